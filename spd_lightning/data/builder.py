"""Prompts -> SPD records with a draft and a target backend (the work of task=prepare).

For every prompt: the target's greedy response (to EOS, at most `max_new_tokens`); a block start
every `stride` response positions; at each, the draft's K greedy tokens and the target's greedy
token at every draft position (one teacher-forced pass, or vLLM prompt logprobs). A block
without a mismatch carries no decision for the scorer: it is counted and dropped.

No Hydra, no HTTP: the backends are anything with `complete`, `propose` and `argmax_along`
(spd_lightning.targets.base.Target), so the in-process and the vLLM ones give the same records.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, fields

from spd_lightning.data.answers import extract_final_number
from spd_lightning.data.prompts import Prompt
from spd_lightning.errors import SetupError
from spd_lightning.models.hf import id_set
from spd_lightning.targets.base import Target

REFERENCES = ("dataset", "target")


@dataclass
class BlockSpec:
    block_size: int  # K: draft tokens per block
    stride: int  # a block starts every `stride` response positions
    max_new_tokens: int  # cap on the target's response
    reference: str  # "dataset": the prompt's answer; "target": the target's own final number


@dataclass
class ResponseReader:
    """How a target's response is read: where it ends, its text, and whether it reaches an answer."""

    eos_ids: int | Collection[int]
    decode: Callable[[list[int]], str]  # response ids -> text
    reaches: Callable[[str, str], bool]  # (response text, answer) -> correct (an answer check of data/answers.py)


@dataclass
class Counts:
    """What a chunk of prompts gave; summed over chunks (and over resumed runs) into stats.json."""

    prompts: int = 0
    records: int = 0
    blocks: int = 0
    blocks_without_mismatch: int = 0
    mismatches: int = 0  # over kept records
    responses_capped: int = 0  # responses that hit max_new_tokens before EOS
    prompts_without_reference: int = 0  # reference=target and the response holds no number
    prompts_with_answer: int = 0
    target_solves: int = 0  # responses that pass the verifier against the dataset's answer

    def add(self, other: Counts) -> Counts:
        return Counts(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(Counts)})

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def block_starts(response_len: int, stride: int) -> range:
    """Response positions where a block starts: 0, stride, 2*stride, ... < response_len (EOS not
    counted), so every block's context holds the prompt and a strict prefix of the response."""
    return range(0, response_len, stride)


def strip_eos(completion: list[int], eos_ids: int | Collection[int]) -> tuple[list[int], bool]:
    """(the response without its EOS, whether it was cut by the length cap instead of ending).
    `eos_ids`: the id, or every id, that ends a response."""
    ends = id_set(eos_ids)
    if completion and completion[-1] in ends:
        return completion[:-1], False
    return completion, True


def _require(answers: list[list[int] | None], what: str) -> list[list[int]]:
    failed = sum(a is None for a in answers)
    if failed:
        raise SetupError(
            f"the {what} failed for {failed} of {len(answers)} inputs after its retries (see the warnings above); "
            "rerun the same command to resume where it stopped"
        )
    return answers  # type: ignore[return-value]


def _reference(prompt: Prompt, response_text: str, reference: str) -> str | None:
    if reference == "dataset":
        return prompt.answer
    return extract_final_number(response_text)


def records_for_prompts(
    prompts: list[Prompt],
    prompt_ids: list[list[int]],
    draft: Target,
    target: Target,
    spec: BlockSpec,
    reader: ResponseReader,
) -> tuple[list[dict], Counts]:
    """Records of a chunk of prompts, in prompt order and, within a prompt, by block start.

    `prompt_ids[i]` are prompts[i]'s token ids; `reader` turns a response into text (for the
    reference and the answer check). Each record carries the SPEC fields plus `prompt_index` (the raw
    file's line number). Raises SetupError when a backend failed after its retries."""
    counts = Counts(prompts=len(prompts))
    completions = _require(target.complete(prompt_ids, max_new_tokens=spec.max_new_tokens), "target (responses)")
    kept: list[tuple[int, list[int], str]] = []  # (prompt position, response, reference)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        response, capped = strip_eos(completion, reader.eos_ids)
        counts.responses_capped += capped
        text = reader.decode(response)
        if prompt.answer is not None:
            counts.prompts_with_answer += 1
            counts.target_solves += bool(reader.reaches(text, prompt.answer))
        reference = _reference(prompt, text, spec.reference)
        if reference is None:
            counts.prompts_without_reference += 1
            continue
        kept.append((i, response, reference))
    blocks = [(i, response[:s], ref) for i, response, ref in kept for s in block_starts(len(response), spec.stride)]
    contexts = [prompt_ids[i] + partial for i, partial, _ in blocks]
    drafts = _require(draft.propose(contexts, spec.block_size), "draft (proposals)") if contexts else []
    targets = _require(target.argmax_along(contexts, drafts), "target (argmax along drafts)") if contexts else []
    records = []
    for (i, _, ref), context, d, t in zip(blocks, contexts, drafts, targets):
        mismatches = sum(a != b for a, b in zip(d, t))
        if mismatches == 0:
            counts.blocks_without_mismatch += 1
            continue
        counts.mismatches += mismatches
        record = {"context_ids": context, "prompt_len": len(prompt_ids[i]), "draft_ids": d, "target_ids": t}
        records.append({**record, "reference": ref, "prompt_index": prompts[i].index})
    counts.blocks, counts.records = len(blocks), len(records)
    return records, counts


def summarise(counts: Counts, prompts_skipped: int, block_size: int) -> dict:
    """stats.json: what was kept and dropped, and how well the target itself solves the prompts."""
    return {
        "records": counts.records,
        "prompts": counts.prompts,
        "prompts_skipped": prompts_skipped,
        "prompts_without_reference": counts.prompts_without_reference,
        "block_size": block_size,
        "blocks": counts.blocks,
        "blocks_without_mismatch": counts.blocks_without_mismatch,
        "mismatches_per_block": counts.mismatches / counts.records if counts.records else None,
        "responses_capped": counts.responses_capped,
        "target_solves": counts.target_solves / counts.prompts_with_answer if counts.prompts_with_answer else None,
    }
