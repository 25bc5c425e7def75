"""Train the tiny draft and target language models of the toy world on the synthetic task."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from spd_lightning.toy.task import make_example


@dataclass
class LMSpec:
    """Size and training budget of one toy language model."""

    hidden_size: int
    num_layers: int
    num_heads: int  # head_dim = hidden_size / num_heads; vLLM needs head_dim >= 32
    steps: int
    lr: float
    batch_size: int = 64
    seed: int = 0


def build_llama(spec: LMSpec, vocab_size: int, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.hidden_size * 2,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def example_batch(
    rng: random.Random, tokenizer: PreTrainedTokenizerFast, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns input_ids [B, L] and labels [B, L]; labels are -100 on the prompt and padding."""
    rows, labels = [], []
    for _ in range(batch_size):
        ex = make_example(rng)
        prompt = tokenizer(ex.prompt).input_ids
        response = tokenizer(ex.response).input_ids + [tokenizer.eos_token_id]
        rows.append(prompt + response)
        labels.append([-100] * len(prompt) + response)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    return ids, lab


def train_lm(spec: LMSpec, tokenizer: PreTrainedTokenizerFast, desc: str) -> LlamaForCausalLM:
    torch.manual_seed(spec.seed)
    model = build_llama(spec, len(tokenizer), tokenizer)
    rng = random.Random(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.steps, pct_start=0.1)
    model.train()
    bar = tqdm(range(spec.steps), desc=desc, leave=False)
    for _ in bar:
        ids, labels = example_batch(rng, tokenizer, spec.batch_size)
        loss = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()
