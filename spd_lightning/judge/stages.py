"""The stages of training judges on stored outcomes (task=judge), each kept on disk so a rerun
resumes where the last one stopped:
1. inputs: one pass of the target and of the draft over every record's context + draft gives the
   zero-cost judge's inputs and the rules' features (inputs_train.pt, inputs_heldout.pt);
2. outcomes: every reachable outcome of every record is completed once by the target, with the
   response budget of the target's own response (completions.jsonl, appended batch by batch);
3. tables: the verdicts of every outcome, against the reference and against the target's own answer.
Then judge/compare.py trains the judges on the train split's tables (judge/fit.py: no target call).

Shapes: N records, K draft tokens per block.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from transformers import PreTrainedModel

from spd_lightning.core.rules import TokenFeatures
from spd_lightning.data.answers import extract_final_number, gsm8k_final_number
from spd_lightning.data.records import Record, load_records, split_by_prompt
from spd_lightning.judge.compare import Split
from spd_lightning.judge.head import JudgeInputs
from spd_lightning.judge.inputs import (
    DiskCompletions,
    Greedy,
    block_inputs,
    complete_outcomes,
    prompt_of,
    target_answers,
)
from spd_lightning.models.hf import pad_id_of, response_end_ids
from spd_lightning.verification.hybrid import HybridVerifier
from spd_lightning.verification.outcomes import OutcomeTable, verify_outcomes


class _StoredOnly:
    """A target for HybridVerifier that is never asked: every outcome is stored already."""

    num_requests = 0

    def complete(self, prefixes, max_new_tokens=None):
        raise RuntimeError(f"{len(prefixes)} outcomes were not completed in stage 2")


def whole_prompts(records: list[Record], at_least: int) -> list[Record]:
    """The records of the first prompts (file order) that together hold at least `at_least`."""
    seen: list[tuple[int, ...]] = []
    out = []
    for r in records:
        prompt = prompt_of(r)
        if prompt not in seen:
            if len(out) >= at_least:
                break
            seen.append(prompt)
        out.append(r)
    return out


def split_records(
    train: list[str], heldout: list[str], train_records: int | None, heldout_share: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """(train records, held-out records). Without held-out files, `heldout_share` of the train
    files' prompts are held out (data/records.split_by_prompt); `train_records` keeps the records
    of the first whole prompts that hold at least that many (None: all)."""
    records = [r for f in train for r in load_records(f, "judge.train")]
    if heldout:
        held = [r for f in heldout for r in load_records(f, "judge.heldout")]
    else:
        records, held = split_by_prompt(records, heldout_share, seed)
    return (records if train_records is None else whole_prompts(records, train_records)), held


def stage_inputs(out: Path, name: str, target, draft, records: list[Record], pad_id: int, batch: int):
    """Stage 1 for one split: (JudgeInputs, TokenFeatures), read back when already computed."""
    path = out / f"inputs_{name}.pt"
    if path.is_file():
        saved = torch.load(path)
        if saved["records"] == len(records):
            return JudgeInputs(**saved["inputs"]), TokenFeatures(**saved["rules"])
    inputs, rules = block_inputs(target, draft, records, pad_id, batch)
    torch.save({"records": len(records), "inputs": vars(inputs), "rules": vars(rules)}, path)
    return inputs, rules


def tables(records: list[Record], store: DiskCompletions, tokenizer, mismatch) -> tuple[OutcomeTable, OutcomeTable]:
    """(verdicts against each record's reference, verdicts against the target's own answer);
    records whose target response holds no answer are unverified in the second."""
    verifier = HybridVerifier(_StoredOnly(), tokenizer, gsm8k_final_number)
    verifier.cache = store
    table, _ = verify_outcomes(verifier, records, mismatch)
    answers = target_answers(
        records, store, lambda ids: tokenizer.decode(ids, skip_special_tokens=True), extract_final_number
    )
    own = [replace(r, reference=a or "") for r, a in zip(records, answers)]
    self_table, _ = verify_outcomes(verifier, own, mismatch)
    self_table.verified &= torch.tensor([a is not None for a in answers])
    return table, self_table


def build_splits(
    models: tuple[PreTrainedModel, PreTrainedModel, object],
    records: dict[str, list[Record]],
    out: Path,
    max_response: int,
    batch: int,
) -> dict[str, Split]:
    """Stages 1-3 for every split. models: (draft, target, tokenizer); records: split name -> records."""
    draft, target, tokenizer = models
    pad_id = pad_id_of(tokenizer)
    inputs = {name: stage_inputs(out, name, target, draft, recs, pad_id, batch) for name, recs in records.items()}
    store = DiskCompletions(out / "completions.jsonl")
    eos = response_end_ids(target, tokenizer)
    every = [r for recs in records.values() for r in recs]
    complete_outcomes(Greedy(target, pad_id, eos, batch), every, store, max_response)
    splits = {}
    for name, recs in records.items():
        judge_inputs, rules = inputs[name]
        table, self_table = tables(recs, store, tokenizer, judge_inputs.mismatch)
        splits[name] = Split(judge_inputs, rules, table, self_table, torch.tensor([r.target_ids for r in recs]))
    return splits
