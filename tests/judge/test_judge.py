"""The zero-cost judge (judge.py, judge_data.py, judge_training.py, judge_compare.py): its inputs
equal a fresh forward pass, its labels equal the outcome table's verdicts, every head trains."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from spd_lightning.core.reward import RewardWeights
from spd_lightning.core.rules import token_features
from spd_lightning.core.sampling import hybrid_prefix
from spd_lightning.data.records import Record, load_records, split_by_prompt
from spd_lightning.errors import RecordError
from spd_lightning.judge.compare import JUDGES, CompareSettings, Split, compare, train_judges
from spd_lightning.judge.fit import FitSettings
from spd_lightning.judge.head import TOKEN_FEATURES, JudgeHead, JudgeInputs, autojudge_labels, judge_token_features
from spd_lightning.judge.inputs import DiskCompletions, Greedy, block_inputs, complete_outcomes
from spd_lightning.models.lm import greedy_generate
from spd_lightning.models.scorer import ScoringActor
from spd_lightning.verification.outcomes import OutcomeTable, best_at_parity


def _models(toy_world):
    load = lambda d: AutoModelForCausalLM.from_pretrained(toy_world / d).eval()  # noqa: E731
    return load("target"), load("draft")


@torch.no_grad()
def test_inputs_equal_a_fresh_forward_pass_of_each_record(toy_world):
    target, draft = _models(toy_world)
    records = load_records(toy_world / "records.jsonl")[:12]  # blocks of shared responses
    inputs, rules = block_inputs(target, draft, records, pad_id=0, batch_size=5)
    for n, r in enumerate(records):
        ids = torch.tensor([r.context_ids + r.draft_ids])
        k, c = len(r.draft_ids), len(r.context_ids)
        t_hidden = target.get_decoder()(input_ids=ids).last_hidden_state[0]  # [L, H]
        d_hidden = draft.get_decoder()(input_ids=ids).last_hidden_state[0]
        t_logits = target(input_ids=ids).logits[:, c - 1 : c + k]  # [1, K+1, V]
        d_logits = draft(input_ids=ids).logits[:, c - 1 : c + k]
        torch.testing.assert_close(inputs.target_hidden[n], t_hidden[c : c + k], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(inputs.draft_hidden[n], d_hidden[c : c + k], atol=1e-4, rtol=1e-4)
        fresh = judge_token_features(t_logits, d_logits, torch.tensor([r.draft_ids]))[0]
        torch.testing.assert_close(inputs.tokens[n], fresh, atol=1e-4, rtol=1e-4)
        assert inputs.mismatch[n].tolist() == [d != t for d, t in zip(r.draft_ids, r.target_ids)]
        fresh_rules = token_features(t_logits, d_logits, torch.tensor([r.draft_ids]))
        torch.testing.assert_close(rules.kl[n], fresh_rules.kl[0], atol=1e-4, rtol=1e-4)
        assert rules.rank[n].tolist() == fresh_rules.rank[0].tolist()


def test_token_features_by_hand():
    # V = 3; the target prefers token 0 (p = .7, .2, .1), the draft token 2 (p = .1, .2, .7).
    pt, pd = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.1, 0.2, 0.7])
    feats = judge_token_features(pt.log()[None, None], pd.log()[None, None], torch.tensor([[2]]))[0, 0]
    named = dict(zip(TOKEN_FEATURES, feats.tolist()))
    assert abs(named["target_logp_draft"] - torch.log(torch.tensor(0.1))) < 1e-5
    assert abs(named["draft_logp_top"] - torch.log(torch.tensor(0.1))) < 1e-5
    assert abs(named["kl"] - float((pt * (pt / pd).log()).sum())) < 1e-5
    assert abs(named["log_rank"] - torch.log1p(torch.tensor(2.0))) < 1e-5  # two tokens beat the draft's


def test_autojudge_labels_equal_the_verdict_after_accepting():
    # Record 0: mismatches at 1 and 3; record 1: one mismatch at 0; record 2: the target was already wrong.
    mismatch = torch.tensor([[False, True, False, True], [True, False, False, False], [True, False, False, False]])
    correct = torch.tensor(
        [
            [False, True, False, False, True],  # end at 1 (SD): right; accept 1 -> end at 3: wrong
            [True, False, False, False, True],  # accept 0 -> end at K: right
            [False, False, False, False, True],  # SD wrong: no label
        ]
    )
    labels, defined = autojudge_labels(correct, mismatch)
    assert defined.tolist() == [[False, True, False, False], [True, False, False, False], [False] * 4]
    assert labels[0, 1].item() is False  # accepting the mismatch at 1 breaks the answer (end at 3)
    assert labels[1, 0].item() is True
    # The mismatch at 3 is reached only through an answer already lost: no label.
    assert not defined[0, 3]


def test_judge_head_starts_at_its_prior_and_standardises():
    data = JudgeInputs(torch.tensor([[True, False]] * 4), torch.randn(4, 2, 8) * 50, torch.randn(4, 2, 6))
    head = JudgeHead(JudgeHead.sizes_of(data), ("tokens", "target_hidden"), init_accept_prob=0.3)
    assert torch.allclose(torch.sigmoid(head(data)), torch.full((4, 2), 0.3))
    head.fit_scaling(data)
    x = (head.features(data)[data.mismatch] - head.mean) / head.std
    assert torch.allclose(x.mean(0), torch.zeros(14), atol=1e-5)


def test_disk_completions_resume(tmp_path):
    store = DiskCompletions(tmp_path / "c.jsonl")
    store.add([((1, 2), [3, 4]), ((5,), [])])
    again = DiskCompletions(tmp_path / "c.jsonl")
    assert again.get((1, 2)) == [3, 4] and again.get((5,)) == [] and again.get((9,)) is None


def test_disk_completions_drop_a_last_line_cut_short_and_name_a_broken_one(tmp_path):
    path = tmp_path / "c.jsonl"
    DiskCompletions(path).add([((1, 2), [3, 4])])
    with path.open("a") as f:
        f.write('{"prefix": [7], "compl')  # killed while appending
    again = DiskCompletions(path)
    assert again.get((1, 2)) == [3, 4] and again.get((7,)) is None
    again.add([((7,), [8])])  # appends after the last whole line
    assert DiskCompletions(path).get((7,)) == [8] and len(path.read_text().splitlines()) == 2
    path.write_text('{"prefix": [1], "completion": []}')  # cut right before its newline
    DiskCompletions(path).add([((2,), [])])
    assert DiskCompletions(path).get((1,)) == [] and DiskCompletions(path).get((2,)) == []
    path.write_text('not json\n{"prefix": [1], "completion": []}\n')
    with pytest.raises(RecordError, match=rf"{path}:1: not a stored completion"):
        DiskCompletions(path)


def test_outcomes_reuse_the_targets_response_exactly(toy_world, tmp_path):
    """Every stored outcome equals the prefix's own greedy completion within the response budget,
    including the standard-SD outcomes read off each prompt's response."""
    target, _ = _models(toy_world)
    records = load_records(toy_world / "records.jsonl")[:20]
    store = DiskCompletions(tmp_path / "c.jsonl")
    eos = {int(target.config.eos_token_id)}
    complete_outcomes(Greedy(target, 0, eos, batch_size=8), records, store, max_response=16)
    lines = len((tmp_path / "c.jsonl").read_text().splitlines())
    checked = 0
    for r in records:
        first = next(i for i, (d, t) in enumerate(zip(r.draft_ids, r.target_ids)) if d != t)
        prefix = hybrid_prefix(r.context_ids, r.draft_ids, r.target_ids, first)
        stored = store.get(tuple(prefix))
        if stored is None:  # the response ended inside the block
            continue
        left = r.prompt_len + 16 - len(prefix)
        fresh = greedy_generate(target, [prefix], left, 0, eos)[0]
        assert stored == fresh
        checked += 1
    assert checked > 5
    # A second run finds everything stored and completes nothing.
    complete_outcomes(Greedy(target, 0, eos, batch_size=8), records, DiskCompletions(tmp_path / "c.jsonl"), 16)
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == lines


