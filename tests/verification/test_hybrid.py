"""Verification of hybrid prefixes with a fake target (SPEC.md, "One training step", steps 4-5)."""

import torch

from spd_lightning.core.sampling import hybrid_prefix
from spd_lightning.data.answers import gsm8k_final_number
from spd_lightning.data.records import Record
from spd_lightning.verification.hybrid import CompletionCache, HybridVerifier

EOS = 1
VOCAB = {
    0: "<pad>",
    EOS: "</s>",
    20: "Q:",
    21: " 2+2=",
    22: " so",
    23: " the",
    24: " sum",
    25: " is",
    26: " total",
    27: " makes",
    30: " ",
    31: ".",
}
VOCAB.update({10 + d: str(d) for d in range(10)})
FOUR = [30, 14, 31, EOS]  # " 4." then EOS
FIVE = [30, 15, 31, EOS]  # " 5." then EOS


class FakeTokenizer:
    eos_token_id = EOS

    def __init__(self):
        self.calls = []

    def decode(self, ids, skip_special_tokens=False):
        self.calls.append(skip_special_tokens)
        return "".join(VOCAB[i] for i in ids if not (skip_special_tokens and i in (0, EOS)))


class FakeTarget:
    """Records every prefix it is asked for; answers " 4." unless told otherwise, None for `fail`."""

    max_new_tokens = 8

    def __init__(self, answers=None, fail=()):
        self.answers = {tuple(k): v for k, v in (answers or {}).items()}
        self.fail = {tuple(p) for p in fail}
        self.calls: list[list[list[int]]] = []

    @property
    def num_requests(self) -> int:
        return len(self.calls)

    def complete(self, prefixes):
        self.calls.append([list(p) for p in prefixes])
        return [None if tuple(p) in self.fail else list(self.answers.get(tuple(p), FOUR)) for p in prefixes]

    def close(self):
        pass

    @property
    def sent(self) -> list[tuple[int, ...]]:
        return [tuple(p) for call in self.calls for p in call]


# prompt "Q: 2+2=", response so far " so"; mismatches at positions 1 and 2
REC = Record(
    context_ids=[20, 21, 22], prompt_len=2, draft_ids=[23, 24, 27, 30], target_ids=[23, 26, 25, 30], reference="4"
)


def prefix(r: Record, j: int) -> tuple[int, ...]:
    return tuple(hybrid_prefix(r.context_ids, r.draft_ids, r.target_ids, j))


def make(target=None, max_invalid_fraction=1.0):
    target = target or FakeTarget()
    verifier = HybridVerifier(target, FakeTokenizer(), gsm8k_final_number, max_invalid_fraction=max_invalid_fraction)
    return verifier, target


def test_each_distinct_prefix_sent_once():
    verifier, target = make()
    accept_len = torch.tensor([[1, 1, 1, 2, 2, 4, 4, 1]])  # 8 samples, 3 distinct j
    out = verifier.verify([REC], accept_len)
    assert len(target.calls) == 1  # one batched request
    assert sorted(target.sent) == sorted({prefix(REC, 1), prefix(REC, 2), prefix(REC, 4)})
    assert out.stats["unique_prefixes"] == 3 and out.stats["completions"] == 3
    assert out.correct.shape == out.valid.shape == (1, 8)


def test_identical_prefixes_across_records_sent_once():
    verifier, target = make()
    twin = Record(list(REC.context_ids), REC.prompt_len, list(REC.draft_ids), list(REC.target_ids), "4")
    out = verifier.verify([REC, twin], torch.tensor([[2, 2], [2, 4]]))
    # (REC, 2) and (twin, 2) are the same token ids: one request; plus (twin, 4)
    assert sorted(target.sent) == sorted([prefix(REC, 2), prefix(REC, 4)])
    assert out.valid.all() and out.correct.all()


