"""Every YAML file under conf/ composes and its objects instantiate; schemas catch typos."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from hydra_compose import compose_config
from omegaconf import DictConfig, OmegaConf

from spd_lightning.core.exact import ExactLoss
from spd_lightning.core.generation_grpo import GenerationGRPOLoss
from spd_lightning.core.grpo import GRPOLoss
from spd_lightning.core.reward import RewardWeights
from spd_lightning.data.prompts import Prompt
from spd_lightning.errors import SetupError
from spd_lightning.judge.zero_cost import ZeroCostJudge
from spd_lightning.models.scorer import ScoringActor
from spd_lightning.targets import LocalTarget
from spd_lightning.targets.vllm import VLLMTarget
from spd_lightning.tasks.builders import build_scorer, instantiate_dict
from spd_lightning.tasks.ranges import RANGES, check_ranges

CONF = Path(__file__).resolve().parents[2] / "conf"
# Groups whose files are selected with `group=name`; the primary config is composed as is.
GROUP_FILES = sorted(p.relative_to(CONF) for p in CONF.rglob("*.yaml") if p.parent != CONF)


# Extra overrides a file needs to instantiate here (no GPU, no weights, no network). "{toy}" is the
# toy world's directory, "{fake_vllm}" the URL of the suite's loopback vLLM server.
EXTRA_OVERRIDES: dict[str, list[str]] = {
    "data/jsonl.yaml": ["data.path={toy}/records.jsonl"],
    "target/vllm.yaml": ["target.url={fake_vllm}", "target.model=toy-target"],
    # Real-model files: the toy draft stands in for the hub weights.
    "model/_base.yaml": ["model.path={toy}/draft"],
    "model/llama3_8b.yaml": ["model.path={toy}/draft"],
    "model/llama3_2_1b.yaml": ["model.path={toy}/draft"],
    "model/qwen2_5_0_5b.yaml": ["model.path={toy}/draft"],
    "model/qwen2_5_7b.yaml": ["model.path={toy}/draft"],
    # toy=default brings back the toy group the experiment turns off, for toy.out and toy.spec here.
    "experiment/llama3_8b_vllm.yaml": [
        "toy=default",
        "data.path={toy}/records.jsonl",
        "model.path={toy}/draft",
        "target.url={fake_vllm}",
        "target.model=toy-target",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.precision=32-true",
        "logger.wandb.mode=disabled",
    ],
    # The real pair's directories are built by hand (python -m spd_lightning.models.pairs): the toy pair stands in.
    "pair/qwen_coder.yaml": ["pair.draft={toy}/draft", "pair.target={toy}/target"],
    "experiment/qwen_coder_gsm8k.yaml": [
        "toy=default",
        "pair.draft={toy}/draft",
        "pair.target={toy}/target",
        "data.path={toy}/records.jsonl",
        "target.url={fake_vllm}",
        "target.model=toy-target",
    ],
    "experiment/qwen_coder_generations.yaml": [
        "toy=default",
        "pair.draft={toy}/draft",
        "pair.target={toy}/target",
        "data.raw={raw}",
        "target.url={fake_vllm}",
        "target.model=toy-target",
        "model.dtype=float32",
    ],
    # Never online from a test (WandbLogger only starts a run when first used, but to be sure).
    "logger/wandb.yaml": ["logger.wandb.mode=offline"],
    # A raw prompt file of two lines, written by the test ("{raw}").
    "data/prompts.yaml": ["data.raw={raw}"],
    "data/gsm8k.yaml": ["data.raw={raw}"],
    "task/prepare.yaml": ["data.raw={raw}"],
    # The draft group belongs to task=prepare.
    "draft/local.yaml": ["task=prepare", "data.raw={raw}"],
    "draft/vllm.yaml": ["task=prepare", "data.raw={raw}", "draft.url={fake_vllm}", "draft.model=toy-target"],
    # GPU files on this CPU machine. Lightning refuses FSDP1 on a CPU, so its strategy is left out
    # here; tests/training/test_distributed.py builds that strategy by itself.
    "trainer/gpu.yaml": ["trainer.accelerator=cpu"],
    "trainer/fsdp.yaml": ["trainer.accelerator=cpu", "~trainer.strategy"],
}


def override_for(rel: Path) -> str:
    group, name = rel.parent.as_posix(), rel.stem
    return f"{group}={name}"


def test_every_group_file_is_tested():
    assert len(GROUP_FILES) >= 15, GROUP_FILES


@pytest.mark.parametrize("rel", GROUP_FILES, ids=str)
def test_group_file_composes_and_instantiates(rel: Path, toy_world: Path, tmp_path: Path, compose_train, request):
    extra = EXTRA_OVERRIDES.get(rel.as_posix(), [])
    fake_url = request.getfixturevalue("fake_vllm").url if any("{fake_vllm}" in o for o in extra) else ""
    raw = tmp_path / "raw.jsonl"
    raw.write_text('{"question": "Q: 3+4= A:", "answer": "7"}\n{"question": "Q: 5+5= A:", "answer": "10"}\n')
    extra = [
        o.replace("{toy}", str(toy_world)).replace("{fake_vllm}", fake_url).replace("{raw}", str(raw)) for o in extra
    ]
    cfg = compose_train([override_for(rel), f"toy.out={toy_world}", *extra], tmp_path)
    check_ranges(cfg)  # every shipped value lies in its knob's range
    data = instantiate(cfg.data)
    if "path" in cfg.data:  # records
        assert isinstance(data, L.LightningDataModule)
    else:  # prompts (data=prompts, data=toy_prompts)
        assert data and all(isinstance(p, Prompt) for p in data)
    assert isinstance(build_scorer(cfg.model), (ScoringActor, ZeroCostJudge))
    for backend in ("target", "draft"):
        if backend in cfg:
            target = instantiate(cfg[backend])
            assert isinstance(target, (LocalTarget, VLLMTarget))
            target.close()
    assert instantiate(cfg.answer)("82", "82") is True
    assert isinstance(instantiate(cfg.reward), RewardWeights)
    assert isinstance(instantiate(cfg.loss), (GRPOLoss, ExactLoss, GenerationGRPOLoss))
    assert callable(instantiate(cfg.optimizer))
    instantiate(cfg.toy.spec)
    callbacks, loggers = instantiate_dict(cfg.callbacks), instantiate_dict(cfg.logger)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    assert isinstance(trainer, L.Trainer)
    if rel.parent.as_posix() == "task" and rel.stem != "train":
        section = OmegaConf.to_object(cfg[rel.stem])  # checked against its dataclass schema
        assert section.__class__.__name__.endswith("Config")


@pytest.mark.parametrize("task", ["train", "prepare", "eval", "decode", "judge"])
def test_a_pair_names_each_model_role_once(task: str, tmp_path: Path, compose_train):
    raw = ["data.raw=x.jsonl"] if task == "prepare" else []
    cfg = compose_train([f"task={task}", "pair=qwen_coder", "pair.dir=/pairs/qc", *raw], tmp_path)
    draft, target = "/pairs/qc/draft", "/pairs/qc/target"
    assert (cfg.model.path, cfg.model.tokenizer, cfg.target.model_path) == (draft, target, target)
    # eval's rules and decode's loop read pair.draft and pair.target themselves: no key of their own.
    assert (cfg.pair.draft, cfg.pair.target) == (draft, target)
    assert not {"draft_path", "target_path"} & set(cfg.get(task) or {})
    if task == "prepare":
        assert cfg.draft.model_path == draft
    hub = compose_train(["pair=qwen_coder", "pair.target=Qwen/Qwen2.5-Coder-1.5B-Instruct"], tmp_path)
    assert hub.target.model_path == hub.model.tokenizer == "Qwen/Qwen2.5-Coder-1.5B-Instruct"


@pytest.mark.parametrize("target", ["local", "vllm"])
def test_a_pair_completes_prefixes_to_the_end_of_a_solution(target: str, tmp_path: Path, compose_train):
    cfg = compose_train(["pair=qwen_coder", f"target={target}"], tmp_path)
    assert cfg.target.max_new_tokens == 320  # not the toy world's 16, which would cut every answer
    mine = compose_train(["pair=qwen_coder", f"target={target}", "target.max_new_tokens=512"], tmp_path)
    assert mine.target.max_new_tokens == 512


def test_dr_grpo_turns_off_std_scaling(tmp_path: Path, compose_train):
    cfg = compose_train(["loss=dr_grpo"], tmp_path)
    assert instantiate(cfg.loss).scale_std is False


def test_misspelled_override_fails_at_compose(tmp_path: Path, compose_train):
    with pytest.raises(ConfigCompositionException, match="weight_x"):
        compose_train(["reward.weight_x=1"], tmp_path)


def test_wrong_type_fails_at_compose(tmp_path: Path, compose_train):
    with pytest.raises(ConfigCompositionException, match="weight_a"):
        compose_train(["reward.weight_a=abc"], tmp_path)
    with pytest.raises(ConfigCompositionException, match="num_samples"):
        compose_train(["loss.num_samples=2.5"], tmp_path)


def test_group_baseline_needs_two_samples(tmp_path: Path, compose_train):
    cfg = compose_train(["loss.num_samples=1"], tmp_path)
    with pytest.raises(Exception, match="num_samples"):
        instantiate(cfg.loss)


# The numeric knobs without a range: any value is meaningful (seeds), Lightning checks its own
# (trainer.*), or they are display settings of the dashboards and the developer's toy world.
UNRANGED = ("seed", "data.seed", "trainer.", "callbacks.", "toy.spec.")
TASK_OVERRIDES = {
    "train": [],
    "prepare": ["task=prepare", "data.raw=x.jsonl", "draft=vllm", "draft.url=http://h:1/v1"],
    "eval": ["task=eval"],
    "decode": ["task=decode"],
    "vllm": ["target=vllm", "target.url=http://h:1/v1"],
    "judge": ["model=judge"],
    "judge_task": ["task=judge"],
    "prompts": ["task=prepare", "data.raw=x.jsonl"],
    "generation": ["rollout=generation"],
}


@pytest.fixture(scope="module")
def composed_tasks(toy_world: Path, tmp_path_factory) -> dict[str, DictConfig]:

    out = tmp_path_factory.mktemp("ranges")
    cfgs = {name: compose_config([f"toy.out={toy_world}", *o], out) for name, o in TASK_OVERRIDES.items()}
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    return cfgs


def numeric_leaves(node, path: str = "") -> set[str]:
    """Keys of every int or float value (or list of them, or null) in a composed config."""
    if isinstance(node, dict):
        return set().union(*(numeric_leaves(v, f"{path}.{k}" if path else k) for k, v in node.items()))
    numeric = isinstance(node, (int, float)) and not isinstance(node, bool)
    listed = isinstance(node, list) and node and all(isinstance(x, (int, float)) for x in node)
    return {path} if numeric or listed else set()


def test_every_numeric_knob_has_a_range(composed_tasks):
    leaves = set()
    for cfg in composed_tasks.values():
        node = OmegaConf.to_container(cfg, resolve=False)
        node.pop("hydra", None)
        leaves |= numeric_leaves(node)
    unranged = sorted(k for k in leaves if k not in RANGES and not k.startswith(UNRANGED))
    assert not unranged, f"add these to spd_lightning/tasks/ranges.py RANGES: {unranged}"


@pytest.mark.parametrize("key", sorted(RANGES))
def test_every_range_is_enforced_with_one_message_naming_key_and_value(key: str, composed_tasks):
    cfg = next((c for c in composed_tasks.values() if OmegaConf.select(c, key, default="absent") != "absent"), None)
    assert cfg is not None, f"{key} is in no task's config: remove it from RANGES"
    tried = []
    for bad in (float("nan"), -1, 0, 1, 1.5, 2):
        trial = copy.deepcopy(cfg)
        try:  # a scalar knob, or a list knob (eval.topk, eval.kl_thresholds: null by default)
            OmegaConf.update(trial, key, bad)
        except Exception:
            try:
                OmegaConf.update(trial, key, [bad])
            except Exception:  # the schema's type check refuses it already (e.g. nan for an int)
                continue
        try:
            check_ranges(trial)
        except SetupError as err:
            assert str(err).startswith(f"{key}=") and "is out of range: it must be" in str(err)
            tried.append(bad)
    assert tried, f"no value outside {key}'s range was refused"
