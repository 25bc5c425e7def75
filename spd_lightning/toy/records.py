"""Turn the toy task into SPD records with a real draft and a real target model.

For every prompt: the target's greedy response; a block start at every response
position; the draft's K greedy tokens there; the target's greedy token after each
draft prefix (one teacher-forced pass). Records without a mismatch carry no decision
and are dropped.
"""

from __future__ import annotations

import random

from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from spd_lightning.models.lm import greedy_responses, greedy_tokens, teacher_forced_argmax
from spd_lightning.toy.task import make_example


def build_records(
    draft: PreTrainedModel,
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    num_prompts: int,
    block_size: int,
    seed: int,
    batch_size: int = 64,
) -> list[dict]:
    rng = random.Random(seed)
    examples = [make_example(rng) for _ in range(num_prompts)]
    pad = tokenizer.pad_token_id
    records: list[dict] = []
    for start in tqdm(range(0, num_prompts, batch_size), desc="toy records", leave=False):
        chunk = examples[start : start + batch_size]
        prompts = [tokenizer(ex.prompt).input_ids for ex in chunk]
        responses = greedy_responses(target, prompts, 12, tokenizer.eos_token_id, pad)
        blocks = [(p, r[:s], ex.answer) for p, r, ex in zip(prompts, responses, chunk) for s in range(len(r))]
        contexts = [p + r for p, r, _ in blocks]
        drafts = greedy_tokens(draft, contexts, block_size, pad)
        targets = teacher_forced_argmax(target, contexts, drafts, pad)
        for (p, _, answer), ctx, d, t in zip(blocks, contexts, drafts, targets):
            if d != t:
                records.append(
                    {"context_ids": ctx, "prompt_len": len(p), "draft_ids": d, "target_ids": t, "reference": answer}
                )
    return records
