"""Hydra glue: build the world, the data, the scorer, the target and the trainer; fit; summarise."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer

from spd_lightning.data import RecordDataModule, check_vocab
from spd_lightning.errors import SetupError, VerificationError
from spd_lightning.hf import load_pretrained
from spd_lightning.module import VAL_POLICIES, SPDModule
from spd_lightning.plots import plot_training_curves
from spd_lightning.rollout import HybridVerifier
from spd_lightning.summary import print_summary
from spd_lightning.toy.build import build_toy_world

log = logging.getLogger(__name__)

# Lightning internals that warn about things this project does on purpose.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # the frozen reference scorer


def route_lightning_logs_through_hydra() -> None:
    """Lightning adds its own stderr handlers; with Hydra's handlers on the root logger every
    line would print twice and miss run.log. One set of handlers: Hydra's."""
    if logging.getLogger().handlers:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        # An advertisement for a hosted logger, printed at every start: not a log line.
        logging.getLogger(name).addFilter(lambda record: "litlogger" not in record.getMessage())


def check_shared_vocab(tokenizer, scorer, target) -> None:
    """Draft, target and scorer must share one vocabulary: speculative decoding compares token ids."""
    vocab = scorer.backbone.config.vocab_size
    # A model may pad its embedding table past the tokenizer, never below it.
    if vocab < len(tokenizer):
        raise SetupError(
            f"tokenizer mismatch: the scorer backbone has {vocab} embeddings, the tokenizer {len(tokenizer)} "
            "tokens. Draft, target and scorer must share one tokenizer."
        )
    target.check_tokenizer(tokenizer)


def build_components(cfg: DictConfig) -> tuple[RecordDataModule, SPDModule]:
    if cfg.get("toy"):
        build_toy_world(cfg.toy.out, instantiate(cfg.toy.spec))
    datamodule: RecordDataModule = instantiate(cfg.data)
    datamodule.setup("fit")
    tokenizer = load_pretrained(AutoTokenizer, cfg.model.tokenizer, "tokenizer", "model.tokenizer")
    check_vocab(datamodule.train_records + datamodule.val_records, len(tokenizer), cfg.data.path)
    scorer = instantiate(cfg.model.scorer)
    target = instantiate(cfg.target)
    check_shared_vocab(tokenizer, scorer, target)
    verifier = HybridVerifier(
        target, tokenizer, instantiate(cfg.verifier), cfg.verify.cache_size, cfg.verify.max_invalid_fraction
    )
    module = SPDModule(
        scorer=scorer,
        verifier=verifier,
        reward=instantiate(cfg.reward),
        loss=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optimizer),
        **cfg.module,
    )
    return datamodule, module


def instantiate_dict(cfg: DictConfig | None) -> list:
    """Callbacks and loggers are dicts of named entries; an entry without _target_ is skipped."""
    return [instantiate(c) for c in (cfg or {}).values() if c is not None and "_target_" in c]


def validation_metrics(trainer: L.Trainer, module: SPDModule, datamodule: RecordDataModule) -> dict[str, float]:
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in results[0].items()}


def train(cfg: DictConfig) -> float | None:
    route_lightning_logs_through_hydra()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    datamodule, module = build_components(cfg)
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=instantiate_dict(cfg.get("callbacks")), logger=instantiate_dict(cfg.get("logger"))
    )
    out = Path(cfg.paths.output_dir)
    if trainer.is_global_zero:
        log.info(
            "records: %d train, %d val, K=%d; output: %s",
            len(datamodule.train_records),
            len(datamodule.val_records),
            datamodule.block_size,
            out,
        )
    try:
        return fit_and_summarise(cfg, trainer, module, datamodule, out)
    finally:
        module.verifier.target.close()


def fit_and_summarise(
    cfg: DictConfig, trainer: L.Trainer, module: SPDModule, datamodule: RecordDataModule, out: Path
) -> float | None:
    initial = validation_metrics(trainer, module, datamodule) if cfg.validate_before_fit else {}
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except VerificationError as err:
        ckpt = out / "checkpoints" / "last.ckpt"
        hint = f"The last checkpoint is intact: resume with ckpt_path={ckpt}" if ckpt.is_file() else ""
        raise VerificationError(f"{err}\n{hint}".strip()) from None
    final = validation_metrics(trainer, module, datamodule)
    summary = {**final, **{f"initial/{k}": v for k, v in initial.items()}}
    summary["train/steps"] = trainer.global_step
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)
        metrics_csv = out / "csv" / "metrics.csv"
        if metrics_csv.is_file():
            plot_training_curves(metrics_csv, out / "training_curves.png")
        print_summary(summary, list(VAL_POLICIES), out / "summary.json")
    return summary.get(cfg.optimized_metric)
