"""Presets: one validated schema, shipped presets load, typos and bad values are named."""

from __future__ import annotations

import os

import pytest
import yaml

from conftest import run_cli
from engine.errors import UserError
from engine.preset import Preset, field_help, load_preset, preset_from_dict, save_preset, shipped_presets

MINIMAL = {"model": {"source": "meta-llama/Llama-3.1-8B"}, "data": {"train": "train.jsonl"}}


def _with(section: str, key: str, value) -> dict:
    d = {k: dict(v) for k, v in MINIMAL.items()}
    d.setdefault(section, {})[key] = value
    return d


def test_shipped_presets_all_load():
    names = {p.name for p in shipped_presets()}
    assert {"tiny-demo.yaml", "llama-3.1-8b-qlora.yaml", "mistral-7b-qlora.yaml", "qwen2.5-7b-qlora.yaml"} <= names
    for path in shipped_presets():
        preset = load_preset(path)
        assert isinstance(preset, Preset), path


def test_defaults_fill_every_section():
    p = preset_from_dict(MINIMAL)
    assert p.quantization.method == "nf4" and p.quantization.double_quant
    assert p.lora.targets == "all-linear"
    assert p.training.packing and p.training.gradient_checkpointing


def test_unknown_key_names_the_nearest_valid_one():
    with pytest.raises(UserError) as e:
        preset_from_dict(_with("training", "learnig_rate", 1e-4), "my.yaml")
    assert str(e.value) == "preset my.yaml: unknown key 'training.learnig_rate' (did you mean 'learning_rate'?)"


def test_unknown_top_level_section():
    with pytest.raises(UserError, match=r"unknown key 'trainig' \(did you mean 'training'\?\)"):
        preset_from_dict({**MINIMAL, "trainig": {}}, "my.yaml")


@pytest.mark.parametrize(
    "section,key,value,expected",
    [
        ("training", "micro_batch_size", 0, "training.micro_batch_size = 0 is not valid (allowed: >= 1)"),
        ("lora", "dropout", 1.5, "lora.dropout = 1.5 is not valid (allowed: < 1)"),
        ("data", "validation_split", 0.9, "data.validation_split = 0.9 is not valid (allowed: <= 0.5)"),
        ("quantization", "method", "int3", "quantization.method = 'int3' is not valid (allowed: nf4, fp4 or none)"),
        ("training", "optimizer", "sgd", "training.optimizer = 'sgd' is not valid"),
    ],
)
def test_out_of_range_values_name_the_field_and_the_range(section, key, value, expected):
    with pytest.raises(UserError) as e:
        preset_from_dict(_with(section, key, value), "p.yaml")
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_required_field():
    with pytest.raises(UserError, match="'data.train' is missing"):
        preset_from_dict({"model": {"source": "x/y"}, "data": {}}, "p.yaml")


def test_round_trip_is_exact(tmp_path):
    p = preset_from_dict(_with("training", "seq_len", 1024))
    path = save_preset(p, tmp_path / "out.yaml")
    assert load_preset(path) == p
    assert yaml.safe_load(path.read_text())["training"]["seq_len"] == 1024


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    target = tmp_path / "p.yaml"
    save_preset(preset_from_dict(MINIMAL), target)
    before = target.read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_preset(preset_from_dict(_with("training", "seq_len", 64)), target)
    assert target.read_text() == before  # the old file is intact
    assert [f.name for f in tmp_path.iterdir()] == ["p.yaml"]


def test_yaml_is_loaded_safely(tmp_path):
    bad = tmp_path / "evil.yaml"
    bad.write_text("model: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_preset(bad)


def test_broken_yaml_names_the_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  source: x/y\n data: [\n")
    with pytest.raises(UserError, match=r"broken.yaml is not valid YAML at line \d+"):
        load_preset(bad)


def test_every_field_has_help_text():
    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no help text"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")

    walk(Preset)
    assert "truncated" in field_help("training.seq_len")


def test_cli_refuses_a_preset_with_a_typo(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text(yaml.safe_dump(_with("lora", "rank", 8)))
    r = run_cli("--preset", str(p))
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: preset {p}: unknown key 'lora.rank' (did you mean 'r'?)"


def test_cli_missing_preset_file():
    r = run_cli("--preset", "no/such/preset.yaml")
    assert r.returncode == 2
    assert r.stderr.startswith("error: no preset file at no/such/preset.yaml")
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "preset_name,fixture",
    [
        ("llama-3.1-8b-qlora.yaml", "meta-llama__Llama-3.1-8B"),
        ("mistral-7b-qlora.yaml", "mistralai__Mistral-7B-v0.1"),
        ("qwen2.5-7b-qlora.yaml", "Qwen__Qwen2.5-7B"),
    ],
)
def test_shipped_model_presets_fit_the_gpu_their_comment_names(preset_name, fixture, hf_configs, tmp_path):
    """Each popular-model preset says it fits a 16 GB card: hold it to that, with 5 % headroom."""
    from engine.preset import PRESETS_DIR

    text = (PRESETS_DIR / preset_name).read_text()
    assert "fits a 16 GB card" in text
    data = yaml.safe_load(text)
    data["model"]["source"] = str(hf_configs / fixture)
    p = tmp_path / preset_name
    p.write_text(yaml.safe_dump(data))
    r = run_cli("estimate", "--preset", str(p), "--gpu-mem", str(16e9 / 2**30 * 0.95), "--json")
    assert r.returncode == 0, r.stderr
    out = __import__("json").loads(r.stdout)
    assert out["fits"] is True
    claimed = float(text.splitlines()[1].split("memory: ")[1].split(" GiB")[0])
    assert abs(out["total_bytes"] / 2**30 - claimed) < 0.05


def test_every_list_of_choices_comes_from_the_schema():
    """Forms, prompts, argparse and the memory model take their choices from the preset's Literals."""
    from engine import memory
    from engine.preset import choices
    from engine.train import TRANSFORMERS_OPTIMIZER_NAMES
    from tui.cli import build_parser
    from tui.draft import choice_options

    with pytest.raises(UserError) as refused:  # what a person who mistypes it is told
        build_parser().parse_args(["estimate", "x/y", "--optimizer", "adamw"])
    allowed = "', '".join(choices("training.optimizer"))
    assert f"(choose from '{allowed}')" in refused.value.one_line()
    assert choices("training.optimizer") == memory.OPTIMIZERS
    assert memory.QUANTIZATIONS == choices("quantization.method")
    assert set(TRANSFORMERS_OPTIMIZER_NAMES) <= set(choices("training.optimizer"))
    assert [v for _, v in choice_options("quantization.method")] == list(choices("quantization.method"))
    assert dict(choice_options("quantization.method"))["nf4 (QLoRA)"] == "nf4"
