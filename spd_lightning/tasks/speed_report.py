"""bench/speed.py's report: tables, the batch-size plot, speed.json and the last line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from spd_lightning.reporting.plots import plot_batch_speed
from spd_lightning.reporting.tables import FigureTable, print_tables, write_markdown
from spd_lightning.tasks.speed import Run, RunStore, bytes_read_per_token, greedy_bound_tps, memory_bandwidth_gbs

NAMES = {
    "hf_greedy": "HF greedy generate()",
    "hf_assisted": "HF assisted, its defaults",
    "hf_greedy_k": "HF greedy generate(), our kernels",
    "hf_assisted_k": "HF assisted, K tokens, our kernels",
    "greedy": "ours: greedy",
    "standard_sd": "ours: standard SD",
    "judge": "ours: judge",
    "standard_sd_vocab": "ours: standard SD, small draft head",
    "standard_sd_int8": "ours: standard SD, int8 draft",
    "standard_sd_int8_vocab": "ours: standard SD, int8 draft, small head",
    "hf_assisted_k_int8": "HF assisted, K tokens, int8 draft",
    "greedy_bf16": "ours: greedy, bfloat16",
    "standard_sd_bf16": "ours: standard SD, bfloat16",
    "vllm_plain": "vLLM greedy",
    "vllm_draft": "vLLM SD, 0.5B draft",
    "vllm_ngram": "vLLM n-gram lookup",
    "vllm_draft_turn": "vLLM SD, in turn with the next two",
    "standard_sd_turn": "ours: standard SD in vLLM's dtype, in turn",
    "standard_sd_int8_vocab_turn": "ours: int8 draft, small head, vLLM's dtype, in turn",
}
LAST_LINE = {
    "sd_tps": "standard_sd_b1", "hf_assisted_k_tps": "hf_assisted_k_b1", "hf_greedy_tps": "hf_greedy_b1",
    "vllm_sd_tps": "vllm_draft_b1", "vllm_tps": "vllm_plain_b1", "sd_tps_b8": "standard_sd_b8",
    "vllm_sd_tps_b8": "vllm_draft_b8",
}  # fmt: skip


def target_bytes(target_dir: str) -> dict[str, int]:
    """The weight bytes a greedy token of the target reads, in float32 and bfloat16, from its
    config alone (no weights read)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(target_dir))
        model.tie_weights()  # a tied output layer is the embedding: read once, counted once
    return {dtype: bytes_read_per_token(model, getattr(torch, dtype)) for dtype in ("float32", "bfloat16")}


def runs_by_method(store: RunStore) -> dict[str, dict[int, Run]]:
    """{method: {batch size: Run}} of every stored run."""
    found: dict[str, dict[int, Run]] = {}
    for path in sorted(store.folder.glob("*_b*.json")):
        method, batch = path.stem.rsplit("_b", 1)
        found.setdefault(method, {})[int(batch)] = store.load(path.stem)
    return found


def tps_text(run: Run | None) -> str:
    return f"{run.tokens_per_s:.2f}" if run is not None and run.rows else "-"


def kept_per_block(run: Run) -> str:
    """Draft tokens kept per target call; a vLLM server's: accepted tokens per draft (/metrics)."""
    if run.note.startswith("{"):
        counters = json.loads(run.note)
        if counters.get("drafts"):
            return f"{counters.get('accepted_tokens', 0.0) / counters['drafts']:.2f}"
    return f"{run.kept / run.target_calls:.2f}" if run.kept and run.target_calls else "-"


def one_row(name: str, run: Run, base: dict[str, float], greedy_rows: list, bound: float) -> list[str]:
    if not run.rows:
        return [name, "failed", *["-"] * 7]
    tps = run.tokens_per_s
    calls = f"{run.target_calls / run.tokens:.3f}" if run.target_calls else "-"
    same = f"{sum(a == b for a, b in zip(run.rows, greedy_rows))}/{len(run.rows)}" if greedy_rows else "-"
    ratios = [f"{tps / base[b]:.2f}" if b in base else "-" for b in ("hf_greedy", "hf_assisted", "hf_assisted_k")]
    return [name, f"{tps:.2f}", calls, kept_per_block(run), same, *ratios, f"{tps / bound:.2f}"]


def single_table(runs: dict[str, dict[int, Run]], bounds: dict[str, float], vllm_dtype: str) -> FigureTable:
    """Batch size 1: every method's speed, cost, identity with our greedy, ratios, share of the limit."""
    single = {m: by[1] for m, by in runs.items() if 1 in by}
    base = {m: single[m].tokens_per_s for m in ("hf_greedy", "hf_assisted", "hf_assisted_k") if m in single}
    greedy_rows = single["greedy"].rows if "greedy" in single else []
    columns = ["method", "tok/s", "calls/tok", "kept/blk", "=greedy", "xHFgr", "xHFas", "xHFasK", "/limit"]
    prompts = max((len(run.rows) for run in single.values()), default=0)
    table = FigureTable(f"Batch size 1, {prompts} prompts", columns)
    for method, name in NAMES.items():
        if method in single:
            bf16 = method.endswith("bf16") or (("vllm" in method or "turn" in method) and vllm_dtype == "bfloat16")
            table.add(*one_row(name, single[method], base, greedy_rows, bounds["bfloat16" if bf16 else "float32"]))
    return table


