"""Does the learned judge pay off? RL against supervised labels and training-free rules, on one
set of verified outcomes. The measuring happens in task=judge (spd_lightning/tasks/judge.py),
which also trains the judges that task=decode and the generation API load; this script runs it
with command-line flags and keeps each world's stages under --out, so a rerun resumes.

    python bench/judges.py --world toy                  # the embedded default world: about 2 minutes
    python bench/judges.py --pair .cache/pairs/qwen_coder --train data/gsm8k_qwen/records.jsonl \
        --train-records 150 --heldout data/gsm8k_qwen_test/records.jsonl data/gsm8k_qwen_test_b/records.jsonl \
        --out outputs/judges/qwen_coder                 # the real pair: hours on 2 cores, resumable

Prints the policies at parity with standard SD (in agreement with the target's own answer, then
in accuracy, at most --tolerance below it, chosen on the held-out records for every policy alike),
writes judges.json, judges.md, tradeoff.csv and judges.png, saves judge_*.pt, and ends with
`rl_accept_len=.. rl_accuracy=.. sup_accept_len=.. sup_accuracy=.. kl_accept_len=.. kl_accuracy=..
sd_accept_len=.. sd_accuracy=..`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from spd_lightning.decoding.setup import PairSettings
from spd_lightning.judge.head import INPUT_GROUPS
from spd_lightning.models.pairs import require_built
from spd_lightning.tasks.judge import JudgeConfig, train_and_compare
from spd_lightning.toy.build import SHIPPED_WORLD

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", choices=["toy", "pair"], default=None, help="toy: the embedded default world")
    parser.add_argument("--pair", help="a pair directory with draft/, target/ (python -m spd_lightning.models.pairs)")
    parser.add_argument("--train", nargs="+", default=[], help="records.jsonl file(s) the judges train on")
    parser.add_argument("--train-records", type=int, default=150, help="records of the first prompts, whole prompts")
    parser.add_argument("--heldout", nargs="+", default=[], help="records.jsonl file(s) of held-out prompts")
    parser.add_argument("--max-response", type=int, default=320, help="the target's response budget (pair)")
    parser.add_argument("--out", default=None, help="where every stage is kept (default outputs/judges/<world>)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both models'")
    parser.add_argument("--batch", type=int, default=32, help="rows per model pass")
    parser.add_argument("--labels", choices=["target", "reference"], default="target", help="what judges train on")
    parser.add_argument("--inputs", nargs="+", default=["tokens", "target_hidden"], choices=list(INPUT_GROUPS))
    parser.add_argument("--hidden", type=int, default=0, help="the judge's hidden layer width (0: linear)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--scorer-lr", type=float, default=None, help="ScoringActor head (3e-3 toy, 3e-4 pair)")
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.world = args.world or ("pair" if args.pair else "toy")
    if args.world == "pair" and not (args.pair and args.train and args.heldout):
        parser.error("--pair needs --train and --heldout record files")
    return args


def main() -> None:
    args = parse_args()
    toy = args.world == "toy"
    pair = SHIPPED_WORLD if toy else Path(args.pair)
    if not toy:
        require_built("--pair", pair / "draft", pair / "target")
    settings = JudgeConfig(
        train=[str(SHIPPED_WORLD / "records.jsonl")] if toy else args.train,
        train_records=None if toy else args.train_records,
        heldout=[] if toy else args.heldout,
        max_response=16 if toy else args.max_response,  # the toy world's responses are 16 tokens at most
        dtype=args.dtype,
        batch=args.batch,
        labels=args.labels,
        inputs=list(args.inputs),
        hidden=args.hidden,
        steps=args.steps,
        lr=args.lr,
        weight_decay=args.weight_decay,
        scorer_lr=args.scorer_lr or (3e-3 if toy else 3e-4),
        tolerance=args.tolerance,
    )
    source = PairSettings(
        str(pair / "draft"), str(pair / "target"), args.dtype, "cpu", False, draft_key="--pair", target_key="--pair"
    )
    out = Path(args.out or ROOT / "outputs" / "judges" / args.world)
    train_and_compare(settings, source, out, args.world, args.seed)


if __name__ == "__main__":
    main()
