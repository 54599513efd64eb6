#!/usr/bin/env python3
"""Writes crates/llm/tests/data/llama3_pre.json: texts and how Llama 3's pre-tokenizer
regex (GGUF tokenizer.ggml.pre "llama-bpe", as llama.cpp gives it) splits them, computed
with the `regex` module, so that ferry-llm's hand-written scanner is checked against a
regex engine.

    python3 -m pip install regex
    tools/reference/pretokenizer_fixture.py    # rewrites the fixture

The texts: hand-picked ones, then random strings (a fixed seed) over characters of every
class the pattern tells apart. No U+001C-U+001F: Python's `re` counts them as \\s, the
Unicode White_Space property that llama.cpp's tables use does not (nor does `regex`).
"""
import json
import os
import random
import sys

import regex

LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

HAND = [
    "",
    "Hello world",
    "What is the capital of France?",
    "I'm sure they'll say it's fine, DON'T YOU'RE WE'VE I'D",
    "'hello 'Sup '",
    "x'Sup y'LLama z'REd q'sx w'Ve",
    "12345 678 9",
    "(parenthesis) [brackets] {braces}!!",
    "tabs\tand\tmore\t\tx",
    "line\nbreaks\r\nhere\n\n\nend",
    "  two  spaces   three",
    "trailing   ",
    " \n \t\n x",
    "...\n\nnext",
    "naïve café Zürich — Émile",
    "日本語のテキスト 123",
    "Ελληνικά ½ ٣٤٥",
    "emoji 🚢🚢 ship",
    "snake_case and kebab-case",
    "a\u3000b\u00a0c\u2003d",
]

ALPHABET = [
    "a", "b", "Z", "é", "ж", "日", "ǅ",  # letters (Ll, Lu, Lo, Lt)
    "1", "7", "٣", "½", "Ⅻ",  # numbers (Nd, No, Nl)
    " ", " ", " ", "\t", "\n", "\r", "\u3000", "\u00a0", "\u2003",  # whitespace
    "\x0b", "\x0c", "\x85", "\u2028", "\u2029",  # more whitespace
    "\u0301", "\u200b",  # a combining mark, a zero-width space (neither \s nor L nor N)
    "'", "s", "t", "r", "e", "v", "m", "l", "d", "S", "L", "E",  # contractions
    ".", ",", "(", "!", "-", "_", "😀", "—",  # others
]


def main() -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = os.path.join(root, "crates", "llm", "tests", "data", "llama3_pre.json")
    rng = random.Random(20261204)
    texts = HAND + [
        "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 24))) for _ in range(600)
    ]
    pattern = regex.compile(LLAMA3)
    cases = []
    for t in texts:
        pieces = [m.group(0) for m in pattern.finditer(t)]
        assert "".join(pieces) == t, f"the pattern does not cover {t!r}"
        cases.append({"text": t, "pieces": pieces})
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"generator": "regex " + regex.__version__, "pattern": LLAMA3,
                   "cases": cases}, f, ensure_ascii=False, indent=0)
        f.write("\n")
    print(f"wrote {out}: {len(cases)} cases", file=sys.stderr)


if __name__ == "__main__":
    main()
