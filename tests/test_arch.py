"""The architecture profile is the one place a family is added: no other module names one it lacks,
and what every module decides per family comes from it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from engine.arch import FUSED_QKV, LAYER_ROLES, LEGACY_MODEL_TYPES, PROFILES, UNKNOWN, family, profile

ROOT = Path(__file__).resolve().parent.parent


def _model_type_literals() -> list[tuple[str, int, str]]:
    """Every string in engine/ and tui/ (outside engine/arch.py) that is a transformers model type."""
    from transformers import CONFIG_MAPPING

    types = set(CONFIG_MAPPING.keys()) | set(LEGACY_MODEL_TYPES)
    found = []
    for path in sorted([*(ROOT / "engine").rglob("*.py"), *(ROOT / "tui").rglob("*.py")]):
        if path == ROOT / "engine" / "arch.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.lower() in types:
                found.append((str(path.relative_to(ROOT)), node.lineno, node.value))
    return found


def test_no_module_names_a_family_that_has_no_profile():
    found = _model_type_literals()
    assert found, "the scan finds the families other modules name (lr's table, the size presets)"
    missing = [f"{path}:{line} names {value!r}" for path, line, value in found if not profile(value).known]
    assert not missing, "add a profile in engine/arch.py for: " + "; ".join(missing)


def test_the_learning_rate_tables_families_are_profiles_families():
    from engine import lr

    families = {p.family for p in PROFILES.values()}
    assert set(lr._FAMILIES) | {"llama"} <= families
    for key in lr._FAMILIES:
        assert lr.family_defaults(key) is not None


def test_every_profile_is_a_model_type_transformers_knows_and_its_choices_agree():
    from transformers import CONFIG_MAPPING

    for model_type, p in PROFILES.items():
        assert model_type in CONFIG_MAPPING, model_type
        assert p.model_type == model_type and p.family and p.examples and p.known
        assert not p.liger or p.own_loss, f"{model_type}: Liger's fused loss is the engine's own loss"
        assert not p.router_aux_loss or p.moe, model_type
        assert p.attention in ("full", "sliding", "alternating"), model_type
    assert profile("gemma3_text").family == profile("gemma3").family == "gemma3"
    assert family("RefinedWebModel") == "falcon" and family("qwen3_moe") == "qwen3"
    assert profile("a_family_from_next_year") is UNKNOWN and family("a_family_from_next_year") == "a_family_from_next_year"


def test_every_module_asks_the_profile():
    """Liger, the loss, the device plan's attention and the memory model follow the profile."""
    from dataclasses import replace

    from engine import arch
    from engine.kernels import liger_supported
    from engine.loss import chunked_loss_applies
    from engine.memory import layer_role
    from engine.plan import plan_device
    from engine.preset import preset_from_dict

    preset = preset_from_dict({"model": {"source": "x"}, "data": {"train": "builtin:demo"}})
    for model_type, p in PROFILES.items():
        assert chunked_loss_applies(model_type) == p.own_loss, model_type
        assert liger_supported(model_type) == p.liger, model_type
        assert (plan_device(preset, [], model_type).attn_implementation == "eager") == p.attention_softcap, model_type
    # A new profile is all it takes: patch one in and every module sees it.
    new = replace(PROFILES["llama"], model_type="llama_next", family="llama_next", liger=False)
    try:
        arch.PROFILES["llama_next"] = new
        assert chunked_loss_applies("llama_next") and not liger_supported("llama_next")
    finally:
        del arch.PROFILES["llama_next"]
    assert not chunked_loss_applies("llama_next")
    for name in FUSED_QKV:
        assert layer_role(name) == "attn_in"
    assert all(layer_role(n) == role for role, names in LAYER_ROLES.items() for n in names)


@pytest.mark.parametrize("model_type", ["persimmon"])
def test_a_family_without_a_profile_is_estimated_conservatively_and_says_so(tmp_path, model_type):
    import json

    from transformers import CONFIG_MAPPING

    from engine.memory import LOSS_BYTES_PER_LOGIT, estimate_training_memory
    from engine.modelinfo import inspect_model
    from engine.plan import memory_settings
    from engine.preset import preset_from_dict

    config = CONFIG_MAPPING[model_type](hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                        num_attention_heads=4, vocab_size=1000)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    info = inspect_model(str(tmp_path))
    assert not profile(info.model_type).known
    preset = preset_from_dict({"model": {"source": str(tmp_path)}, "data": {"train": "builtin:demo"},
                               "training": {"seq_len": 4096, "micro_batch_size": 1}})
    est = estimate_training_memory(info, memory_settings(preset, info))
    assert est.loss_peak_bytes >= LOSS_BYTES_PER_LOGIT * 4096 * 1000  # transformers' loss: every position's logits
    assert any("no profile" in n and "transformers' own loss" in n for n in est.notes), est.notes


def test_inspect_says_what_the_engine_does_with_the_family():
    from conftest import FIXTURES, run_cli

    for p in [*PROFILES.values(), UNKNOWN]:
        assert p.describe()
    r = run_cli("inspect", str(FIXTURES / "google__gemma-2-9b"))
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "family profile gemma2" in text and "the engine's chunked loss with the final soft-cap" in text
    assert "eager attention without flash-attn" in text
    assert UNKNOWN.describe().startswith("no profile")