def batch_table(runs: dict[str, dict[int, Run]], prompts: int) -> FigureTable:
    sizes = sorted({b for by in runs.values() for b in by})
    title = f"Aggregate tokens/s by batch size ({prompts} prompts above batch size 1, 8 at b=8)"
    table = FigureTable(title, ["method", *(f"b={b}" for b in sizes)])
    for method, name in NAMES.items():
        if method in runs and len(runs[method]) > 1:
            table.add(name, *(tps_text(runs[method].get(b)) for b in sizes))
    return table


def limit_table(bandwidth: dict[str, float], nbytes: dict[str, int], bounds: dict, kernels: dict) -> FigureTable:
    table = FigureTable("Kernels and the limit", ["what", "figure"])
    figures = " / ".join(f"{bandwidth[k]:.1f}" for k in ("copy", "read", "gemv"))
    table.add("memory bandwidth, copy / sum / matrix-vector (GB/s)", figures)
    for dtype, b in nbytes.items():
        table.add(f"target weights read per token, {dtype} (GB)", f"{b / 1e9:.2f}")
        table.add(f"greedy bound, {dtype} (tok/s)", f"{bounds[dtype]:.2f}")
    for role, choice in kernels.items():
        table.add(f"kernels: {role}", str(choice))
    return table


LEGEND = (
    "tok/s: generated tokens per second, wall clock; calls/tok: target passes per token (ours and HF; a server's "
    "are not counted); kept/blk: draft tokens kept per target call (vLLM: accepted per draft, from /metrics); "
    "=greedy: responses equal to our float32 greedy's; xHFgr, xHFas, xHFasK: tok/s over HF greedy, HF assisted "
    "at its defaults, HF assisted at K on our kernels; /limit: tok/s over the greedy bound of its dtype "
    "(the highest measured bandwidth / the weight bytes a greedy token of the target reads: all but its input "
    "embedding table, of which it reads one row)",
)


def last_line(store: RunStore, bounds: dict[str, float]) -> dict[str, float]:
    figures = {}
    for key, stem in (*LAST_LINE.items(), ("greedy_tps", "greedy_b1")):
        run = store.load(stem)
        figures[key] = run.tokens_per_s if run is not None and run.rows else math.nan
    figures["greedy_limit_tps"] = bounds["float32"]
    return {k: figures[k] for k in (*LAST_LINE, "greedy_limit_tps", "greedy_tps")}


def report(args, store: RunStore, kernels: dict, listed) -> dict:
    """Tables to --out/speed.md, the batch-size plot, speed.json; prints the last line."""
    out, runs = Path(args.out), runs_by_method(store)
    bandwidth, nbytes = memory_bandwidth_gbs(), target_bytes(str(Path(args.pair) / "target"))
    bounds = {dtype: greedy_bound_tps(max(bandwidth.values()), b) for dtype, b in nbytes.items()}
    tables = [single_table(runs, bounds, args.vllm_dtype), batch_table(runs, args.batch_prompts),
              limit_table(bandwidth, nbytes, bounds, kernels)]  # fmt: skip
    sample = (f"GSM8K test prompts from line {listed[0].index}, {args.max_new_tokens} new tokens at most, "
              f"K={args.k}, vLLM in {args.vllm_dtype}")  # fmt: skip
    markdown = write_markdown(out / "speed.md", tables, LEGEND, sample)
    print_tables(*tables, notes=(*LEGEND, f"tables: {markdown}"))
    failed = {f"{m}_b{b}": r.note for m, by in runs.items() for b, r in by.items() if not r.rows}
    for key, note in failed.items():
        print(f"{key} did not run: {note}")
    series = {NAMES.get(m, m): {b: r.tokens_per_s for b, r in by.items() if r.rows} for m, by in runs.items()}
    limits = {f"greedy bound, {dtype}": bound for dtype, bound in bounds.items()}
    title = f"Aggregate tokens/s, {Path(args.pair).name}, {args.max_new_tokens} new tokens"
    plot = plot_batch_speed(series, limits, out / "speed_batch.png", title)
    figures = last_line(store, bounds)
    summary = {"args": vars(args), "bandwidth_gbs": bandwidth, "target_bytes": nbytes, "bounds_tps": bounds,
               "kernels": kernels, "failed": failed, "last_line": figures}  # fmt: skip
    (out / "speed.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"figures: {out / 'speed.json'}, plot: {plot}")
    print(" ".join(f"{k}={v:.3f}" for k, v in figures.items()))
    return summary
