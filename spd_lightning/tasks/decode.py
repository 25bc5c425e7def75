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

from hydra.utils import instantiate
from omegaconf import DictConfig

from spd_lightning.core.sampling import changed_at, threshold_changing_at_most
from spd_lightning.core.stats import wilson_interval
from spd_lightning.data.prompts import Prompt, encode_prompts
from spd_lightning.decoding.loop import Generation, LoopSettings, generate, generate_cached, summarize, timed
from spd_lightning.decoding.policies import PolicySettings
from spd_lightning.decoding.registry import DECODE_POLICIES, SPECS, check_policy_names
from spd_lightning.decoding.setup import DecodingSetup, PairSettings, build_decoding, check_tokenizer
from spd_lightning.errors import SetupError
from spd_lightning.judge.zero_cost import ZeroCostJudge
from spd_lightning.models.hf import load_tokenizer, pad_id_of, resolve_device
from spd_lightning.reporting.plots import plot_judge_watch
from spd_lightning.reporting.tables import FigureTable, print_tables, write_markdown
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
    # judge: a zero-cost judge saved by task=judge (e.g. outputs/judge/runs/<time>/judge_grpo.pt).
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
    # On the CPU, pack every linear layer of draft and target for oneDNN (models/packed.py). null:
    # time a probe pass both ways at load and keep the faster (it pays on an AMD EPYC, not on a
    # Xeon with AMX); true / false: always / never. Ignored on a GPU.
    pack_linears: bool | None = None
    # The draft's output layer restricted to this many tokens, the most frequent in
    # draft_vocab_corpus (models/vocab_head.py): cheaper draft passes, standard SD still lossless.
    draft_vocab: int | None = None
    draft_vocab_corpus: str | None = None
    # The draft's linear layers with int8 weights (models/int8.py; CPU only): cheaper draft passes,
    # standard SD still lossless.
    draft_int8: bool = False


def check_settings(settings: DictConfig) -> None:
    """decode's settings that no policy reads, before anything is loaded."""
    check_policy_names(list(settings.policies), "decode.policies")
    if settings.draft_confidence is not None and not settings.kv_cache:
        raise SetupError("decode.draft_confidence needs decode.kv_cache=true (the loop that drafts per block)")
    if settings.block_size < 1 or settings.max_new_tokens < 1 or settings.batch_size < 1:
        raise SetupError("decode.block_size, decode.max_new_tokens and decode.batch_size must be >= 1")
    if "kl_below" in settings.policies and settings.kl_threshold is None:
        raise SetupError(
            "decode.policies has kl_below: set decode.kl_threshold=TAU (task=eval's tradeoff.csv lists "
            "the KL rule's accuracy and accepted tokens at each tau)"
        )


def decoding_setup(cfg: DictConfig, tokenizer, device: str) -> DecodingSetup:
    """The pair, packed or not, and decode.policies (decoding.setup.build_decoding); with
    decode.judge_path, standard_sd runs with the judge watching."""
    settings = cfg.decode
    check_settings(settings)
    choice = PolicySettings(settings.kl_threshold, settings.kl_confidence, judge_threshold=settings.judge_threshold)
    choice.watch_with_judge, choice.pad_id = True, pad_id_of(tokenizer)
    if "scorer" in settings.policies:
        choice.scorer, choice.scorer_threshold = _trained_scorer(cfg, tokenizer, device)
    offline_key = "model.local_files_only" if cfg.model.local_files_only else None  # as for the scorer
    source = PairSettings(
        pair_path(cfg, "draft"), pair_path(cfg, "target"), settings.dtype, device, settings.pack_linears,
        settings.draft_vocab, settings.draft_vocab_corpus, "pair.draft", "pair.target", "decode", offline_key,
        draft_int8=settings.draft_int8,
    )  # fmt: skip
    keys = ("decode.policies", "decode.judge_path")
    setup = build_decoding(source, list(settings.policies), choice, settings.judge_path, tokenizer, keys)
    if choice.judge is not None:
        threshold = choice.judge_threshold
        log.info("zero-cost judge from %s, accepting mismatches at p >= %.12g", settings.judge_path, threshold)
    return setup


