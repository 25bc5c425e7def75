"""Lossy speculative decoding from Python: your draft, your target, an accept policy (a trained
zero-cost judge, the KL rule, or standard SD), prompt text in, text and statistics out.

    from spd_lightning.decoding.speculative import SpeculativeDecoder

    decoder = SpeculativeDecoder.from_pretrained(
        ".cache/pairs/qwen_coder/draft", ".cache/pairs/qwen_coder/target",
        policy="judge", judge_path="judges/qwen_coder_grpo.pt",
    )
    out = decoder.generate("Natalia sold clips to 48 of her friends ...", max_new_tokens=128)
    print(out.text, out.stats["tokens_per_s"], out.stats["target_calls_per_token"])

The loop is decoding.generate_cached (KV caches for both models, rolled back after each block).
Policies, by name (registry.DECODE_POLICIES): greedy (the target alone), standard_sd (lossless: every
mismatch rejected), judge (a head saved by task=judge), kl_below (the training-free KL rule),
accept_all; or any decoding.Policy, or a plain callable Block -> [B, K] bool.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from spd_lightning.data.prompts import Prompt, PromptList, encode_prompts
from spd_lightning.decoding.loop import Generation, LoopClock, LoopSettings, generate_cached
from spd_lightning.decoding.policies import Decide, Policy, PolicySettings, as_policy
from spd_lightning.decoding.registry import build_policy
from spd_lightning.decoding.setup import PairSettings, build_decoding, check_tokenizer
from spd_lightning.errors import SetupError
from spd_lightning.models.hf import pad_id_of, response_end_ids


@dataclass
class Speculation:
    """What one generate call produced and what it cost."""

    texts: list[str]  # one response per prompt, special tokens dropped
    generations: list[Generation]  # token ids and per-prompt counts
    seconds: float  # wall time of the whole call, every model pass and decision included
    clock: LoopClock = field(default_factory=LoopClock)  # where those seconds went

    @property
    def text(self) -> str:
        """The response to the first (or only) prompt."""
        return self.texts[0]

    @property
    def stats(self) -> dict[str, float]:
        tokens = sum(g.num_tokens for g in self.generations)
        calls = sum(g.target_calls for g in self.generations)
        return {
            "tokens": tokens,
            "seconds": self.seconds,
            "tokens_per_s": tokens / self.seconds if self.seconds > 0 else float("nan"),
            "target_calls": calls,
            "target_calls_per_token": calls / max(tokens, 1),
            "draft_tokens_kept_per_block": sum(g.accepted_draft_tokens for g in self.generations) / max(calls, 1),
            "mismatches_kept_per_block": sum(g.accepted_mismatches for g in self.generations) / max(calls, 1),
            "draft_s": self.clock.draft_s,
            "target_s": self.clock.target_s,
            "policy_s": self.clock.policy_s,
        }


class SpeculativeDecoder:
    """Greedy-target speculative decoding with a lossy accept policy, KV caches on both models."""

    def __init__(
        self,
        draft: PreTrainedModel,
        target: PreTrainedModel,
        tokenizer,
        policy: str | Policy | Decide = "standard_sd",
        block_size: int = 4,
        settings: PolicySettings | None = None,
        chat_template: bool = True,
        system_prompt: str | None = None,
        draft_confidence: float | None = None,
    ) -> None:
        if block_size < 1:
            raise SetupError(f"block_size={block_size}: a block holds at least one draft token")
        check_tokenizer(tokenizer, {"the draft": draft, "the target": target})
        self.draft, self.target, self.tokenizer = draft, target, tokenizer
        self.chat_template = chat_template and getattr(tokenizer, "chat_template", None) is not None
        self.system_prompt = system_prompt  # with the chat template: a system turn first (None: the template's)
        # End a block's drafting early where the draft is unsure (decoding.generate_cached); None: always K.
        self.draft_confidence = draft_confidence
        named = isinstance(policy, str)
        self.policy = build_policy(policy, settings or PolicySettings()) if named else as_policy(policy)
        self.block_size = block_size if self.policy.needs.drafts else 0
        self.eos_ids = response_end_ids(target, tokenizer)
        self.pad_id = pad_id_of(tokenizer)

    @classmethod
    def from_pretrained(
        cls, draft: str, target: str, policy: str = "standard_sd", judge_path: str | None = None, **kwargs
    ) -> SpeculativeDecoder:
        """Loads both models (transformers directories or hub ids) and the target's tokenizer
        (decoding.setup.build_decoding, as task=decode does). kwargs: dtype, device, pack_linears,
        block_size, kl_threshold, kl_confidence, judge_threshold, chat_template, system_prompt,
        draft_confidence. pack_linears (default None): on the CPU, every linear layer's weight
        packed for oneDNN (models.packed) when True, kept as loaded when False, and when None
        whichever probe passes at load find faster, per pass width; a GPU model is left as it is.
        draft_vocab=N with draft_vocab_corpus=JSONL: the draft scores only the corpus's N most
        frequent tokens (models.vocab_head); draft_int8=True: the draft's linear layers with int8
        weights (models.int8, CPU only). Either makes draft passes cheaper; standard SD stays lossless."""
        loading = ("dtype", "device", "pack_linears", "draft_vocab", "draft_vocab_corpus", "draft_int8")
        load = {k: kwargs.pop(k) for k in loading if k in kwargs}
        choice = {k: kwargs.pop(k) for k in ("kl_threshold", "kl_confidence", "judge_threshold") if k in kwargs}
        setup = build_decoding(PairSettings(draft, target, **load), [policy], PolicySettings(**choice), judge_path)
        models = (setup.draft, setup.target, setup.tokenizer)
        return cls(*models, setup.policies[policy], settings=setup.settings, **kwargs)

    def encode(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt: the user's turn of the chat template (instruct models), as
        prepare, eval and decode write them, or the text alone."""
        listed = PromptList(Prompt(i, text, None) for i, text in enumerate(prompts))
        listed.chat_template, listed.system_prompt = self.chat_template, self.system_prompt
        return encode_prompts(self.tokenizer, listed)

    def generate(self, prompts: str | list[str], max_new_tokens: int = 256, batch_size: int = 1) -> Speculation:
        """Decodes every prompt (`batch_size` rows at a time) and times the whole call."""
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.generate_ids(self.encode(texts), max_new_tokens, batch_size)

    @torch.no_grad()
    def generate_ids(self, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int = 1) -> Speculation:
        """As generate, from token ids."""
        if max_new_tokens < 1 or batch_size < 1:
            raise SetupError("max_new_tokens and batch_size must be >= 1")
        clock, start = LoopClock(), time.perf_counter()
        settings = LoopSettings(
            self.block_size, max_new_tokens, self.eos_ids, self.pad_id, batch_size, self.draft_confidence
        )
        gens = generate_cached(self.draft, self.target, prompt_ids, self.policy, settings, clock=clock)
        seconds = time.perf_counter() - start
        texts = [self.tokenizer.decode(g.response_ids, skip_special_tokens=True) for g in gens]
        return Speculation(texts, gens, seconds, clock)
