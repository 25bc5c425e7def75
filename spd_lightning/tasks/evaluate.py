"""task=eval: the trained scorer against standard SD, accept-all and training-free rules.

    python run.py task=eval ckpt_path=outputs/train/runs/<time>/checkpoints/last.ckpt
    python run.py task=eval ckpt_path=... eval.max_records=128 'eval.topk=[2,5]' module.threshold=0.7

On the held-out records of the data group (data.val_path, or the split of data.path), every
reachable block end of every record is verified once by the target (outcomes.py); then the scorer
at each threshold, standard SD, accept-all, and the top-k, KL and entropy rules (rules.py) are
table lookups on the same verdicts. The rules read the draft's and the target's distributions from
in-process copies of both models (pair.draft, pair.target), also with target=vllm: vLLM's
prompt logprobs hold only the top few tokens, not the whole distributions KL and entropy need.

Writes eval.json, tradeoff.csv and tradeoff.png to the run directory, logs them to wandb when that
logger is on, and ends stdout with the scorer at module.threshold against standard SD:
`scorer_accept_len=... scorer_accuracy=... sd_accept_len=... sd_accuracy=...`.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from transformers import PreTrainedModel

from spd_lightning.core.rules import TokenFeatures, quantile_thresholds, token_features
from spd_lightning.core.sampling import mismatch_mask
from spd_lightning.core.stats import wilson_interval
from spd_lightning.data.records import Record, check_vocab, collate_records
from spd_lightning.decoding.registry import EVAL_FAMILIES, SPECS
from spd_lightning.errors import RecordError
from spd_lightning.models.hf import check_shared_vocabulary, load_tokenizer, pad_id_of, resolve_device
from spd_lightning.models.lm import teacher_forced_logits
from spd_lightning.models.scorer import ScoringActor
from spd_lightning.reporting.plots import plot_tradeoff
from spd_lightning.reporting.tables import FigureTable, print_tables, write_markdown
from spd_lightning.targets import LocalTarget
from spd_lightning.targets.local import load_causal_lm
from spd_lightning.tasks.builders import SCORER, ensure_toy_world, instantiate_dict, pair_path
from spd_lightning.tasks.checkpoint import load_trained_scorer
from spd_lightning.training.callbacks import finish_wandb, log_config, log_images, wandb_loggers
from spd_lightning.verification.hybrid import HybridVerifier
from spd_lightning.verification.outcomes import (
    OutcomeTable,
    RuleSweep,
    best_at_parity,
    policy_points,
    tradeoff_rows,
    verify_outcomes,
)

log = logging.getLogger(__name__)

CSV_COLUMNS = [
    "policy",
    "parameter",
    "accuracy",
    "accept_len",
    "accepted_mismatches",
    "accuracy_drop",
    "accept_len_ratio",
]


@dataclass
class EvalConfig:
    # Accept thresholds of the trained scorer to sweep (module.threshold and auto_thresholds quantiles
    # of its probabilities at mismatches are always added).
    thresholds: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    # The top-k rule: accept a mismatching draft token when it is in the target's top-k.
    topk: list[int] = field(default_factory=lambda: [2, 3, 5, 10])
    # The KL rule: accept when KL(target || draft) <= tau; null: auto_thresholds quantiles.
    kl_thresholds: Optional[list[float]] = None  # noqa: UP045 (OmegaConf reads typing.Optional)
    # The KL rule verifies strictly where the target's top-1 probability exceeds this; null: never.
    kl_confidence: Optional[float] = 0.9  # noqa: UP045
    # The entropy rule (FLy): accept when the target's entropy (nats) >= tau, i.e. the target is
    # unsure there; null: auto_thresholds quantiles.
    entropy_thresholds: Optional[list[float]] = None  # noqa: UP045
    # How many quantiles of the values seen at mismatches a null threshold list becomes (and how many
    # quantiles of the scorer's probabilities join eval.thresholds). Lookups cost no target call, and
    # a coarse sweep can step over a rule's best point (values at mismatches cluster near 0).
    auto_thresholds: int = 49
    # Evaluate at most this many held-out records (null: all).
    max_records: Optional[int] = None  # noqa: UP045
    # Records per scorer / rule-model forward and per verification call; lower it for long contexts.
    batch_size: int = 64
    # dtype of the models the training-free rules read (pair.draft, pair.target): float32, bfloat16, float16.
    dtype: str = "float32"
    # Where the scorer and the rule models run: cpu, cuda, cuda:N, or auto (cuda when available).
    device: str = "cpu"


def load_rule_model(path: str, key: str, dtype: str, device: str, tokenizer) -> PreTrainedModel:
    """A causal LM for the training-free rules, on `device` in eval mode; it must cover the tokenizer."""
    model = load_causal_lm(path, dtype, device, "causal LM", key, section="eval")
    check_shared_vocabulary(tokenizer, {f"{key}={path}": model})
    return model


def rule_models(cfg: DictConfig, target, tokenizer) -> tuple[PreTrainedModel, PreTrainedModel]:
    """(target LM, draft LM) for the rules; an in-process target of the same path is reused."""
    ecfg, device = cfg.eval, resolve_device(cfg.eval.device, "eval.device")
    target_path, draft_path = pair_path(cfg, "target"), pair_path(cfg, "draft")
    same = isinstance(target, LocalTarget) and cfg.target.get("model_path") == target_path
    if same and str(target.device) == device and ecfg.dtype == cfg.target.dtype:
        target_lm = target.model
    else:
        target_lm = load_rule_model(target_path, "pair.target", ecfg.dtype, device, tokenizer)
    return target_lm, load_rule_model(draft_path, "pair.draft", ecfg.dtype, device, tokenizer)


def eval_records(cfg: DictConfig, vocab: int) -> list[Record]:
    """The held-out records of the data group, at most eval.max_records of them."""
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    records = datamodule.val_records[: cfg.eval.max_records]
    if not records:
        raise RecordError(f"{cfg.data.path}: no held-out records to evaluate (data.val_path, data.val_fraction)")
    check_vocab(records, vocab, cfg.data.get("val_path") or cfg.data.path)
    return records


@torch.no_grad()
def collect(
    records: list[Record],
    scorer: ScoringActor,
    verifier: HybridVerifier,
    models: tuple[PreTrainedModel, PreTrainedModel],
    pad_id: int,
    batch_size: int,
) -> tuple[OutcomeTable, torch.Tensor, TokenFeatures, dict[str, float]]:
    """Per batch: the scorer's accept probabilities, the rules' features and the verdict of every
    reachable outcome. -> (table, probs [N, K], features, summed verification stats)."""
    device = next(scorer.parameters()).device
    tables, probs, features, stats = [], [], [], {}
    for start in tqdm(range(0, len(records), batch_size), desc="eval", unit="batch"):
        chunk = records[start : start + batch_size]
        batch = collate_records(chunk)
        mismatch = mismatch_mask(batch.draft_ids, batch.target_ids)  # [B, K]
        inputs = (batch.input_ids, batch.attention_mask, batch.context_len, batch.target_ids)
        probs.append(torch.sigmoid(scorer(*(t.to(device) for t in inputs)).float()).cpu())  # [B, K]
        contexts, drafts = [r.context_ids for r in chunk], [r.draft_ids for r in chunk]
        target_logits, draft_logits = (teacher_forced_logits(m, contexts, drafts, pad_id) for m in models)
        features.append(token_features(target_logits, draft_logits, batch.draft_ids).cpu())
        table, batch_stats = verify_outcomes(verifier, chunk, mismatch)
        tables.append(table)
        for key, value in batch_stats.items():
            stats[key] = stats.get(key, 0) + value
    return OutcomeTable.cat(tables), torch.cat(probs), TokenFeatures.cat(features), stats


def sweep(cfg: DictConfig, table: OutcomeTable, probs: torch.Tensor, features: TokenFeatures) -> list[dict]:
    """Every policy point's metrics (outcomes.tradeoff_rows); the scorer's sweep includes module.threshold
    and auto_thresholds quantiles of its accept probabilities at mismatch positions."""
    ecfg = cfg.eval
    # A trained scorer's probabilities pile up near 0 and 1, where fixed thresholds all give one
    # point: quantiles of its probabilities at mismatches spread its curve like the rules' ones.
    spread = quantile_thresholds(probs, table.mismatch, ecfg.auto_thresholds)
    thresholds = sorted({*ecfg.thresholds, float(cfg.module.threshold), *spread})
    rules = RuleSweep(
        thresholds,
        list(ecfg.topk),
        None if ecfg.kl_thresholds is None else list(ecfg.kl_thresholds),
        None if ecfg.entropy_thresholds is None else list(ecfg.entropy_thresholds),
        ecfg.kl_confidence,
        ecfg.auto_thresholds,
    )
    points = policy_points(table.mismatch, probs, features, rules)
    return tradeoff_rows(table, points)


def headline(rows: list[dict], threshold: float) -> dict[str, float]:
    """The scorer at the configured threshold and standard SD: the numbers of the last line."""
    scorer = next(r for r in rows if r["policy"] == "scorer" and r["parameter"] == threshold)
    sd = next(r for r in rows if r["policy"] == "standard_sd")
    return {
        "scorer_accept_len": scorer["accept_len"],
        "scorer_accuracy": scorer["accuracy"],
        "sd_accept_len": sd["accept_len"],
        "sd_accuracy": sd["accuracy"],
    }


def write_outputs(out: Path, summary: dict, rows: list[dict], highlight: dict) -> list[Path]:
    """eval.json, tradeoff.csv and tradeoff.png in `out`; returns the PNG paths."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({**summary, "policies": rows}, indent=2))
    with (out / "tradeoff.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return [plot_tradeoff(rows, {p: SPECS[p].label for p in EVAL_FAMILIES}, highlight, out / "tradeoff.png")]


def log_results(loggers: list, metrics: dict[str, float], rows: list[dict], pngs: list[Path]) -> None:
    """The headline metrics on every logger; the whole table and the plot on wandb."""
    for logger in loggers:
        logger.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=0)
    for logger in wandb_loggers(loggers):
        data = [[r[c] for c in CSV_COLUMNS] for r in rows]
        logger.log_table(key="eval/tradeoff", columns=CSV_COLUMNS, data=data, step=0)
    log_images(loggers, pngs, step=0)
    for logger in loggers:
        logger.finalize("success")


