"""The trade-off on whole generations: every policy's episodes, stage by stage, on disk.

    python bench/whole_generations.py --world toy          # the default world: minutes
    python bench/whole_generations.py --world qwen_coder --stage responses   # real pair, resumable

A world is a draft, a target, problem sets (train: judges learn there; choose: thresholds are
chosen there; test: reported there) and one completion store, keyed by prompt + response prefix,
that every stage reads and extends: the target's own responses first (stage `responses`), then
the completions of every hybrid prefix an episode forks to. A stage that is interrupted resumes
from the store.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from spd_lightning.core.episode import Ask
from spd_lightning.data.answers import extract_final_number, gsm8k_final_number
from spd_lightning.data.prompts import PromptList, encode_prompts
from spd_lightning.data.resumable import write_atomically
from spd_lightning.decoding.episodes import PathSource, run_episodes
from spd_lightning.decoding.features import FeatureCache
from spd_lightning.decoding.progress import Progress
from spd_lightning.judge.fit import FitSettings, fit_supervised
from spd_lightning.judge.head import TOKEN_FEATURES, JudgeHead, load_judge, save_judge
from spd_lightning.judge.inputs import DiskCompletions
from spd_lightning.models.hf import load_tokenizer, pad_id_of, response_end_ids
from spd_lightning.models.packed import pack_linears
from spd_lightning.targets.local import LocalTarget, load_causal_lm
from spd_lightning.targets.vllm import VLLMTarget
from spd_lightning.toy.build import SHIPPED_WORLD
from spd_lightning.toy.raw import toy_prompts
from spd_lightning.training.callbacks import make_paths_relative

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
GSM8K_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


@dataclass(frozen=True)
class ProblemSet:
    """Prompts of one role: a slice of a raw JSONL file (or toy prompts of one seed)."""

    name: str  # train, choose or test
    raw: str | None  # JSONL of GSM8K-style lines; None: toy prompts
    skip: int
    limit: int


@dataclass
class Problems:
    prompts: list[tuple[int, ...]]
    answers: list[str]


@dataclass
class World:
    name: str
    draft: object
    target: object
    tokenizer: object
    sets: dict[str, Problems]
    source: PathSource
    out: Path

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def real_sets(data: Path, train: int, choose: int, test: int) -> list[ProblemSet]:
    """GSM8K: train and choose from train.jsonl (disjoint), test from test.jsonl; test first, so
    that a stage cut short has done what the report needs first."""
    return [
        ProblemSet("test", str(data / "test.jsonl"), 0, test),
        ProblemSet("choose", str(data / "train.jsonl"), train, choose),
        ProblemSet("train", str(data / "train.jsonl"), 0, train),
    ]


def toy_sets(train: int = 320, choose: int = 96, test: int = 200) -> list[ProblemSet]:
    """Fresh toy prompts, one seed per role (the world's records came from another seed); the
    train prompts are rollout=generation's (conf/rollout/generation.yaml: 320 of seed 2000)."""
    return [ProblemSet("train", None, 2000, train), ProblemSet("choose", None, 3000, choose),
            ProblemSet("test", None, 1000, test)]  # fmt: skip


def problem_sets(toy: bool, data: Path, train: int | None, choose: int | None, test: int | None) -> list[ProblemSet]:
    """The bench's sets, each count defaulting to its world's (toy: 320, 96, 200; GSM8K: 100, 60, 150)."""
    if toy:
        return toy_sets(train or 320, choose or 96, test or 200)
    return real_sets(data, train or 100, choose or 60, test or 150)


def load_problems(spec: ProblemSet, tokenizer) -> Problems:
    if spec.raw is None:
        prompts = toy_prompts(spec.limit, spec.skip)
    else:
        prompts = PromptList.from_jsonl(spec.raw, template=GSM8K_TEMPLATE, chat_template=True,
                                        limit=spec.limit, skip=spec.skip)  # fmt: skip
    ids = encode_prompts(tokenizer, prompts)
    return Problems([tuple(p) for p in ids], [p.answer or "" for p in prompts])


@dataclass(frozen=True)
class WorldSettings:
    """How a world is loaded: the pair, its problem sets, where its stages are kept."""

    pair: Path  # a directory with draft/ and target/
    sets: list[ProblemSet]
    out: Path  # the completion store and every stage's files
    max_new_tokens: int
    pack: bool = False  # pack the float32 linear layers for oneDNN (models/packed.py)
    batch_size: int = 16  # paths completed per call
    dtype: str = "float32"
    target_url: str | None = None  # a vLLM server of the target; None: in-process
    # With a server: requests of fork completions in flight while the in-process models decide
    # (decoding/overlap.py); 0: lockstep rounds. Off by default: where the server shares the
    # CPU with the models (2 cores) it ran at 1-2 rows and cut completions per minute about 3x
    # (docs/whole_generations.md). In-process completions are always lockstep.
    overlap: int = 0
    # A fork's path completed this many tokens at a time, doubling (decoding/episodes.PathSource);
    # None: to the budget at once.
    segment: int | None = None


def load_world(name: str, settings: WorldSettings) -> World:
    """The pair in settings.dtype, its problem sets and the completion store out/completions.jsonl.
    The target completes paths in-process, or on the vLLM server at settings.target_url (serving
    the same target in the same dtype; the in-process target then computes the judge's features)."""
    pair, out, max_new_tokens, dtype = settings.pair, settings.out, settings.max_new_tokens, settings.dtype
    batch_size, target_url, sets = settings.batch_size, settings.target_url, settings.sets
    tokenizer = load_tokenizer(str(pair / "target"), True)
    draft = load_causal_lm(str(pair / "draft"), dtype, "cpu", "draft model", "--pair", None)
    target = load_causal_lm(str(pair / "target"), dtype, "cpu", "target model", "--pair", None)
    for model in (draft, target) if settings.pack else ():
        pack_linears(model)
    if target_url:
        backend = VLLMTarget(url=target_url, model="target", max_new_tokens=max_new_tokens, timeout_s=3600.0,
                             concurrency=max(settings.overlap, 8))  # fmt: skip
        backend.check_tokenizer(tokenizer)
    else:
        backend = LocalTarget.from_model(target, max_new_tokens, batch_size)
    eos, pad = response_end_ids(target, tokenizer), pad_id_of(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    store = DiskCompletions(out / "completions.jsonl")
    overlap = settings.overlap if target_url else 0
    source = PathSource(backend.complete, draft, pad, eos, max_new_tokens, store, batch_size, overlap=overlap,
                        segment=settings.segment)  # fmt: skip
    problems = {s.name: load_problems(s, tokenizer) for s in sets}
    return World(name, draft, target, tokenizer, problems, source, out)


def stage_responses(world: World) -> None:
    """The target's own response to every prompt of every set (the paths every episode starts on)."""
    for name, problems in world.sets.items():
        log.info("responses: %s, %d prompts", name, len(problems.prompts))
        world.source.fill(problems.prompts, [()] * len(problems.prompts), desc=f"responses ({name})")


def accuracy_of(world: World, problems: Problems, responses: list[list[int]]) -> list[bool]:
    return [gsm8k_final_number(world.decode(r), a) for r, a in zip(responses, problems.answers)]


TOY_PAIR = SHIPPED_WORLD


# --- stage heads: the judges the sweep compares -------------------------------------------------


def mine_labels(world: World, prompts: list[tuple[int, ...]], block_size: int, on_progress=None):
    """AutoJudge's labels along whole generations: walk each target response; at every mismatch
    met, in order, accept it and let the target complete the new prefix; it is harmless (label 1,
    kept: the walk goes on along the new path) when the target's own final answer survives, and
    important (label 0, rejected) when it changes. on_progress: as in run_episodes.
    -> (prompts [N], Asks [N], labels [N] bool)."""
    own = {
        p: extract_final_number(world.decode(t))
        for p, (t, *_) in zip(prompts, world.source.paths(prompts, [()] * len(prompts)))
    }
    seen: list[tuple[tuple[int, ...], Ask, bool]] = []

    def decide(batch_prompts, asks):
        forks = world.source.paths(batch_prompts, [a.response + (a.draft,) for a in asks])
        verdicts = []
        for prompt, ask, (tokens, *_) in zip(batch_prompts, asks, forks):
            answer = own[prompt]
            harmless = answer is not None and gsm8k_final_number(world.decode(tokens), answer)
            seen.append((prompt, ask, harmless))
            verdicts.append(harmless)
        return verdicts

    run_episodes(prompts, decide, world.source, block_size, desc="mining labels", on_progress=on_progress)
    return [s[0] for s in seen], [s[1] for s in seen], torch.tensor([s[2] for s in seen])


def mined_labels(world: World, prompts: list[tuple[int, ...]], block_size: int, path: Path, on_progress=None):
    """mine_labels, written to `path` (JSON: token ids and labels, small enough to commit) and read
    back on a rerun: replaying the walks from the store still costs every path's draft passes."""
    if path.is_file():
        saved = json.loads(path.read_text())
        rows = saved["rows"]  # [prompt index, response, draft token, target token, harmless]
        kept = [tuple(saved["prompts"][r[0]]) for r in rows]
        return kept, [Ask(tuple(r[1]), r[2], r[3]) for r in rows], torch.tensor([bool(r[4]) for r in rows])
    mined, asks, labels = mine_labels(world, prompts, block_size, on_progress)
    index = {p: i for i, p in enumerate(dict.fromkeys(mined))}
    rows = [[index[p], list(a.response), a.draft, a.target, bool(y)] for p, a, y in zip(mined, asks, labels)]
    write_atomically(path, json.dumps({"prompts": [list(p) for p in index], "rows": rows}))
    return mined, asks, labels


def fit_supervised_head(world: World, cache: FeatureCache, prompts, asks, labels, steps: int, seed: int) -> JudgeHead:
    """A logistic regression on the zero-cost judge's inputs (AutoJudge's head), on mined labels."""
    inputs = cache.get(prompts, asks).judge_inputs()  # [N, 1, ...]
    head = JudgeHead(JudgeHead.sizes_of(inputs), ("tokens", "target_hidden"), hidden=0)
    head.fit_scaling(inputs)
    defined = torch.ones(len(labels), 1, dtype=torch.bool)
    fit_supervised(lambda index: head(inputs.select(index)), head.parameters(), labels[:, None], defined,
                   FitSettings(steps=steps, seed=seed))  # fmt: skip
    return head.eval()


def head_from_checkpoint(ckpt: Path) -> JudgeHead:
    """The zero-cost judge's head from a `python run.py model=judge` checkpoint."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    head_state = {k[len("scorer.head.") :]: v for k, v in state.items() if k.startswith("scorer.head.")}
    width = head_state["mean"].numel()
    hidden = head_state["net.0.weight"].shape[0] if "net.2.weight" in head_state else 0
    # model.inputs=[tokens] or [tokens, target_hidden]: the width tells which.
    inputs = ("tokens",) if width == len(TOKEN_FEATURES) else ("tokens", "target_hidden")
    sizes = {"tokens": len(TOKEN_FEATURES), "target_hidden": width - len(TOKEN_FEATURES)}
    head = JudgeHead(sizes, inputs, hidden)
    head.load_state_dict(head_state)
    return head.eval()


def train_with_run_py(out: Path, overrides: list[str]) -> Path:
    """`python run.py <overrides>` into `out`: skipped once it wrote summary.json; resumed from its
    last checkpoint when an earlier run was cut short."""
    ckpt = out / "checkpoints" / "last.ckpt"
    if not (out / "summary.json").is_file():
        resume = [f"ckpt_path={project_relative(ckpt)}"] if ckpt.is_file() else []
        command = [sys.executable, "run.py", *overrides, *resume, f"hydra.run.dir={project_relative(out)}"]
        log.info("training: %s", " ".join(command[1:]))
        # Paths relative to the project root (callbacks.portable_paths in the checkpoints, the
        # logged config): the run is committed with the store, so it must not name this machine's folders.
        run_to_its_end(command, ROOT, {"PROJECT_ROOT": "."})
    return ckpt


def portable_checkpoint(path: Path) -> None:
    """Rewrites a Lightning checkpoint with every path under the project root (the checkpoint
    callback's folders, the run's settings) relative to it; weights and optimiser state as they are.
    For checkpoints written without callbacks.portable_paths (which does this as they are saved)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    make_paths_relative(checkpoint, str(ROOT))
    torch.save(checkpoint, path)


def project_relative(path: Path | str) -> str:
    """`path` as seen from the project root (run.py's working directory here)."""
    return os.path.relpath(Path(path).resolve(), ROOT)


def run_to_its_end(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    """Runs `command` and waits for it. A stop that reaches this process (SIGTERM raised as
    SystemExit) is passed on as SIGTERM, and the child is waited for: Lightning ends a run after
    the step in flight, with its checkpoint and curves, where a kill loses the step (minutes on
    the real pair). Ctrl+C reaches the child by itself; a second stop kills it."""
    proc = subprocess.Popen(command, cwd=cwd, env={**os.environ, **(env or {})})
    try:
        code = proc.wait()
    except BaseException as stop:
        if not isinstance(stop, KeyboardInterrupt):
            proc.send_signal(signal.SIGTERM)
        log.warning("stopping: the run ends after its step in flight (stop again to kill it)")
        try:
            proc.wait()
        except BaseException:
            proc.kill()
            raise
        raise
    if code != 0:
        raise subprocess.CalledProcessError(code, command)


def stage_heads(world: World, overrides: dict[str, list[str]], block_size: int, steps: int, seed: int,
                block_rl_path: Path | None) -> dict[str, JudgeHead]:  # fmt: skip
    """supervised (mined here), block_rl (run.py model=judge, or a saved judge) and gen_rl (run.py
    rollout=generation model=judge), each saved under out/heads/ and read back on a rerun. gen_rl
    trains first: the issue's head comes first when a session ends mid-stage, and run.py loads
    its own pair while this process's model caches are still empty."""
    folder = world.out / "heads"
    folder.mkdir(parents=True, exist_ok=True)
    gen_rl = head_from_checkpoint(train_with_run_py(folder / "gen_rl", overrides["gen_rl"]))
    if block_rl_path is not None:
        block_rl, _ = load_judge(block_rl_path)
    else:
        block_rl = head_from_checkpoint(train_with_run_py(folder / "block_rl", overrides["block_rl"]))
    world.source.store = DiskCompletions(world.out / "completions.jsonl")  # with what training added
    path = folder / "supervised.pt"
    if not path.is_file():
        cache = FeatureCache(world.draft, world.target, draft_states=world.source.draft_states)
        # Features: what gen_rl's training computed on the same prompts. The mining's walks and the
        # passes over its mismatches take hours on a real pair: both are saved as they go.
        progress = Progress(cache, world.source, folder)
        progress.load()
        cache.on_progress = progress
        prompts, asks, labels = mined_labels(world, world.sets["train"].prompts, block_size,
                                             folder / "mined_labels.json", progress)  # fmt: skip
        head = fit_supervised_head(world, cache, prompts, asks, labels, steps, seed)
        progress.save()
        notes = {"mismatches": len(labels), "harmless": int(labels.sum())}
        save_judge(head, path, 0.5, notes)
    supervised, _ = load_judge(path)
    return {"supervised": supervised, "block_rl": block_rl, "gen_rl": gen_rl}
