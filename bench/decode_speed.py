"""Wall-clock tokens per second of (lossy) speculative decoding on a real pair, against the tools
users already have, on the same models and prompts at batch size 1.

    python bench/decode_speed.py                 # qwen_coder pair, 5 held-out GSM8K prompts, 128 new tokens
    python bench/decode_speed.py --prompts 8 --judge judges/qwen_coder_grpo.pt --kl-threshold 0.2
    python bench/decode_speed.py --methods hf_assisted greedy standard_sd judge   # a subset

Methods, one after another, each warmed up on one short generation first:
- HF greedy: target.generate(do_sample=False), KV cache;
- HF assisted: target.generate(assistant_model=draft, do_sample=False), transformers' assisted
  generation with its defaults (up to 20 draft tokens per round, the draft stops early below
  confidence 0.4): standard, lossless speculative decoding as users run it today;
- HF assisted, packed: the same, on the models with their linear layers packed for oneDNN as
  ours are (spd_lightning.models.packed): the comparison on equal kernels;
- ours (spd_lightning.decoding.speculative.SpeculativeDecoder, KV caches, K draft tokens per block):
  every decoding policy of the registry that needs no training checkpoint (greedy, standard SD,
  accept-all, the KL rule, the zero-cost judge); the KL rule runs when --kl-threshold is given or
  the judge's file carries a tau, and is skipped with a note otherwise.
The pair is loaded as task=decode and the generation API load it (decoding.setup).
Both models' generation_config.json is replaced by a neutral one, so generate() is plain greedy.
The HF rows run on the models as loaded; then (unless --no-pack) both models' linear layers are
packed for oneDNN, and the rest run on the packed models.
Prompts are GSM8K test questions through the chat template, after the first --skip (the ones the
judge's threshold was chosen on). Target calls are counted with a forward hook, for HF as for
ours. The ideal speed-up of a speculative method over greedy is (tokens per target call) /
(1 + K c), c the draft's seconds per pass over the target's (both measured here); the measured
speed-up over our greedy divided by it is the loop's efficiency. It counts a verification pass
over K+1 tokens as one single-token pass; the JSON also holds v, a verification pass's measured
seconds over a greedy pass's, and the efficiency against (tokens per target call) / (v + K c),
which leaves only the loop's own overhead.

Accuracy at 128 new tokens says little (a GSM8K solution runs longer); accuracy on more problems
comes from task=decode. With --accuracy-from DECODE_JSON (task=decode's decode.json) nothing is
decoded: the tokens/s of --out's decode_speed.json are paired with that run's accuracy and drawn
to decode_speed_accuracy.png. Lossless methods that run did not decode (HF greedy and assisted,
our greedy) take its greedy's accuracy, or standard SD's, and say so in their label.

Writes decode_speed.json and decode_speed.png (tokens/s against accuracy) to --out; the last line is
    hf_greedy_tps=.. hf_assisted_tps=.. sd_tps=.. judge_tps=.. judge_accuracy=.. sd_accuracy=..
followed by hf_assisted_packed_tps=.. and the judge's efficiency.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

from spd_lightning.core.stats import wilson_interval
from spd_lightning.data.answers import gsm8k_final_number
from spd_lightning.data.prompts import PromptList, encode_prompts
from spd_lightning.decoding.policies import PolicySettings
from spd_lightning.decoding.registry import DECODE_POLICIES, LOSSLESS, SPECS
from spd_lightning.decoding.setup import DecodingSetup, PairSettings, build_decoding
from spd_lightning.decoding.speculative import SpeculativeDecoder
from spd_lightning.judge.head import judge_notes
from spd_lightning.models.hf import tokenizer_eos_ids
from spd_lightning.models.packed import pack_linears
from spd_lightning.models.pairs import pair_dir, require_built
from spd_lightning.reporting.plots import plot_speed
from spd_lightning.reporting.tables import FigureTable, print_tables, write_markdown
from spd_lightning.tasks.speed import CallCounter, hf_generate

ROOT = Path(__file__).resolve().parents[1]
BASES = ("hf_greedy", "hf_assisted", "hf_assisted_packed")  # the anchors every method is divided by
# Our methods: every decoding policy that needs no training checkpoint.
OURS = {name: f"ours: {SPECS[name].short}" for name in DECODE_POLICIES if not SPECS[name].needs.scorer}
NAMES = {"hf_greedy": "HF greedy", "hf_assisted": "HF assisted",
         "hf_assisted_packed": "HF assisted, packed", **OURS}  # fmt: skip


def run_hf(target, draft, prompts, args, eos, pad, counter) -> dict:
    name = "HF assisted" if draft is not None else "HF greedy"
    hf_generate(target, [prompts[0][:16]], 8, pad, eos, draft)  # warm-up
    rows, seconds, calls = [], 0.0, counter.calls
    for prompt in prompts:
        start = time.perf_counter()
        rows.extend(hf_generate(target, [prompt], args.max_new_tokens, pad, eos, draft))
        seconds += time.perf_counter() - start
        print(f"  {name}: {len(rows[-1])} tokens, {seconds:.1f} s so far", flush=True)
    return {"rows": rows, "seconds": seconds, "target_calls": counter.calls - calls}


def run_ours(decoder: SpeculativeDecoder, prompts, args, counter) -> dict:
    decoder.generate_ids([prompts[0][:16]], 8)  # warm-up
    rows, seconds, calls, clock = [], 0.0, counter.calls, {"draft_s": 0.0, "target_s": 0.0, "policy_s": 0.0}
    kept = draft_passes = 0
    for prompt in prompts:
        out = decoder.generate_ids([prompt], args.max_new_tokens)
        rows.append(out.generations[0].response_ids)
        seconds += out.seconds
        kept += out.generations[0].accepted_draft_tokens
        draft_passes += out.clock.draft_passes
        for key in clock:
            clock[key] += getattr(out.clock, key)
        print(f"  {len(rows[-1])} tokens, {seconds:.1f} s so far", flush=True)
    return {"rows": rows, "seconds": seconds, "target_calls": counter.calls - calls, "kept": kept,
            "draft_passes": draft_passes, **clock}  # fmt: skip


def figures(run: dict, correct: list[bool]) -> dict:
    tokens = sum(map(len, run["rows"]))
    low, high = wilson_interval(sum(correct), len(correct))
    return {
        "accuracy": sum(correct) / len(correct),
        "ci_low": low,
        "ci_high": high,
        "correct": sum(correct),
        "tokens": tokens,
        "tokens_per_s": tokens / run["seconds"],
        "target_calls_per_token": run["target_calls"] / tokens,
    }


def ideal_and_efficiency(results: dict, k: int) -> None:
    """Adds c, the ideal speed-up over our greedy and the efficiency to every speculative method of ours."""
    greedy = results["greedy"]
    target_pass_s = greedy["target_s"] / greedy["target_calls"]
    for name in (m for m in OURS if SPECS[m].needs.drafts):
        if name not in results:
            continue
        r = results[name]
        r["draft_cost"] = r["draft_s"] / r["draft_passes"] / target_pass_s
        r["ideal_speedup"] = (1 / r["target_calls_per_token"]) / (1 + k * r["draft_cost"])
        r["speedup_vs_greedy"] = r["tokens_per_s"] / greedy["tokens_per_s"]
        r["efficiency"] = r["speedup_vs_greedy"] / r["ideal_speedup"]
        r["verify_cost"] = r["target_s"] / r["target_calls"] / target_pass_s
        r["ideal_speedup_measured_v"] = (1 / r["target_calls_per_token"]) / (r["verify_cost"] + k * r["draft_cost"])
        r["loop_efficiency"] = r["speedup_vs_greedy"] / r["ideal_speedup_measured_v"]
        r["kept_per_block"] = r["kept"] / r["target_calls"]


def tables(results: dict, n: int) -> tuple[list[FigureTable], tuple[str, ...]]:
    """(what each method wrote and cost; its speed against every anchor), and their legend."""
    base = {key: results[key]["tokens_per_s"] for key in (*BASES, "standard_sd") if key in results}
    title = f"{n} prompts, batch size 1"
    speed = FigureTable(f"{title}: speed", ["method", "acc.", "calls/tok", "kept/blk", "tok/s", "same"])
    ratios = FigureTable(f"{title}: ratios", ["method", "xHFgr", "xHFas", "xHFpk", "xSD", "ideal", "effic."])
    for key, name in NAMES.items():
        if key not in results:
            continue
        r = results[key]
        kept = f"{r['kept_per_block']:.2f}" if "kept_per_block" in r else "-"
        speed.add(name, f"{r['correct']}/{n}", f"{r['target_calls_per_token']:.3f}", kept, f"{r['tokens_per_s']:.2f}",
                  r.get("same", "-"))  # fmt: skip
        over = [f"{r['tokens_per_s'] / base[b]:.2f}" if b in base else "-" for b in (*BASES, "standard_sd")]
        ideal = [f"{r['ideal_speedup']:.2f}", f"{r['efficiency']:.2f}"] if "ideal_speedup" in r else ["-", "-"]
        ratios.add(name, *over, *ideal)
    legend = (
        "acc.: answers right; calls/tok: target forward passes per generated token (the prefill included); "
        "kept/blk: draft tokens kept per block; same: prompts whose tokens equal greedy's (ours against ours, "
        "HF assisted against HF greedy); xHFgr, xHFas, xHFpk, xSD: tokens/s over HF greedy, HF assisted, HF "
        "assisted on the packed models, our standard SD; ideal: (tokens per target call) / (1 + K c); effic.: "
        "the measured speed-up over our greedy / ideal",
    )
    return [speed, ratios], legend


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default=str(pair_dir("qwen_coder", ROOT)))
    parser.add_argument("--gsm8k", default=str(ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"))
    parser.add_argument("--skip", type=int, default=8, help="test questions the judge's threshold was chosen on")
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=4, help="K, our draft tokens per block")
    parser.add_argument("--judge", default=str(ROOT / "judges" / "qwen_coder_grpo.pt"))
    parser.add_argument("--judge-threshold", type=float, default=None, help="default: the one saved with it")
    parser.add_argument("--kl-threshold", type=float, default=None, help="default: from --judge's metadata")
    parser.add_argument("--methods", nargs="+", choices=[*BASES, *OURS], default=None, help="default: all")
    parser.add_argument("--no-pack", dest="pack", action="store_false", help="our methods on the models as loaded")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=str(ROOT / "outputs" / "decode_speed"))
    parser.add_argument("--accuracy-from", default=None, help="task=decode's decode.json: plot only (above)")
    return parser.parse_args()


def load_setup(args) -> DecodingSetup:
    """Both models unpacked (the HF rows run first, on the models as loaded) with our policies;
    generate() made plain greedy on both."""
    pair = Path(args.pair)
    require_built("--pair", pair / "draft", pair / "target")
    ours = [m for m in args.methods if m in OURS]
    settings = PolicySettings(kl_threshold=args.kl_threshold, judge_threshold=args.judge_threshold)
    judge = args.judge if "judge" in ours or "kl_below" in ours else None
    source = PairSettings(
        str(pair / "draft"), str(pair / "target"), args.dtype, "cpu", False, draft_key="--pair", target_key="--pair"
    )
    setup = build_decoding(source, ours or ["greedy"], settings, judge, keys=("--methods", "--judge"))
    # generate() merges the model's generation_config.json into any config it is given: Qwen's
    # repetition penalty and sampling defaults would make it something other than greedy.
    for model in (setup.draft, setup.target):
        model.generation_config = GenerationConfig(eos_token_id=sorted(setup.eos_ids), pad_token_id=setup.pad_id)
    return setup


def resolve_methods(args) -> None:
    """--kl-threshold from the judge's notes when not given; without any, the default methods
    leave the KL rule out (with a note) and an explicit kl_below stops."""
    if args.kl_threshold is None and Path(args.judge).is_file():
        args.kl_threshold = judge_notes(args.judge).get("kl_threshold")
    if args.methods is None:
        args.methods = [*BASES, *OURS]
        if args.kl_threshold is None:
            args.methods.remove("kl_below")
            print(f"kl_below skipped: {args.judge} carries no KL tau (pass --kl-threshold TAU to run it)")
    elif "kl_below" in args.methods and args.kl_threshold is None:
        raise SystemExit(f"error: {args.judge} carries no KL tau: pass --kl-threshold TAU")


def plot_with_accuracy(args) -> None:
    """--out's tokens/s against the accuracy of a task=decode run on more problems."""
    bench = json.loads((Path(args.out) / "decode_speed.json").read_text())
    speed, run = bench["results"], bench["args"]
    summary = json.loads(Path(args.accuracy_from).read_text())
    stand_in = next((m for m in ("greedy", "standard_sd") if f"{m}/accuracy" in summary), None)
    rows = []
    for method, name in NAMES.items():
        lossless = method in BASES or method in LOSSLESS
        source = method if f"{method}/accuracy" in summary else (stand_in if lossless else None)
        if method not in speed or source is None:
            continue
        keys = ("accuracy", "accuracy_ci95_low", "accuracy_ci95_high")
        accuracy, low, high = (summary[f"{source}/{k}"] for k in keys)
        label = name if source == method else f"{name} (accuracy: {SPECS[source].short}'s, lossless)"
        rows.append({"name": label, "tokens_per_s": speed[method]["tokens_per_s"], "accuracy": accuracy,
                     "ci_low": low, "ci_high": high})  # fmt: skip
        print(f"{label:60s} {speed[method]['tokens_per_s']:6.2f} tok/s  accuracy {accuracy:.3f} ({low:.3f}-{high:.3f})")
    n = int(summary["num_prompts"])
    title = (f"tokens/s: {run['prompts']} prompts x {run['max_new_tokens']} tokens; "
             f"accuracy: {n} problems (task=decode)")  # fmt: skip
    print(f"plot: {plot_speed(rows, Path(args.out) / 'decode_speed_accuracy.png', title)}")


