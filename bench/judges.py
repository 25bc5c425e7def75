"""Does the learned judge pay off? RL against supervised labels and training-free rules, on one
set of verified outcomes.

    python bench/judges.py --world toy                  # the embedded default world: about 2 minutes
    python bench/judges.py --pair .cache/pairs/qwen_coder --train data/gsm8k_qwen/records.jsonl \
        --train-records 150 --heldout data/gsm8k_qwen_test/records.jsonl data/gsm8k_qwen_test_b/records.jsonl \
        --out outputs/judges/qwen_coder                 # the real pair: hours on 2 cores, resumable

Stages, each kept in --out so a rerun resumes where the last one stopped:
1. inputs: one pass of the target and of the draft over every record's context + draft gives the
   zero-cost judge's inputs (the target's hidden states at the draft tokens, token features) and
   the rules' features (inputs_train.pt, inputs_heldout.pt);
2. outcomes: every reachable outcome of every record is completed once by the target, with the
   response budget of the target's own response (completions.jsonl, appended batch by batch);
3. the comparison: the judges train on the train records' table (no target call) and every policy
   is scored on the held-out table at all its thresholds.
Prints the policies at parity with standard SD (accuracy at most --tolerance below it, chosen on
the held-out records for every policy alike), writes judges.json, tradeoff.csv and judges.png, and
ends with `rl_accept_len=.. rl_accuracy=.. sup_accept_len=.. sup_accuracy=.. kl_accept_len=..
kl_accuracy=.. sd_accept_len=.. sd_accuracy=..`.
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spd_lightning.core.reward import RewardWeights
from spd_lightning.core.rules import TokenFeatures
from spd_lightning.core.stats import wilson_interval
from spd_lightning.data.answers import extract_final_number, gsm8k_final_number
from spd_lightning.data.records import Record, load_records, split_by_prompt
from spd_lightning.decoding.registry import EVAL_FAMILIES, SPECS
from spd_lightning.judge.compare import (
    JUDGES,
    CompareSettings,
    Split,
    compare,
    parity_by_agreement,
    train_judges,
)
from spd_lightning.judge.fit import FitSettings
from spd_lightning.judge.head import INPUT_GROUPS, JudgeInputs, save_judge
from spd_lightning.judge.inputs import (
    DiskCompletions,
    Greedy,
    block_inputs,
    complete_outcomes,
    prompt_of,
    target_answers,
)
from spd_lightning.models.hf import end_of_sequence_ids, tokenizer_eos_ids
from spd_lightning.models.scorer import ScoringActor
from spd_lightning.reporting.plots import plot_tradeoff
from spd_lightning.toy.build import SHIPPED_WORLD
from spd_lightning.verification.hybrid import HybridVerifier
from spd_lightning.verification.outcomes import OutcomeTable, best_at_parity, verify_outcomes

ROOT = Path(__file__).resolve().parents[1]
# The rules task=eval sweeps that need no trained scorer, then the judges trained here.
RULES = tuple(p for p in EVAL_FAMILIES if not SPECS[p].needs.scorer)
NAMES = {**{p: SPECS[p].short for p in RULES}, **JUDGES}


class _StoredOnly:
    """A target for HybridVerifier that is never asked: every outcome is stored already."""

    num_requests = 0

    def complete(self, prefixes, max_new_tokens=None):
        raise RuntimeError(f"{len(prefixes)} outcomes were not completed in stage 2")


def whole_prompts(records: list[Record], at_least: int) -> list[Record]:
    """The records of the first prompts (file order) that together hold at least `at_least`."""
    seen: list[tuple[int, ...]] = []
    out = []
    for r in records:
        prompt = prompt_of(r)
        if prompt not in seen:
            if len(out) >= at_least:
                break
            seen.append(prompt)
        out.append(r)
    return out


def load_world(args):
    """(target, draft, tokenizer, train records, held-out records, response budget)."""
    if args.world == "toy":
        target_dir, draft_dir = SHIPPED_WORLD / "target", SHIPPED_WORLD / "draft"
        train, heldout = split_by_prompt(load_records(SHIPPED_WORLD / "records.jsonl"), 0.1, args.seed)
        budget = 16
    else:
        target_dir, draft_dir = Path(args.pair) / "target", Path(args.pair) / "draft"
        train = whole_prompts([r for f in args.train for r in load_records(f)], args.train_records)
        heldout = [r for f in args.heldout for r in load_records(f)]
        budget = args.max_response
    dtype = getattr(torch, args.dtype)
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()  # noqa: E731
    return load(target_dir), load(draft_dir), AutoTokenizer.from_pretrained(target_dir), train, heldout, budget


def stage_inputs(out: Path, name: str, target, draft, records: list[Record], pad_id: int, batch: int):
    path = out / f"inputs_{name}.pt"
    if path.is_file():
        saved = torch.load(path)
        if saved["records"] == len(records):
            return JudgeInputs(**saved["inputs"]), TokenFeatures(**saved["rules"])
    inputs, rules = block_inputs(target, draft, records, pad_id, batch)
    torch.save({"records": len(records), "inputs": vars(inputs), "rules": vars(rules)}, path)
    return inputs, rules


def tables(records: list[Record], store: DiskCompletions, tokenizer, mismatch) -> tuple[OutcomeTable, OutcomeTable]:
    """(verdicts against each record's reference, verdicts against the target's own answer);
    records whose target response holds no answer are unverified in the second."""
    verifier = HybridVerifier(_StoredOnly(), tokenizer, gsm8k_final_number)
    verifier.cache = store
    table, _ = verify_outcomes(verifier, records, mismatch)
    answers = target_answers(
        records, store, lambda ids: tokenizer.decode(ids, skip_special_tokens=True), extract_final_number
    )
    own = [replace(r, reference=a or "") for r, a in zip(records, answers)]
    self_table, _ = verify_outcomes(verifier, own, mismatch)
    self_table.verified &= torch.tensor([a is not None for a in answers])
    return table, self_table


def build_splits(args, out: Path):
    target, draft, tokenizer, train, heldout, budget = load_world(args)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    print(f"records: {len(train)} train, {len(heldout)} held-out; response budget {budget} tokens", flush=True)
    inputs = {
        name: stage_inputs(out, name, target, draft, recs, pad_id, args.batch)
        for name, recs in (("train", train), ("heldout", heldout))
    }
    store = DiskCompletions(out / "completions.jsonl")
    eos = end_of_sequence_ids(target) | tokenizer_eos_ids(tokenizer)
    complete_outcomes(Greedy(target, pad_id, eos, args.batch), train + heldout, store, budget)
    splits = {}
    for name, recs in (("train", train), ("heldout", heldout)):
        judge_inputs, rules = inputs[name]
        table, self_table = tables(recs, store, tokenizer, judge_inputs.mismatch)
        splits[name] = Split(judge_inputs, rules, table, self_table, torch.tensor([r.target_ids for r in recs]))
    scorer = ScoringActor(draft.get_decoder())
    return splits, scorer


def print_table(rows: list[dict], parity: dict, n: int, tolerance: float, measure: str = "accuracy") -> None:
    print(f"\nHeld-out: {n} records; each policy at its longest blocks with {measure} >= standard SD's - {tolerance}")
    header = (
        f"{'policy':48s} {'param':>8s} {'accuracy':>8s} {'95% CI':>13s} {'agree':>6s} {'accept_len':>10s} {'vs SD':>6s}"
    )
    print(header + "\n" + "-" * len(header))
    for policy in (*RULES, *JUDGES):
        row = parity.get(policy) if policy != "accept_all" else next(r for r in rows if r["policy"] == policy)
        if row is None:
            print(f"{NAMES[policy]:48s} {'(none at parity)':>8s}")
            continue
        low, high = wilson_interval(round(row["accuracy"] * n), n)
        param = "" if row["parameter"] is None else f"{row['parameter']:.3g}"
        ratio = "-" if row["accept_len_ratio"] is None else f"{row['accept_len_ratio']:.2f}x"
        figures = f"{row['accuracy']:8.3f} {low:6.3f}-{high:.3f} {row['agreement']:6.3f} {row['accept_len']:10.3f}"
        print(f"{NAMES[policy]:48s} {param:>8s} {figures} {ratio:>6s}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", choices=["toy", "pair"], default=None, help="toy: the embedded default world")
    parser.add_argument("--pair", help="a pair directory with draft/, target/ (python -m spd_lightning.models.pairs)")
    parser.add_argument("--train", nargs="+", default=[], help="records.jsonl file(s) the judges train on")
    parser.add_argument("--train-records", type=int, default=150, help="records of the first prompts, whole prompts")
    parser.add_argument("--heldout", nargs="+", default=[], help="records.jsonl file(s) of held-out prompts")
    parser.add_argument(
        "--max-response", type=int, default=320, help="the target's response budget (prepare.max_new_tokens)"
    )
    parser.add_argument("--out", default=None, help="where every stage is kept (default outputs/judges/<world>)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="both models' (as prepare's records)"
    )
    parser.add_argument("--batch", type=int, default=32, help="rows per model pass")
    parser.add_argument(
        "--labels", choices=["target", "reference"], default="target", help="the verdicts judges train on"
    )
    parser.add_argument(
        "--inputs",
        nargs="+",
        default=["tokens", "target_hidden"],
        choices=list(INPUT_GROUPS),
        help="what the zero-cost judge reads",
    )
    parser.add_argument("--hidden", type=int, default=0, help="the judge's hidden layer width (0: linear)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument(
        "--scorer-lr", type=float, default=None, help="today's scorer head (default: 3e-3 toy, 3e-4 pair)"
    )
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.world = args.world or ("pair" if args.pair else "toy")
    if args.world == "pair" and not (args.pair and args.train and args.heldout):
        parser.error("--pair needs --train and --heldout record files")
    return args


def save_judges(out: Path, heads: dict, parity: dict, measure: str) -> None:
    """Each judge at its threshold at parity in `measure` (for task=decode decode.judge_path=...
    and the generation API), with the KL rule's tau at parity on the same records in its notes."""
    kl = parity.get("kl_below")
    notes = {"parity_measure": measure, **({"kl_threshold": kl["parameter"]} if kl else {})}
    for name, head in heads.items():
        save_judge(head, out / f"{name}.pt", parity.get(name, {"parameter": 1.0})["parameter"], notes)


