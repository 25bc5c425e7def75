"""One decoding setup: settings in, (draft, target, tokenizer, policies) out, packed or not.
task=decode, the generation API (SpeculativeDecoder.from_pretrained) and bench/decode_speed.py
all build through here, so a pair is loaded, checked and packed one way.

    setup = build_decoding(PairSettings(draft_dir, target_dir), ["standard_sd", "judge"],
                           PolicySettings(), judge_path="judges/qwen_coder_grpo.pt")
    generate_cached(setup.draft, setup.target, prompt_ids, setup.policies["judge"], ...)
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel

from spd_lightning.data.textfiles import json_lines
from spd_lightning.decoding.policies import Policy, PolicySettings
from spd_lightning.decoding.registry import DECODE_POLICIES, build_policy, check_policy_names
from spd_lightning.errors import SetupError
from spd_lightning.judge.head import JudgeHead, load_judge
from spd_lightning.models.hf import (
    check_shared_vocabulary,
    load_pretrained,
    pad_id_of,
    response_end_ids,
)
from spd_lightning.models.int8 import int8_kernel_available, quantize_linears
from spd_lightning.models.packed import can_pack, pack_if_faster, pack_linears
from spd_lightning.models.vocab_head import frequent_tokens, restrict_output_layer
from spd_lightning.targets.local import load_causal_lm


@dataclass
class PairSettings:
    """Where the draft and target come from and how to load them."""

    draft: str  # a transformers directory or a hub id
    target: str
    dtype: str = "float32"  # float32, bfloat16 or float16, both models
    device: str = "cpu"
    # On the CPU, every linear layer packed for oneDNN (models/packed.py); a GPU model is left as it
    # is. None: each model's probe passes timed both ways at load, the faster kept per pass width
    # (pack_if_faster; where both are kept, the weights are held twice).
    pack_linears: bool | None = None
    # The draft's output layer restricted to this many tokens, the most frequent in
    # draft_vocab_corpus (a JSONL file of the task's text; models/vocab_head.py); None: all.
    draft_vocab: int | None = None
    draft_vocab_corpus: str | None = None
    # How messages name the settings: the keys of the two paths, the section of dtype and device
    # (None: each path key's own), and the key that turned downloads off (None: downloads allowed).
    draft_key: str = "draft"
    target_key: str = "target"
    section: str | None = None
    offline_key: str | None = None
    # The draft's linear layers with int8 weights, a scale per row (models/int8.py; CPU only):
    # a quarter of float32's bytes per draft pass; standard SD stays lossless, the target verifies.
    draft_int8: bool = False


@dataclass
class DecodingSetup:
    """Both models, their shared tokenizer and the policies, ready for decoding.loop."""

    draft: PreTrainedModel
    target: PreTrainedModel
    tokenizer: object
    policies: dict[str, Policy]  # in registry order
    settings: PolicySettings  # what the policies were built with (the judge's threshold in use)

    @cached_property
    def eos_ids(self) -> set[int]:
        """Every id that ends a response: the target's config and generation_config, and the tokenizer's."""
        return response_end_ids(self.target, self.tokenizer)

    @property
    def pad_id(self) -> int:
        return pad_id_of(self.tokenizer)


def load_judge_file(
    path: str | None, threshold: float | None, key: str = "judge_path", why: str = ""
) -> tuple[JudgeHead, float]:
    """(a judge saved by task=judge, the threshold to run it at: `threshold`, or the one saved
    with it). `why` opens the message of a missing file."""
    if path is None or not Path(path).is_file():
        raise SetupError(
            f"{why}{key}={path} is not a file: train a judge with `python run.py task=judge` (it writes "
            "judge_sup.pt, judge_grpo.pt and judge_exact.pt to its run directory)"
        )
    head, saved = load_judge(path)
    return head, saved if threshold is None else threshold


def build_policies(names: list[str], settings: PolicySettings, key: str = "policies") -> dict[str, Policy]:
    """The named policies, in registry order whatever the order of `names` (greedy's responses,
    when it runs, are the others' reference)."""
    check_policy_names(names, key)
    return {name: build_policy(name, settings) for name in DECODE_POLICIES if name in names}


def check_tokenizer(tokenizer, parts: dict) -> None:
    """The tokenizer must say where generation stops, and every part must know all its tokens."""
    if tokenizer.eos_token_id is None:
        raise SetupError("the tokenizer has no EOS token: generation could never stop")
    check_shared_vocabulary(tokenizer, parts)


def load_pair(source: PairSettings, tokenizer=None) -> tuple[PreTrainedModel, PreTrainedModel, object]:
    """(draft, target, tokenizer): both models in eval mode, checked against the tokenizer (the
    target's own when none is given), packed as source.pack_linears says."""
    models = [
        load_causal_lm(path, source.dtype, source.device, f"{role} model", key, source.offline_key, source.section)
        for role, path, key in (("draft", source.draft, source.draft_key), ("target", source.target, source.target_key))
    ]
    if tokenizer is None:
        tokenizer = load_pretrained(AutoTokenizer, source.target, "tokenizer", source.target_key, source.offline_key)
    names = (f"the draft ({source.draft_key})", f"the target ({source.target_key})")
    check_tokenizer(tokenizer, dict(zip(names, models)))
    if source.draft_vocab is not None:
        restrict_draft_vocab(models[0], models[1], tokenizer, source)
    if source.draft_int8:
        quantize_draft(models[0], source)
    for role, model in zip(("draft", "target"), models):
        if source.pack_linears is None and can_pack(model):
            print(f"{role}: {pack_if_faster(model)}", flush=True)
        elif source.pack_linears:
            pack_linears(model)
    return models[0], models[1], tokenizer


def corpus_token_rows(path: str | Path, tokenizer, key: str = "draft_vocab_corpus") -> list[list[int]]:
    """Token ids of every string field of every line of a JSONL file (a task's prompts and
    answers, e.g. GSM8K's train.jsonl): what frequent_tokens counts."""
    path = Path(path)
    if not path.is_file():
        raise SetupError(f"{key}={path} is not a file: give a JSONL file of the task's text (e.g. GSM8K's train.jsonl)")
    rows = []
    for _, record in json_lines(path, "draft vocabulary corpus", key):
        texts = [v for v in (record.values() if isinstance(record, dict) else []) if isinstance(v, str)]
        rows.append(tokenizer("\n".join(texts)).input_ids)
    return rows


def corpus_vocabulary(paths: list, tokenizer, n: int, always: Collection[int], key: str) -> torch.Tensor:
    """The n ids most frequent in the JSONL files `paths` (a task's text), plus `always` (end of
    sequence ids): -> [<= n + len(always)] sorted ids, the draft's restricted output layer."""
    rows = [row for path in paths for row in corpus_token_rows(path, tokenizer, key)]
    return frequent_tokens(rows, n, always=always)


def restrict_draft_vocab(draft: PreTrainedModel, target: PreTrainedModel, tokenizer, source: PairSettings) -> None:
    """The draft's output layer cut to source.draft_vocab frequent tokens (and every end of
    sequence): cheaper draft passes; standard SD stays lossless, the target verifies."""
    prefix = f"{source.section}." if source.section else ""
    if source.draft_vocab_corpus is None:
        raise SetupError(f"{prefix}draft_vocab needs {prefix}draft_vocab_corpus=PATH: a JSONL file of the task's text")
    key, ends = f"{prefix}draft_vocab_corpus", response_end_ids(target, tokenizer)
    keep = corpus_vocabulary([source.draft_vocab_corpus], tokenizer, source.draft_vocab, ends, key)
    restrict_output_layer(draft, keep)
    print(f"draft output layer: {len(keep)} tokens of {draft.config.vocab_size}, from {source.draft_vocab_corpus}")


def quantize_draft(draft: PreTrainedModel, source: PairSettings) -> None:
    """The draft's linear layers (its output layer, restricted or not, too) with int8 weights."""
    key = f"{source.section}.draft_int8" if source.section else "draft_int8"
    if draft.device.type != "cpu":
        raise SetupError(f"{key}=true is a CPU path (torch's int8-weight kernel): set it false on {draft.device}")
    if not int8_kernel_available():
        raise SetupError(f"{key}=true: torch {torch.__version__} has no CPU kernel for int8 weights; set it false")
    print(f"draft: {quantize_linears(draft)} linear layers with int8 weights", flush=True)


def build_decoding(
    source: PairSettings,
    names: list[str],
    settings: PolicySettings,
    judge_path: str | None = None,
    tokenizer=None,
    keys: tuple[str, str] = ("policies", "judge_path"),
) -> DecodingSetup:
    """Settings -> DecodingSetup. The policies are built first, so a missing judge or tau stops the
    run before minutes of loading; `keys` name the policies and judge_path settings in messages."""
    if judge_path is not None or ("judge" in names and settings.judge is None):
        why = f"{keys[0]} has judge, but " if "judge" in names else ""
        settings.judge, settings.judge_threshold = load_judge_file(judge_path, settings.judge_threshold, keys[1], why)
    policies = build_policies(names, settings, keys[0])
    draft, target, tokenizer = load_pair(source, tokenizer)
    return DecodingSetup(draft, target, tokenizer, policies, settings)