def print_table(rows: list[dict], threshold: float, tolerance: float, num_records: int, out: Path) -> None:
    """The configured scorer, the baselines, and each family's longest blocks at parity with SD."""
    columns = ["policy", "param", "acc.", "95% CI", "kept/blk", "vs SD"]
    table = FigureTable(f"Evaluation: {num_records} held-out records", columns)

    def add(name: str, row: dict | None) -> None:
        if row is None:
            table.add(name, "-", "-", "-", "-", "-")
            return
        ratio = row["accept_len_ratio"]
        param = "" if row["parameter"] is None else f"{row['parameter']:.4g}"
        ratio_text = "-" if ratio is None else f"{ratio:.2f}x"
        low, high = wilson_interval(round(row["accuracy"] * num_records), num_records)
        ci = f"{low:.3f}-{high:.3f}"
        table.add(name, param, f"{row['accuracy']:.3f}", ci, f"{row['accept_len']:.3f}", ratio_text)

    add("SPD scorer (configured)", next(r for r in rows if r["policy"] == "scorer" and r["parameter"] == threshold))
    for policy in (p for p in EVAL_FAMILIES if not SPECS[p].swept):  # one point each
        add(SPECS[policy].short, next(r for r in rows if r["policy"] == policy))
    parity = best_at_parity(rows, tolerance)
    for policy in (p for p in EVAL_FAMILIES if SPECS[p].swept):
        add(f"{SPECS[policy].short}, at parity", parity.get(policy))
    notes = (
        f"acc.: accuracy; kept/blk: draft tokens kept per block (accept_len). At parity: each family's longest "
        f"blocks with accuracy at most {tolerance} below standard SD ('-': none). KL = KL(target || draft); entropy "
        "= the target's. 95% CI: Wilson, treating records as independent (blocks of one response are not).",
    )
    markdown = write_markdown(out / "eval.md", [table], notes, f"{num_records} held-out records")
    print_tables(table, notes=(*notes, f"all {len(rows)} policy points: {out / 'tradeoff.csv'}; table: {markdown}"))


