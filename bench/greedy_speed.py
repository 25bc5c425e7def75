"""The project's greedy generation (spd_lightning.models.lm.greedy_generate) against transformers'
`model.generate(do_sample=False)` with its KV cache: same model, prompts, max_new_tokens, batch.

    python bench/greedy_speed.py                           # the qwen_coder target, 4 GSM8K test prompts
    python bench/greedy_speed.py --model DIR --prompts 8 --max-new-tokens 128 --batch-size 4

Prompts are GSM8K test questions (../shared/data/gsm8k/test.jsonl, or --gsm8k) through the
tokenizer's chat template. transformers is given an explicit greedy GenerationConfig and the same
end-of-sequence ids, and the model's own generation_config (which generate() merges into it, with
Qwen2.5-Instruct's sampling defaults and repetition penalty) is replaced by a neutral one. Each
side is warmed up on one short prompt first; then the prompts run in batches of --batch-size,
and the wall time of all of them counts. The last line reads
    greedy_s=<ours> hf_generate_s=<reference> ratio=<ours/reference> identical=<k>/<n>
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from spd_lightning.data.prompts import PromptList, encode_prompts
from spd_lightning.models.hf import end_of_sequence_ids, pad_id_of
from spd_lightning.models.lm import greedy_generate
from spd_lightning.models.pairs import pair_dir, require_built
from spd_lightning.reporting.tables import FigureTable, print_tables, write_markdown
from spd_lightning.tasks.speed import hf_generate

ROOT = Path(__file__).resolve().parents[1]


def chat_prompts(tokenizer, path: Path, n: int) -> list[list[int]]:
    """The first n questions of a GSM8K file, each the user turn of the tokenizer's chat template."""
    return encode_prompts(tokenizer, PromptList.from_jsonl(str(path), limit=n, chat_template=True))


def timed(fn, prompts: list[list[int]], batch_size: int) -> tuple[float, list[list[int]]]:
    start, rows = time.perf_counter(), []
    for b in range(0, len(prompts), batch_size):
        rows.extend(fn(prompts[b : b + batch_size]))
    return time.perf_counter() - start, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(pair_dir("qwen_coder", ROOT) / "target"))
    parser.add_argument("--gsm8k", default=str(ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"))
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=str(ROOT / "outputs" / "greedy_speed"))
    args = parser.parse_args()
    require_built("--model", args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    pad = pad_id_of(tokenizer)
    eos = end_of_sequence_ids(model)
    # generate() fills what a passed GenerationConfig leaves at its default from the model's own
    # generation_config.json: Qwen2.5-Instruct's repetition_penalty 1.05 then turns greedy decoding
    # into something else (measured: 1 of 4 prompts left greedy at token 51). Make that one neutral.
    model.generation_config = GenerationConfig(eos_token_id=sorted(eos), pad_token_id=pad)
    prompts = chat_prompts(tokenizer, Path(args.gsm8k), args.prompts)
    print(f"{args.model}: {len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"max_new_tokens={args.max_new_tokens}, batch {args.batch_size}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, EOS ids {sorted(eos)}", flush=True)  # fmt: skip

    def ours(batch):
        return greedy_generate(model, batch, args.max_new_tokens, pad, eos)

    def theirs(batch):
        return hf_generate(model, batch, args.max_new_tokens, pad, eos)

    for fn in (ours, theirs):  # warm-up: first-call allocations and kernel selection
        fn([prompts[0][:16]])
    ours_s, ours_rows = timed(ours, prompts, args.batch_size)
    print(f"ours: {ours_s:.1f} s, {sum(map(len, ours_rows))} tokens", flush=True)
    hf_s, hf_rows = timed(theirs, prompts, args.batch_size)
    print(f"transformers generate: {hf_s:.1f} s, {sum(map(len, hf_rows))} tokens", flush=True)
    identical = sum(a == b for a, b in zip(ours_rows, hf_rows))
    for i, (a, b) in enumerate(zip(ours_rows, hf_rows)):
        if a != b:
            first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(f"prompt {i}: differs from token {first} on ({len(a)} vs {len(b)} tokens)")
    ratio = ours_s / hf_s
    table = FigureTable("Greedy generation, the same prompts", ["method", "wall s", "tokens", "same tokens"])
    table.add("spd_lightning.models.lm.greedy_generate", f"{ours_s:.1f}", str(sum(map(len, ours_rows))),
              f"{identical}/{len(prompts)}")  # fmt: skip
    table.add("transformers generate(do_sample=False)", f"{hf_s:.1f}", str(sum(map(len, hf_rows))), "")
    sample = (f"{len(prompts)} GSM8K test prompts through the chat template, {args.max_new_tokens} new tokens at "
              f"most, batch {args.batch_size}, {args.dtype}")  # fmt: skip
    notes = (f"ratio of wall times: {ratio:.2f}",)
    markdown = write_markdown(Path(args.out) / "greedy_speed.md", [table], notes, sample)
    print_tables(table, notes=(f"table: {markdown}",))
    print(f"greedy_s={ours_s:.1f} hf_generate_s={hf_s:.1f} ratio={ratio:.2f} identical={identical}/{len(prompts)}")


if __name__ == "__main__":
    main()
