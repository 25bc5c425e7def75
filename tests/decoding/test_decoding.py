"""The decoding loop: speculative semantics, stopping and the accounting of target calls.

Hand-built "models" whose next token is a lookup of the last token make every block's outcome
known in advance; the toy world's real models check that standard SD reproduces greedy decoding.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spd_lightning.decoding.loop import LoopClock, LoopSettings, block_tokens, generate, generate_cached, summarize
from spd_lightning.decoding.policies import Block, accept_all, judge_policy, kl_policy, reject_all, scorer_policy
from spd_lightning.judge.head import TOKEN_FEATURES, JudgeHead
from spd_lightning.models.lm import PrefixCache, greedy_responses
from spd_lightning.models.packed import pack_linears
from spd_lightning.models.scorer import ScoringActor
from spd_lightning.targets.local import load_causal_lm
from spd_lightning.toy.raw import toy_prompts

V, EOS, PAD = 64, 1, 0
K = 4


class LookupLM(nn.Module):
    """Next token = table[last token], whatever came before: a causal LM with a known answer."""

    def __init__(self, table: dict[int, int]) -> None:
        super().__init__()
        nxt = torch.tensor([table.get(t, t + 1 if t + 1 < V else 2) for t in range(V)])
        self.register_buffer("next_token", nxt)
        self.anchor = nn.Parameter(torch.zeros(()))  # the lm helpers read the device off a parameter

    def forward(self, input_ids: torch.Tensor, past_key_values=None, logits_to_keep: int = 0, **_) -> SimpleNamespace:
        logits = F.one_hot(self.next_token[input_ids], V).float() * 10  # [B, L, V]
        # The answer depends on the last token alone, so the KV cache has nothing to keep.
        return SimpleNamespace(logits=logits[:, -logits_to_keep:], past_key_values=past_key_values or NoCache())


class NoCache:
    def batch_select_indices(self, indices: torch.Tensor) -> None:
        pass

    def crop(self, tokens: int) -> None:
        pass


def counting(eos_after: int | None = None) -> LookupLM:
    """2, 3, 4, ...: EOS follows `eos_after` (never when None)."""
    return LookupLM({} if eos_after is None else {eos_after: EOS})


def run(draft, target, prompts, policy, k=K, max_new_tokens=40, batch_size=8):
    return generate(draft, target, prompts, policy, LoopSettings(k, max_new_tokens, EOS, PAD, batch_size))


def test_block_emits_accepted_draft_then_the_targets_token():
    draft, target = [5, 6, 7, 8], [5, 6, 9, 10, 11]
    assert block_tokens(draft, target, 2) == [5, 6, 9]  # the target's correction at j
    assert block_tokens(draft, target, 4) == [5, 6, 7, 8, 11]  # j = K: the free token after the block


def test_greedy_is_one_target_call_per_token():
    gens = run(None, counting(eos_after=9), [[2], [5], [7, 8]], reject_all, k=0)
    assert [g.response_ids for g in gens] == [[3, 4, 5, 6, 7, 8, 9, EOS], [6, 7, 8, 9, EOS], [9, EOS]]
    assert all(g.target_calls == g.num_tokens and g.stopped_at_eos for g in gens)
    assert summarize(gens, [True] * 3, 0.0)["target_calls_per_token"] == 1.0


def test_standard_sd_with_a_perfect_draft_is_one_call_per_block_of_k_plus_1():
    target = counting(eos_after=20)
    gens = run(counting(eos_after=20), target, [[2]], reject_all)
    assert gens[0].response_ids == list(range(3, 21)) + [EOS]  # 19 tokens
    assert gens[0].target_calls == 4  # ceil(19 / (K + 1))
    assert gens[0].accepted_draft_tokens == 4 * K  # every draft token kept, the last block's EOS too


def test_standard_sd_rejects_every_mismatch_and_equals_greedy():
    target = counting(eos_after=20)
    draft = LookupLM({4: 9, 10: 12, 15: EOS})  # wrong after 4, 10 and 15 (an early EOS too)
    prompts = [[2], [3], [11], [16]]
    greedy = run(None, target, prompts, reject_all, k=0)
    sd = run(draft, target, prompts, reject_all)
    assert [g.response_ids for g in sd] == [g.response_ids for g in greedy]
    assert all(g.accepted_mismatches == 0 for g in sd)
    assert sum(g.target_calls for g in sd) < sum(g.target_calls for g in greedy)


def test_accept_all_emits_k_plus_1_tokens_per_block_until_max_new_tokens():
    draft = LookupLM({t: t + 2 for t in range(2, V - 2)})  # every token a mismatch
    gens = run(draft, counting(), [[2], [3]], accept_all, max_new_tokens=17)
    for g in gens:
        assert g.num_tokens == 17 and not g.stopped_at_eos
        assert g.target_calls == 4  # 3 full blocks of K + 1, then 2 of the 4th block's 5
        # every kept draft token a mismatch; the cut-off ones of the last block are not counted
        assert g.accepted_draft_tokens == g.accepted_mismatches == 3 * K + 2
    assert gens[0].response_ids[:5] == [4, 6, 8, 10, 11]  # draft x4, then the target's token after 10


def test_eos_inside_an_accepted_block_ends_the_response_there():
    draft = LookupLM({4: EOS})  # proposes 3, 4, EOS, ... from [2]; the target would go on
    gens = run(draft, counting(), [[2]], accept_all)
    assert gens[0].response_ids == [3, 4, EOS]
    assert gens[0].stopped_at_eos and gens[0].target_calls == 1
    assert gens[0].accepted_draft_tokens == 3  # the draft tokens after its EOS are not counted


@pytest.mark.parametrize("policy,k", [(reject_all, 0), (reject_all, K), (accept_all, K)])
def test_max_new_tokens_is_respected(policy, k):
    draft = LookupLM({5: 9})
    gens = run(draft, counting(), [[2], [4], [30]], policy, k=k, max_new_tokens=7)
    assert [g.num_tokens for g in gens] == [7, 7, 7]


def test_rows_of_a_batch_finish_independently():
    target = counting(eos_after=12)
    prompts = [[11], [2], [10], [3], [5]]
    together = run(counting(eos_after=12), target, prompts, reject_all, batch_size=5)
    alone = [run(counting(eos_after=12), target, [p], reject_all)[0] for p in prompts]
    assert [g.response_ids for g in together] == [g.response_ids for g in alone]


class ZeroBackbone(nn.Module):
    """Hidden states of zeros, with a cache that keeps nothing: the backbone of ConstantScorer."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor, past_key_values=None, **_) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=torch.zeros(*input_ids.shape, 1), past_key_values=NoCache())


