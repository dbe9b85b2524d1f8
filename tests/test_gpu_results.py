"""The estimator against the peaks this engine's own training runs reached on GPUs.

The rows in benchmarks/results/ were measured on a GPU (see benchmarks/GPU-RESULTS.md); this test
recomputes each estimate from the real config on any machine, so the memory model cannot drift
from what was measured. The promise (issue 12): the reserved peak within 10 %, and never under it
by more than 5 % (an under-estimate is an OOM after a long download); the process's nvidia-smi
footprint within 10 % of the total.
"""

from __future__ import annotations

import json

import pytest

from conftest import ROOT
from engine.memory import GIB, MemorySettings, estimate_training_memory
from engine.modelinfo import inspect_model

RESULTS = ROOT / "benchmarks" / "results"
H200_ENGINE = json.loads((RESULTS / "h200-2026-11-27-engine-quoted.json").read_text())
H100_EXPANDABLE = json.loads((RESULTS / "h100-2026-11-23-expandable-segments.json").read_text())
H100_DEFAULT = json.loads((RESULTS / "h100-2026-11-23-default-allocator.json").read_text())
FOLDERS = {"Llama-3.2-1B": "meta-llama__Llama-3.2-1B", "Qwen2.5-0.5B": "Qwen__Qwen2.5-0.5B",
           "Llama-3.1-8B": "meta-llama__Llama-3.1-8B", "Qwen2.5-7B": "Qwen__Qwen2.5-7B"}


def estimate_for(case: str, hf_configs, **kw):
    """The estimate for a gpu_check case NAME:SEQ:MB:ckpt:targets:RANK (LoRA dropout 0.05, AdamW)."""
    name, seq, mb, ckpt, targets, rank = case.split(":")
    info = inspect_model(str(hf_configs / FOLDERS[name]))
    s = MemorySettings(lora_rank=int(rank), lora_targets=() if targets == "all" else ("q_proj", "v_proj"),
                       micro_batch_size=int(mb), seq_len=int(seq), gradient_checkpointing=ckpt == "ckpt",
                       lora_dropout=0.05, optimizer="adamw_torch", **kw)
    return estimate_training_memory(info, s)


@pytest.mark.parametrize("row", H200_ENGINE, ids=[r["case"] for r in H200_ENGINE])
def test_engine_runs_on_the_h200_are_estimated_within_the_promise(row, hf_configs):
    """The engine as shipped: its chunked loss and expandable segments. These rows were 11-37 % over
    when the model kept both the loss's and a layer's backward blocks reserved."""
    est = estimate_for(row["case"], hf_configs, loss_chunk=1024, expandable_segments=True)
    error = est.reserved_bytes / (row["peak_reserved_gib"] * GIB) - 1
    assert -0.05 <= error <= 0.10, f"{row['case']}: {error:+.1%}"
    device_error = est.total_bytes / (row["process_device_gib_derived"] * GIB) - 1
    assert abs(device_error) <= 0.10, f"{row['case']}: device {device_error:+.1%}"


@pytest.mark.parametrize("row", H100_EXPANDABLE, ids=[r["case"] for r in H100_EXPANDABLE])
def test_transformers_loss_runs_with_expandable_segments_stay_close(row, hf_configs):
    """``training.chunked_loss: false`` (transformers' loss over every position), expandable segments:
    the allocated peak to 8 %, the reserved one within 13 % and never more than 5 % under."""
    est = estimate_for(row["case"], hf_configs, expandable_segments=True)
    assert abs(est.allocated_bytes / row["peak_allocated"] - 1) <= 0.08
    error = est.reserved_bytes / row["peak_reserved"] - 1
    assert -0.05 <= error <= 0.13, f"{row['case']}: {error:+.1%}"


@pytest.mark.parametrize("row", H100_DEFAULT, ids=[r["case"] for r in H100_DEFAULT])
def test_default_allocator_runs_keep_both_phases_reserved(row, hf_configs):
    """Without expandable segments the model adds the loss's blocks to the layer's backward's."""
    est = estimate_for(row["case"], hf_configs, expandable_segments=False)
    assert abs(est.allocated_bytes / row["peak_allocated"] - 1) <= 0.08
    assert abs(est.reserved_bytes / row["peak_reserved"] - 1) <= 0.21  # Qwen 512 x4: -20 %, the allocator's worst


def test_the_h200_rows_were_over_by_the_overlap_the_allocator_does_not_keep(hf_configs):
    """What issue 12 found: keeping both phases reserved over-estimated the Qwen runs by about one
    chunk of fp32 logits at a 151,936 vocabulary; modelling expandable segments removes it."""
    row = next(r for r in H200_ENGINE if r["case"].startswith("Qwen2.5-0.5B"))
    both = estimate_for(row["case"], hf_configs, loss_chunk=1024, expandable_segments=False)
    shared = estimate_for(row["case"], hf_configs, loss_chunk=1024, expandable_segments=True)
    assert both.reserved_bytes / (row["peak_reserved_gib"] * GIB) - 1 > 0.30
    assert 1.3 * GIB < both.reserved_bytes - shared.reserved_bytes < 2.0 * GIB
