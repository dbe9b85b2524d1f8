"""The estimator against the peaks this engine's own training runs reached on an H100.

The rows in benchmarks/results/ were measured on a GPU (see benchmarks/GPU-RESULTS.md); this
test recomputes each estimate from the real config on any machine and checks it stays close.
"""

from __future__ import annotations

import json

import pytest

from conftest import ROOT
from engine.memory import MemorySettings, estimate_training_memory
from engine.modelinfo import inspect_model

ROWS = json.loads((ROOT / "benchmarks" / "results" / "h100-2026-11-23-expandable-segments.json").read_text())
FOLDERS = {"Llama-3.2-1B": "meta-llama__Llama-3.2-1B", "Qwen2.5-0.5B": "Qwen__Qwen2.5-0.5B",
           "Llama-3.1-8B": "meta-llama__Llama-3.1-8B"}


def settings_for(case: str) -> MemorySettings:
    """The memory settings of a gpu_check case NAME:SEQ:MB:ckpt:targets:RANK."""
    _, seq, mb, ckpt, targets, rank = case.split(":")
    return MemorySettings(lora_rank=int(rank), lora_targets=() if targets == "all" else ("q_proj", "v_proj"),
                          micro_batch_size=int(mb), seq_len=int(seq), gradient_checkpointing=ckpt == "ckpt",
                          lora_dropout=0.05, optimizer="adamw_torch")


@pytest.mark.parametrize("row", ROWS, ids=[r["case"] for r in ROWS])
def test_estimate_is_within_20_percent_of_the_measured_reserved_peak(row, hf_configs):
    info = inspect_model(str(hf_configs / FOLDERS[row["case"].split(":")[0]]))
    est = estimate_training_memory(info, settings_for(row["case"]))
    assert abs(est.reserved_bytes / row["peak_reserved"] - 1) <= 0.20


def test_median_error_is_within_10_percent():
    errors = sorted(abs(r["reserved_error"]) for r in ROWS)
    assert errors[len(errors) // 2] <= 0.10