class ConstantScorer(nn.Module):
    """Accept logits [B, K] from a fixed vector: a stand-in for ScoringActor (whole batches go
    through forward, single rows of the KV-cached loop through score)."""

    def __init__(self, probs: list[float]) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.logit(torch.tensor(probs)))
        self.backbone = ZeroBackbone()
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids, attention_mask, context_len, target_ids):
        return self.score(None, target_ids)

    def score(self, at_draft, target_ids):
        self.seen.append(target_ids)
        return self.logits.expand(len(target_ids), -1)


def test_scorer_policy_accepts_mismatches_at_or_above_the_threshold():
    scorer = ConstantScorer([0.9, 0.5, 0.2, 0.7])
    decide = scorer_policy(scorer, threshold=0.5, pad_id=PAD)
    block = Block([[2, 3], [4]], [1, 1], torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]]), torch.tensor([[9] * 5, [5] * 5]))
    keep = decide(block)
    # Row 0: every position a mismatch; p >= 0.5 keeps 0, 1 and 3. Row 1: position 0 matches.
    assert keep.tolist() == [[True, True, False, True], [True, True, False, True]]
    assert scorer.seen[0].tolist() == [[9] * 4, [5] * 4]  # the target's K tokens are the alternatives


def test_scorer_policy_ends_block_at_first_rejected_mismatch():
    draft = LookupLM({t: t + 2 for t in range(2, V - 2)})
    policy = scorer_policy(ConstantScorer([0.9, 0.9, 0.1, 0.9]), 0.5, PAD)
    gens = run(draft, counting(), [[2]], policy, max_new_tokens=12)
    # two mismatches kept, the third replaced by the target's token; the fourth never reached
    assert gens[0].response_ids == [4, 6, 7, 9, 11, 12, 14, 16, 17, 19, 21, 22]
    assert gens[0].target_calls == 4 and gens[0].accepted_mismatches == 8


