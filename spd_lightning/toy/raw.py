"""Prompts of the embedded default world's task: fresh ones for data=toy_prompts, or a raw JSONL
file of them for task=prepare.

    python -m spd_lightning.toy.raw --out prompts.jsonl --num 100
    python run.py task=prepare data.raw=prompts.jsonl

Each line is {"question": "Q: 37+45= A:", "answer": "82"}, the shape of GSM8K's files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from spd_lightning.data.prompts import Prompt
from spd_lightning.toy.task import make_example


def toy_prompts(num_prompts: int = 200, seed: int = 1000) -> list[Prompt]:
    """Fresh prompts of the embedded default world's task, with their answers. The default seed
    differs from the one the world's records were built from (toy.spec.seed)."""
    rng = random.Random(seed)
    return [Prompt(i, ex.prompt, ex.answer) for i, ex in enumerate(make_example(rng) for _ in range(num_prompts))]


def write_raw_prompts(out: str | Path, num: int, seed: int = 1000) -> Path:
    """`num` toy prompts drawn with `seed` (seed 0 and the world's num_prompts: its own prompts)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for prompt in toy_prompts(num, seed):
            f.write(json.dumps({"question": prompt.text, "answer": prompt.answer}) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="prompts.jsonl", help="the JSONL file to write")
    parser.add_argument("--num", type=int, default=100, help="how many prompts")
    parser.add_argument("--seed", type=int, default=1000, help="seeds the prompts (the world's records used 0)")
    args = parser.parse_args()
    print(f"wrote {args.num} prompts to {write_raw_prompts(args.out, args.num, args.seed)}")


if __name__ == "__main__":
    main()