def _toy_split(records: list[Record], target, draft) -> Split:
    inputs, rules = block_inputs(target, draft, records, pad_id=0, batch_size=64)
    # Verdicts from the records' shape alone (no target calls): a mismatch whose draft token is a
    # digit breaks the answer. Enough to check that each objective learns from a table.
    harmful = inputs.tokens[..., TOKEN_FEATURES.index("kl")] > inputs.tokens[..., TOKEN_FEATURES.index("kl")].median()
    bad = harmful & inputs.mismatch  # [N, K]
    broken_before = torch.cat([torch.zeros(len(records), 1, dtype=torch.bool), bad.cumsum(1).bool()], dim=1)  # [N, K+1]
    correct = ~broken_before
    table = OutcomeTable(inputs.mismatch, correct, torch.ones(len(records), dtype=torch.bool))
    return Split(inputs, rules, table, table, torch.tensor([r.target_ids for r in records]))


def test_every_judge_trains_on_the_toy_world(toy_world):
    target, draft = _models(toy_world)
    train_records, held = split_by_prompt(load_records(toy_world / "records.jsonl")[:1200], 0.25, 0)
    train, heldout = _toy_split(train_records, target, draft), _toy_split(held, target, draft)
    settings = CompareSettings(fit=FitSettings(steps=150, lr=1e-2, batch_size=64), scorer_lr=3e-3, sweep=9)
    judges, heads = train_judges(train, settings, RewardWeights(), ScoringActor(draft.get_decoder()))
    assert set(judges) == set(JUDGES)
    assert set(heads) == {"judge_sup", "judge_grpo", "judge_exact"}
    rows = compare(heldout, judges, settings)
    parity = best_at_parity(rows, 0.01)
    sd = parity["standard_sd"]["accept_len"]  # 0.50
    for name in JUDGES:
        # Untrained, every judge is accept-all at 0.5 (accuracy 0.24 here); trained, each keeps more
        # draft tokens than standard SD at parity (0.87-0.90 measured).
        assert parity[name]["accept_len"] > sd + 0.2, name


