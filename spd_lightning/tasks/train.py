"""Hydra glue: build the world, the data, the scorer, the target and the trainer; fit; summarise."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger

# Lightning has no public way to tell how a strategy starts its processes: these two launcher
# classes (exported by lightning.pytorch.strategies.launchers, underscored) are how it says so.
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from omegaconf import DictConfig, OmegaConf, read_write

from spd_lightning.data.records import check_vocab
from spd_lightning.errors import VerificationError
from spd_lightning.models.hf import check_shared_vocabulary, load_tokenizer
from spd_lightning.reporting.names import INITIAL, PARITY_METRIC
from spd_lightning.reporting.plots import draw_run_curves, set_aside
from spd_lightning.reporting.summary import accept_len_at_parity, print_summary
from spd_lightning.tasks.builders import (
    SCORER,
    build_scorer,
    ensure_toy_world,
    in_toy_world,
    instantiate_dict,
    pair_path,
)
from spd_lightning.tasks.checkpoint import check_resume_checkpoint
from spd_lightning.training.callbacks import finish_wandb, log_config, log_images
from spd_lightning.training.datamodule import RecordDataModule
from spd_lightning.training.generation import GenerationModule
from spd_lightning.training.module import SPDModule
from spd_lightning.training.prompts import PromptDataModule
from spd_lightning.verification.hybrid import HybridVerifier

log = logging.getLogger(__name__)

# Lightning internals that warn about things this project does on purpose.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # the frozen reference scorer
# The training loaders resume mid-epoch by their own means (training/shuffle.py), not state_dict.
warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable.*")
# The GRPO modules step their optimiser by hand; a checkpoint holds the weights after the step,
# which is what a resumed run must go on from.
warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization and every_n_train_steps.*")


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


def load_scorer(cfg: DictConfig):
    """The scorer of cfg.model; one from outside the toy world loads before the world is built,
    so a missing model stops the run in seconds."""
    scorer = None if in_toy_world(cfg, "model.path") else build_scorer(cfg.model)
    ensure_toy_world(cfg)
    return scorer if scorer is not None else build_scorer(cfg.model)


def build_verifier(cfg: DictConfig, tokenizer, scorer) -> HybridVerifier:
    """The target of cfg.target behind the verifier, after checking it shares the scorer's vocabulary."""
    target = instantiate(cfg.target)
    check_shared_vocabulary(tokenizer, {SCORER: scorer.backbone, "target": target})
    return HybridVerifier(
        target, tokenizer, instantiate(cfg.answer), cfg.verify.cache_size, cfg.verify.max_invalid_fraction
    )


def build_components(cfg: DictConfig) -> tuple[RecordDataModule | PromptDataModule, SPDModule]:
    if cfg.get("rollout") is not None and cfg.rollout.kind == "generation":
        return build_generation_components(cfg)
    scorer = load_scorer(cfg)
    datamodule: RecordDataModule = instantiate(cfg.data)
    datamodule.setup("fit")
    tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.local_files_only)
    check_vocab(datamodule.train_records + datamodule.val_records, len(tokenizer), cfg.data.path)
    verifier = build_verifier(cfg, tokenizer, scorer)
    module = SPDModule(
        scorer=scorer,
        verifier=verifier,
        reward=instantiate(cfg.reward),
        loss=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optimizer),
        **cfg.module,
    )
    return datamodule, module


