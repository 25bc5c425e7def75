"""The greedy passes (spd_lightning/models/lm.py): KV-cached, batched, sharing prefixes, and token for
token what a plain full recomputation of each row alone, or transformers' generate, gives."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from spd_lightning.models.lm import (
    argmax_shared,
    greedy_generate,
    greedy_responses,
    propose_shared,
    teacher_forced_argmax,
    teacher_forced_logits,
    trunk_groups,
)
from spd_lightning.models.row_cache import RowCache
from spd_lightning.targets import LocalTarget


@pytest.fixture(scope="module")
def target(toy_world):
    return AutoModelForCausalLM.from_pretrained(toy_world / "target").eval()


@pytest.fixture(scope="module")
def draft(toy_world):
    return AutoModelForCausalLM.from_pretrained(toy_world / "draft").eval()


@torch.no_grad()
def recompute_greedy(model, context: list[int], n: int, eos: set[int] = frozenset()) -> list[int]:
    """The reference: one row alone, the whole sequence recomputed for every token."""
    row: list[int] = []
    for _ in range(n):
        token = int(model(input_ids=torch.tensor([context + row])).logits[0, -1].argmax())
        row.append(token)
        if token in eos:
            break
    return row


@torch.no_grad()
def recompute_logits(model, context: list[int], draft: list[int]) -> torch.Tensor:
    """[K+1, V] logits after context + draft[:i], from one unpadded pass."""
    logits = model(input_ids=torch.tensor([context + draft])).logits[0]
    return logits[len(context) - 1 :].float()


def test_greedy_generate_equals_recomputing_each_row_alone(target, toy_prefixes, toy_tokenizer):
    eos = {toy_tokenizer.eos_token_id}
    out = greedy_generate(target, toy_prefixes, 14, toy_tokenizer.pad_token_id, eos)
    assert out == [recompute_greedy(target, p, 14, eos) for p in toy_prefixes]
    assert all(row[-1] in eos for row in out)  # every toy answer ends within 14 tokens
    assert len({len(row) for row in out}) > 1  # rows of different lengths left the batch at their EOS


def test_greedy_generate_equals_hf_generate(target, toy_prefixes, toy_tokenizer):
    eos, pad = toy_tokenizer.eos_token_id, toy_tokenizer.pad_token_id
    ours = greedy_generate(target, toy_prefixes, 10, pad, {eos})
    for prefix, row in zip(toy_prefixes, ours):
        ids = torch.tensor([prefix])
        hf = target.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=pad)
        assert row == hf[0, len(prefix) :].tolist()


def test_without_eos_ids_every_row_gets_n_tokens(draft, toy_prefixes, toy_tokenizer):
    out = greedy_generate(draft, toy_prefixes, 6, toy_tokenizer.pad_token_id)
    assert all(len(row) == 6 for row in out)
    assert out == [recompute_greedy(draft, p, 6) for p in toy_prefixes]


def test_greedy_responses_stop_at_any_of_several_eos_ids(target, toy_prefixes, toy_tokenizer):
    eos = toy_tokenizer.eos_token_id
    full = greedy_responses(target, toy_prefixes, 14, eos, toy_tokenizer.pad_token_id)
    # A second end-of-sequence id: the token the first response writes third.
    second = full[0][2]
    cut = greedy_responses(target, toy_prefixes, 14, {eos, second}, toy_tokenizer.pad_token_id)
    for whole, short in zip(full, cut):
        stop = whole.index(second) if second in whole else len(whole)
        assert short == whole[:stop]
    assert len(cut[0]) == 2


def test_teacher_forced_logits_are_the_k_plus_1_rows_of_a_plain_pass(target, toy_prefixes):
    drafts = [[5, 6, 7, 8]] * len(toy_prefixes)
    logits = teacher_forced_logits(target, toy_prefixes, drafts, pad_id=0)
    assert logits.shape == (len(toy_prefixes), 5, target.config.vocab_size)
    for b, (context, block) in enumerate(zip(toy_prefixes, drafts)):
        assert torch.allclose(logits[b], recompute_logits(target, context, block), atol=1e-4)


def test_trunk_groups_join_contexts_that_extend_one_another():
    contexts = [[1, 2], [1, 2, 3], [1, 2, 3, 4], [1], [5, 6], [5], [7]]
    groups = trunk_groups(contexts)
    assert [(g.ids, g.members) for g in groups] == [([1, 2, 3, 4], [0, 1, 2, 3]), ([5, 6], [4, 5]), ([7], [6])]


def blocks_of_responses(target, toy_prefixes, toy_tokenizer) -> list[list[int]]:
    """Every prefix of each response, as task=prepare makes them (one trunk per response)."""
    responses = greedy_responses(target, toy_prefixes, 14, toy_tokenizer.eos_token_id, toy_tokenizer.pad_token_id)
    return [p + r[:s] for p, r in zip(toy_prefixes, responses) for s in range(len(r))]


def test_shared_trunk_passes_equal_one_pass_per_context(target, draft, toy_prefixes, toy_tokenizer):
    contexts = blocks_of_responses(target, toy_prefixes, toy_tokenizer)
    assert len(trunk_groups(contexts)) == len(toy_prefixes)
    proposals = propose_shared(draft, contexts, 4, toy_tokenizer.pad_token_id)
    assert proposals == [recompute_greedy(draft, c, 4) for c in contexts]
    along = argmax_shared(target, contexts, proposals, toy_tokenizer.pad_token_id)
    assert along == teacher_forced_argmax(target, contexts, proposals, toy_tokenizer.pad_token_id)
    assert along == [recompute_logits(target, c, d)[:-1].argmax(-1).tolist() for c, d in zip(contexts, proposals)]
    assert sum(a != b for a, b in zip(proposals, along)) > 0  # the draft does disagree somewhere


def test_sampling_defaults_in_generation_config_leave_greedy_alone(toy_world, toy_prefixes, tmp_path):
    """Qwen2.5-Instruct ships do_sample, temperature, top_p, top_k and repetition_penalty 1.05
    in generation_config.json; greedy verification must not pick any of them up."""
    noisy = tmp_path / "target"
    shutil.copytree(toy_world / "target", noisy)
    settings = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.5}
    config = json.loads((noisy / "generation_config.json").read_text())
    (noisy / "generation_config.json").write_text(json.dumps({**config, **settings}))
    plain, tuned = LocalTarget(str(toy_world / "target")), LocalTarget(str(noisy))
    assert tuned.model.generation_config.repetition_penalty == 1.5
    assert tuned.complete(toy_prefixes) == plain.complete(toy_prefixes)
    # The same settings do change what transformers' generate() writes when it is left to them.
    torch.manual_seed(0)
    drifted = [tuned.model.generate(torch.tensor([p]), max_new_tokens=16)[0, len(p) :].tolist() for p in toy_prefixes]
    assert drifted != plain.complete(toy_prefixes)


def test_local_target_ends_a_response_at_every_eos_id_of_its_generation_config(toy_world, toy_prefixes, tmp_path):
    two_ends = tmp_path / "target"
    shutil.copytree(toy_world / "target", two_ends)
    plain = LocalTarget(str(toy_world / "target"))
    second = plain.complete(toy_prefixes[:1])[0][1]  # the second token the target writes
    GenerationConfig(eos_token_id=[plain.eos_token_id, second], pad_token_id=0).save_pretrained(two_ends)
    target = LocalTarget(str(two_ends))
    assert target.eos_token_ids == {plain.eos_token_id, second}
    for whole, short in zip(plain.complete(toy_prefixes), target.complete(toy_prefixes)):
        stop = whole.index(second) + 1 if second in whole else len(whole)
        assert short == whole[:stop]


@torch.no_grad()
def test_row_cache_rolls_rows_back_by_different_amounts_and_reads_what_a_fresh_pass_reads(target, toy_prefixes):
    rows = [list(p) for p in toy_prefixes[:3]]
    assert len({len(r) for r in rows}) > 1  # rows of different lengths share the batch
    cache = RowCache(target, pad_id=0)
    blocks = [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    logits, _ = cache.feed([r + b for r, b in zip(rows, blocks)], 5)  # [3, 5, V]
    for b in range(3):
        assert torch.allclose(logits[b], recompute_logits(target, rows[b], blocks[b]), atol=1e-4)
    kept = [4, 2, 0]  # row 0 keeps its whole block, row 1 two tokens, row 2 none
    cache.discard([4 - j for j in kept])
    seqs = [r + block[:j] for r, block, j in zip(rows, blocks, kept)]
    new = [[20, 21], [22], [23, 24, 25]]  # what each row appends next: different lengths again
    logits, _ = cache.feed(new, 1)
    for b in range(3):
        assert torch.allclose(logits[b, -1], recompute_logits(target, seqs[b] + new[b], [])[0], atol=1e-4)
    assert cache.lengths.tolist() == [len(s) + len(n) for s, n in zip(seqs, new)]
    cache.keep_rows([2, 0])  # row 1 finished
    logits, _ = cache.feed([[30], [31]], 1)
    for b, row in zip(range(2), (2, 0)):
        after = seqs[row] + new[row] + [[30], [31]][b]
        assert torch.allclose(logits[b, -1], recompute_logits(target, after, [])[0], atol=1e-4)


@torch.no_grad()
def test_row_cache_of_one_row_cuts_its_rolled_back_tail(target, toy_prefixes):
    cache = RowCache(target, pad_id=0)
    cache.feed([toy_prefixes[0] + [5, 6, 7, 8]], 5)
    cache.discard([2])
    assert cache.cache.get_seq_length() == len(toy_prefixes[0]) + 2  # cut, not masked beside
    assert bool(cache.mask.all())
    with pytest.raises(ValueError, match="more than its last fed tokens"):
        cache.discard([10_000])