def main() -> None:
    args = parse_args()
    if args.accuracy_from:
        return plot_with_accuracy(args)
    resolve_methods(args)
    setup = load_setup(args)
    draft, target, tokenizer, settings = setup.draft, setup.target, setup.tokenizer, setup.settings
    questions = PromptList.from_jsonl(args.gsm8k, limit=args.prompts, chat_template=True, skip=args.skip)
    prompts = encode_prompts(tokenizer, questions)
    print(f"{args.pair}: {len(prompts)} GSM8K test prompts (lines {questions[0].index}-{questions[-1].index}), "
          f"{args.max_new_tokens} new tokens at most, K={args.block_size}, {args.dtype}, "
          f"{torch.get_num_threads()} threads; judge threshold {settings.judge_threshold}, "
          f"KL tau {settings.kl_threshold}", flush=True)  # fmt: skip
    counter = CallCounter(target)
    runs = {}
    for method in run_order(args):
        if method == "pack":
            print(f"packing linear layers for oneDNN: {pack_linears(draft)} in the draft, "
                  f"{pack_linears(target)} in the target", flush=True)  # fmt: skip
            continue
        print(f"{method} ...", flush=True)
        if method.startswith("hf_"):
            helper = draft if method.startswith("hf_assisted") else None
            runs[method] = run_hf(target, helper, prompts, args, setup.eos_ids, setup.pad_id, counter)
        else:
            decoder = SpeculativeDecoder(draft, target, tokenizer, setup.policies[method], args.block_size)
            runs[method] = run_ours(decoder, prompts, args, counter)
    report(runs, questions, tokenizer, args)


