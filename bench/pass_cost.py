"""What a forward pass over n new tokens costs against one over a single token, per dtype: the
premise of speculative decoding is that verifying K+1 tokens costs about one token's pass.

    python bench/pass_cost.py                                  # the qwen_coder target: float32 3 ways, bfloat16
    python bench/pass_cost.py --model DIR --context 200 --tokens 1 2 5 9 17 --kinds float32 float32-packed

For each kind (a dtype; "-packed": its linear layers packed for oneDNN, spd_lightning.models.packed;
"-auto": packed per width as the loaders do, models.packed.pack_if_faster; "-int8": int8 weights,
a scale per row, activations in the dtype, models.int8)
the model reads a --context-token prompt once (KV cache), then, for each n, passes
over n new tokens after it (the cache cut back each time); the median of --repeats timings is
printed, and its ratio to the single-token pass, in a table also written to --out/pass_cost.md.
With --identity N each kind also writes N greedy tokens after a GSM8K-like prompt, and the
table says for how many it agrees with the first kind (what a kernel path costs in token identity;
torch.compile's is bench/compiled_greedy.py: it needs a static cache, which these passes do not use).
On a CPU whose matrix units only speed up bfloat16 (Intel AMX), an unpacked float32 pass over a
few tokens can cost several single-token passes, and speculative decoding then gains little
there: MKL re-lays-out the weights for every small product, which packing once avoids.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer

from spd_lightning.models.int8 import quantize_linears
from spd_lightning.models.packed import pack_if_faster, pack_linears, pass_seconds
from spd_lightning.models.pairs import pair_dir, require_built
from spd_lightning.models.prefix_states import common_prefix
from spd_lightning.reporting.tables import FigureTable, print_tables, write_markdown
from spd_lightning.targets.local import load_causal_lm
from spd_lightning.tasks.speed import hf_generate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(pair_dir("qwen_coder", ROOT) / "target"))
    parser.add_argument("--kinds", nargs="+", default=["float32", "float32-packed", "float32-auto", "bfloat16"])
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 5, 9, 17])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--identity", type=int, default=0, help="greedy tokens compared with the first kind")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "pass_cost"))
    args = parser.parse_args()
    require_built("--model", args.model)
    print(f"{args.model}, context {args.context} tokens, {torch.get_num_threads()} threads")
    title = f"A pass over n new tokens after {args.context}: the single token's time, then x that time"
    identity = [f"= {args.kinds[0]}, of {args.identity}"] if args.identity else []
    table = FigureTable(title, ["new tokens", *map(str, args.tokens), *identity])
    first_ids: list[int] = []
    if args.identity:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        prompt, pad = tokenizer(PROMPT).input_ids, tokenizer.pad_token_id or 0
    for name in args.kinds:
        model = prepared(name, args, parser)
        cells = pass_figures(model, name, args)
        if args.identity:
            ids = greedy_ids(model, prompt, pad, args.identity)
            first_ids = first_ids or ids
            cells.append(str(common_prefix(ids, first_ids)))  # after a first difference, agreement is chance
            print(f"{name:14s} greedy: the first {cells[-1]} of {args.identity} tokens as {args.kinds[0]}'s")
        table.add(name, *cells)
        del model
    model_dir = Path(args.model)
    sample = f"median of {args.repeats} timings after a warm-up, {model_dir.parent.name}/{model_dir.name}"
    markdown = write_markdown(Path(args.out) / "pass_cost.md", [table], sample=sample)
    print_tables(table, notes=(f"table: {markdown}",))


def pass_figures(model, name: str, args) -> list[str]:
    """The single-token pass's ms, then each wider pass as a multiple of it; printed as measured."""
    single, row = None, []
    for n in args.tokens:
        seconds = pass_seconds(model, args.context, n, args.repeats)
        single = single or seconds
        print(f"{name:14s} {n:3d} new tokens: {seconds * 1000:7.1f} ms  ({seconds / single:.2f}x one token)")
        row.append(f"{seconds * 1000:.0f} ms" if n == args.tokens[0] else f"{seconds / single:.2f}x")
    return row


PROMPT = "Question: A baker sells 24 muffins a day at $3 each. How much does he earn in a week?\nAnswer:"


def greedy_ids(model, prompt: list[int], pad: int, n: int) -> list[int]:
    """n greedy token ids after `prompt` (transformers' generate(), no end-of-sequence stop)."""
    (row,) = hf_generate(model, [prompt], n, pad=pad, eos=())
    return row


def prepared(name: str, args, parser: argparse.ArgumentParser):
    """The --model loaded in the kind's dtype, its kernels as the kind says."""
    dtype, _, variant = name.partition("-")
    if variant not in ("", "packed", "auto", "int8"):
        parser.error(f"--kinds {name}: a dtype, optionally -packed, -auto or -int8 (float32-packed)")
    model = load_causal_lm(args.model, dtype, what="model", config_key="--model")
    if variant == "packed":
        pack_linears(model)
    elif variant == "int8":
        quantize_linears(model)
    elif variant == "auto":
        print(f"{name}: {pack_if_faster(model)}", flush=True)
    return model


if __name__ == "__main__":
    main()