def write_outputs(out: Path, rows: list[dict], parity: dict, args, n: int, title: str) -> None:
    """tradeoff.csv (every policy point), judges.json and judges.png (every curve)."""
    with (out / "tradeoff.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {"heldout_records": n, "parity": parity, "args": vars(args)}
    (out / "judges.json").write_text(json.dumps(summary, indent=2) + "\n")
    labels = {**{p: SPECS[p].label for p in EVAL_FAMILIES}, **JUDGES}
    png = plot_tradeoff(rows, labels, None, out / "judges.png", title)
    fidelity = plot_tradeoff(rows, labels, None, out / "judges_agreement.png", title, "agreement")
    print(f"all {len(rows)} policy points: {out / 'tradeoff.csv'}; curves: {png}, {fidelity}")


def last_line(parity: dict) -> str:
    pick = {"rl": "judge_grpo", "sup": "judge_sup", "kl": "kl_below", "sd": "standard_sd"}
    last = []
    for short, policy in pick.items():
        row = parity.get(policy, {"accept_len": float("nan"), "accuracy": float("nan")})
        last.append(f"{short}_accept_len={row['accept_len']:.3f} {short}_accuracy={row['accuracy']:.3f}")
    return " ".join(last)


def main() -> None:
    args = parse_args()
    out = Path(args.out or ROOT / "outputs" / "judges" / args.world)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    splits, scorer = build_splits(args, out)
    fit = FitSettings(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed)
    scorer_lr = args.scorer_lr or (3e-3 if args.world == "toy" else 3e-4)
    settings = CompareSettings(args.labels, tuple(args.inputs), args.hidden, fit, scorer_lr, tolerance=args.tolerance)
    judges, heads = train_judges(splits["train"], settings, RewardWeights(), scorer)
    rows = compare(splits["heldout"], judges, settings)
    parity = best_at_parity(rows, args.tolerance)
    n = int(splits["heldout"].table.verified.sum())
    agreement = parity_by_agreement(rows, args.tolerance)
    print_table(rows, agreement, n, args.tolerance, "agreement with the target")
    print_table(rows, parity, n, args.tolerance)
    title = f"{args.world}: {n} held-out records, judges trained on {len(splits['train'].mismatch)}"
    write_outputs(out, rows, parity, args, n, title)
    # Judges trained on agreement with the target run at their point at parity in agreement.
    if args.labels == "target":
        save_judges(out, heads, agreement, "agreement")
    else:
        save_judges(out, heads, parity, "accuracy")
    print(last_line(parity))


if __name__ == "__main__":
    main()
