"""Tokens per second of the decoding methods a user could pick, each run kept on disk (bench/speed.py).

A Run is one method at one batch size over a list of prompts: the responses, the wall time of
all of them, the target's forward passes. RunStore keeps each as JSON under its key, so a bench
stopped half-way resumes where it stopped. The machine's own limit is here too: a greedy token
reads every weight of the target once, so memory bandwidth / the target's bytes bounds
single-stream greedy tokens per second.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig

from spd_lightning.decoding.speculative import SpeculativeDecoder
from spd_lightning.models.lm import left_pad


@dataclass
class Run:
    """One method at one batch size: what it wrote and what it cost."""

    rows: list[list[int]]  # one response per prompt, cut after its end of sequence
    seconds: float  # wall time of every batch, warm-up excluded
    target_calls: int = 0  # the target's forward passes (0 where nobody counted them: a server)
    kept: int = 0  # draft tokens kept (ours only)
    note: str = ""  # how the method ran, or why it did not (a server that refused)

    @property
    def tokens(self) -> int:
        return sum(map(len, self.rows))

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 and self.rows else float("nan")


class RunStore:
    """Runs as <folder>/<key>.json: `get` returns a stored run or makes, stores and returns it."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def load(self, key: str) -> Run | None:
        path = self.path(key)
        return Run(**json.loads(path.read_text())) if path.is_file() else None

    def save(self, key: str, run: Run) -> None:
        self.path(key).write_text(json.dumps(asdict(run)) + "\n")

    def get(self, key: str, make: Callable[[], Run]) -> Run:
        run = self.load(key)
        if run is None:
            print(f"{key} ...", flush=True)
            run = make()
            self.save(key, run)
            print(f"{key}: {run.tokens} tokens in {run.seconds:.1f} s, {run.tokens_per_s:.2f} tok/s", flush=True)
        return run

    def get_interleaved(self, methods: dict[str, OnePrompt], prompts: list[list[int]], max_new_tokens: int,
                        counter: CallCounter) -> dict[str, Run]:  # fmt: skip
        """Stored batch-size-1 runs of `methods` (keys: <name>_b1); the missing ones made together
        by `interleaved` and stored."""
        runs = {name: self.load(f"{name}_b1") for name in methods}
        missing = {name: make for name, make in methods.items() if runs[name] is None}
        if missing:
            print(f"{', '.join(f'{name}_b1' for name in missing)}: timed in turn ...", flush=True)
            for name, run in interleaved(missing, prompts, max_new_tokens, counter).items():
                self.save(f"{name}_b1", run)
                print(f"{name}_b1: {run.tokens} tokens in {run.seconds:.1f} s, {run.tokens_per_s:.2f} tok/s")
                runs[name] = run
        return runs


# One prompt, a token budget -> (the response's ids, draft tokens kept): a method at batch size 1.
OnePrompt = Callable[[list[int], int], tuple[list[int], int]]


class CallCounter:
    """Counts a model's forward passes (a hook: generate() and our loop alike)."""

    def __init__(self, model) -> None:
        self.calls = 0
        model.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.calls += 1


def cut_at_end(rows: list[list[int]], eos: Collection[int]) -> list[list[int]]:
    """Each row up to and including its first end of sequence (generate() pads finished rows)."""
    cut = []
    for row in rows:
        ends = [i for i, t in enumerate(row) if t in eos]
        cut.append(row[: ends[0] + 1] if ends else row)
    return cut


@torch.no_grad()
def hf_generate(
    model, prompts: list[list[int]], max_new_tokens: int, pad: int, eos: Collection[int], assistant=None,
    assistant_tokens: int | None = None,
) -> list[list[int]]:  # fmt: skip
    """transformers' greedy generate() over a left-padded batch, or its assisted generation with
    `assistant` as the draft (batch size 1). assistant_tokens=K: exactly K draft tokens per round
    (a constant schedule, no confidence stop), as our loop drafts; None: transformers' defaults."""
    ids, mask, _ = left_pad(prompts, pad)
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(eos), pad_token_id=pad
    )
    extra = {"assistant_model": assistant} if assistant is not None else {}
    if assistant is not None:  # transformers reads the drafting schedule from the assistant's own config
        saved = assistant.generation_config
        assistant.generation_config = GenerationConfig(**saved.to_dict())
        if assistant_tokens is not None:
            assistant.generation_config.num_assistant_tokens = assistant_tokens
            assistant.generation_config.num_assistant_tokens_schedule = "constant"
            assistant.generation_config.assistant_confidence_threshold = 0.0
    try:
        inputs = {"input_ids": ids.to(model.device), "attention_mask": mask.to(model.device)}
        out = model.generate(**inputs, generation_config=config, **extra)
    finally:
        if assistant is not None:
            assistant.generation_config = saved
    return cut_at_end(out[:, ids.shape[1] :].tolist(), eos)


