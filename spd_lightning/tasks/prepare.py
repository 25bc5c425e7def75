"""task=prepare: raw prompts -> SPD records, with a draft and a target model.

    python run.py task=prepare data.raw=gsm8k.jsonl                        # both models in-process
    python run.py task=prepare data.raw=gsm8k.jsonl draft=vllm draft.url=http://HOST:8001/v1 \\
        target=vllm target.url=http://HOST:8000/v1                          # both served by vLLM

Writes prepare.out/records.jsonl (the SPEC's records, plus `prompt_index`, the raw line), stats.json
and progress.json. Prompts go in chunks; each chunk's records are committed durably before the
next starts, so rerunning an interrupted command continues where it stopped. The work itself
is in spd_lightning/data/builder.py; this file is the Hydra glue.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from spd_lightning.data.builder import REFERENCES, BlockSpec, Counts, ResponseReader, records_for_prompts, summarise
from spd_lightning.data.prompts import Prompt, encode_prompts
from spd_lightning.data.resumable import ResumableJsonl, write_atomically
from spd_lightning.errors import SetupError
from spd_lightning.models.hf import check_shared_vocabulary, load_tokenizer, tokenizer_eos_ids
from spd_lightning.tasks.builders import ensure_toy_world

log = logging.getLogger(__name__)


@dataclass
class PrepareConfig:
    # Where records.jsonl, stats.json and the resume state go.
    out: str = "prepared"
    # K: draft tokens per block.
    block_size: int = 4
    # A block starts every `stride` positions of the target's response (1: every position).
    stride: int = 1
    # Cap on the target's greedy response to a prompt (it stops at EOS before that).
    max_new_tokens: int = 256
    # The records' reference: dataset (the prompt's answer) or target (the target's own final number).
    reference: str = "dataset"
    # Prompts per chunk: the unit of work that is committed to disk and resumed.
    prompts_per_chunk: int = 64
    # Start over in `out`, dropping what an earlier run wrote there.
    overwrite: bool = False


def block_spec(section: DictConfig) -> BlockSpec:
    for key in ("block_size", "stride", "max_new_tokens", "prompts_per_chunk"):
        if section[key] < 1:
            raise SetupError(f"prepare.{key} must be at least 1, got {section[key]}")
    if section.reference not in REFERENCES:
        raise SetupError(f"prepare.reference must be one of {list(REFERENCES)}, got {section.reference!r}")
    return BlockSpec(section.block_size, section.stride, section.max_new_tokens, section.reference)


def load_prompt_set(data: DictConfig) -> tuple[list[Prompt], int, str | None]:
    """(prompts, malformed lines skipped, sha256 of the raw file or None for generated prompts)."""
    # Called here rather than by instantiate, so that a malformed line's RecordError is not wrapped.
    prompts = instantiate(data, _partial_=True)()
    if not isinstance(prompts, list) or not all(isinstance(p, Prompt) for p in prompts):
        raise SetupError("task=prepare reads prompts: data=prompts data.raw=PATH (JSONL), or data=toy_prompts")
    raw_sha256 = hashlib.sha256(Path(data.raw).read_bytes()).hexdigest() if "raw" in data else None
    return prompts, getattr(prompts, "skipped", 0), raw_sha256


def backend_name(backend: DictConfig) -> str:
    """How messages name a draft or target config: its model directory, or its served model."""
    return str(backend.model_path) if "model_path" in backend else f"{backend.model} at {backend.url or backend.urls}"


def run_settings(cfg: DictConfig, raw_sha256: str | None) -> dict:
    """What decides the records: a rerun resumes only when all of it is unchanged."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data.pop("raw", None)  # the content counts, not where the file lies
    if not data.get("skip"):
        data.pop("skip", None)  # records prepared before the knob existed still resume

    def identity(backend: DictConfig) -> dict:
        keys = ("_target_", "model_path", "model", "dtype")
        return {k: v for k, v in OmegaConf.to_container(backend, resolve=True).items() if k in keys}

    section = cfg.prepare
    return {
        "data": data,
        "raw_sha256": raw_sha256,
        **{k: section[k] for k in ("block_size", "stride", "max_new_tokens", "reference")},
        "tokenizer": str(cfg.model.tokenizer),
        "draft": identity(cfg.draft),
        "target": identity(cfg.target),
        "verifier": cfg.answer._target_,
    }


