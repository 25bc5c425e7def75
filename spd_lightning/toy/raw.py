"""Write prompts of the embedded default world's task as a raw JSONL file, for task=prepare.

    python -m spd_lightning.toy.raw --out prompts.jsonl --num 100
    python run.py task=prepare data.raw=prompts.jsonl

Each line is {"question": "Q: 37+45= A:", "answer": "82"}, the shape of GSM8K's files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spd_lightning.prompts import toy_prompts


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
