"""Build the embedded default world once and cache it.

    python -m spd_lightning.toy.build --out .cache/toy

writes tokenizer + target/ and draft/ (transformers directories), records.jsonl and
stats.json. A directory whose build.json matches the requested settings is reused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from spd_lightning.toy.records import build_records
from spd_lightning.toy.tokenizer import save_tokenizer
from spd_lightning.toy.train_lm import LMSpec, train_lm

# Bump when the task, tokenizer or training code changes, so old caches are rebuilt.
BUILD_VERSION = 1


@dataclass
class ToyWorldSpec:
    # 3 layers of width 128 (head_dim 32, as vLLM needs) reach ~99% accuracy in ~1500 steps.
    target: LMSpec
    # Much weaker on purpose: its mistakes are the mismatches the scorer must judge.
    draft: LMSpec
    num_prompts: int = 600
    block_size: int = 4
    seed: int = 0


def default_spec() -> ToyWorldSpec:
    return ToyWorldSpec(
        target=LMSpec(hidden_size=128, num_layers=3, num_heads=4, steps=1500, lr=3e-3, seed=0),
        draft=LMSpec(hidden_size=64, num_layers=1, num_heads=2, steps=300, lr=3e-3, seed=1),
    )


def _spec_dict(spec: ToyWorldSpec) -> dict:
    return {"version": BUILD_VERSION, **asdict(spec)}


def is_built(out: Path, spec: ToyWorldSpec) -> bool:
    meta = out / "build.json"
    return meta.is_file() and json.loads(meta.read_text()) == _spec_dict(spec)


def record_stats(records: list[dict]) -> dict:
    mismatches = [sum(d != t for d, t in zip(r["draft_ids"], r["target_ids"])) for r in records]
    prompts = {tuple(r["context_ids"][: r["prompt_len"]]) for r in records}
    return {
        "records": len(records),
        "prompts": len(prompts),
        "mismatches_per_block": statistics.mean(mismatches),
    }


def build_toy_world(out: str | Path, spec: ToyWorldSpec | None = None, verbose: bool = True) -> Path:
    """Trains target and draft, writes records; a no-op when `out` already holds this build."""
    out, spec = Path(out), spec or default_spec()
    if is_built(out, spec):
        return out
    log = print if verbose else (lambda *a, **k: None)
    log(f"Building the embedded default world in {out} (once; about 2 minutes on 2 CPU cores)")
    start = time.time()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = save_tokenizer(tmp / "target")
    save_tokenizer(tmp / "draft")
    models = {}
    for name in ("target", "draft"):
        models[name] = train_lm(getattr(spec, name), tokenizer, desc=f"toy {name} model")
        models[name].save_pretrained(tmp / name)
        log(f"  trained the {name} model ({time.time() - start:.0f}s)")
    torch.manual_seed(spec.seed)
    records = build_records(models["draft"], models["target"], tokenizer, spec.num_prompts, spec.block_size, spec.seed)
    with (tmp / "records.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    stats = record_stats(records)
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    (tmp / "build.json").write_text(json.dumps(_spec_dict(spec), indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # the finished world appears at once, never half-written
    log(f"  wrote {stats['records']} records from {stats['prompts']} prompts ({time.time() - start:.0f}s)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".cache/toy", help="directory to write the world to")
    args = parser.parse_args()
    build_toy_world(args.out)


if __name__ == "__main__":
    main()
