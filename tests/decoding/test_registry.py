"""The one registry of policies (spd_lightning/decoding/registry.py): every list of names is derived
from it, each policy says what it needs in typed fields, and a missing setting stops with one message."""

from __future__ import annotations

import pytest
import torch

from spd_lightning.decoding.policies import Block, Needs, Policy, PolicySettings, as_policy
from spd_lightning.decoding.registry import (
    DECODE_POLICIES,
    EVAL_FAMILIES,
    LOSSLESS,
    REGISTRY,
    SPECS,
    VAL_POLICIES,
    build_policy,
    check_policy_names,
)
from spd_lightning.errors import SetupError
from spd_lightning.judge.head import TOKEN_FEATURES, JudgeHead
from spd_lightning.reporting.names import POLICIES


def test_every_list_of_names_is_the_one_it_replaced():
    # The lists the project kept by hand before the registry, in the order their tables show.
    assert set(DECODE_POLICIES) == {"greedy", "standard_sd", "scorer", "kl_below", "judge", "accept_all"}
    assert DECODE_POLICIES[0] == "greedy"  # its responses are the others' reference
    assert EVAL_FAMILIES == ("scorer", "standard_sd", "accept_all", "topk", "kl_below", "entropy_above")
    assert VAL_POLICIES == ("scorer", "standard_sd", "accept_all")
    assert LOSSLESS == ("greedy", "standard_sd")
    assert POLICIES is SPECS and [s.name for s in REGISTRY] == list(SPECS)
    assert all(s.short and s.label and len(s.short) <= 16 for s in REGISTRY)  # table rows fit 80 columns


def test_every_decoding_policy_builds_and_says_what_it_reads():
    head = JudgeHead({"tokens": len(TOKEN_FEATURES), "target_hidden": 8})
    settings = PolicySettings(kl_threshold=0.5, judge=head, judge_threshold=0.5, scorer=None)
    for name in DECODE_POLICIES:
        if SPECS[name].needs.scorer:
            continue  # a trained checkpoint: tests/tasks/test_decode.py
        policy = build_policy(name, settings)
        assert isinstance(policy, Policy) and policy.name == name
        assert policy.needs.drafts == SPECS[name].needs.drafts
        assert policy.needs.distributions == SPECS[name].needs.distributions
        assert policy.needs.target_hidden == SPECS[name].needs.target_hidden
    watched = build_policy("standard_sd", PolicySettings(judge=head, judge_threshold=0.5, watch_with_judge=True))
    assert watched.watch is not None and watched.needs.target_hidden and watched.needs.distributions


@pytest.mark.parametrize(
    "name,settings,message",
    [
        ("beam", PolicySettings(), r"policy 'beam': choose among \['greedy'"),
        ("topk", PolicySettings(), "policy 'topk': choose among"),  # scored on outcome tables only
        ("kl_below", PolicySettings(), "kl_threshold=TAU"),
        ("judge", PolicySettings(), "judge head and its threshold"),
        ("scorer", PolicySettings(), "needs a trained scorer"),
    ],
)
def test_a_missing_setting_stops_with_one_message(name, settings, message):
    with pytest.raises(SetupError, match=message):
        build_policy(name, settings)


def test_policy_names_are_checked_against_the_registry():
    check_policy_names(["greedy", "judge"], "decode.policies")
    for names in ([], ["greedy", "beam"]):
        with pytest.raises(SetupError, match=r"decode.policies .*: choose among"):
            check_policy_names(names, "decode.policies")


def test_a_plain_function_is_a_policy_that_reads_token_ids_only():
    def keep_first(block: Block) -> torch.Tensor:
        keep = torch.zeros_like(block.draft_ids, dtype=torch.bool)
        keep[:, 0] = True
        return keep

    policy = as_policy(keep_first)
    assert policy.name == "keep_first" and policy.needs == Needs() and as_policy(policy) is policy
    block = Block([[1, 2]], [1], torch.tensor([[3, 4]]), torch.tensor([[5, 4, 6]]))
    assert policy(block).tolist() == [[True, False]]
    assert Needs(distributions=True).union(Needs(target_hidden=True)) == Needs(distributions=True, target_hidden=True)
