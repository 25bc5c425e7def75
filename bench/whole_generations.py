"""The trade-off where users deploy the judge: whole generations, every policy at a threshold
chosen on one problem set and measured on another (spd_lightning/tasks/generations.py).

    python bench/whole_generations.py                          # the default world: a few minutes
    python bench/whole_generations.py --world qwen_coder --stage responses   # real pair, resumable
    python bench/whole_generations.py --world qwen_coder       # every stage, hours on 2 cores
    python bench/whole_generations.py --world qwen_coder --on-disk --k 4 8   # report what is measured

Stages, each kept on disk under --out, so a rerun resumes: responses (the target's own response to
every prompt), heads (the supervised head on AutoJudge labels mined along whole generations, the
per-block GRPO head, the whole-generation GRPO head: `python run.py ... model=judge`), sweep (every
policy's thresholds on the choosing and the test set, at each K), then the report: a table per K,
generations.png, generations.json/.md, and the last line
`gen_rl_tpc=.. gen_rl_accuracy=.. block_rl_tpc=.. sup_tpc=.. kl_tpc=.. sd_tpc=.. sd_accuracy=.. n=..`
(tpc: tokens per target call at the chosen threshold, at the largest K; a head swept by name with
--head NAME=RUN adds NAME_tpc=.. NAME_accuracy=.. before n).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path

from spd_lightning.models.pairs import pair_dir, require_built
from spd_lightning.targets.vllm_server import launch_vllm_server
from spd_lightning.tasks.generation_report import report
from spd_lightning.tasks.generation_sweep import SweepSettings, families, stage_sweep
from spd_lightning.tasks.generations import (
    ROOT,
    TOY_PAIR,
    WorldSettings,
    head_from_checkpoint,
    load_world,
    problem_sets,
    project_relative,
    stage_heads,
    stage_responses,
)

STAGES = ("responses", "heads", "sweep")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", choices=["toy", "qwen_coder"], default="toy")
    parser.add_argument("--stage", choices=STAGES, default="sweep", help="run the stages up to this one")
    parser.add_argument("--pair", default=str(pair_dir("qwen_coder", ROOT)))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gsm8k"), help="GSM8K jsonl folder")
    parser.add_argument("--out", default=None, help="default: outputs/generations/toy, data/episodes_<world>")
    parser.add_argument("--train", type=int, default=None, help="train problems (toy 320, pair 100)")
    parser.add_argument("--choose", type=int, default=None, help="problems thresholds are chosen on (96, 60)")
    parser.add_argument("--test", type=int, default=None, help="test problems (200, 150)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="response budget (toy 24, pair 384)")
    parser.add_argument("--k", type=int, nargs="+", default=[4, 8], help="draft tokens per block")
    parser.add_argument("--points", type=int, default=8, help="thresholds per policy (top-k: first of k=2,3,5,10)")
    parser.add_argument("--families", nargs="+", default=None, help="sweep only these (sd kl entropy topk ...)")
    parser.add_argument("--no-heads", action="store_true", help="sweep the rules (and --head runs): no judge trained")
    parser.add_argument(
        "--test-points", choices=["all", "chosen"], default="all",
        help="on the test set: every threshold of the grid, or only the one chosen on the choosing set",
    )  # fmt: skip
    parser.add_argument(
        "--on-disk", action="store_true",
        help="report only the points measured before (in the sweep's folder), measure none: a family or K "
        "never swept is left out, a chosen threshold not yet run on the test set says so",
    )  # fmt: skip
    parser.add_argument("--tolerance", type=float, default=0.01, help="accuracy below standard SD allowed")
    parser.add_argument("--steps", type=int, default=300, help="supervised head's optimiser steps")
    parser.add_argument("--train-steps", type=int, default=None, help="GRPO steps of run.py (default: its own)")
    parser.add_argument(
        "--block-rl", default=None, help="a saved per-block judge (default, real pair: judges/qwen_coder_grpo.pt)"
    )
    parser.add_argument(
        "--head", action="append", default=[], metavar="NAME=RUN",
        help="a run.py model=judge run folder whose checkpoints/last.ckpt joins the sweep as family NAME "
        "(e.g. gen_rl_one=data/episodes_qwen_coder_bfloat16/heads/gen_rl_one); repeatable",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, default=16, help="paths completed per call (vLLM: 64 suits)")
    parser.add_argument(
        "--overlap", type=int, default=0,
        help="with --vllm: completion requests in flight while the models decide (0: lockstep rounds; "
        "meant for a server on its own hardware; slower where it shares the CPU)",
    )  # fmt: skip
    parser.add_argument(
        "--segment", type=int, default=None,
        help="complete a fork's path this many tokens at a time, each next piece twice the last (most "
        "forked paths are left at their next accepted mismatch); default: to the budget at once, which "
        "also labels every accepted mismatch for bench/mismatch_ranking.py",
    )  # fmt: skip
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="every model's")
    parser.add_argument("--vllm", action="store_true", help="serve the target with vLLM (.venv-vllm) for completions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.head = named_runs(args.head)  # a wrong one stops here, before any model or server starts
    return args


def named_runs(pairs: list[str]) -> list[tuple[str, Path]]:
    """--head NAME=RUN values, each run folder checked for its last checkpoint."""
    out = []
    for pair in pairs:
        name, _, run = pair.partition("=")
        if not name or not run:
            raise SystemExit(f"error: --head {pair!r}: expected NAME=RUN (a run.py model=judge output folder)")
        if not (Path(run) / "checkpoints" / "last.ckpt").is_file():
            raise SystemExit(f"error: --head {pair!r}: {run}/checkpoints/last.ckpt is not there")
        out.append((name, Path(run)))
    return out


def training_overrides(args, toy: bool, out: Path, budget: int, url: str | None) -> dict[str, list[str]]:
    """The run.py command lines of the two GRPO heads (model=judge: the zero-cost judge): on the
    real pair experiment=qwen_coder_generations, with the bench's server, dtype and store."""
    common = [f"seed={args.seed}", "logger=csv"]
    if args.train_steps:
        common += [f"trainer.max_steps={args.train_steps}", f"trainer.val_check_interval={min(25, args.train_steps)}"]
    store = f"rollout.completions={project_relative(out / 'completions.jsonl')}"
    # A resumed run skips the judge's passes.
    features = f"rollout.features={project_relative(out / 'heads' / 'features.pt')}"
    if toy:  # the bench's train prompts are rollout=generation's: 320 (or --train) of seed 2000
        gen = ["rollout=generation", f"rollout.block_size={max(args.k)}", f"rollout.max_new_tokens={budget}",
               f"data.num_prompts={args.train or 320}"]  # fmt: skip
        return {"block_rl": ["model=judge", *common], "gen_rl": ["model=judge", *gen, store, features, *common]}
    gen = ["experiment=qwen_coder_generations", f"data.raw={project_relative(Path(args.data) / 'train.jsonl')}",
           f"data.limit={args.train or 100}", f"rollout.block_size={max(args.k)}", f"rollout.max_new_tokens={budget}",
           f"model.dtype={args.dtype}", store, features, *common]  # fmt: skip
    if url is None and not (out / "heads" / "gen_rl" / "summary.json").is_file():  # a finished run is read back
        raise SystemExit("error: the real pair's GRPO head trains against a vLLM server: add --vllm")
    return {"block_rl": [], "gen_rl": [*gen, f"target.url={url}", "target.model=target"]}