@pytest.fixture(scope="module", params=["as_loaded", "packed"])
def toy_lms(toy_world, request):
    """The toy draft and target, as loaded and with their linear layers packed for oneDNN (the
    CPU decoding path): every loop test holds for both."""
    models = load_causal_lm(str(toy_world / "draft")), load_causal_lm(str(toy_world / "target"))
    for model in models if request.param == "packed" else ():
        assert pack_linears(model) > 0
    return models


def test_standard_sd_equals_greedy_on_the_toy_models(toy_lms, toy_tokenizer):

    draft, target = toy_lms
    prompts = [toy_tokenizer(p.text).input_ids for p in toy_prompts(48, seed=7)]
    eos, pad = toy_tokenizer.eos_token_id, toy_tokenizer.pad_token_id
    greedy = generate(None, target, prompts, reject_all, LoopSettings(0, 24, eos, pad, 16))
    sd = generate(draft, target, prompts, reject_all, LoopSettings(K, 24, eos, pad, 16))
    lossy = generate(draft, target, prompts, accept_all, LoopSettings(K, 24, eos, pad, 16))
    assert [g.response_ids for g in sd] == [g.response_ids for g in greedy]
    # and greedy is the target's own greedy decoding (lm.greedy_responses cuts before EOS)
    assert [g.response_ids[:-1] for g in greedy] == greedy_responses(target, prompts, 24, eos, pad)
    assert all(g.stopped_at_eos for g in greedy)
    calls = {name: summarize(gens, [True] * len(gens), 0.0) for name, gens in [("sd", sd), ("all", lossy)]}
    # the weak draft still saves target calls; accepting everything saves the most
    assert calls["all"]["target_calls_per_token"] < calls["sd"]["target_calls_per_token"] < 1.0
    assert [g.response_ids for g in lossy] != [g.response_ids for g in greedy]


@pytest.fixture
def responses_under(toy_lms, toy_tokenizer):
    """policy -> the toy pair's responses to 24 fresh prompts under it (batched loop)."""

    draft, target = toy_lms
    prompts = [toy_tokenizer(p.text).input_ids for p in toy_prompts(24, seed=8)]
    eos, pad = toy_tokenizer.eos_token_id, toy_tokenizer.pad_token_id

    def ids(policy):
        return [g.response_ids for g in generate(draft, target, prompts, policy, LoopSettings(K, 24, eos, pad, 12))]

    return ids


def test_kl_policy_spans_standard_sd_to_accept_all_on_the_toy_models(responses_under):
    ids = responses_under
    sd = ids(reject_all)
    # No divergence is <= -1: every mismatch rejected, as standard SD. Any divergence is <= inf and
    # without the confidence mask nothing is verified strictly: accept-all.
    assert ids(kl_policy(-1.0)) == sd
    assert ids(kl_policy(float("inf"), confidence=None)) == ids(accept_all)
    middle = ids(kl_policy(0.85))
    assert middle != sd


def _random_judge(target, seed: int = 0):
    """A zero-cost judge with random output weights: it accepts some mismatches and not others."""

    torch.manual_seed(seed)
    head = JudgeHead({"tokens": len(TOKEN_FEATURES), "target_hidden": target.config.hidden_size})
    torch.nn.init.normal_(head.net[-1].weight, std=0.5)
    return head.eval()


def test_judge_policy_spans_standard_sd_to_accept_all_on_the_toy_models(responses_under, toy_lms):
    ids = responses_under
    head = _random_judge(toy_lms[1])
    assert ids(judge_policy(head, 1.01)) == ids(reject_all)  # no probability reaches 1.01
    assert ids(judge_policy(head, 0.0)) == ids(accept_all)
    assert ids(judge_policy(head, 0.5)) not in (ids(reject_all), ids(accept_all))


