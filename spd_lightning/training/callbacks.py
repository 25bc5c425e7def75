"""Dashboards for wandb: what the scorer decides on mismatches, and what that did to the answer.

`SampleDashboard` reads what `SPDModule.validation_step` returns and, after every validation,
logs to each WandbLogger of the trainer:

- `val/accept_prob_mismatch`: a histogram of the scorer's accept probability at every mismatch
  position of the validation records (matches carry no decision);
- `val/samples`: a table of sample hybrids of the trained scorer (threshold policy): the end of
  the context, the draft block marked token by token, the target's token where the block was
  cut, the response, its verdict, scenario and reward.

Without a WandbLogger it does nothing. Only rank 0 collects and logs; under DDP the histogram
and the table cover rank 0's share of the validation records.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger, WandbLogger

from spd_lightning.core.reward import scenario
from spd_lightning.errors import SetupError

SAMPLE_COLUMNS = [
    "step",
    "context",
    "draft",
    "target_token",
    "accept_len",
    "response",
    "reference",
    "verdict",
    "scenario",
    "reward",
]


def wandb_loggers(loggers: Iterable[Logger]) -> list[WandbLogger]:
    return [lg for lg in loggers if isinstance(lg, WandbLogger)]


def _token(tokenizer, token_id: int) -> str:
    if tokenizer is None:
        return str(token_id)
    return tokenizer.decode([token_id]).strip().replace("\n", "\\n") or repr(tokenizer.decode([token_id]))


def render_block(tokenizer, draft_ids: list[int], mismatch: list[bool], probs: list[float], accept_len: int) -> str:
    """The draft block as the policy executed it, e.g. `our [result ✓0.91] [makes ✗0.08] (is)`:
    plain = matching token kept, ✓ = mismatch accepted, ✗ = the mismatch that ended the block
    (the target's token replaces it), (...) = never executed, with the accept probability."""
    parts = []
    for i, (tok_id, mis, p) in enumerate(zip(draft_ids, mismatch, probs)):
        tok = _token(tokenizer, tok_id)
        if i > accept_len:
            parts.append(f"({tok})")
        elif not mis:
            parts.append(tok)
        else:
            parts.append(f"[{tok} {'✓' if i < accept_len else '✗'}{p:.2f}]")
    return " ".join(parts)


def sample_rows(batch, outputs: dict, tokenizer, step: int, context_tokens: int, limit: int) -> list[list[Any]]:
    """Up to `limit` table rows (SAMPLE_COLUMNS) for the records of one validation batch that have
    at least one mismatch (the others involve no decision); column 0 of the outputs is the
    trained scorer."""
    mismatch = outputs["mismatch"].cpu()  # [B, K]
    probs = outputs["accept_probs"].float().cpu()  # [B, K]
    accept_len = outputs["accept_len"][:, 0].cpu()  # [B]
    rewards = outputs["rewards"][:, 0].float().cpu()  # [B]
    correct = outputs["correct"][:, 0].cpu()  # [B]
    rows: list[list[Any]] = []
    for b, record in enumerate(batch.records):
        if len(rows) >= limit:
            break
        if not mismatch[b].any():
            continue
        j, k = int(accept_len[b]), len(record.draft_ids)
        tail = record.context_ids[-context_tokens:]
        context = tokenizer.decode(tail) if tokenizer is not None else " ".join(map(str, tail))
        if len(record.context_ids) > context_tokens:
            context = "…" + context
        text = outputs["texts"].get((b, j))
        accepted_any = bool(mismatch[b, :j].any())
        verdict = "unverified" if text is None else ("correct" if bool(correct[b]) else "wrong")
        scenario_ = "-" if text is None else scenario(accepted_any, verdict == "correct")
        rows.append(
            [
                step,
                context,
                render_block(tokenizer, record.draft_ids, mismatch[b].tolist(), probs[b].tolist(), j),
                _token(tokenizer, record.target_ids[j]) if j < k else "",
                j,
                text if text is not None else "",
                record.reference,
                verdict,
                scenario_,
                float(rewards[b]),
            ]
        )
    return rows


class SampleDashboard(L.Callback):
    """Logs an accept-probability histogram and a table of sample hybrids to wandb after every
    validation (see the module docstring). A no-op without a WandbLogger."""

    def __init__(self, num_samples: int = 16, context_tokens: int = 12, histogram_bins: int = 20) -> None:
        self.num_samples = num_samples
        self.context_tokens = context_tokens
        self.histogram_bins = histogram_bins
        self._probs: list[torch.Tensor] = []
        self._rows: list[list[Any]] = []

    def _active(self, trainer: L.Trainer) -> bool:
        return trainer.is_global_zero and not trainer.sanity_checking and bool(wandb_loggers(trainer.loggers))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._probs, self._rows = [], []

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not isinstance(outputs, dict) or not self._active(trainer):
            return
        self._probs.append(outputs["accept_probs"][outputs["mismatch"]].detach().float().cpu())
        if len(self._rows) < self.num_samples:
            tokenizer = getattr(getattr(pl_module, "verifier", None), "tokenizer", None)
            limit = self.num_samples - len(self._rows)
            self._rows += sample_rows(batch, outputs, tokenizer, trainer.global_step, self.context_tokens, limit)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active(trainer) or not (self._probs or self._rows):
            return
        import numpy as np
        import wandb

        probs = torch.cat(self._probs).numpy() if self._probs else np.zeros(0)
        metrics: dict[str, Any] = {}
        if probs.size:
            # Fixed bins over [0, 1], so the histograms of successive validations line up.
            counts_edges = np.histogram(probs, bins=self.histogram_bins, range=(0.0, 1.0))
            metrics["val/accept_prob_mismatch"] = wandb.Histogram(np_histogram=counts_edges)
        if self._rows:
            metrics["val/samples"] = wandb.Table(columns=SAMPLE_COLUMNS, data=self._rows)
        for logger in wandb_loggers(trainer.loggers):
            logger.log_metrics(metrics, step=trainer.global_step)
        self._probs, self._rows = [], []


# Tensors only: nothing in them names a folder.
TENSOR_STATE = ("state_dict", "optimizer_states", "lr_schedulers")


class PortablePaths(L.Callback):
    """Saves checkpoints whose paths under the project root (`root`, default $PROJECT_ROOT) are
    relative to it: the checkpoint callback's folders and the module's settings otherwise name this
    machine's folders, and the real pair's runs are committed and resumed elsewhere."""

    def __init__(self, root: str | None = None) -> None:
        self.root = root

    def _root(self) -> str | None:
        root = self.root if self.root is not None else os.environ.get("PROJECT_ROOT")
        return str(Path(root).resolve()) if root else None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if root := self._root():
            make_paths_relative(checkpoint, root)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Runs before the callbacks load their state: ModelCheckpoint keeps its best and last
        # checkpoints on a resume only if the saved folder equals its own (absolute) one.
        root = self._root()
        for state in checkpoint.get("callbacks", {}).values() if root else []:
            if isinstance(state, dict) and "dirpath" in state:
                for key in ("dirpath", "best_model_path", "kth_best_model_path", "last_model_path"):
                    if state.get(key):
                        state[key] = os.path.realpath(os.path.join(root, state[key]))
                if "best_k_models" in state:
                    state["best_k_models"] = {os.path.realpath(os.path.join(root, p)): v
                                              for p, v in state["best_k_models"].items()}  # fmt: skip


def log_config(loggers: Iterable[Logger], config: dict, root: str | Path | None = None) -> None:
    """The resolved config as every logger's hyperparameters; this starts the wandb run, so a
    wandb that cannot log in stops here with one message. Paths under `root` (default: the
    project root, $PROJECT_ROOT) are logged relative to it: a run's hparams.yaml can be shared or
    committed without naming the machine's folders."""
    root = root if root is not None else os.environ.get("PROJECT_ROOT")
    if root:
        config = relative_paths(config, str(Path(root).resolve()))
    for logger in loggers:
        try:
            logger.log_hyperparams(config)
        except Exception as err:
            if not isinstance(logger, WandbLogger):
                raise
            from wandb.errors import UsageError

            if isinstance(err, UsageError):  # no API key, no login
                raise SetupError(
                    f"wandb could not start a run ({err}). Log in (`wandb login` or $WANDB_API_KEY), or log "
                    "offline with WANDB_MODE=offline or logger.wandb.mode=offline and `wandb sync` the run later."
                ) from None
            raise


def log_images(loggers: Iterable[Logger], paths: Iterable[Path], step: int | None = None) -> None:
    """Logs each PNG (training_curves.png, evaluation plots) to every WandbLogger as `plots/<name>`."""
    targets = wandb_loggers(loggers)
    for path in paths:
        for logger in targets:
            logger.log_image(key=f"plots/{Path(path).stem}", images=[str(path)], step=step)


def finish_wandb(crashed: bool = False) -> None:
    """Ends this process's wandb run, if one was started (marked failed after a crash), so that
    the next job of a multirun starts a run of its own instead of reusing this one."""
    wandb = sys.modules.get("wandb")  # never imported: no run to finish
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if crashed else 0)


def make_paths_relative(checkpoint: dict, root: str) -> None:
    """In place: every entry of a Lightning checkpoint but its tensors, with paths under `root`
    made relative to it."""
    for key in [k for k in checkpoint if k not in TENSOR_STATE]:
        checkpoint[key] = relative_paths(checkpoint[key], root)


def relative_paths(value: Any, root: str) -> Any:
    """`value` (a resolved config: dicts, lists, scalars) with every string that names `root` or a
    path under it made relative to `root`."""
    if isinstance(value, dict):
        return type(value)((key, relative_paths(item, root)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(relative_paths(item, root) for item in value)
    if isinstance(value, str) and (value == root or value.startswith(root + os.sep)):
        return os.path.relpath(value, root)
    return value
