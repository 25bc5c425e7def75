"""The greedy passes (spd_lightning/lm.py): KV-cached, batched, sharing prefixes, and token for
token what a plain full recomputation of each row alone, or transformers' generate, gives."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from spd_lightning.lm import (
    CachedLM,
    argmax_shared,
    greedy_generate,
    greedy_responses,
    propose_shared,
    teacher_forced_argmax,
    teacher_forced_logits,
    trunk_groups,
)
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
def test_cached_lm_cut_back_to_the_shared_prefix_reads_what_a_fresh_pass_reads(target, draft, toy_prefixes):
    context = toy_prefixes[0]
    lm = CachedLM(target)
    block = [5, 6, 7, 8]
    assert torch.allclose(lm.feed(context + block, 5), recompute_logits(target, context, block), atol=1e-4)
    after = context + block[:2] + [9]  # two draft tokens kept, then the target's own token
    assert torch.allclose(lm.feed(after + [10], 2), recompute_logits(target, after, [10]), atol=1e-4)
    assert lm.cache.get_seq_length() == len(after) + 1  # the rejected tail was cut, not kept beside
    proposer = CachedLM(draft)
    tokens, logits = proposer.propose(context, 3, with_logits=True)
    assert tokens == recompute_greedy(draft, context, 3)
    assert torch.allclose(logits, recompute_logits(draft, context, tokens), atol=1e-4)  # [K+1, V]
    assert proposer.cache.get_seq_length() == len(context) + 3