def test_kv_cached_loop_gives_the_uncached_loops_tokens_and_counts_for_every_policy(toy_lms, toy_tokenizer, toy_world):

    draft, target = toy_lms
    prompts = [toy_tokenizer(p.text).input_ids for p in toy_prompts(12, seed=9)]
    eos, pad = toy_tokenizer.eos_token_id, toy_tokenizer.pad_token_id
    torch.manual_seed(0)
    scorer = ScoringActor.from_pretrained(str(toy_world / "draft")).eval()
    torch.nn.init.normal_(scorer.head[-1].weight, std=0.5)  # an untrained head that still decides something
    policies = {
        "greedy": (reject_all, 0),
        "standard_sd": (reject_all, K),
        "accept_all": (accept_all, K),
        "kl_below": (kl_policy(0.85), K),
        "scorer": (scorer_policy(scorer, 0.5, pad), K),
        "judge": (judge_policy(_random_judge(target), 0.5), K),
    }
    for name, (policy, k) in policies.items():
        batched = generate(draft, target, prompts, policy, LoopSettings(k, 24, eos, pad, 6))
        for batch_size in (1, 5):  # one row (caches cut back) and rows rolled back by different amounts
            cached = generate_cached(draft, target, prompts, policy, LoopSettings(k, 24, eos, pad, batch_size))
            assert [g.response_ids for g in cached] == [g.response_ids for g in batched], (name, batch_size)
            assert [(g.target_calls, g.accepted_draft_tokens, g.accepted_mismatches) for g in cached] == [
                (g.target_calls, g.accepted_draft_tokens, g.accepted_mismatches) for g in batched
            ], (name, batch_size)


@torch.no_grad()
def test_backbone_prefix_cache_reads_what_a_full_pass_reads(toy_world):

    backbone = ScoringActor.from_pretrained(str(toy_world / "draft")).backbone.eval()
    cache = PrefixCache(backbone)
    first = list(range(5, 40))
    later = first[:30] + [7, 8, 9, 10, 11, 12]  # the next block: 30 tokens kept, a new tail
    unrelated = [3, 4, *first]  # another prompt: nothing to reuse
    for ids in (first, later, later, unrelated):
        full = backbone(input_ids=torch.tensor([ids])).last_hidden_state[0, -4:]  # [4, H]
        assert torch.allclose(cache.read(ids, 4).last_hidden_state[0, -4:], full, atol=1e-4)
        assert cache.ids == ids


def test_draft_confidence_ends_drafting_early_and_standard_sd_stays_greedy(toy_lms, toy_tokenizer):

    draft, target = toy_lms
    prompts = [toy_tokenizer(p.text).input_ids for p in toy_prompts(8, seed=3)]
    eos, pad = toy_tokenizer.eos_token_id, toy_tokenizer.pad_token_id
    greedy = generate_cached(draft, target, prompts, reject_all, LoopSettings(0, 24, eos, pad, 4))
    fixed, never, always = LoopClock(), LoopClock(), LoopClock()
    full = generate_cached(draft, target, prompts, reject_all, LoopSettings(K, 24, eos, pad, 4), clock=fixed)
    sure = generate_cached(draft, target, prompts, reject_all, LoopSettings(K, 24, eos, pad, 4, 0.0), clock=never)
    one = generate_cached(draft, target, prompts, reject_all, LoopSettings(K, 24, eos, pad, 4, 1.01), clock=always)
    for gens in (full, sure, one):  # lossless whatever the draft length
        assert [g.response_ids for g in gens] == [g.response_ids for g in greedy]
    assert never.draft_passes == fixed.draft_passes == K * fixed.target_passes  # probability >= 0: never unsure
    assert always.draft_passes == always.target_passes  # nothing reaches 1.01: one draft token per block
    assert all(g.accepted_draft_tokens <= g.target_calls for g in one)  # at most one kept per block
    assert sum(g.accepted_draft_tokens for g in full) > sum(g.accepted_draft_tokens for g in one)