def main() -> None:
    # A stage stopped with SIGTERM unwinds as from an exception: the vLLM server it started stops too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    toy = args.world == "toy"
    pair = TOY_PAIR if toy else Path(args.pair)
    if not toy:
        require_built("--pair", pair / "draft", pair / "target")
    sets = problem_sets(toy, Path(args.data), args.train, args.choose, args.test)
    default_out = (
        ROOT / "outputs" / "generations" / "toy" if toy else ROOT / "data" / f"episodes_{args.world}_{args.dtype}"
    )
    out = Path(args.out or default_out)
    budget = args.max_new_tokens or (24 if toy else 384)
    with serving(args, pair) as url:
        pack = not toy and args.dtype == "float32"  # oneDNN-packed float32 linears (models/packed.py)
        settings = WorldSettings(pair, sets, out, budget, pack, args.batch, args.dtype, url, args.overlap, args.segment)
        world = load_world(args.world, settings)
        run_stages(args, world, toy, out, budget, url)


@contextlib.contextmanager
def serving(args, pair: Path):
    """A vLLM server of the target (--vllm: both cores, the pair's dtype), or None."""
    if not args.vllm:
        yield None
        return
    env = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}"}
    extra = ["--enforce-eager", "--max-model-len", "2048", "--dtype", args.dtype]
    with launch_vllm_server(pair / "target", "target", extra_args=extra, env=env) as url:
        yield url


def trained_heads(args, world, toy: bool, out: Path, budget: int, url: str | None) -> dict:
    """The supervised head and the two GRPO heads (stage heads), trained here or read back."""
    block_rl = Path(args.block_rl) if args.block_rl else None if toy else ROOT / "judges" / "qwen_coder_grpo.pt"
    overrides = training_overrides(args, toy, out, budget, url)
    return stage_heads(world, overrides, max(args.k), args.steps, args.seed, block_rl)


def run_stages(args, world, toy: bool, out: Path, budget: int, url: str | None) -> None:
    upto = STAGES.index(args.stage)
    for stage in STAGES[: upto + 1]:
        start = time.perf_counter()
        if stage == "responses":
            stage_responses(world)
        elif stage == "heads":
            heads = {} if args.no_heads else trained_heads(args, world, toy, out, budget, url)
            heads |= {name: head_from_checkpoint(run / "checkpoints" / "last.ckpt") for name, run in args.head}
        else:
            names = args.families and tuple(args.families)
            settings = SweepSettings(args.points, args.tolerance, args.test_points, names, args.on_disk)
            results = stage_sweep(world, heads, args.k, settings)
            sample = ", ".join(f"{name}: {len(p.prompts)} problems" for name, p in world.sets.items())
            if args.on_disk:
                sample += "; read from disk (--on-disk): the points measured so far, a grid's others left out"
            # A sweep of some families measures them; only a report of all (or --on-disk) is the
            # world's generations.md, which a partial one would overwrite with a part of the picture.
            stem = "generations" if args.on_disk or not args.families else "generations_last_sweep"
            sample += f"; {budget} new tokens at most, {args.dtype}"
            report(results, families(heads), out, args.tolerance, sample, stem)
        print(f"stage {stage}: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
