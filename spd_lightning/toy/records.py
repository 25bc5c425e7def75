"""The toy task's SPD records, built by the record builder of task=prepare (data/builder.py).

For every prompt: the target's greedy response (at most 12 tokens); a block start at every
response position; the draft's K greedy tokens there; the target's greedy token after each
draft prefix (one teacher-forced pass). Records without a mismatch carry no decision and are
dropped. The two freshly trained models serve as in-process backends (LocalTarget.from_model).
"""

from __future__ import annotations

import random

from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from spd_lightning.data.answers import gsm8k_final_number
from spd_lightning.data.builder import BlockSpec, ResponseReader, records_for_prompts
from spd_lightning.data.prompts import Prompt
from spd_lightning.data.records import REQUIRED_FIELDS
from spd_lightning.targets.local import LocalTarget
from spd_lightning.toy.task import make_example

# The longest response of the toy task ("so the total is 123" and EOS) fits in this many tokens.
RESPONSE_TOKENS = 12


def build_records(
    draft: PreTrainedModel,
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    num_prompts: int,
    block_size: int,
    seed: int,
    batch_size: int = 64,
) -> list[dict]:
    """The records of `num_prompts` toy prompts drawn with `seed`, in prompt order; the SPEC
    fields only (task=prepare's records add the prompt's line number)."""
    rng = random.Random(seed)
    prompts = [Prompt(i, ex.prompt, ex.answer) for i, ex in enumerate(make_example(rng) for _ in range(num_prompts))]
    prompt_ids = [tokenizer(p.text).input_ids for p in prompts]
    spec = BlockSpec(block_size, stride=1, max_new_tokens=RESPONSE_TOKENS, reference="dataset")

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    reader = ResponseReader(tokenizer.eos_token_id, decode, gsm8k_final_number)
    backends = [LocalTarget.from_model(model, batch_size=batch_size) for model in (draft, target)]
    records: list[dict] = []
    for start in tqdm(range(0, num_prompts, batch_size), desc="toy records", leave=False):
        chunk = slice(start, start + batch_size)
        rows, _ = records_for_prompts(prompts[chunk], prompt_ids[chunk], *backends, spec, reader)
        records += [{key: row[key] for key in REQUIRED_FIELDS} for row in rows]
    return records