def test_model_judge_trains_in_lightning_and_decodes(toy_world, tmp_path, compose_train):
    """model=judge beside ScoringActor: GRPO through the LightningModule, a checkpoint that holds
    the head only, and task=decode running it on the blocks' own passes."""
    import json

    from spd_lightning.tasks.decode import decode
    from spd_lightning.tasks.train import train

    overrides = [f"toy.out={toy_world}", "model=judge", "trainer.max_steps=40", "trainer.val_check_interval=40"]
    cfg = compose_train([*overrides, "validate_before_fit=false", "data.max_val_records=64"], tmp_path / "train")
    train(cfg)
    summary = json.loads((tmp_path / "train" / "summary.json").read_text())
    # 40 GRPO steps move the judge off accept-all (0.44 accuracy at 4.0 tokens per block).
    assert summary["val/accuracy"] > 0.8 and summary["val/accept_len"] > summary["val/standard_sd/accept_len"]
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert all(key.startswith(("scorer.head.", "ref_scorer.head.")) for key in state), list(state)[:5]
    for kv_cache in (False, True):
        out = tmp_path / f"decode_{kv_cache}"
        decode_overrides = [f"toy.out={toy_world}", "model=judge", "task=decode", "data.num_prompts=8"]
        policies = ["decode.policies=[standard_sd,scorer]", f"decode.kv_cache={kv_cache}", f"ckpt_path={ckpt}"]
        cfg = compose_train([*decode_overrides, *policies], out)
        decode(cfg)
        result = json.loads((out / "decode.json").read_text())
        assert result["scorer/target_calls_per_token"] < result["standard_sd/target_calls_per_token"]


def test_the_shipped_qwen_coder_judge_loads_with_its_threshold_and_kl_tau():
    from pathlib import Path

    from spd_lightning.judge.head import judge_notes, load_judge

    path = Path(__file__).resolve().parents[2] / "judges" / "qwen_coder_grpo.pt"
    head, threshold = load_judge(path)
    assert head.inputs == ("tokens", "target_hidden")  # what decoding computes anyway: no extra pass
    assert head.sizes["tokens"] == len(TOKEN_FEATURES) and head.sizes["target_hidden"] == 1536  # the 1.5B's width
    assert 0.0 < threshold <= 1.0 and bool(head.fitted)
    assert judge_notes(path)["parity_measure"] == "agreement"