def _trained_scorer(cfg: DictConfig, tokenizer, device: str):
    """(the scorer of ckpt_path, on `device`; the threshold to run it at)."""
    scorer, hparams = load_trained_scorer(cfg.model, cfg.ckpt_path, "decode")
    threshold = cfg.decode.threshold
    if threshold is None:  # the threshold the training run validated the scorer at
        threshold = float(hparams.get("threshold", cfg.module.threshold))
    check_tokenizer(tokenizer, {SCORER: scorer.backbone})
    log.info("scorer from %s, accepting mismatches at p >= %.3f", cfg.ckpt_path, threshold)
    return (scorer if isinstance(scorer, ZeroCostJudge) else scorer.to(device)), threshold


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
    setup = decoding_setup(cfg, tokenizer, device)
    prompt_ids = encode_prompts(tokenizer, prompts)
    outputs: dict[str, tuple[list[Generation], float]] = {}
    for name, policy in setup.policies.items():
        k = settings.block_size if policy.needs.drafts else 0
        loop = LoopSettings(k, settings.max_new_tokens, setup.eos_ids, setup.pad_id, settings.batch_size,
                            settings.draft_confidence)  # fmt: skip
        run_loop = generate_cached if settings.kv_cache else generate
        outputs[name] = timed(run_loop, setup.draft, setup.target, prompt_ids, policy, loop, desc=name)
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
    if setup.settings.judge is not None and "standard_sd" in outputs:  # standard SD ran with the judge watching
        watched = [g.watched_max for g in outputs["standard_sd"][0]]
        summary.update(judge_watch(watched, settings.judge_tolerance, setup.settings.judge_threshold))
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


# decode.json's per-policy figures -> (table, column header); headers stay short enough for 80 columns.
ACCURACY_COLUMNS = {"accuracy": "accuracy", "accuracy_ci95_low": "95% CI low", "accuracy_ci95_high": "high"}
COST_COLUMNS = {
    "target_calls_per_token": "calls/tok",
    "accepted_draft_tokens_per_block": "kept/blk",
    "tokens_per_prompt": "tokens",
    "tokens_per_s": "tok/s*",
    "speedup_vs_greedy": "x greedy*",
}


def _policy_table(summary: dict[str, float], title: str, columns: dict[str, str]) -> FigureTable:
    table = FigureTable(title, ["policy", *columns.values()])
    for name in DECODE_POLICIES:
        if f"{name}/accuracy" in summary:
            figures = (summary.get(f"{name}/{m}") for m in columns)  # x greedy only when greedy ran
            table.add(SPECS[name].short, *("-" if v is None else f"{v:.3f}" for v in figures))
    return table


def report(summary: dict[str, float], kv_cache: bool = False) -> tuple[list[FigureTable], list[str]]:
    """Two tables (accuracy; what it cost) that fit 80 columns, and the notes below them."""
    title = f"Decoding {summary['num_prompts']} prompts, K={summary['block_size']}"
    clock = "KV caches" if kv_cache else "without KV caches, so secondary"
    notes = [
        "calls/tok: target passes per generated token; kept/blk: draft tokens kept per block; tokens: "
        f"generated per prompt; *wall-clock, {clock}"
    ]
    if "judge_watch/threshold_at_tolerance" in summary:
        watch = {k.split("/")[1]: v for k, v in summary.items() if k.startswith("judge_watch/")}
        notes.append(
            f"The judge, watching standard SD, would change {watch['changed_at_threshold_in_use']:.1%} of these "
            f"generations at its threshold (p >= {watch['threshold_in_use']:.12g}), and "
            f"{watch['changed_at_tolerance']:.1%} at p >= {watch['threshold_at_tolerance']:.12g}: the lowest "
            f"threshold within decode.judge_tolerance={watch['tolerance']:g}."
        )
    tables = [
        _policy_table(summary, f"{title}: accuracy", ACCURACY_COLUMNS),
        _policy_table(summary, f"{title}: cost", COST_COLUMNS),
    ]
    return tables, notes


def print_table(summary: dict[str, float], path: Path, kv_cache: bool = False) -> None:
    """Prints the tables and notes, and writes them to decode.md beside decode.json (for docs/)."""
    tables, notes = report(summary, kv_cache)
    sample = f"{summary['num_prompts']} prompts, K={summary['block_size']}"
    markdown = write_markdown(path.with_suffix(".md"), tables, tuple(notes), sample)
    print_tables(*tables, notes=(*notes, f"decode: {path}, {markdown.name}"))


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