def load_inputs(cfg: DictConfig) -> tuple[ScoringActor, object, list[Record]]:
    """(trained scorer on eval.device, tokenizer, held-out records); a missing ckpt_path stops first."""
    if not cfg.get("ckpt_path"):
        load_trained_scorer(cfg.model, None, "eval")  # its one-line error, before anything is built
    ensure_toy_world(cfg)
    scorer, hparams = load_trained_scorer(cfg.model, cfg.ckpt_path, "eval")
    if "threshold" in hparams and float(hparams["threshold"]) != float(cfg.module.threshold):
        log.info("module.threshold=%s (the training run validated at %s)", cfg.module.threshold, hparams["threshold"])
    tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.local_files_only)
    return scorer.to(resolve_device(cfg.eval.device, "eval.device")), tokenizer, eval_records(cfg, len(tokenizer))


def summarize(cfg: DictConfig, table: OutcomeTable, rows: list[dict], stats: dict) -> dict:
    """eval.json without its policy rows: the run, the records, the headline, each family at parity."""
    return {
        "checkpoint": str(cfg.ckpt_path),
        "threshold": float(cfg.module.threshold),
        "records": int(table.verified.sum()),
        "excluded_records": int((~table.verified).sum()),
        "block_size": int(table.mismatch.shape[1]),
        "mismatches_per_block": float(table.mismatch.sum(-1).float().mean()),
        "kl": "KL(target || draft), nats",
        "kl_confidence": cfg.eval.kl_confidence,
        **headline(rows, float(cfg.module.threshold)),
        "parity_tolerance": cfg.parity_tolerance,
        "best_at_parity": best_at_parity(rows, cfg.parity_tolerance),
        "verify": stats,
    }