def build_generation_components(cfg: DictConfig) -> tuple[PromptDataModule, GenerationModule]:
    """rollout=generation: prompts (data=toy_prompts, data=gsm8k, ...) and the episode module."""
    scorer = load_scorer(cfg)
    tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.local_files_only)
    rollout = cfg.rollout
    datamodule = PromptDataModule(
        instantiate(cfg.data), tokenizer, rollout.block_size, rollout.val_fraction, rollout.batch_size,
        rollout.val_batch_size, cfg.seed,
    )  # fmt: skip
    datamodule.setup("fit")
    verifier = build_verifier(cfg, tokenizer, scorer)
    module = GenerationModule(
        scorer=scorer,
        verifier=verifier,
        reward=instantiate(cfg.reward),
        loss=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optimizer),
        draft_path=pair_path(cfg, "draft"),
        block_size=rollout.block_size,
        max_new_tokens=rollout.max_new_tokens,
        reference=rollout.reference,
        speed=rollout.speed,
        max_forks=rollout.max_forks,
        completions_path=rollout.completions,
        val_accept_all=rollout.val_accept_all,
        cached_paths=rollout.cached_paths,
        features_path=rollout.features,
        overlap=rollout.overlap,
        segment=rollout.segment,
        center=rollout.center,
        decisions=rollout.decisions,
        draft_dtype=cfg.model.dtype,  # the draft proposes in the scorer's dtype
        **cfg.module,
    )
    return datamodule, module


class LastValidation(L.Callback):
    """The metrics of fit's latest validation and the step it ran after: a fit whose last step
    falls on val_check_interval has just validated its final weights, and validating them again
    for the summary would double the run's longest evaluation (an hour of whole generations on
    the real pair)."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.metrics: dict[str, float] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.step = trainer.global_step
        self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    def of(self, trainer: L.Trainer) -> dict[str, float] | None:
        """Its metrics if fit validated after its last step in this process, else None."""
        return self.metrics if self.metrics and self.step == trainer.global_step else None


def validation_metrics(
    trainer: L.Trainer, module: SPDModule, datamodule: RecordDataModule, ckpt_path: str | None = None
) -> dict[str, float]:
    results = trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
    # trainer.limit_val_batches=0 (validation off: a real pair's whole generations cost an hour) gives none.
    return {k: float(v) for k, v in results[0].items()} if results else {}


def learn_csv_columns(trainer: L.Trainer) -> None:
    """trainer=ddp_spawn runs every trainer call in new processes that log into copies of this
    process's loggers: tell its CSV writer the columns they wrote, or the next call would
    rewrite metrics.csv with a header that lacks them (and fail)."""
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger) and os.path.isfile(logger.experiment.metrics_file_path):
            with open(logger.experiment.metrics_file_path, newline="") as f:
                header = next(csv.reader(f), [])
            logger.experiment.metrics_keys = sorted(set(logger.experiment.metrics_keys) | set(header))


def config_flags(argv: list[str]) -> list[str]:
    """The --config-path/--config-name/--config-dir flags of a Hydra command line (or their
    short forms), as --config-X=VALUE; everything else is left out."""
    parser = argparse.ArgumentParser(add_help=False)
    for short, name in (("-cp", "path"), ("-cn", "name"), ("-cd", "dir")):
        parser.add_argument(short, f"--config-{name}", dest=name)
    known, _ = parser.parse_known_args(argv)
    return [f"--config-{k}={v}" for k in ("path", "name", "dir") if (v := getattr(known, k))]


def children_run_this_job(trainer: L.Trainer) -> Callable[[], None]:
    """trainer=ddp/fsdp2 start the other ranks by running run.py again: Lightning passes on sys.argv
    plus `hydra.run.dir=<hydra.run.dir>`. In a multirun job that would re-run the whole sweep in
    every child, into directories of its own. Here each child runs just this job (its overrides,
    RUN mode) into this job's directory. Returns what undoes it once the job is done, so that the
    sweep's next job starts processes of its own."""
    strategy = trainer.strategy
    launches = isinstance(strategy.launcher, _SubprocessScriptLauncher)
    if not launches or strategy.cluster_environment.creates_processes_externally:
        return lambda: None  # one process, spawned processes, or ranks started by torchrun/Slurm
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return lambda: None  # a single run: Lightning's command is right
    hydra_cfg, argv = HydraConfig.get(), sys.argv
    sys.argv = [argv[0], *config_flags(argv[1:]), *hydra_cfg.overrides.task, "hydra.mode=RUN"]
    with read_write(hydra_cfg.run):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir

    def undo() -> None:
        sys.argv = argv
        # What Lightning's launcher left for this job's processes (their group, its address).
        for var in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE"):
            os.environ.pop(var, None)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    return undo


