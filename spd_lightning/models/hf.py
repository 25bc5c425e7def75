"""Loading transformers models and tokenizers with one clear error instead of a hub stack trace."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers.utils import logging as transformers_logging

from spd_lightning.errors import SetupError

# transformers draws a "Loading weights" bar for every model; the tasks show their own progress.
transformers_logging.disable_progress_bar()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str, config_key: str) -> torch.dtype:
    """The torch dtype a config names; a SetupError naming `config_key` for anything else."""
    if name not in DTYPES:
        raise SetupError(f"{config_key} {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def local_copy(path: str) -> str | None:
    """`path` itself when it is a local directory, else its snapshot in the local Hugging Face
    cache, else None. Never touches the network."""
    if Path(path).is_dir():
        return path
    from huggingface_hub import try_to_load_from_cache

    for name in ("config.json", "tokenizer_config.json"):
        try:
            cached = try_to_load_from_cache(path, name)
        except ValueError:  # not a valid hub id either (e.g. a missing local path)
            return None
        if isinstance(cached, str):
            return str(Path(cached).parent)
    return None


def load_pretrained(loader, path: str, what: str, config_key: str, offline_key: str | None = None, **kwargs):
    """`loader.from_pretrained(path, **kwargs)`; on failure a SetupError naming `what`, the path
    and the config key to point at a local copy.

    With `offline_key` (the config key that turned downloads off) only a local directory or the
    local Hugging Face cache is used: a missing model fails at once, with no network retries
    (transformers' own local_files_only still probes the hub for adapter files)."""
    source = path
    if offline_key is not None:
        source = local_copy(path)
        if source is None:
            raise SetupError(
                f"cannot load the {what} {path!r}: it is not a local directory and not in the local "
                f"Hugging Face cache, and downloads are off ({offline_key}=true).\n"
                f"Point it at a local copy: {config_key}=/local/dir (a transformers directory: config.json, "
                f"weights, tokenizer files), or set {offline_key}=false to download it from the hub."
            )
        kwargs = {**kwargs, "local_files_only": True}
    try:
        return loader.from_pretrained(source, **kwargs)
    except (SafetensorError, RuntimeError) as err:  # a truncated or damaged weights file
        raise SetupError(
            f"cannot load the {what} {path!r}: a weights file there is damaged ({str(err).splitlines()[0][:200]}). "
            f"Rebuild or re-download that directory, or point {config_key} at an intact copy."
        ) from None
    except (OSError, ValueError) as err:
        where = "a local directory that" if Path(source).exists() else "not a local directory, and the hub"
        raise SetupError(
            f"cannot load the {what} {path!r} ({where} did not provide it): {str(err).splitlines()[0]}\n"
            f"Point {config_key} at a local directory holding it (config.json, weights, tokenizer files)."
        ) from None


def load_tokenizer(path: str, local_files_only: bool):
    """The tokenizer draft, target and scorer share (`model.tokenizer`), as every task loads it."""
    from transformers import AutoTokenizer

    offline_key = "model.local_files_only" if local_files_only else None
    return load_pretrained(AutoTokenizer, path, "tokenizer", "model.tokenizer", offline_key)


def check_covers_tokenizer(vocab_size: int, tokenizer, what: str) -> None:
    """Speculative decoding compares token ids, so every model must know every token of the shared
    tokenizer. A model may pad its embedding table past the tokenizer, never below it."""
    if vocab_size < len(tokenizer):
        raise SetupError(
            f"tokenizer mismatch: {what} has {vocab_size} embeddings, the tokenizer (model.tokenizer) "
            f"{len(tokenizer)} tokens. Draft, target and scorer must share one tokenizer."
        )


def check_shared_vocabulary(tokenizer, parts: dict) -> None:
    """The one vocabulary check: speculative decoding compares token ids, so every part must use
    `tokenizer`'s vocabulary. parts: what messages call a part ("the draft (pair.draft)")
    -> a model (its embeddings must cover the tokenizer) or a target backend (its own
    `check_tokenizer`: a local model's embeddings and EOS, a vLLM server's tokenisation)."""
    for name, part in parts.items():
        if hasattr(part, "check_tokenizer"):
            part.check_tokenizer(tokenizer, role=name)
        else:
            check_covers_tokenizer(part.config.vocab_size, tokenizer, name)


def resolve_device(name: str, config_key: str) -> str:
    """cpu, cuda, cuda:N, or auto (cuda when there is one); cuda without a GPU is a SetupError."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SetupError(f"{config_key}={name} but torch sees no GPU; use {config_key}=cpu")
    return name


def id_set(value) -> set[int]:
    """An EOS setting as a set of ids: None, one id, or a list of them (generation_config's form)."""
    return {value} if isinstance(value, int) else set(value or ())


def end_of_sequence_ids(model) -> set[int]:
    """Every id that ends a response: the config's EOS and each one generation_config lists
    (instruct models end a turn with one token and a document with another, e.g. Qwen's
    <|im_end|> and <|endoftext|>)."""
    ids: set[int] = set()
    for source in (model.config, getattr(model, "generation_config", None)):
        ids |= id_set(getattr(source, "eos_token_id", None))
    return ids


def response_end_ids(model, tokenizer) -> set[int]:
    """Every id that ends a response when `model` generates with `tokenizer`: the model's config
    and generation_config, and the tokenizer's (with the generation_config.json beside it)."""
    return end_of_sequence_ids(model) | tokenizer_eos_ids(tokenizer)


def tokenizer_eos_ids(tokenizer) -> set[int]:
    """The tokenizer's EOS and every id the generation_config.json beside it lists: where a
    response ends when only the shared tokenizer (model.tokenizer) is at hand."""
    ids = id_set(tokenizer.eos_token_id)
    name = getattr(tokenizer, "name_or_path", None)
    directory = local_copy(str(name)) if name else None
    config = Path(directory) / "generation_config.json" if directory else None
    if config is not None and config.is_file():
        ids |= id_set(json.loads(config.read_text()).get("eos_token_id"))
    return ids


def pad_id_of(source) -> int:
    """The id that fills padded rows: the pad token of `source` (a tokenizer or a model config),
    or its EOS where it has none (masked out either way; many causal LMs ship without a pad token)."""
    return source.pad_token_id if source.pad_token_id is not None else source.eos_token_id
