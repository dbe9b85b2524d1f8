"""The benchmark's model-FLOPs count (the numerator of its MFU), against arithmetic by hand from a
real config: 4 x frozen matmul weights + 6 x LoRA weights + attention, per real token."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import FIXTURES as CONFIGS
from conftest import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flops_per_token_of_llama_3_2_1b_is_the_hand_count():
    cfg = json.loads((CONFIGS / "meta-llama__Llama-3.2-1B" / "config.json").read_text())
    h, m, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    # q, k, v, o, gate, up, down: (in, out)
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, m), (h, m), (m, h)]
    frozen = L * sum(i * o for i, o in shapes) + h * cfg["vocab_size"]  # the head's matmul, tied or not
    r = 16
    lora = L * sum(r * (i + o) for i, o in shapes)
    lengths = [100, 300]
    ctx = (100 * 101 / 2 + 300 * 301 / 2) / 400
    attention = 12 * L * q * ctx

    got = _bench().flops_per_token(CONFIGS / "meta-llama__Llama-3.2-1B", r, lengths)
    assert got["n_frozen_matmul"] == frozen == 1_235_746_816
    assert got["n_lora"] == lora == 11_272_192
    assert got["attention"] == pytest.approx(attention)
    assert got["flops_per_token"] == pytest.approx(4 * frozen + 6 * lora + attention)
