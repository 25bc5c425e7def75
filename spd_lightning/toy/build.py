"""The embedded default world: shipped with the package, or built from scratch.

The world that `python run.py` uses lies in `spd_lightning/toy/world/` (about 3 MB): built once
on the developers' machine and checked in with the sha256 of every file (manifest.json), so
that every machine trains on the same bytes. Float training is not bit-identical across CPUs,
thread counts and library versions, so rebuilding gives a world of the same kind, not the same
world:

    python -m spd_lightning.toy.build --out .cache/toy     # then: python run.py toy.out=.cache/toy
    python -m spd_lightning.toy.build --ship               # developers: replace the shipped world

writes tokenizer + target/ and draft/ (transformers directories), records.jsonl, stats.json,
build.json (the settings) and manifest.json. A directory whose build.json matches the requested
settings is reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from spd_lightning.errors import SetupError
from spd_lightning.toy.records import build_records
from spd_lightning.toy.tokenizer import save_tokenizer
from spd_lightning.toy.train_lm import LMSpec, train_lm

# Bump when the task, tokenizer or training code changes, so old caches are rebuilt.
BUILD_VERSION = 1
# The world every machine uses by default (conf/toy/default.yaml: toy.out).
SHIPPED_WORLD = Path(__file__).resolve().parent / "world"
# sha256 of every other file of a world, written last by the build.
MANIFEST = "manifest.json"


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


def file_digests(out: Path) -> dict[str, str]:
    """{relative path: sha256} of every file of the world in `out` except the manifest."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def check_shipped_world(spec: ToyWorldSpec) -> None:
    """The shipped world is used only as it was built: same settings, same bytes."""
    if not is_built(SHIPPED_WORLD, spec):
        raise SetupError(
            "toy.spec differs from the settings of the world shipped with the package "
            f"({SHIPPED_WORLD / 'build.json'}); to build that world on this machine (about 2 minutes), "
            "also set toy.out to a directory of your own, e.g. toy.out=.cache/toy"
        )
    expected = json.loads((SHIPPED_WORLD / MANIFEST).read_text())
    found = file_digests(SHIPPED_WORLD)
    damaged = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
    if damaged:
        raise SetupError(
            f"the default world shipped in {SHIPPED_WORLD} is damaged ({', '.join(damaged)} differ from "
            f"{MANIFEST}): restore it with `git checkout -- {SHIPPED_WORLD}` or reinstall the package"
        )


def record_stats(records: list[dict]) -> dict:
    mismatches = [sum(d != t for d, t in zip(r["draft_ids"], r["target_ids"])) for r in records]
    prompts = {tuple(r["context_ids"][: r["prompt_len"]]) for r in records}
    return {
        "records": len(records),
        "prompts": len(prompts),
        "mismatches_per_block": statistics.mean(mismatches),
    }


def build_toy_world(
    out: str | Path, spec: ToyWorldSpec | None = None, verbose: bool = True, replace_shipped: bool = False
) -> Path:
    """Trains target and draft, writes records; a no-op when `out` already holds this build.
    The shipped world is checked, never rebuilt, unless `replace_shipped` (developers only)."""
    out, spec = Path(out), spec or default_spec()
    if out.resolve() == SHIPPED_WORLD and not replace_shipped:
        check_shipped_world(spec)
        return out
    if is_built(out, spec) and not replace_shipped:
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
    (tmp / MANIFEST).write_text(json.dumps(file_digests(tmp), indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # the finished world appears at once, never half-written
    log(f"  wrote {stats['records']} records from {stats['prompts']} prompts ({time.time() - start:.0f}s)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".cache/toy", help="directory to write the world to")
    parser.add_argument("--ship", action="store_true", help=f"rebuild the shipped world in {SHIPPED_WORLD}")
    args = parser.parse_args()
    if args.ship:
        build_toy_world(SHIPPED_WORLD, replace_shipped=True)
    else:
        build_toy_world(args.out)


if __name__ == "__main__":
    main()
