"""A text-classification set with a known rule, made offline (issue 13 §2 evidence).

Each text is 4–9 filler words from a fixed list with one sentiment word (`good` or `bad`) at a random place,
preceded by `not` in a quarter of the texts (`negated_share`). The label is the rule
    positive  ⇔  (the sentiment word is `good`) XOR (it is preceded by `not`),
so the sentiment word alone gives about 75%, and the rest needs relating `not` to the word after it (a byte
bag cannot). 3% of labels are flipped (fixed seed), so the best accuracy is about 97%.

    .venv/bin/python bench/make_text_rule.py OUT.csv [--n 3000] [--seed 0] [--jsonl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

FILLER = [
    *("the", "film", "was", "a", "movie", "and", "plot", "it", "story", "actor", "very", "quite"),
    *("really", "this", "that", "show", "seemed", "felt", "rather", "truly", "scene", "ending", "music", "cast"),
]
NOISE = 0.03
NEGATED = 0.25


def make_rows(n: int, seed: int = 0, negated_share: float = NEGATED) -> list[tuple[str, str]]:
    """(text, label) pairs following the rule in the module docstring."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        words = list(rng.choice(FILLER, int(rng.integers(4, 10))))
        good, negated = bool(rng.integers(2)), bool(rng.random() < negated_share)
        at = int(rng.integers(0, len(words) + 1))
        words[at:at] = (["not"] if negated else []) + ["good" if good else "bad"]
        positive = good != negated
        if rng.random() < NOISE:
            positive = not positive
        rows.append((" ".join(words), "pos" if positive else "neg"))
    return rows


def write(path: Path, rows: list[tuple[str, str]], jsonl: bool) -> None:
    if jsonl:
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    else:  # texts hold no commas or quotes
        path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jsonl", action="store_true", help="write JSON lines instead of CSV")
    args = parser.parse_args()
    write(args.out, make_rows(args.n, args.seed), args.jsonl)


if __name__ == "__main__":
    main()
