"""Benchmark the verification step against a real vLLM server: naive per-sample text requests
(as the original verl-based reward function did) against VLLMTarget (distinct token-id
prefixes, batched).

    python bench/verify.py                                   # the shipped default world, start vLLM, run, stop
    python bench/verify.py --url http://127.0.0.1:8765/v1 --model toy-target   # a running server

The self-started server needs vLLM's own python: --vllm-python, else $SPD_VLLM_PYTHON, else
.venv-vllm/bin/python (see spd_lightning/targets/vllm_server.py).

Workload: 8 toy records (fixed seed), N=8 samples each, decisions ~ Bernoulli(0.5) at mismatch
positions, so 64 samples and their hybrid prefixes. Each way runs --repeats times after a warm-up;
the median wall time counts. The last line reads
    speedup=<naive/ours> requests_per_sample=<our requests/samples>
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import requests
import torch
from transformers import AutoTokenizer

from spd_lightning.core.sampling import first_reject, hybrid_prefix, mismatch_mask, sample_decisions
from spd_lightning.data.answers import extract_final_number
from spd_lightning.data.records import Record, load_records
from spd_lightning.errors import SPDError
from spd_lightning.reporting.tables import FigureTable, print_tables, write_markdown
from spd_lightning.targets.vllm import VLLMTarget
from spd_lightning.targets.vllm_server import launch_vllm_server
from spd_lightning.toy.build import SHIPPED_WORLD, build_toy_world

REPO = Path(__file__).resolve().parents[1]


def workload(records: list[Record], num_records: int, num_samples: int, seed: int):
    """[(record, hybrid prefix)] for num_records x num_samples samples, record-major."""
    chosen = random.Random(seed).sample(records, num_records)
    draft = torch.tensor([r.draft_ids for r in chosen])
    target = torch.tensor([r.target_ids for r in chosen])
    torch.manual_seed(seed)
    decisions = sample_decisions(torch.full(draft.shape, 0.5), mismatch_mask(draft, target), num_samples)
    accept_len = first_reject(decisions)  # [B, N]
    return [
        (r, hybrid_prefix(r.context_ids, r.draft_ids, r.target_ids, j))
        for r, row in zip(chosen, accept_len.tolist())
        for j in row
    ]


def naive(url: str, model: str, samples, tokenizer, max_tokens: int) -> tuple[list[str], int]:
    """One fresh POST per sample with a text prompt, sequentially: the per-sample reward way."""
    texts = []
    for _, prefix in samples:
        body = {
            "model": model,
            "prompt": tokenizer.decode(prefix, skip_special_tokens=False),
            "max_tokens": max_tokens,
            "temperature": 0.0,
        }
        resp = requests.post(url + "/completions", json=body, timeout=120)
        resp.raise_for_status()
        texts.append(resp.json()["choices"][0]["text"])
    return texts, len(samples)


def ours(url: str, model: str, samples, max_tokens: int) -> tuple[dict, int]:
    """Distinct prefixes only, batched token ids, through a fresh VLLMTarget (no cache)."""
    target = VLLMTarget(url=url, model=model, max_new_tokens=max_tokens)  # start-up checks: untimed
    try:
        start = time.perf_counter()
        distinct = list(dict.fromkeys(tuple(p) for _, p in samples))
        completions = dict(zip(distinct, target.complete([list(p) for p in distinct])))
        elapsed = time.perf_counter() - start
        assert target.num_failed_requests == 0, "a request to the server failed"
        return {"completions": completions, "elapsed": elapsed}, target.num_requests
    finally:
        target.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server, http://HOST:PORT/v1 (default: start one)")
    parser.add_argument("--model", default="toy-target", help="its served model name")
    parser.add_argument("--toy-dir", default=str(SHIPPED_WORLD), help="the embedded default world")
    parser.add_argument("--vllm-python", help="python of vLLM's venv, to start the server")
    parser.add_argument("--records", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8, help="N samples per record")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "outputs" / "verify"))
    args = parser.parse_args()
    try:
        bench(args)
    except SPDError as err:
        sys.exit(f"error: {err}")


def bench(args: argparse.Namespace) -> None:
    toy = build_toy_world(args.toy_dir)
    tokenizer = AutoTokenizer.from_pretrained(toy / "target")
    samples = workload(load_records(toy / "records.jsonl"), args.records, args.samples, args.seed)
    if args.url:
        run(args.url.rstrip("/"), args, samples, tokenizer)
        return
    start = time.perf_counter()
    with launch_vllm_server(toy / "target", args.model, python=args.vllm_python) as url:
        print(f"server_start_s={time.perf_counter() - start:.1f}")
        run(url, args, samples, tokenizer)


def run(url: str, args, samples, tokenizer) -> None:
    # Warm-up: the server's first request of each kind (text, token ids) is not timed.
    naive(url, args.model, samples[:1], tokenizer, args.max_tokens)
    ours(url, args.model, samples[:2], args.max_tokens)

    naive_times, our_times = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        naive_texts, naive_requests = naive(url, args.model, samples, tokenizer, args.max_tokens)
        naive_times.append(time.perf_counter() - start)
        result, our_requests = ours(url, args.model, samples, args.max_tokens)
        our_times.append(result["elapsed"])
    naive_wall, our_wall = statistics.median(naive_times), statistics.median(our_times)

    eos, eos_text = tokenizer.eos_token_id, tokenizer.eos_token
    agree = 0
    for (record, prefix), text in zip(samples, naive_texts):
        naive_response = tokenizer.decode(prefix[record.prompt_len :], skip_special_tokens=False) + text
        naive_response = naive_response.split(eos_text)[0]
        ids = prefix[record.prompt_len :] + result["completions"][tuple(prefix)]
        our_response = tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids, skip_special_tokens=True)
        agree += extract_final_number(naive_response) == extract_final_number(our_response)

    n, distinct = len(samples), len(result["completions"])
    table = FigureTable("Verifying one workload against a vLLM server", ["method", "requests", "wall s"])
    table.add("naive: one text request per sample, sequential", str(naive_requests), f"{naive_wall:.3f}")
    table.add(f"VLLMTarget: the {distinct} distinct prefixes as token ids", str(our_requests), f"{our_wall:.3f}")
    notes = (f"{naive_wall / our_wall:.1f}x faster, median of {args.repeats} runs each; same final answer on "
             f"{agree}/{n} samples; server start-up not included",)  # fmt: skip
    sample = f"{args.records} records x {args.samples} samples, decisions ~ Bernoulli(0.5), the toy target"
    markdown = write_markdown(Path(args.out) / "verify.md", [table], notes, sample)
    print_tables(table, notes=(*notes, f"table: {markdown}"))
    print(f"naive_wall_s={naive_wall:.3f}  (runs: {', '.join(f'{t:.3f}' for t in naive_times)})")
    print(f"ours_wall_s={our_wall:.3f}  (runs: {', '.join(f'{t:.3f}' for t in our_times)})")
    print(f"naive_requests={naive_requests}")
    print(f"our_requests={our_requests}")
    print(f"samples={n}")
    print(f"distinct_prefixes={distinct}")
    print(f"final_answers_agree={agree}/{n}")
    print(f"speedup={naive_wall / our_wall:.1f} requests_per_sample={our_requests / n:.3f}")
    if agree != n:
        sys.exit(1)


if __name__ == "__main__":
    main()
