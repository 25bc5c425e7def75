"""The in-process target: greedy completion of token-id prefixes (SPEC.md, step 4)."""

import random

import pytest

from spd_lightning.data.answers import gsm8k_final_number
from spd_lightning.targets.local import LocalTarget, load_causal_lm
from spd_lightning.toy.task import make_example


@pytest.fixture(scope="module")
def tokenizer(toy_tokenizer):
    return toy_tokenizer


@pytest.fixture(scope="module")
def target(toy_world):
    return LocalTarget(str(toy_world / "target"), max_new_tokens=12, batch_size=64)


@pytest.fixture(scope="module")
def prefixes(toy_prefixes):
    return toy_prefixes[:6]


def test_batched_equals_one_at_a_time(target, prefixes):
    # left padding must not change any row's greedy completion
    assert len({len(p) for p in prefixes}) > 3
    batched = target.complete(prefixes)
    single = [target.complete([p])[0] for p in prefixes]
    assert batched == single
    assert len(batched) == len(prefixes)


def test_small_batch_size_splits_requests(toy_world, target, prefixes):
    small = LocalTarget(str(toy_world / "target"), max_new_tokens=12, batch_size=4)
    assert small.complete(prefixes) == target.complete(prefixes)


def test_completion_ends_at_eos_or_budget(toy_world, target, prefixes):
    # with enough budget every completion ends with EOS, and nothing follows it
    for completion in target.complete(prefixes):
        assert completion and completion[-1] == target.eos_token_id
        assert completion.count(target.eos_token_id) == 1
        assert len(completion) <= target.max_new_tokens
    # a short budget: exactly max_new_tokens tokens unless EOS came first
    short = LocalTarget(str(toy_world / "target"), max_new_tokens=3)
    for full, cut in zip(target.complete(prefixes), short.complete(prefixes)):
        assert cut == full[:3]
        assert len(cut) == 3 or cut[-1] == short.eos_token_id


def test_eos_and_pad_from_config(target, tokenizer):
    assert target.eos_token_id == tokenizer.eos_token_id
    assert target.pad_token_id == tokenizer.pad_token_id


def test_prompt_completion_reaches_answer(target, tokenizer):
    # the toy target is trained to near-perfect accuracy: greedy completions reach the sum
    rng = random.Random(7)
    examples = [make_example(rng) for _ in range(20)]
    completions = target.complete([tokenizer(e.prompt).input_ids for e in examples])
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    right = sum(gsm8k_final_number(t, e.answer) for t, e in zip(texts, examples))
    assert right >= 18, list(zip(texts, [e.answer for e in examples]))
    text = tokenizer.decode(target.complete([tokenizer("Q: 37+45= A:").input_ids])[0], skip_special_tokens=True)
    assert text.endswith(" 82.") and gsm8k_final_number(text, "82")


def test_load_missing_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(RuntimeError) as err:
        load_causal_lm(str(missing))
    msg = str(err.value)
    assert str(missing) in msg
    assert "model_path" in msg  # says which setting to fix
    assert "Traceback" not in msg and len(msg.splitlines()) <= 3
    assert err.value.__cause__ is None and err.value.__suppress_context__  # `from None`


def test_load_directory_without_model(tmp_path):
    with pytest.raises(RuntimeError) as err:
        load_causal_lm(str(tmp_path))
    assert str(tmp_path) in str(err.value) and "model_path" in str(err.value)


def test_load_bad_dtype(toy_world):
    with pytest.raises((ValueError, RuntimeError), match="dtype"):  # a clear error, whichever kind
        load_causal_lm(str(toy_world / "target"), dtype="float64")


# --- task=prepare: responses with their own budget, draft proposals, the target along a draft ---


def test_complete_with_its_own_budget(target, prefixes):
    assert target.complete(prefixes, max_new_tokens=3) == [c[:3] for c in target.complete(prefixes)]
    assert target.max_new_tokens == 12  # the configured budget is untouched


def test_propose_gives_exactly_k_tokens_past_eos(target, prefixes):
    proposals = target.propose(prefixes, 14)
    assert [len(p) for p in proposals] == [14] * len(prefixes)
    for proposal, completion in zip(proposals, target.complete(prefixes)):
        assert proposal[: len(completion)] == completion  # the same greedy path, not cut at EOS
    assert sum(target.eos_token_id in p[:-1] for p in proposals) >= len(prefixes) // 2


def test_argmax_along_is_the_greedy_token_after_each_draft_prefix(toy_world, target, prefixes):
    rng = random.Random(0)
    drafts = [[rng.randrange(3, 45) for _ in range(4)] for _ in prefixes]  # arbitrary drafts
    got = target.argmax_along(prefixes, drafts)
    one_by_one = [[target.propose([p + d[:i]], 1)[0][0] for i in range(4)] for p, d in zip(prefixes, drafts)]
    assert got == one_by_one
    # The target agrees with its own greedy block everywhere; batches split the same way.
    own = target.propose(prefixes, 4)
    assert target.argmax_along(prefixes, own) == own
    small = LocalTarget(str(toy_world / "target"), batch_size=2)
    assert small.argmax_along(prefixes, drafts) == got and small.propose(prefixes, 4) == own
    assert small.num_requests == 2 * -(-len(prefixes) // 2)


@pytest.mark.parametrize(
    "sizes,cuts",
    [
        ([1] * 10, [(0, 4), (4, 8), (8, 10)]),  # plain rows: batch_size at a time
        ([3, 3, 3], [(0, 3), (3, 6), (6, 9)]),  # whole trunks: none straddles two batches
        ([2, 2, 2, 2, 1], [(0, 4), (4, 8), (8, 9)]),
        ([9], [(0, 4), (4, 8), (8, 9)]),  # a trunk larger than a batch gets batches of its own
        ([5, 2], [(0, 4), (4, 7)]),
    ],
)
def test_batches_keep_the_contexts_of_one_trunk_together(toy_world, sizes, cuts):
    target = LocalTarget(str(toy_world / "target"), batch_size=4)
    assert [(c.start, c.stop) for c in target._batches(sizes, "test")] == cuts
    assert target.num_requests == len(cuts)


KEYS = [("target.model_path", "target.device"), ("decode.draft_path", "decode.device")]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("key,expected", KEYS)
def test_cuda_without_a_gpu_names_the_device_key(toy_world, key, expected):
    from spd_lightning.errors import SetupError

    with pytest.raises(SetupError, match=rf"^{expected}=cuda but torch sees no GPU; use {expected}=cpu$"):
        load_causal_lm(str(toy_world / "target"), device="cuda", config_key=key)


def test_a_damaged_weights_file_is_one_message_naming_the_directory_and_key(toy_world, tmp_path):
    import shutil

    from spd_lightning.errors import SetupError

    damaged = tmp_path / "target"
    shutil.copytree(toy_world / "target", damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(SetupError, match=r"a weights file there is damaged .*point target\.model_path at an intact"):
        load_causal_lm(str(damaged))
