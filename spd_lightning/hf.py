"""Loading transformers models and tokenizers with one clear error instead of a hub stack trace."""

from __future__ import annotations

from pathlib import Path

from spd_lightning.errors import SetupError


def load_pretrained(loader, path: str, what: str, config_key: str, **kwargs):
    """`loader.from_pretrained(path, **kwargs)`; on failure a SetupError naming `what`, the path
    and the config key to point at a local copy."""
    try:
        return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        where = "a local directory that" if Path(path).exists() else "not a local directory, and the hub"
        raise SetupError(
            f"cannot load the {what} {path!r} ({where} did not provide it): {str(err).splitlines()[0]}\n"
            f"Point {config_key} at a local directory holding it (config.json, weights, tokenizer files)."
        ) from None