def run_eval(cfg: DictConfig, scorer: ScoringActor, tokenizer, records: list[Record], target) -> dict[str, float]:
    """Verify, sweep, write, log and print; returns the headline metrics."""

    check_shared_vocabulary(tokenizer, {SCORER: scorer.backbone, "target": target})
    verifier = HybridVerifier(
        target, tokenizer, instantiate(cfg.answer), cfg.verify.cache_size, cfg.verify.max_invalid_fraction
    )
    models = rule_models(cfg, target, tokenizer)
    loggers = instantiate_dict(cfg.get("logger"))
    log_config(loggers, OmegaConf.to_container(cfg, resolve=True))
    out, threshold = Path(cfg.paths.output_dir), float(cfg.module.threshold)
    log.info("evaluating %d held-out records, K=%d; output: %s", len(records), records[0].block_size, out)
    pad_id = pad_id_of(tokenizer)
    table, probs, features, stats = collect(records, scorer, verifier, models, pad_id, cfg.eval.batch_size)
    rows = sweep(cfg, table, probs, features)
    summary = summarize(cfg, table, rows, stats)
    metrics = headline(rows, threshold)
    highlight = next(r for r in rows if r["policy"] == "scorer" and r["parameter"] == threshold)
    pngs = write_outputs(out, summary, rows, highlight)
    log_results(loggers, metrics, rows, pngs)
    print_table(rows, threshold, cfg.parity_tolerance, summary["records"], out)
    if summary["excluded_records"]:
        log.warning("%d records left out: the target could not verify them", summary["excluded_records"])
    return metrics


def evaluate(cfg: DictConfig) -> float:
    """task=eval (see the module docstring); returns the scorer's accept_len at module.threshold."""
    torch.manual_seed(cfg.seed)
    scorer, tokenizer, records = load_inputs(cfg)
    target = instantiate(cfg.target)
    failed = True
    try:
        metrics = run_eval(cfg, scorer, tokenizer, records, target)
        failed = False
    finally:
        target.close()
        finish_wandb(crashed=failed)  # before the last line, so that nothing prints after it
    print(" ".join(f"{k}={v:.3f}" for k, v in metrics.items()), flush=True)
    return metrics["scorer_accept_len"]
