#!/usr/bin/env python3
"""Writes crates/llm/tests/data/spm_bpe.json: a small SentencePiece BPE vocabulary (the
kind TinyLlama and Llama 2 GGUF files carry as tokenizer.ggml.model "llama") and how the
sentencepiece library itself encodes a set of texts with it, so that ferry-llm's SPM
tokenizer is checked against the reference implementation, not against our reading of it.

    python3 -m pip install sentencepiece==0.2.3
    tools/reference/spm_fixture.py            # rewrites the fixture

The vocabulary is trained as llama.cpp expects such files: byte fallback, a dummy prefix
(GGUF's add_space_prefix), no normalization and no whitespace collapsing.
"""
import json
import os
import sys
import tempfile

import sentencepiece as spm

CORPUS = """The quick brown fox jumps over the lazy dog. What is the capital of France?
Paris is the capital of France. Hello world, hello there! Ships sail on the sea; the sea
is wide and deep. Numbers like 12345 and 3.14159 appear too. Émile visited Zürich in
2019 — naïve café. 日本語のテキストも少し。 Ελληνικά γράμματα. Русский текст.
    indented code: fn main() { println!("hi"); }
tabs\tand\nnewlines and  double  spaces.
"""

CASES = [
    "Hello world",
    "hello world",
    "The capital of France is Paris.",
    "What is the capital of France?",
    "  two  spaces",
    "trailing space ",
    " leading space",
    "\n\nnewlines\n",
    "x\ty\tz",
    "Zürich 2019",
    "naïve café — Émile",
    "日本語のテキスト",
    "Ελληνικά",
    "Русский текст",
    "unseen ☃ char and 🚢 ship",
    "12345 3.14159 007",
    "fn main() { println!(\"hi\"); }",
    "a",
    " ",
    "▁ literal block",
    "aaaaaaaaaaaaaaaaaaaaaaaa",
    "thethethe the the",
    "Ships sail on the wide, deep sea.",
]


def main() -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = os.path.join(root, "crates", "llm", "tests", "data", "spm_bpe.json")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            f.write(CORPUS * 20)
        prefix = os.path.join(tmp, "m")
        spm.SentencePieceTrainer.train(
            input=corpus,
            model_prefix=prefix,
            vocab_size=400,
            model_type="bpe",
            byte_fallback=True,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            split_digits=False,
            character_coverage=0.98,
            allow_whitespace_only_pieces=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            minloglevel=2,
        )
        sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    pieces = []
    for i in range(sp.get_piece_size()):
        kind = (
            2 if sp.is_unknown(i)
            else 3 if sp.is_control(i)
            else 5 if sp.is_unused(i)
            else 6 if sp.is_byte(i)
            else 1
        )
        pieces.append({"piece": sp.id_to_piece(i), "score": sp.get_score(i), "type": kind})
    cases = [{"text": t, "ids": sp.encode(t)} for t in CASES]
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"generator": "sentencepiece " + spm.__version__, "unk": 0, "bos": 1,
                   "eos": 2, "pieces": pieces, "cases": cases}, f, ensure_ascii=False, indent=0)
        f.write("\n")
    print(f"wrote {out}: {len(pieces)} pieces, {len(cases)} cases", file=sys.stderr)


if __name__ == "__main__":
    main()
