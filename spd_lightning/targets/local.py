"""The in-process backend: a transformers causal LM run greedily over token ids, in batches.

It serves as the target (completing hybrid prefixes, and for task=prepare the responses and the
target's token at every draft position) and as the draft (proposing K tokens)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from spd_lightning.errors import SetupError
from spd_lightning.hf import load_pretrained, torch_dtype
from spd_lightning.lm import greedy_tokens, teacher_forced_argmax


def load_causal_lm(
    path: str,
    dtype: str = "float32",
    device: str = "cpu",
    what: str = "target model",
    config_key: str = "target.model_path",
    offline_key: str | None = None,
) -> PreTrainedModel:
    """A causal LM in eval mode on `device`; errors name `what` and the config keys of the caller
    (`config_key` for the path, its sibling `.dtype` for the dtype)."""
    model_dtype = torch_dtype(dtype, config_key.rsplit(".", 1)[0] + ".dtype")
    model = load_pretrained(AutoModelForCausalLM, path, what, config_key, offline_key, dtype=model_dtype)
    return model.to(device).eval()


class LocalTarget:
    """Greedy completion with `generate`, left-padded batches, token ids in and out."""

    def __init__(
        self,
        model_path: str,
        max_new_tokens: int = 16,
        batch_size: int = 64,
        dtype: str = "float32",
        device: str = "cpu",
    ) -> None:
        # "auto": the training process's own device, set by the LightningModule (each DDP rank its GPU).
        self.follows_module = device == "auto"
        self.device = "cpu" if self.follows_module else device
        self.model = load_causal_lm(model_path, dtype, self.device)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        config = self.model.config
        self.eos_token_id = int(config.eos_token_id)
        self.pad_token_id = int(config.pad_token_id if config.pad_token_id is not None else config.eos_token_id)
        self.num_requests = 0

    def to(self, device) -> LocalTarget:
        self.model.to(device)
        self.device = str(device)
        return self

    def check_tokenizer(self, tokenizer, role: str = "target") -> None:
        vocab = self.model.config.vocab_size
        # A model may pad its embedding table past the tokenizer, never below it.
        if vocab < len(tokenizer) or self.eos_token_id != tokenizer.eos_token_id:
            raise SetupError(
                f"tokenizer mismatch: the {role} model has {vocab} embeddings and EOS id {self.eos_token_id}, "
                f"the tokenizer {len(tokenizer)} tokens and EOS id {tokenizer.eos_token_id}. "
                "Draft, target and scorer must share one tokenizer."
            )

    @torch.no_grad()
    def _complete_batch(self, prefixes: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        self.num_requests += 1
        width = max(map(len, prefixes))
        ids = torch.full((len(prefixes), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prefixes):  # left padding: every row ends where generation starts
            ids[b, width - len(p) :] = torch.tensor(p)
            mask[b, width - len(p) :] = 1
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        completions = []
        for row in out[:, width:].tolist():
            cut = row.index(self.eos_token_id) + 1 if self.eos_token_id in row else len(row)
            completions.append(row[:cut])
        return completions

    def complete(self, prefixes: list[list[int]], max_new_tokens: int | None = None) -> list[list[int] | None]:
        """Greedy completions ending with EOS, or `max_new_tokens` long (None: self.max_new_tokens)."""
        budget = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        out: list[list[int] | None] = []
        for start in range(0, len(prefixes), self.batch_size):
            out.extend(self._complete_batch(prefixes[start : start + self.batch_size], budget))
        return out

    def propose(self, contexts: list[list[int]], k: int) -> list[list[int] | None]:
        """k greedy tokens after each context, not stopping at EOS (the draft's block)."""
        out: list[list[int] | None] = []
        for start in range(0, len(contexts), self.batch_size):
            self.num_requests += 1
            out.extend(greedy_tokens(self.model, contexts[start : start + self.batch_size], k, self.pad_token_id))
        return out

    def argmax_along(self, contexts: list[list[int]], drafts: list[list[int]]) -> list[list[int] | None]:
        """[i] = greedy token after context + draft[:i], i < K: one teacher-forced pass per batch.
        Every draft of one call must have the same length K."""
        out: list[list[int] | None] = []
        for start in range(0, len(contexts), self.batch_size):
            self.num_requests += 1
            batch = slice(start, start + self.batch_size)
            out.extend(teacher_forced_argmax(self.model, contexts[batch], drafts[batch], self.pad_token_id))
        return out

    def close(self) -> None:
        pass