def run_order(args) -> list[str]:
    """The methods on the models as loaded, then "pack" (unless --no-pack), then the rest."""
    packed = [m for m in args.methods if m.endswith("_packed") or not m.startswith("hf_")]
    if not args.pack:
        return [m for m in args.methods if not m.endswith("_packed")]
    return [m for m in args.methods if m not in packed] + ["pack"] + packed


def report(runs: dict, questions, tokenizer, args) -> None:
    results, ends = {}, tokenizer_eos_ids(tokenizer)
    for method, run in runs.items():
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in run["rows"]]
        correct = [gsm8k_final_number(t, q.answer) for t, q in zip(texts, questions)]
        results[method] = {**figures(run, correct), **{k: v for k, v in run.items() if k != "rows"}}
        results[method]["finished"] = sum(bool(r) and r[-1] in ends for r in run["rows"])
    hf_pairs = (("hf_assisted", "hf_greedy"), ("hf_assisted_packed", "hf_greedy"))
    for method, reference in (*hf_pairs, *((m, "greedy") for m in OURS if m != "greedy")):
        if method in runs and reference in runs:
            same = sum(a == b for a, b in zip(runs[method]["rows"], runs[reference]["rows"]))
            results[method]["same"] = f"{same}/{len(questions)}"
    if "greedy" in runs and "hf_greedy" in runs:
        same = sum(a == b for a, b in zip(runs["greedy"]["rows"], runs["hf_greedy"]["rows"]))
        results["greedy"]["same"] = f"{same}/{len(questions)}"
    if "greedy" in results:
        ideal_and_efficiency(results, args.block_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_speed.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    figure_tables, legend = tables(results, len(questions))
    sample = (f"{len(questions)} GSM8K test prompts (from line {questions[0].index}), {args.max_new_tokens} new tokens "
              f"at most, K={args.block_size}, {args.dtype}, batch size 1")  # fmt: skip
    markdown = write_markdown(out / "decode_speed.md", figure_tables, legend, sample)
    print_tables(*figure_tables, notes=(*legend, f"tables: {markdown}"))
    rows = [{"name": NAMES[m], **results[m]} for m in NAMES if m in results]
    title = f"{len(questions)} GSM8K test prompts, {args.max_new_tokens} new tokens, {Path(args.pair).name}"
    print(f"figures: {out / 'decode_speed.json'}, plot: {plot_speed(rows, out / 'decode_speed.png', title)}")
    pick = {"hf_greedy_tps": ("hf_greedy", "tokens_per_s"), "hf_assisted_tps": ("hf_assisted", "tokens_per_s"),
            "sd_tps": ("standard_sd", "tokens_per_s"), "judge_tps": ("judge", "tokens_per_s"),
            "judge_accuracy": ("judge", "accuracy"), "sd_accuracy": ("standard_sd", "accuracy"),
            "hf_assisted_packed_tps": ("hf_assisted_packed", "tokens_per_s"),
            "judge_efficiency": ("judge", "efficiency")}  # fmt: skip
    print(" ".join(f"{k}={results[m][f]:.3f}" for k, (m, f) in pick.items() if m in results))


if __name__ == "__main__":
    main()