def build_backend(cfg: DictConfig, role: str):
    """The draft or target backend; its setup errors name the config group they came from."""
    try:
        return instantiate(cfg[role])
    except Exception as err:
        cause = err.__cause__ if isinstance(err.__cause__, SetupError) else err
        if not isinstance(cause, SetupError) or role == "target":
            raise
        # The backends' messages speak of `target.url` etc.; here the draft group is the culprit.
        raise SetupError(re.sub(r"\btarget([.=])", rf"{role}\1", str(cause))) from None


def check_backends_vocabulary(cfg: DictConfig, tokenizer, draft, target) -> None:
    """Draft and target must both use model.tokenizer's vocabulary: records compare their token ids."""
    for role, backend in (("draft", draft), ("target", target)):
        try:
            check_shared_vocabulary(tokenizer, {role: backend})
        except SetupError as err:
            raise SetupError(
                f"{err} Here the draft is {backend_name(cfg.draft)}, the target {backend_name(cfg.target)} and "
                f"model.tokenizer {cfg.model.tokenizer}."
            ) from None


def prepare_chunks(cfg, prompts, tokenizer, draft, target, spec: BlockSpec, writer: ResumableJsonl) -> Counts:
    """Every prompt not done yet, chunk by chunk, each chunk committed before the next starts."""
    chunk, counts = cfg.prepare.prompts_per_chunk, Counts(**writer.counts)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    reader = ResponseReader(tokenizer_eos_ids(tokenizer), decode, instantiate(cfg.answer))
    prompt_ids = encode_prompts(tokenizer, prompts)
    with tqdm(total=len(prompts), initial=writer.done, desc="prepare", unit="prompt") as bar:
        for start in range(writer.done, len(prompts), chunk):
            batch, ids = prompts[start : start + chunk], prompt_ids[start : start + chunk]
            rows, got = records_for_prompts(batch, ids, draft, target, spec, reader)
            counts = counts.add(got)
            writer.commit(rows, start + len(batch), counts.to_dict())
            bar.update(len(batch))
            bar.set_postfix(records=counts.records)
    return counts


def report(stats: dict, out: Path, max_new_tokens: int) -> None:
    solves = stats["target_solves"]
    log.info(
        "%d records from %d prompts (%d malformed lines skipped) in %s; stats in %s",
        stats["records"],
        stats["prompts"],
        stats["prompts_skipped"],
        out / "records.jsonl",
        out / "stats.json",
    )
    log.info(
        "blocks: %d, without a mismatch (dropped): %d; mismatches per kept block: %s; target solves: %s",
        stats["blocks"],
        stats["blocks_without_mismatch"],
        "n/a" if stats["mismatches_per_block"] is None else f"{stats['mismatches_per_block']:.2f}",
        "n/a (no answers)" if solves is None else f"{solves:.1%}",
    )
    if stats["responses_capped"]:
        log.warning(
            "%d responses reached prepare.max_new_tokens=%d before EOS: raise it if their answers were cut",
            stats["responses_capped"],
            max_new_tokens,
        )
    if stats["prompts_without_reference"]:
        log.warning(
            "%d prompts gave no records: the target's response holds no final number (prepare.reference=target)",
            stats["prompts_without_reference"],
        )


def prepare(cfg: DictConfig) -> None:
    spec = block_spec(cfg.prepare)
    prompts, skipped, raw_sha256 = load_prompt_set(cfg.data)
    if spec.reference == "dataset" and any(p.answer is None for p in prompts):
        raise SetupError(
            "prepare.reference=dataset needs an answer for every prompt, but data.answer_key is null: set "
            "data.answer_key=FIELD, or prepare.reference=target to use the target's own final answer"
        )
    out = Path(cfg.prepare.out)
    hint = f"prepare.overwrite=true, or another prepare.out than {out}"
    writer = ResumableJsonl(out, run_settings(cfg, raw_sha256), cfg.prepare.overwrite, fix_hint=hint)
    if writer.done:
        log.info("resuming in %s: %d of %d prompts already done", out, writer.done, len(prompts))
    ensure_toy_world(cfg)
    tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.get("local_files_only"))
    draft = build_backend(cfg, "draft")
    try:
        target = build_backend(cfg, "target")
        try:
            check_backends_vocabulary(cfg, tokenizer, draft, target)
            counts = prepare_chunks(cfg, prompts, tokenizer, draft, target, spec, writer)
        finally:
            target.close()
    finally:
        draft.close()
    stats = summarise(counts, skipped, spec.block_size)
    write_atomically(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    report(stats, out, spec.max_new_tokens)
