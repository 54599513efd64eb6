#!/usr/bin/env python3
"""Writes crates/llm/tests/data/llama3_pre.json and default_pre.json: texts and how
Llama 3's pre-tokenizer regex (GGUF tokenizer.ggml.pre "llama-bpe", as llama.cpp gives
it), and llama.cpp's default pre-tokenizer ("default", or no tokenizer.ggml.pre), split
them, computed with the `regex` module, so that ferry-llm's hand-written scanners are
checked against a regex engine.

llama.cpp's default is four patterns, each splitting every piece the one before made,
the text between its matches kept as pieces too (llama.cpp's unicode_regex_split).

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

# llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT (the second is GPT-2's, which llama.cpp runs
# with its own scanner: with the final \s+ its regex form leaves unmatched, a piece
# either way).
DEFAULT = [
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
]


def split_all(text, patterns):
    """llama.cpp's unicode_regex_split: each pattern splits each piece into its matches
    and the text between them."""
    pieces = [text] if text else []
    for pattern in patterns:
        out = []
        for piece in pieces:
            start = 0
            for m in pattern.finditer(piece):
                if m.start() > start:
                    out.append(piece[start:m.start()])
                out.append(m.group(0))
                start = m.end()
            if start < len(piece):
                out.append(piece[start:])
        pieces = out
    return pieces


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
    "$", "+", "<", "=", "^", "~", "|", "`", "«", "¿", "€",  # symbols and punctuation
    "0", "2", "3", "4", "5", "6", "8", "9",  # more ASCII digits (threes)
]

# Added to the hand-picked texts for the default pre-tokenizer only (the Llama 3 fixture
# keeps its texts).
DEFAULT_HAND = [
    "1234567 89 12a345",
    "price: $1,000,000.99 <= 5^2 ~ x|y",
    "«quoted» ¿qué? ... --- !!",
    "(hello) [world] {x}",
    "x+=1; y<<=2",
]


def write(path, generator, pattern, cases):
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"generator": generator, "pattern": pattern, "cases": cases},
                  f, ensure_ascii=False, indent=0)
        f.write("\n")
    print(f"wrote {path}: {len(cases)} cases", file=sys.stderr)


def main() -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    data = os.path.join(root, "crates", "llm", "tests", "data")
    rng = random.Random(20261204)
    # The Llama 3 texts draw from the alphabet as it was when that fixture was made.
    first = ALPHABET[: ALPHABET.index("$")]
    texts = HAND + [
        "".join(rng.choice(first) for _ in range(rng.randint(1, 24))) for _ in range(600)
    ]
    generator = "regex " + regex.__version__
    pattern = regex.compile(LLAMA3)
    cases = []
    for t in texts:
        pieces = [m.group(0) for m in pattern.finditer(t)]
        assert "".join(pieces) == t, f"the pattern does not cover {t!r}"
        cases.append({"text": t, "pieces": pieces})
    write(os.path.join(data, "llama3_pre.json"), generator, LLAMA3, cases)

    rng = random.Random(20261205)
    texts = HAND + DEFAULT_HAND + [
        "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 24))) for _ in range(600)
    ]
    patterns = [regex.compile(p) for p in DEFAULT]
    cases = []
    for t in texts:
        pieces = split_all(t, patterns)
        assert "".join(pieces) == t and all(pieces), f"lost text of {t!r}"
        cases.append({"text": t, "pieces": pieces})
    write(os.path.join(data, "default_pre.json"), generator, " then ".join(DEFAULT), cases)


if __name__ == "__main__":
    main()
