"""Does a vLLM server complete the real pair's hybrid prefixes exactly as the in-process target?

    python bench/vllm_real_pair.py --records data/gsm8k_qwen/records.jsonl     # 50 prefixes, 32 tokens each

Takes hybrid prefixes from prepared records of the real pair (`task=prepare pair=qwen_coder`):
for record i, the block cut at its first mismatch (context + draft[:j] + [target[j]]) and the
block kept whole (context + draft), alternately. Starts vLLM on the target (from .venv-vllm, float32,
--max-model-len 2048, VLLM_CPU_KVCACHE_SPACE=2), completes every prefix greedily with at most
--max-tokens tokens, stops the server, then completes the same prefixes in-process (LocalTarget,
float32) and compares token for token. Where they differ it prints the first differing position.
The last line reads
    identical=<k>/<n> vllm_s=<s> local_s=<s> server_start_s=<s>
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from spd_lightning.models.pairs import pair_dir, require_built, require_records
from spd_lightning.targets import LocalTarget
from spd_lightning.targets.vllm import VLLMTarget
from spd_lightning.targets.vllm_server import launch_vllm_server

ROOT = Path(__file__).resolve().parents[1]


def hybrid_prefixes(records_path: Path, n: int) -> list[list[int]]:
    prefixes = []
    for i, line in enumerate(records_path.read_text().splitlines()):
        if len(prefixes) >= n:
            break
        r = json.loads(line)
        draft, target = r["draft_ids"], r["target_ids"]
        if i % 2 == 0:
            j = next(k for k, (d, t) in enumerate(zip(draft, target)) if d != t)
            prefixes.append(r["context_ids"] + draft[:j] + [target[j]])
        else:
            prefixes.append(r["context_ids"] + draft)
    return prefixes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", required=True, help="records.jsonl of the real pair")
    parser.add_argument("--target", default=str(pair_dir("qwen_coder", ROOT) / "target"))
    parser.add_argument("--prefixes", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    require_built("--target", args.target)
    require_records("--records", args.records)
    prefixes = hybrid_prefixes(Path(args.records), args.prefixes)
    print(f"{len(prefixes)} hybrid prefixes of {min(map(len, prefixes))}-{max(map(len, prefixes))} tokens", flush=True)
    start = time.perf_counter()
    extra = ["--max-model-len", "2048"]
    with launch_vllm_server(args.target, "target", extra_args=extra, env={"VLLM_CPU_KVCACHE_SPACE": "2"}) as url:
        started = time.perf_counter() - start
        print(f"server ready in {started:.0f} s", flush=True)
        from transformers import AutoTokenizer

        remote = VLLMTarget(url=url, model="target", prompts_per_request=len(prefixes), timeout_s=3600, retries=0)
        remote.check_tokenizer(AutoTokenizer.from_pretrained(args.target))
        t = time.perf_counter()
        served = remote.complete(prefixes, max_new_tokens=args.max_tokens)
        vllm_s = time.perf_counter() - t
        remote.close()
    print(f"vLLM: {vllm_s:.0f} s", flush=True)
    local = LocalTarget(args.target, batch_size=len(prefixes), dtype="float32")
    t = time.perf_counter()
    ours = local.complete(prefixes, max_new_tokens=args.max_tokens)
    local_s = time.perf_counter() - t
    print(f"in-process: {local_s:.0f} s", flush=True)
    identical = 0
    for i, (a, b) in enumerate(zip(served, ours)):
        if a == b:
            identical += 1
            continue
        first = next((k for k, (x, y) in enumerate(zip(a or [], b)) if x != y), min(len(a or []), len(b)))
        print(f"prefix {i}: first difference at completion token {first} ({len(a or [])} vs {len(b)} tokens)")
    times = f"vllm_s={vllm_s:.0f} local_s={local_s:.0f} server_start_s={started:.0f}"
    print(f"identical={identical}/{len(prefixes)} {times}")


if __name__ == "__main__":
    main()