def timed_batches(generate: Callable, prompts: list[list[int]], batch_size: int, counter: CallCounter) -> Run:
    """Runs generate(batch) -> rows over `prompts` in batches, after one short warm-up call."""
    generate([prompts[0][:16]])
    calls, rows, start = counter.calls, [], time.perf_counter()
    for b in range(0, len(prompts), batch_size):
        rows.extend(generate(prompts[b : b + batch_size]))
    return Run(rows, time.perf_counter() - start, counter.calls - calls)


def ours(decoder: SpeculativeDecoder, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
         counter: CallCounter) -> Run:  # fmt: skip
    """Our cached loop at `batch_size` rows (its own batching: finished rows leave the batch)."""
    decoder.generate_ids([prompts[0][:16]], 8)  # warm-up
    calls = counter.calls
    out = decoder.generate_ids(prompts, max_new_tokens, batch_size)
    kept = sum(g.accepted_draft_tokens for g in out.generations)
    return Run([g.response_ids for g in out.generations], out.seconds, counter.calls - calls, kept)


def interleaved(methods: dict[str, OnePrompt], prompts: list[list[int]], max_new_tokens: int,
                counter: CallCounter) -> dict[str, Run]:  # fmt: skip
    """Every method on each prompt in turn, the order reversed from one prompt to the next, after
    one short warm-up call each. A shared machine's speed drifts over minutes by as much as two
    methods differ (14% between windows on a 2-core VM): timed in turn, the drift hits every method
    alike and the ratios between them hold. Each Run's seconds sum its own calls only."""
    for make in methods.values():
        make(prompts[0][:16], 8)
    runs = {name: Run([], 0.0) for name in methods}
    order = list(methods)
    for i, prompt in enumerate(prompts):
        took = {}
        for name in order if i % 2 == 0 else order[::-1]:
            calls, start = counter.calls, time.perf_counter()
            row, kept = methods[name](prompt, max_new_tokens)
            took[name] = time.perf_counter() - start
            run = runs[name]
            run.seconds += took[name]
            run.rows.append(row)
            run.target_calls += counter.calls - calls
            run.kept += kept
        print(f"prompt {i + 1}/{len(prompts)}: " + ", ".join(f"{n} {s:.1f} s" for n, s in took.items()), flush=True)
    return runs


def one_prompt_ours(decoder: SpeculativeDecoder) -> OnePrompt:
    """Our loop on one prompt."""

    def make(prompt: list[int], max_new_tokens: int) -> tuple[list[int], int]:
        generation = decoder.generate_ids([prompt], max_new_tokens, 1).generations[0]
        return generation.response_ids, generation.accepted_draft_tokens

    return make


def memory_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """This machine's memory bandwidth in GB/s over float32 buffers of `gib` GiB, far larger than
    any cache (median of `repeats`): "copy" counts the bytes a copy reads and writes, "read" the
    bytes a sum reads, "gemv" the bytes a matrix-vector product reads (a greedy pass is mostly
    these: every weight read once per token)."""
    src = torch.ones(int(gib * 2**30) // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first
    matrix, vector = src.view(-1, 4096), torch.ones(4096)
    nbytes = src.numel() * 4

    def median_s(step: Callable[[], object]) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return {
        "copy": 2 * nbytes / median_s(lambda: dst.copy_(src)) / 1e9,
        "read": nbytes / median_s(src.sum) / 1e9,
        "gemv": nbytes / median_s(lambda: torch.mv(matrix, vector)) / 1e9,
    }


def weight_bytes(model, dtype: torch.dtype | None = None) -> int:
    """Bytes of a model's weights (tied ones once: parameters() yields each once), in `dtype` if given."""
    size = torch.empty((), dtype=dtype).element_size() if dtype else None
    return sum(p.numel() * (size or p.element_size()) for p in model.parameters())


def bytes_read_per_token(model, dtype: torch.dtype | None = None) -> int:
    """Weight bytes one single-token pass reads: every weight once, except an input embedding not
    tied to the output layer, of which a lookup reads one row (the 1.5B target's 0.93 GB table in
    float32 is 13% of its weights, read a row at a time)."""
    embedding, output = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if embedding is output:
        return weight_bytes(model, dtype)
    size = torch.empty((), dtype=dtype).element_size() if dtype else embedding.element_size()
    return weight_bytes(model, dtype) - (embedding.shape[0] - 1) * embedding.shape[1] * size


def greedy_bound_tps(bandwidth_gbs: float, model_bytes: int) -> float:
    """Single-stream greedy tokens/s if every token read the weights once at `bandwidth_gbs`
    (nothing else read, no compute): no greedy decoder on this machine can pass it."""
    return bandwidth_gbs * 1e9 / model_bytes
