"""task=decode: whole generations by lossy speculative decoding, against greedy and standard SD.

    python run.py task=decode ckpt_path=outputs/train/runs/<time>/checkpoints/last.ckpt
    python run.py task=decode ckpt_path=CKPT data=prompts data.raw=prompts.jsonl \
        pair.draft=/models/draft pair.target=/models/target model=...

Every prompt is decoded once per policy (decode.policies) with the draft, the target and the
trained scorer in-process (spd_lightning/decoding/loop.py has the loop). Writes decode.json (the
figures of every policy) and decode_samples.jsonl (every prompt's responses) to the run
directory, prints a table, and ends with one line of the headline figures. Returns
cfg.optimized_metric from decode.json (by default the scorer's target calls per token: lower
is better).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from transformers import PreTrainedModel

from spd_lightning.core.sampling import changed_at, threshold_changing_at_most
from spd_lightning.core.stats import wilson_interval
from spd_lightning.data.prompts import Prompt, encode_prompts
from spd_lightning.decoding.loop import Generation, LoopSettings, generate, generate_cached, summarize, timed
from spd_lightning.decoding.policies import (
    DECODE_POLICIES,
    Policy,
    PolicySettings,
    judge_policy,
    judge_probabilities,
    named_policy,
    scorer_policy,
    watched_sd,
)
from spd_lightning.errors import SetupError
from spd_lightning.judge.head import JudgeHead, load_judge
from spd_lightning.judge.zero_cost import ZeroCostJudge
from spd_lightning.models.hf import check_shared_vocabulary, load_tokenizer, resolve_device, tokenizer_eos_ids
from spd_lightning.models.packed import pack_linears
from spd_lightning.reporting.names import POLICIES
from spd_lightning.reporting.plots import plot_judge_watch
from spd_lightning.targets.local import load_causal_lm
from spd_lightning.tasks.builders import SCORER, ensure_toy_world, pair_path
from spd_lightning.tasks.checkpoint import load_trained_scorer

log = logging.getLogger(__name__)

DEFAULT_POLICIES = ["greedy", "standard_sd", "scorer", "accept_all"]


@dataclass
class DecodeConfig:
    # K: draft tokens per block.
    block_size: int = 4
    # Tokens generated per prompt at most (an EOS ends a response earlier).
    max_new_tokens: int = 32
    # Prompts decoded together, each row with its own growing context. Timing a user's setting
    # of one request at a time: kv_cache=true with batch_size=1.
    batch_size: int = 64
    # true: a KV cache per model, rolled back to the kept tokens after each block (what real
    # models need, and what makes wall times meaningful); false: every block re-runs both models
    # over the whole context (faster for the toy world's tiny models). Both give the same tokens.
    kv_cache: bool = False
    # With kv_cache: end a block's drafting early, after a step at which the draft gives its own
    # token less than this probability (transformers' assisted generation uses 0.4); null: always K.
    draft_confidence: Optional[float] = None  # noqa: UP045
    # Accept a mismatch when the scorer's probability is >= this; null: the threshold the
    # checkpoint's training run validated with (module.threshold there).
    threshold: Optional[float] = None  # noqa: UP045 (OmegaConf reads typing.Optional, not X | None)
    # Which policies to run, from greedy, standard_sd, scorer, kl_below, judge, accept_all.
    policies: list[str] = field(default_factory=lambda: list(DEFAULT_POLICIES))
    # kl_below, the training-free KL rule: keep a mismatch when KL(target || draft) <= this (nats).
    kl_threshold: Optional[float] = None  # noqa: UP045
    # kl_below verifies strictly where the target's top-1 probability exceeds this; null: never.
    kl_confidence: Optional[float] = 0.9  # noqa: UP045
    # judge: a zero-cost judge saved by bench/judges.py (e.g. outputs/judges/qwen_coder/judge_grpo.pt).
    judge_path: Optional[str] = None  # noqa: UP045
    # judge: accept a mismatch when its probability is >= this; null: the threshold saved with the
    # judge (its longest blocks at parity with standard SD on the bench's held-out records).
    judge_threshold: Optional[float] = None  # noqa: UP045
    # With judge_path, standard_sd runs with the judge watching (policies.watched_sd), and
    # decode.json gives the lowest judge threshold that would change at most this share of these
    # generations (judge_watch/threshold_at_tolerance): the judge's accuracy cost is at most that.
    judge_tolerance: float = 0.02
    # float32, bfloat16 or float16, for draft and target (the scorer's is model.dtype).
    dtype: str = "float32"
    # cpu, cuda, cuda:N, or auto (cuda when there is one).
    device: str = "cpu"
    # On the CPU, pack every linear layer of draft and target for oneDNN (models/packed.py): a
    # float32 pass over K+1 tokens then costs about 1.5 single-token passes instead of 2.2 (on a
    # GPU, or false: the models as loaded).
    pack_linears: bool = True


def _load_lm(cfg: DictConfig, role: str, device: str) -> PreTrainedModel:
    """The causal LM at pair.<role> (draft or target)."""
    offline_key = "model.local_files_only" if cfg.model.local_files_only else None  # as for the scorer
    path, what = pair_path(cfg, role), f"{role} model"
    return load_causal_lm(path, cfg.decode.dtype, device, what, f"pair.{role}", offline_key, section="decode")


def _check_vocab(tokenizer, parts: dict[str, torch.nn.Module]) -> None:
    """Every model must know every token of the tokenizer, which must say where generation stops."""
    if tokenizer.eos_token_id is None:
        raise SetupError("the tokenizer (model.tokenizer) has no EOS token: generation could never stop")
    check_shared_vocabulary(tokenizer, parts)


def build_policies(cfg: DictConfig, tokenizer, device: str) -> tuple[dict[str, tuple[Policy, int]], PolicySettings]:
    """decode.policies -> (name: (policy, block size), what they were built with); greedy is the
    target alone (block size 0)."""
    settings = cfg.decode
    unknown = sorted(set(settings.policies) - set(DECODE_POLICIES))
    if unknown or not settings.policies:
        raise SetupError(f"decode.policies {list(settings.policies)}: choose among {list(DECODE_POLICIES)}")
    if settings.draft_confidence is not None and not settings.kv_cache:
        raise SetupError("decode.draft_confidence needs decode.kv_cache=true (the loop that drafts per block)")
    if settings.block_size < 1 or settings.max_new_tokens < 1 or settings.batch_size < 1:
        raise SetupError("decode.block_size, decode.max_new_tokens and decode.batch_size must be >= 1")
    k = settings.block_size
    if "kl_below" in settings.policies and settings.kl_threshold is None:
        raise SetupError(
            "decode.policies has kl_below: set decode.kl_threshold=TAU (task=eval's tradeoff.csv lists "
            "the KL rule's accuracy and accepted tokens at each tau)"
        )
    choice = PolicySettings(settings.kl_threshold, settings.kl_confidence)
    if "judge" in settings.policies or settings.judge_path is not None:
        choice.judge, choice.judge_threshold = _judge(settings)
        path, threshold = settings.judge_path, choice.judge_threshold
        log.info("zero-cost judge from %s, accepting mismatches at p >= %.12g", path, threshold)
    policies = {}
    # A fixed order, whatever the config's: greedy's responses are the others' reference.
    for name in (n for n in DECODE_POLICIES if n in settings.policies):
        if name == "scorer":
            policies[name] = (_scorer_policy(cfg, tokenizer, device), k)
        elif name == "standard_sd" and choice.judge is not None:
            policies[name] = (watched_sd(judge_probabilities(choice.judge)), k)
        else:
            policy, drafts = named_policy(name, choice)
            policies[name] = (policy, k if drafts else 0)
    return policies, choice


def _judge(settings: DictConfig) -> tuple[JudgeHead, float]:
    path = settings.judge_path
    if path is None or not Path(path).is_file():
        raise SetupError(
            f"decode.policies has judge, but decode.judge_path={path} is not a file: train one with "
            "bench/judges.py, which writes judge_sup.pt, judge_grpo.pt and judge_exact.pt to its --out"
        )
    head, saved_threshold = load_judge(path)
    return head, saved_threshold if settings.judge_threshold is None else settings.judge_threshold


def _scorer_policy(cfg: DictConfig, tokenizer, device: str) -> Policy:
    scorer, hparams = load_trained_scorer(cfg.model, cfg.ckpt_path, "decode")
    threshold = cfg.decode.threshold
    if threshold is None:  # the threshold the training run validated the scorer at
        threshold = float(hparams.get("threshold", cfg.module.threshold))
    _check_vocab(tokenizer, {SCORER: scorer.backbone})
    log.info("scorer from %s, accepting mismatches at p >= %.3f", cfg.ckpt_path, threshold)
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    if isinstance(scorer, ZeroCostJudge):  # model=judge: its head reads what the block computed
        return judge_policy(scorer.head.eval(), threshold)
    return scorer_policy(scorer.to(device), threshold, pad)


def response_text(tokenizer, gen: Generation) -> str:
    return tokenizer.decode(gen.response_ids, skip_special_tokens=True)


def references(prompts: list[Prompt], greedy_texts: list[str] | None) -> list[str]:
    """The dataset's answers; for prompts without one, the greedy target's own response."""
    if all(p.answer is not None for p in prompts):
        return [p.answer for p in prompts]
    if greedy_texts is None:
        raise SetupError(
            "some prompts have no answer (data.answer_key): then the greedy target's response is the "
            "reference, so decode.policies must include greedy"
        )
    return [p.answer if p.answer is not None else g for p, g in zip(prompts, greedy_texts)]


def run_policies(cfg: DictConfig, tokenizer, prompts: list[Prompt], device: str):
    """Decodes every prompt with every policy. -> (summary dict, per-prompt sample dicts)."""
    settings = cfg.decode
    if "greedy" not in settings.policies:
        references(prompts, None)  # fails now, not after decoding, when a prompt has no answer
    policies, choice = build_policies(cfg, tokenizer, device)
    draft, target = _load_lm(cfg, "draft", device), _load_lm(cfg, "target", device)
    _check_vocab(tokenizer, {"the draft (pair.draft)": draft, "the target (pair.target)": target})
    for model in (draft, target) if settings.pack_linears else ():
        pack_linears(model)
    prompt_ids = encode_prompts(tokenizer, prompts)
    eos, pad = tokenizer_eos_ids(tokenizer), tokenizer.pad_token_id
    pad = tokenizer.eos_token_id if pad is None else pad
    outputs: dict[str, tuple[list[Generation], float]] = {}
    for name, (policy, k) in policies.items():
        loop = LoopSettings(k, settings.max_new_tokens, eos, pad, settings.batch_size, settings.draft_confidence)
        run_loop = generate_cached if settings.kv_cache else generate
        outputs[name] = timed(run_loop, draft, target, prompt_ids, policy, loop, desc=name)
        log.info("%s: %d prompts in %.1f s", name, len(prompts), outputs[name][1])
    texts = {name: [response_text(tokenizer, g) for g in gens] for name, (gens, _) in outputs.items()}
    refs = references(prompts, texts.get("greedy"))
    answer_check = instantiate(cfg.answer)
    correct = {name: [bool(answer_check(t, r)) for t, r in zip(ts, refs)] for name, ts in texts.items()}
    summary: dict[str, float] = {"num_prompts": len(prompts), "block_size": settings.block_size}
    for name, (gens, seconds) in outputs.items():
        summary.update({f"{name}/{m}": v for m, v in summarize(gens, correct[name], seconds).items()})
        low, high = wilson_interval(sum(correct[name]), len(prompts))
        summary.update({f"{name}/accuracy_ci95_low": low, f"{name}/accuracy_ci95_high": high})
    for base, key in (("greedy", "speedup_vs_greedy"), ("standard_sd", "speedup_vs_sd")):
        if base in outputs:  # wall tokens per second against the base's, for every policy
            for name in outputs:
                summary[f"{name}/{key}"] = summary[f"{name}/tokens_per_s"] / summary[f"{base}/tokens_per_s"]
    if "greedy" in outputs and "standard_sd" in outputs:
        # Standard SD is lossless: a share below 1 means the loop (or the numerics) is off.
        pairs = zip(outputs["standard_sd"][0], outputs["greedy"][0])
        summary["standard_sd/same_as_greedy"] = sum(a.response_ids == b.response_ids for a, b in pairs) / len(prompts)
    if choice.judge is not None and "standard_sd" in outputs:  # standard SD ran with the judge watching
        watched = [g.watched_max for g in outputs["standard_sd"][0]]
        summary.update(judge_watch(watched, settings.judge_tolerance, choice.judge_threshold))
    samples = [
        {
            "index": p.index,
            "prompt": p.text,
            "reference": ref,
            **{n: {"response": texts[n][i], "correct": correct[n][i], **_costs(outputs[n][0][i])} for n in outputs},
        }
        for i, (p, ref) in enumerate(zip(prompts, refs))
    ]
    return summary, samples


def _costs(gen: Generation) -> dict[str, float]:
    costs = {
        "tokens": gen.num_tokens,
        "target_calls": gen.target_calls,
        "accepted_draft_tokens": gen.accepted_draft_tokens,
    }
    if gen.watched_max is not None:  # standard SD with the judge watching
        costs["judge_watched_max"] = gen.watched_max
    return costs


def judge_watch(watched: list[float | None], tolerance: float, in_use: float) -> dict[str, float]:
    """What the judge, watching standard SD, says about its thresholds on these generations
    (watched: each one's Generation.watched_max; in_use: the threshold it would run at)."""
    n, threshold = len(watched), threshold_changing_at_most(watched, tolerance)
    return {
        "judge_watch/tolerance": tolerance,
        "judge_watch/threshold_at_tolerance": threshold,
        "judge_watch/changed_at_tolerance": changed_at(watched, threshold) / max(n, 1),
        "judge_watch/threshold_in_use": in_use,
        "judge_watch/changed_at_threshold_in_use": changed_at(watched, in_use) / max(n, 1),
    }


def _plot_watch(summary: dict[str, float], watched: list[float | None], out_png: Path) -> None:
    marks = {
        "judge's threshold in use": summary["judge_watch/threshold_in_use"],
        f"lowest within tolerance {summary['judge_watch/tolerance']:g}": summary["judge_watch/threshold_at_tolerance"],
    }
    log.info("judge thresholds against the generations they change: %s", plot_judge_watch(watched, marks, out_png))


def print_table(summary: dict[str, float], path: Path, kv_cache: bool = False) -> None:
    table = Table(title=f"Decoding {summary['num_prompts']} prompts, K={summary['block_size']}")
    columns = {
        "accuracy": "accuracy",
        "accuracy_ci95_low": "95% CI low",
        "accuracy_ci95_high": "high",
        "target_calls_per_token": "calls/token",
        "accepted_draft_tokens_per_block": "kept/block",
        "tokens_per_prompt": "tokens",
        "tokens_per_s": "tokens/s*",
        "speedup_vs_greedy": "x greedy*",
    }
    table.add_column("policy")
    for title in columns.values():
        table.add_column(title, justify="right")
    for name in DECODE_POLICIES:
        if f"{name}/accuracy" in summary:
            table.add_row(POLICIES[name].short, *(f"{summary.get(f'{name}/{m}', float('nan')):.3f}" for m in columns))
    console = Console()
    console.print(table)
    console.print("calls/token: target passes per generated token; kept/block: draft tokens kept")
    if kv_cache:
        console.print("per block; tokens: generated per prompt; *wall-clock, KV caches")
    else:
        console.print("per block; tokens: generated per prompt; *wall-clock without KV caches, so secondary")
    if "judge_watch/threshold_at_tolerance" in summary:
        watch = {k.split("/")[1]: v for k, v in summary.items() if k.startswith("judge_watch/")}
        console.print(
            f"The judge, watching standard SD, would change {watch['changed_at_threshold_in_use']:.1%} of these "
            f"generations at its threshold (p >= {watch['threshold_in_use']:.12g}), and "
            f"{watch['changed_at_tolerance']:.1%} at p >= {watch['threshold_at_tolerance']:.12g}: the lowest "
            f"threshold within decode.judge_tolerance={watch['tolerance']:g}.",
            soft_wrap=True,
        )
    console.print(f"decode: {path}", soft_wrap=True)


def headline(summary: dict[str, float]) -> str:
    """The last line: key=value for the figures a user compares."""
    keys = {
        "scorer_accuracy": "scorer/accuracy",
        "scorer_target_calls_per_token": "scorer/target_calls_per_token",
        "judge_accuracy": "judge/accuracy",
        "judge_target_calls_per_token": "judge/target_calls_per_token",
        "sd_accuracy": "standard_sd/accuracy",
        "sd_target_calls_per_token": "standard_sd/target_calls_per_token",
        "greedy_accuracy": "greedy/accuracy",
    }
    return " ".join(f"{k}={summary[v]:.4f}" for k, v in keys.items() if v in summary)


def decode(cfg: DictConfig) -> float | None:
    ensure_toy_world(cfg)
    device = resolve_device(cfg.decode.device, "decode.device")
    tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.local_files_only)
    prompts: list[Prompt] = instantiate(cfg.data)
    log.info("decoding %d prompts, K=%d, on %s", len(prompts), cfg.decode.block_size, device)
    summary, samples = run_policies(cfg, tokenizer, prompts, device)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    with (out / "decode_samples.jsonl").open("w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)
    if "judge_watch/threshold_at_tolerance" in summary:
        _plot_watch(summary, [s["standard_sd"].get("judge_watched_max") for s in samples], out / "judge_watch.png")
    print_table(summary, out / "decode.json", cfg.decode.kv_cache)
    print(headline(summary), flush=True)
    return summary.get(cfg.optimized_metric)