def test_second_verify_is_answered_from_cache():
    verifier, target = make()
    accept_len = torch.tensor([[1, 2, 4]])
    first = verifier.verify([REC], accept_len)
    assert first.stats["cache_hits"] == 0
    second = verifier.verify([REC], accept_len)
    assert len(target.calls) == 1  # nothing new was sent
    assert second.stats["cache_hits"] == 3 and second.stats["completions"] == 0
    assert torch.equal(first.correct, second.correct) and first.texts == second.texts
    assert len(verifier.cache) == 3


def test_prefix_already_ended_needs_no_call():
    # the draft proposes EOS at position 1 and the target agrees: the response ended in the block
    done = Record([20, 21, 22, 30, 14, 31], 2, [30, EOS, 0, 0], [30, EOS, 0, 26], "4")
    verifier, target = make()
    out = verifier.verify([done], torch.tensor([[3, 3]]))  # prefix = ctx + [30, EOS, 0] + [26]
    assert target.calls == []
    assert out.stats["completions"] == 0
    # the text stops at the EOS: the tokens after it are never decoded
    assert out.texts[(0, 3)] == " so 4. "
    assert out.correct.tolist() == [[True, True]] and out.valid.all()


def test_eos_inside_prompt_does_not_count():
    # an EOS in the prompt part does not end the response: the prefix is still completed
    r = Record([20, EOS, 22], 2, [23, 24], [23, 26], "4")
    verifier, target = make()
    verifier.verify([r], torch.tensor([[1]]))
    assert target.sent == [prefix(r, 1)]


def test_response_text_is_after_prompt_cut_at_eos():
    verifier, _ = make()
    text = verifier.response_text(REC, list(prefix(REC, 2)), [30, 14, 31, EOS, 15, 15])
    # response so far " so", accepted " the sum", target's " is", completion " 4." ; "55" after EOS is cut
    assert text == " so the sum is 4."
    assert all(verifier.tokenizer.calls)  # decoded with skip_special_tokens=True


def test_texts_and_correct_follow_the_verifier():
    # rejecting at position 1 leads the fake target to " 5.": wrong; the other prefixes reach " 4."
    target = FakeTarget(answers={prefix(REC, 1): FIVE})
    verifier, _ = make(target)
    accept_len = torch.tensor([[1, 2, 4, 1]])
    out = verifier.verify([REC], accept_len)
    assert out.texts[(0, 1)] == " so the total 5."
    assert out.texts[(0, 4)] == " so the sum makes  4."
    expected = [[gsm8k_final_number(out.texts[(0, j)], REC.reference) for j in row] for row in accept_len.tolist()]
    assert out.correct.tolist() == expected == [[False, True, True, False]]
    assert out.correct.dtype == torch.bool and out.valid.dtype == torch.bool


def test_failed_completion_marks_samples_invalid_and_is_not_cached():
    target = FakeTarget(fail=[prefix(REC, 2)])
    verifier, _ = make(target)
    accept_len = torch.tensor([[2, 1, 2, 2]])
    out = verifier.verify([REC], accept_len)
    assert out.valid.tolist() == [[False, True, False, False]]
    assert out.stats["invalid"] == 3  # samples, not prefixes
    assert not out.correct[0, 0]  # an invalid sample is never counted correct
    assert (0, 2) not in out.texts
    assert len(verifier.cache) == 1  # only the successful completion
    # the failed prefix is asked again next time; the good one comes from the cache
    target.fail.clear()
    again = verifier.verify([REC], accept_len)
    assert target.calls[-1] == [list(prefix(REC, 2))]
    assert again.valid.all() and again.stats["invalid"] == 0 and again.stats["cache_hits"] == 1


def test_cache_evicts_least_recently_used():
    cache = CompletionCache(max_entries=2)
    cache.put((1,), [10])
    cache.put((2,), [20])
    assert cache.get((1,)) == [10]  # (1,) is now the most recent
    cache.put((3,), [30])  # evicts (2,)
    assert len(cache) == 2
    assert cache.get((2,)) is None
    assert cache.get((1,)) == [10] and cache.get((3,)) == [30]
    cache.put((1,), [11])  # overwrite refreshes, does not grow
    cache.put((4,), [40])  # evicts (3,)
    assert len(cache) == 2 and cache.get((3,)) is None and cache.get((1,)) == [11]
