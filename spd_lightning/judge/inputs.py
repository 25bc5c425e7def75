"""The judge comparison's inputs, computed once and kept on disk: what the zero-cost judge reads
(one verification-shaped pass of each frozen model per batch of records) and every reachable
outcome of every record, completed once by the target.

Completing outcomes is the expensive part (a 1.5B target on a CPU writes a few tokens per second,
a GSM8K solution is 100-300 tokens), so:
- a block that ends at the first mismatch (standard SD's outcome) continues exactly as the
  target's own response: each prompt's response is generated once, and every record of that
  prompt reads its standard-SD completion from it;
- every completion has the response budget the target's own response had (`max_response`
  tokens after the prompt), so all outcomes of a record are judged alike;
- completions are appended to a JSONL file after each batch: an interrupted run resumes there.

Shapes: N records, K draft tokens per block, V vocabulary, H hidden size.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from spd_lightning.core.rules import TokenFeatures, token_features
from spd_lightning.core.sampling import all_outcomes, hybrid_prefix
from spd_lightning.data.records import Record
from spd_lightning.errors import RecordError
from spd_lightning.judge.head import JudgeInputs, judge_token_features
from spd_lightning.models.lm import block_states_shared, greedy_generate
from spd_lightning.verification.hybrid import CompletionCache

log = logging.getLogger(__name__)


def _batches(n: int, size: int, desc: str):
    cuts = [slice(start, min(start + size, n)) for start in range(0, n, size)]
    return tqdm(cuts, desc=desc, unit="batch", leave=False, disable=len(cuts) < 2)


def block_inputs(
    target, draft, records: list[Record], pad_id: int, batch_size: int = 16, draft_hidden: bool = True
) -> tuple[JudgeInputs, TokenFeatures]:
    """The judge's inputs and the rules' features of N records, from one pass of each model over
    context + draft per batch (records of one response share one pass over their prefix).

    target, draft: causal LMs (transformers). Returns (JudgeInputs with [N, K, ...] tensors,
    TokenFeatures [N, K] for rules.py, from the same logits)."""
    parts, rule_parts = [], []
    for cut in _batches(len(records), batch_size, "judge inputs"):
        rows = records[cut]
        contexts, drafts = [r.context_ids for r in rows], [r.draft_ids for r in rows]
        t_logits, t_hidden = block_states_shared(target, contexts, drafts, pad_id)  # [B, K+1, V], [B, K, H]
        d_logits, d_hidden = block_states_shared(draft, contexts, drafts, pad_id)
        draft_ids = torch.tensor(drafts)  # [B, K]
        target_ids = torch.tensor([r.target_ids for r in rows])  # [B, K]
        parts.append(
            JudgeInputs(
                mismatch=draft_ids != target_ids,
                tokens=judge_token_features(t_logits, d_logits, draft_ids).cpu(),
                target_hidden=t_hidden.cpu(),
                draft_hidden=d_hidden.cpu() if draft_hidden else None,
            )
        )
        rule_parts.append(token_features(t_logits, d_logits, draft_ids).cpu())
    return JudgeInputs.cat(parts), TokenFeatures.cat(rule_parts)


class DiskCompletions(CompletionCache):
    """A completion cache backed by an append-only JSONL file ({"prefix": [...], "completion":
    [...]} per line): what was completed once is never completed again, in this run or a later one."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(max_entries=10**9)
        self.path = Path(path)
        if self.path.is_file():
            self._read()

    def _read(self) -> None:
        """Loads the file; a last line cut short (the run was killed while appending) is dropped
        from the file, with a warning: only that batch is completed again."""
        text = self.path.read_text()
        lines = text.split("\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if number < len(lines):  # a complete line that is not JSON: not ours to drop
                    raise RecordError(f"{self.path}:{number}: not a stored completion (not JSON)") from None
                log.warning("%s: dropped a last line cut short (%d characters)", self.path, len(line))
                with self.path.open("r+") as f:
                    f.truncate(len(text.encode()) - len(line.encode()))
                return
            super().put(tuple(row["prefix"]), row["completion"])
        if text and not text.endswith("\n"):  # cut right before its newline: the next append starts a line
            with self.path.open("a") as f:
                f.write("\n")

    def add(self, items: list[tuple[tuple[int, ...], list[int]]]) -> None:
        """Stores completions and appends them to the file (flushed and fsynced)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            for prefix, completion in items:
                super().put(prefix, completion)
                f.write(json.dumps({"prefix": list(prefix), "completion": completion}) + "\n")
            f.flush()
            os.fsync(f.fileno())


@dataclass
class Greedy:
    """How completions are generated: a causal LM (transformers), its pad id, the ids that end a
    response, and rows per batch."""

    model: PreTrainedModel
    pad_id: int
    eos: Collection[int]
    batch_size: int = 32

    def fill(self, store: DiskCompletions, prefixes: list[tuple[int, ...]], budgets: list[int], desc: str) -> None:
        """Greedy completions of the prefixes not stored yet, longest budget first, each cut to its
        own budget (greedy decoding is causal: a cut row equals a row generated with that budget)."""
        todo = sorted({p: b for p, b in zip(prefixes, budgets) if store.get(p) is None}.items(), key=lambda x: -x[1])
        for cut in _batches(len(todo), self.batch_size, desc):
            rows = todo[cut]
            budget = max(b for _, b in rows)
            steps = "generating" if budget >= 64 else None
            outs = greedy_generate(self.model, [list(p) for p, _ in rows], budget, self.pad_id, self.eos, steps)
            store.add([(p, out[:b]) for (p, b), out in zip(rows, outs)])


def prompt_of(record: Record) -> tuple[int, ...]:
    return tuple(record.context_ids[: record.prompt_len])


def _outcome_prefixes(records: list[Record], store: DiskCompletions, max_response: int, eos: Collection[int]):
    """(prefixes to complete, their budgets, (prefix, completion) pairs known without the target)."""
    mismatch = torch.tensor([[d != t for d, t in zip(r.draft_ids, r.target_ids)] for r in records])  # [N, K]
    accept_len, possible = all_outcomes(mismatch)  # [N, K+1]
    needed, budgets, derived = [], [], []
    for r, js, ok in zip(records, accept_len.tolist(), possible.tolist()):
        prompt = prompt_of(r)
        whole = list(prompt) + store.get(prompt)  # the target's own response
        for j in {j for j, reachable in zip(js, ok) if reachable}:
            prefix = tuple(hybrid_prefix(r.context_ids, r.draft_ids, r.target_ids, j))
            left = max(0, len(prompt) + max_response - len(prefix))
            if not set(eos).isdisjoint(prefix[len(prompt) :]):
                continue  # the response ended inside the block: nothing to complete
            if left == 0:
                derived.append((prefix, []))  # the response budget is spent
            elif store.get(prefix) is None and tuple(whole[: len(prefix)]) == prefix:
                derived.append((prefix, whole[len(prefix) :]))
            else:
                needed.append(prefix)
                budgets.append(left)
    return needed, budgets, derived


def complete_outcomes(greedy: Greedy, records: list[Record], store: DiskCompletions, max_response: int) -> None:
    """Completes every reachable outcome of every record into `store` (resumable).

    First each prompt's response (max_response tokens at most); a record whose standard-SD prefix
    lies on that response takes its completion from there; every other outcome is completed with
    what is left of the response budget."""
    prompts = sorted({prompt_of(r) for r in records})
    greedy.fill(store, prompts, [max_response] * len(prompts), "responses")
    needed, budgets, derived = _outcome_prefixes(records, store, max_response, greedy.eos)
    for prefix, completion in derived:
        CompletionCache.put(store, prefix, completion)  # in memory only: the response file holds it
    greedy.fill(store, needed, budgets, "outcomes")


def target_answers(records: list[Record], store: DiskCompletions, decode, extract) -> list[str | None]:
    """The final answer of the target's own response to each record's prompt (None: it wrote none).
    decode: ids -> text; extract: text -> answer (verifiers.extract_final_number)."""
    return [extract(decode(store.get(prompt_of(r)))) for r in records]
