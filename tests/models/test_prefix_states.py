"""PrefixStates (spd_lightning/models/prefix_states.py): a sequence run past a kept prefix, a
prefix of a kept sequence, and branches off a trunk give what a full pass over each alone gives."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from spd_lightning.models.prefix_states import PrefixStates, branch_hidden, common_prefix


@pytest.fixture(scope="module")
def model(toy_world):
    return AutoModelForCausalLM.from_pretrained(toy_world / "target").eval()


@torch.no_grad()
def full_hidden(model, ids: list[int]) -> torch.Tensor:
    """[T, H] the reference: one pass over the whole sequence, no cache."""
    return model.get_decoder()(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0]


def _ids(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(4, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize(("a", "b", "shared"), [((1, 2, 3), (1, 2, 4), 2), ((1, 2), (1, 2, 3), 2), ((5,), (6,), 0),
                                                ((), (1,), 0), ((1, 2, 3), (1, 2, 3), 3)])  # fmt: skip
def test_common_prefix_counts_the_shared_leading_tokens(a, b, shared):
    assert common_prefix(a, b) == shared == common_prefix(b, a)


def test_a_fork_runs_only_past_its_parent_and_matches_a_full_pass(model):
    vocab = model.config.vocab_size
    states = PrefixStates(model)
    parent = _ids(40, 0, vocab)
    torch.testing.assert_close(states.hidden(parent), full_hidden(model, parent), atol=1e-5, rtol=1e-4)
    assert states.computed == 40
    fork = parent[:25] + _ids(12, 1, vocab)
    torch.testing.assert_close(states.hidden(fork), full_hidden(model, fork), atol=1e-5, rtol=1e-4)
    assert states.computed == 40 + 12 and states.reused == 25
    # A prefix of a kept sequence costs no pass at all.
    torch.testing.assert_close(states.hidden(parent[:30]), full_hidden(model, parent[:30]), atol=1e-5, rtol=1e-4)
    assert states.computed == 52


def test_a_sequence_read_a_chunk_at_a_time_grows_in_place(model):
    vocab = model.config.vocab_size
    states, copied = PrefixStates(model), PrefixStates(model)
    ids = _ids(36, 4, vocab)
    kept = states.hidden(ids[:10]).clone()
    copied.hidden(ids[:10] + [5])  # the same chunks, each from a copy of a longer kept sequence
    for end in (20, 36):  # each chunk runs only its new tokens, from the same cache
        grown = states.hidden(ids[:end])
        # Equal up to float rounding: the first passes read 10 and 11 tokens, and a product over
        # 10 rows may block differently from one over 11 (on a Xeon with AMX it did, in the last bits).
        torch.testing.assert_close(grown, copied.hidden(ids[:end]), atol=1e-5, rtol=1e-5)
        # float32 sums in another order than one pass over the whole (hidden values up to 8)
        torch.testing.assert_close(grown, full_hidden(model, ids[:end]), atol=5e-4, rtol=1e-4)
    assert states.computed == 36 and len(states._entries) == 1
    assert torch.equal(states.hidden(ids[:10]), kept)
    # A fork inside the grown sequence copies its cache: the grown one stays whole.
    fork = ids[:15] + _ids(5, 5, vocab)
    torch.testing.assert_close(states.hidden(fork), full_hidden(model, fork), atol=5e-4, rtol=1e-4)
    torch.testing.assert_close(states.hidden(ids), copied.hidden(ids), atol=1e-5, rtol=1e-5)
    assert states.computed == 36 + 5  # the fork ran its 5 new tokens only


def test_greedy_tokens_match_a_full_pass_and_reuse_the_parents(model):
    vocab = model.config.vocab_size
    states = PrefixStates(model, vocab_chunk=7)  # several output-layer chunks
    parent = _ids(30, 2, vocab)
    fork = parent[:18] + _ids(9, 3, vocab)
    for ids in (parent, fork):
        top, top_p = states.greedy(ids)
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()  # [T, V]
        assert top.tolist() == logits.argmax(-1).tolist()
        torch.testing.assert_close(top_p, torch.softmax(logits, -1).max(-1).values, atol=1e-5, rtol=1e-4)


def test_branches_off_a_trunk_see_only_their_own_prefix(model):
    vocab = model.config.vocab_size
    states = PrefixStates(model)
    trunk = _ids(32, 4, vocab)
    lengths, tokens = [5, 17, 32, 17], [7, 9, 11, 13]
    got = branch_hidden(model, states.cache(trunk), lengths, tokens)  # [4, H]
    for row, (n, token) in enumerate(zip(lengths, tokens)):
        want = full_hidden(model, trunk[:n] + [token])[-1]
        torch.testing.assert_close(got[row], want, atol=1e-5, rtol=1e-4)
    # The kept cache was copied, not consumed: the trunk's own states still hold.
    torch.testing.assert_close(states.hidden(trunk + [3]), full_hidden(model, trunk + [3]), atol=1e-5, rtol=1e-4)


def test_the_oldest_sequences_leave_past_the_capacity(model):
    vocab = model.config.vocab_size
    states = PrefixStates(model, capacity=2)
    first, second, third = (_ids(10, seed, vocab) for seed in (5, 6, 7))
    for ids in (first, second, third):
        states.hidden(ids)
    before = states.computed
    states.hidden(third[:5])  # kept
    assert states.computed == before
    states.hidden(first)  # evicted: computed again
    assert states.computed == before + 10
