"""How far float arithmetic moves the default run: `python run.py` on the shipped world under
several CPU code paths and thread counts, and on a few seeds.

    python bench/float_spread.py                     # 5 float variants + seeds 1-3, about 3 min on 2 cores
    python bench/float_spread.py --seeds --out outputs/bench/float_spread

The shipped world is the same bytes everywhere, but a 300-step training on it is not: other
vector kernels (AVX-512, AVX2, none), another thread count or another BLAS path sum the same
numbers in another order, and after 300 steps the last digits differ. The variants pin the
kernels that torch (ATEN_CPU_CAPABILITY), MKL (MKL_CBWR) and oneDNN (ONEDNN_MAX_CPU_ISA) may
use, which is how one machine can stand in for another CPU. Each run's summary.json is read
back; a table and the spread (max - min) over the float variants at seed 0 are printed, and
the table is also written to float_spread.md (docs/default_world.md copies it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from spd_lightning.reporting.tables import FigureTable, print_tables, write_markdown

ROOT = Path(__file__).resolve().parents[1]

# name -> environment; "native" is whatever this machine picks by itself.
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
SCALAR = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"}
VARIANTS = {
    "native, 2 threads": {},
    "native, 1 thread": {"OMP_NUM_THREADS": "1"},
    "AVX2 kernels, 2 threads": AVX2,
    "AVX2 kernels, 1 thread": {**AVX2, "OMP_NUM_THREADS": "1"},
    "no vector kernels, 2 threads": SCALAR,
}
KEYS = {
    "scorer accuracy": "val/accuracy",
    "scorer accept_len": "val/accept_len",
    "SD accuracy": "val/standard_sd/accuracy",
    "SD accept_len": "val/standard_sd/accept_len",
    "accept-all accuracy": "val/accept_all/accuracy",
}


def run_dir_of(name: str, seed: int, out: Path) -> Path:
    return out / f"{name.replace(' ', '_').replace(',', '')}_seed{seed}"


def run(name: str, env: dict[str, str], seed: int, out: Path) -> dict:
    run_dir = run_dir_of(name, seed, out)
    if not (run_dir / "summary.json").is_file():
        print(f"running seed={seed} with {name} ...", flush=True)
        cmd = [sys.executable, str(ROOT / "run.py"), f"seed={seed}", f"hydra.run.dir={run_dir}"]
        proc = subprocess.run(
            cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        if proc.returncode != 0:
            sys.exit(f"{name} seed={seed} failed:\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def weights_moved(name: str, reference: str, out: Path) -> float:
    """Largest |difference| between the trained scorers' parameters of two seed-0 runs: evidence
    that a variant did take another arithmetic path, even where no figure moved."""
    import torch

    def load(n: str) -> dict:
        ckpt = run_dir_of(n, 0, out) / "checkpoints" / "last.ckpt"
        return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]

    a, b = load(name), load(reference)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "float_spread"))
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3], help="extra seeds, native kernels")
    args = parser.parse_args()
    out = Path(args.out)
    rows = {f"{name}, seed 0": run(name, env, 0, out) for name, env in VARIANTS.items()}
    rows |= {f"native, 2 threads, seed {s}": run("native, 2 threads", {}, s, out) for s in args.seeds}
    reference = next(iter(VARIANTS))
    moved = {f"{name}, seed 0": weights_moved(name, reference, out) for name in VARIANTS}
    columns = ["run", "acc.", "kept", "SD acc", "SD kept", "all acc", "|dw|"]
    table = FigureTable("python run.py under other float code paths and seeds", columns)
    for name, summary in rows.items():
        dw = f"{moved[name]:.1e}" if name in moved else ""
        table.add(name, *(f"{summary[v]:.3f}" for v in KEYS.values()), dw)
    float_rows = [rows[f"{name}, seed 0"] for name in VARIANTS]
    spread = {k: max(r[v] for r in float_rows) - min(r[v] for r in float_rows) for k, v in KEYS.items()}
    notes = (
        "spread over the float variants at seed 0 (max - min): " + ", ".join(f"{k} {spread[k]:.3f}" for k in KEYS),
        "acc., kept: the scorer's accuracy and draft tokens kept per block; SD: standard SD's; all: accept-all's; "
        "|dw|: the largest scorer weight difference from the first run",
    )
    report = {"runs": rows, "spread": spread, "max_weight_difference": moved}
    (out / "float_spread.json").write_text(json.dumps(report, indent=2))
    sample = f"{len(VARIANTS)} float variants at seed 0, seeds {args.seeds} native; 413 validation records at seed 0"
    markdown = write_markdown(out / "float_spread.md", [table], notes, sample)
    print_tables(table, notes=(*notes, f"table: {markdown}"))
    print(
        f"accuracy_spread={spread['scorer accuracy']:.3f} accept_len_spread={spread['scorer accept_len']:.3f} "
        f"max_weight_difference={max(moved.values()):.1e} runs={len(float_rows)}"
    )


if __name__ == "__main__":
    main()
