"""The in-process backend: a transformers causal LM run greedily over token ids, in batches.

It serves as the target (completing hybrid prefixes, and for task=prepare the responses and the
target's token at every draft position) and as the draft (proposing K tokens). Greedy means
greedy: the passes of spd_lightning.models.lm take the argmax themselves, so a generation_config.json
with sampling defaults or a repetition penalty (Qwen2.5-Instruct ships both) changes nothing."""

from __future__ import annotations

from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel

from spd_lightning.errors import SetupError
from spd_lightning.models.hf import end_of_sequence_ids, load_pretrained, pad_id_of, resolve_device, torch_dtype
from spd_lightning.models.lm import argmax_shared, greedy_generate, propose_shared, trunk_groups


def load_causal_lm(
    path: str,
    dtype: str = "float32",
    device: str = "cpu",
    what: str = "target model",
    config_key: str = "target.model_path",
    offline_key: str | None = None,
    section: str | None = None,
) -> PreTrainedModel:
    """A causal LM in eval mode on `device`; errors name `what` and the config keys of the caller
    (`config_key` for the path, `section`.dtype and `section`.device for the dtype and device;
    section None: config_key's own section)."""
    section = section or config_key.rsplit(".", 1)[0]
    model_dtype = torch_dtype(dtype, section + ".dtype")
    device = resolve_device(device, section + ".device")  # before minutes of loading, not after
    model = load_pretrained(AutoModelForCausalLM, path, what, config_key, offline_key, dtype=model_dtype)
    return model.to(device).eval()


# Completions of at least this many tokens show a progress bar of their generation steps.
LONG_GENERATION = 64


class LocalTarget:
    """Greedy completion with a KV cache, left-padded batches, token ids in and out."""

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
        self._serve(load_causal_lm(model_path, dtype, self.device), max_new_tokens, batch_size)

    @classmethod
    def from_model(cls, model: PreTrainedModel, max_new_tokens: int = 16, batch_size: int = 64) -> LocalTarget:
        """A backend around a model already in memory, on its device (the toy world's build)."""
        backend = cls.__new__(cls)
        backend.follows_module, backend.device = False, str(next(model.parameters()).device)
        backend._serve(model.eval(), max_new_tokens, batch_size)
        return backend

    def _serve(self, model: PreTrainedModel, max_new_tokens: int, batch_size: int) -> None:
        self.model = model
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        config = self.model.config
        self.eos_token_id = int(config.eos_token_id)
        # A response ends at any of these (the config's EOS and every one generation_config lists).
        self.eos_token_ids = end_of_sequence_ids(self.model)
        self.pad_token_id = int(pad_id_of(config))
        self.num_requests = 0

    def to(self, device) -> LocalTarget:
        self.model.to(device)
        self.device = str(device)
        return self

    def check_tokenizer(self, tokenizer, role: str = "target") -> None:
        vocab = self.model.config.vocab_size
        # A model may pad its embedding table past the tokenizer, never below it.
        if vocab < len(tokenizer) or tokenizer.eos_token_id not in self.eos_token_ids:
            raise SetupError(
                f"tokenizer mismatch: the {role} model has {vocab} embeddings and EOS ids "
                f"{sorted(self.eos_token_ids)}, "
                f"the tokenizer {len(tokenizer)} tokens and EOS id {tokenizer.eos_token_id}. "
                "Draft, target and scorer must share one tokenizer."
            )

    def _batches(self, sizes: list[int], desc: str):
        """Slices of consecutive rows, as many per batch as `batch_size` allows without splitting a
        group of `sizes` (a group larger than a batch gets batches of its own); a progress bar when
        there are several (real models take minutes)."""
        cuts, rows, start = [], 0, 0
        for size in sizes:
            if rows and rows + size > self.batch_size:
                cuts.append(slice(start, start + rows))
                start, rows = start + rows, 0
            for _ in range(size // self.batch_size):
                cuts.append(slice(start, start + self.batch_size))
                start += self.batch_size
            rows += size % self.batch_size
        cuts += [slice(start, start + rows)] if rows else []
        for cut in tqdm(cuts, desc=desc, unit="batch", leave=False, disable=len(cuts) < 2):
            self.num_requests += 1
            yield cut

    def _trunk_sizes(self, contexts: list[list[int]]) -> list[int]:
        """How many consecutive contexts share each prefix: a batch then holds whole trunks, and each
        trunk's prefix is run once rather than once per batch it would straddle."""
        return [len(trunk.members) for trunk in trunk_groups(contexts)]

    def complete(self, prefixes: list[list[int]], max_new_tokens: int | None = None) -> list[list[int] | None]:
        """Greedy completions ending with an EOS id, or `max_new_tokens` long (None: self.max_new_tokens)."""
        budget = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        out: list[list[int] | None] = []
        # Long budgets are real responses (minutes on a CPU): show their steps.
        steps = "generating" if budget >= LONG_GENERATION else None
        for batch in self._batches([1] * len(prefixes), "completions"):
            rows = prefixes[batch]
            out.extend(greedy_generate(self.model, rows, budget, self.pad_token_id, self.eos_token_ids, steps))
        return out

    def propose(self, contexts: list[list[int]], k: int) -> list[list[int] | None]:
        """k greedy tokens after each context, not stopping at EOS (the draft's block). Contexts that
        extend one another (the blocks of one response) share one pass over their common prefix."""
        out: list[list[int] | None] = []
        for batch in self._batches(self._trunk_sizes(contexts), "proposals"):
            out.extend(propose_shared(self.model, contexts[batch], k, self.pad_token_id))
        return out

    def argmax_along(self, contexts: list[list[int]], drafts: list[list[int]]) -> list[list[int] | None]:
        """[i] = greedy token after context + draft[:i], i < K: one teacher-forced pass per batch,
        sharing the pass over a common prefix as `propose` does. Drafts of one call have one length K."""
        out: list[list[int] | None] = []
        for batch in self._batches(self._trunk_sizes(contexts), "teacher-forced blocks"):
            out.extend(argmax_shared(self.model, contexts[batch], drafts[batch], self.pad_token_id))
        return out

    def close(self) -> None:
        pass
