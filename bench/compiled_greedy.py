"""Is torch.compile a faster kernel path for greedy decoding on this CPU, and what does it cost in
token identity? transformers' greedy generate() on the target, GSM8K test prompts at batch size 1,
three ways per dtype:

- `dynamic cache`: generate() as users call it (the cache our loop also uses, grown and cut back);
- `static cache`: fixed-size cache buffers, eager;
- `static cache, compiled`: the same through torch.compile (inductor's CPU backend), which
  transformers applies on a CPU only when asked (`CompileConfig._compile_all_devices`).

Our loop cannot take the compiled path as it is: it cuts its DynamicCache back after each block,
and every new cache layout fails torch.compile's stride guards and recompiles (on the default
world's target, 6 recompiles over passes of 1, 2 and 5 tokens). So this bench measures what a
static cache would buy before anyone builds one. The first prompt of each way is a warm-up (it
holds the compilation, timed apart); tokens/s counts the others.

    python bench/compiled_greedy.py                       # the qwen_coder target, 3 prompts, 64 tokens
    python bench/compiled_greedy.py --dtypes float32 --prompts 2 --max-new-tokens 16

Writes compiled_greedy.md to --out; the last line is `eager_tps=.. static_tps=.. compiled_tps=..
compile_s=.. same=..` (float32; same: prompts whose compiled tokens equal the dynamic cache's).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, CompileConfig, GenerationConfig, StaticCache

from spd_lightning.data.prompts import PromptList, encode_prompts
from spd_lightning.models.pairs import pair_dir, require_built
from spd_lightning.reporting.tables import FigureTable, print_tables, write_markdown
from spd_lightning.targets.local import load_causal_lm

ROOT = Path(__file__).resolve().parents[1]
WAYS = {"dynamic cache": (False, False), "static cache": (True, False), "static cache, compiled": (True, True)}


def greedy(model, prompt: list[int], max_new_tokens: int, cache_len: int | None, compiled: bool) -> list[int]:
    """One prompt's greedy tokens (exactly max_new_tokens: no early stop, so every way writes
    alike); cache_len: a static cache of that many positions (one size for every prompt, so that
    a compiled step is compiled once), None: the dynamic cache."""
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                              disable_compile=not compiled)  # fmt: skip
    if compiled:
        config.compile_config = CompileConfig()
        config.compile_config._compile_all_devices = True  # transformers compiles on a GPU only, unless told
    cache = {"past_key_values": StaticCache(config=model.config, max_cache_len=cache_len)} if cache_len else {}
    ids = torch.tensor([prompt])  # [1, T]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, **cache)
    return out[0, ids.shape[1] :].tolist()


def run_way(model, prompts: list[list[int]], args, way: str) -> tuple[float, float, list[list[int]]]:
    """-> (seconds of the warm-up prompt, tokens/s over the rest, every prompt's tokens)."""
    static, compiled = WAYS[way]
    cache_len = max(map(len, prompts)) + args.max_new_tokens if static else None
    start = time.perf_counter()
    rows = [greedy(model, prompts[0], args.max_new_tokens, cache_len, compiled)]
    warm = time.perf_counter() - start
    start = time.perf_counter()
    rows += [greedy(model, p, args.max_new_tokens, cache_len, compiled) for p in prompts[1:]]
    tps = args.max_new_tokens * (len(prompts) - 1) / (time.perf_counter() - start)
    return warm, tps, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(pair_dir("qwen_coder", ROOT) / "target"))
    parser.add_argument("--gsm8k", default=str(ROOT.parent / "shared" / "data" / "gsm8k"))
    parser.add_argument("--skip", type=int, default=8, help="test lines passed over, as bench/speed.py's")
    parser.add_argument("--prompts", type=int, default=3, help="the first is the warm-up")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--out", default=str(ROOT / "outputs" / "compiled_greedy"))
    args = parser.parse_args()
    require_built("--model", args.model)
    if args.prompts < 2:
        parser.error("--prompts: at least 2 (the first is the warm-up)")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    listed = PromptList.from_jsonl(str(Path(args.gsm8k) / "test.jsonl"), limit=args.prompts,
                                   chat_template=bool(tokenizer.chat_template), skip=args.skip)  # fmt: skip
    prompts = encode_prompts(tokenizer, listed)
    table = FigureTable("transformers' greedy generate(), batch size 1",
                        ["dtype, way", "tok/s", "first prompt (s)", "= float32 dynamic"])  # fmt: skip
    reference, figures = None, {}
    for dtype in args.dtypes:
        model = load_causal_lm(args.model, dtype, what="model", config_key="--model")
        for way in WAYS:
            warm, tps, rows = run_way(model, prompts, args, way)
            reference = reference or rows
            same = sum(r == ref for r, ref in zip(rows, reference))
            print(f"{dtype} {way}: {tps:.2f} tok/s, first prompt {warm:.1f} s, {same}/{len(rows)} = float32 dynamic",
                  flush=True)  # fmt: skip
            table.add(f"{dtype}, {way}", f"{tps:.2f}", f"{warm:.1f}", f"{same}/{len(rows)}")
            figures.setdefault(dtype, {})[way] = (tps, warm, same)
        del model
    sample = (f"{args.prompts} GSM8K test prompts from line {listed[0].index}, {args.max_new_tokens} new tokens each; "
              "tok/s over all but the first, the warm-up that holds any compilation")  # fmt: skip
    markdown = write_markdown(Path(args.out) / "compiled_greedy.md", [table], sample=sample)
    print_tables(table, notes=(f"table: {markdown}",))
    first = figures[args.dtypes[0]]
    print(f"eager_tps={first['dynamic cache'][0]:.3f} static_tps={first['static cache'][0]:.3f} "
          f"compiled_tps={first['static cache, compiled'][0]:.3f} compile_s={first['static cache, compiled'][1]:.1f} "
          f"same={first['static cache, compiled'][2]}")  # fmt: skip


if __name__ == "__main__":
    main()