def train(cfg: DictConfig) -> float | None:
    route_lightning_logs_through_hydra()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    check_resume_checkpoint(cfg.get("ckpt_path"))
    out = Path(cfg.paths.output_dir)
    if cfg.get("ckpt_path") and int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0:
        set_aside(out / "csv" / "metrics.csv")  # resumed in its own folder: the curves keep the steps before
    datamodule, module = build_components(cfg)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=[*instantiate_dict(cfg.get("callbacks")), LastValidation()],
        logger=instantiate_dict(cfg.get("logger")),
    )
    undo_launch = children_run_this_job(trainer)
    if trainer.is_global_zero:
        log.info(
            "%s: %d train, %d val, K=%d; output: %s",
            "prompts" if isinstance(datamodule, PromptDataModule) else "records",
            len(datamodule.train_records),
            len(datamodule.val_records),
            datamodule.block_size,
            out,
        )
    try:
        # The resolved config is the run's hyperparameters, on every logger (the module logs none).
        log_config(trainer.loggers, OmegaConf.to_container(cfg, resolve=True))
        return fit_and_summarise(cfg, trainer, module, datamodule, out)
    finally:
        module.verifier.target.close()
        # Always end the wandb run (failed on a crash), so a multirun's next job gets its own.
        finish_wandb(crashed=sys.exc_info()[0] is not None)
        undo_launch()


def draw_curves(trainer: L.Trainer, out: Path) -> None:
    if trainer.is_global_zero:
        draw_run_curves(out)


def fit_and_summarise(
    cfg: DictConfig, trainer: L.Trainer, module: SPDModule, datamodule: RecordDataModule, out: Path
) -> float | None:
    spawned = isinstance(trainer.strategy.launcher, _MultiProcessingLauncher)  # trainer=ddp_spawn
    # A resumed run starts from its checkpoint's weights: "initial/" reports those, not fresh ones.
    resume = cfg.get("ckpt_path")
    initial = validation_metrics(trainer, module, datamodule, resume) if cfg.validate_before_fit else {}
    if spawned:
        learn_csv_columns(trainer)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except BaseException as err:  # a run stopped (Ctrl+C, SIGTERM, a dead server) still shows its curves
        draw_curves(trainer, out)
        if isinstance(err, VerificationError):
            ckpt = out / "checkpoints" / "last.ckpt"  # a folder under trainer=fsdp2
            hint = f"The last checkpoint is intact: resume with ckpt_path={ckpt}" if ckpt.exists() else ""
            raise VerificationError(f"{err}\n{hint}".strip()) from None
        raise
    steps = trainer.global_step
    if spawned:
        learn_csv_columns(trainer)
        # Lightning hands the spawned processes' weights and metrics back, not their step count.
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if best:
            steps = torch.load(best, map_location="cpu", mmap=True, weights_only=False)["global_step"]
    # Every rank gets the same values: validation metrics are reduced over the processes (sync_dist).
    # trainer=ddp_spawn validated in processes of their own, whose callbacks stay there.
    last = next((c for c in trainer.callbacks if isinstance(c, LastValidation)), None)
    final = (None if spawned or last is None else last.of(trainer)) or validation_metrics(trainer, module, datamodule)
    summary = {**final, **{f"{INITIAL}{k}": v for k, v in initial.items()}}
    summary["train/steps"] = steps
    summary[PARITY_METRIC] = accept_len_at_parity(summary, cfg.parity_tolerance)
    if trainer.is_global_zero:
        for logger in trainer.loggers:  # so that W&B sweeps can optimise it too
            logger.log_metrics({PARITY_METRIC: summary[PARITY_METRIC]}, step=steps)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)
        draw_curves(trainer, out)
        log_images(trainer.loggers, sorted(out.glob("*.png")), step=steps)
        print_summary(summary, out / "summary.json")
    return summary.get(cfg.optimized_metric)
