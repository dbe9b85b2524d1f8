"""The throughput model and the fastest settings that fit: the recorded H200 runs reproduced, the
effective batch kept, and what is chosen for the Llama-3.1-8B config on GPUs of 80, 24 and 16 GB."""

from __future__ import annotations

from dataclasses import replace

import pytest

from conftest import FIXTURES
from engine import speed
from engine.errors import UserError
from engine.memory import GIB, MemorySettings, estimate_training_memory
from engine.modelinfo import inspect_model
from engine.plan import memory_settings
from engine.preset import preset_from_dict

H100 = "NVIDIA H100 80GB HBM3"
LLAMA_8B = "meta-llama__Llama-3.1-8B"


@pytest.fixture(scope="module")
def infos():
    """ModelInfo of every config a record ran, and of the 8B."""
    names = {r.config for r in speed.SPEED_RECORDS} | {LLAMA_8B}
    return {name: inspect_model(str(FIXTURES / name)) for name in names}


def settings_8b(info, **training) -> MemorySettings:
    """The memory settings the wizard and ``estimate`` use for the 8B at 2048 tokens (schema defaults;
    without Liger's kernels, whose lower memory lets more fit, so the choice is the same on every machine)."""
    preset = preset_from_dict({"model": {"source": str(FIXTURES / LLAMA_8B)}, "data": {"train": "builtin:demo"},
                               "training": {"seq_len": 2048, "micro_batch_size": 1, "fused_kernels": "off",
                                            **training}})
    return memory_settings(preset, info)


# --- The model against the records ---------------------------------------------------------------


def test_records_are_reproduced_within_the_stated_factor_and_in_their_order(infos):
    got = speed.residuals(infos)
    for config, ratio in got.items():
        assert 1 / speed.RECORD_FACTOR <= ratio <= speed.RECORD_FACTOR, (config, ratio)
        assert ratio == pytest.approx(speed.RESIDUALS[config], abs=0.002)  # the documented residuals
    modelled = {r.config: r.tokens_per_s * got[r.config] for r in speed.SPEED_RECORDS}
    measured = {r.config: r.tokens_per_s for r in speed.SPEED_RECORDS}
    assert sorted(modelled, key=modelled.get) == sorted(measured, key=measured.get)


def test_the_constants_are_the_fit_of_the_records(infos):
    eff, per_launch, per_step = speed.fit_constants(infos)
    assert speed.GPU_EFFICIENCY == pytest.approx(eff, rel=0.02)
    assert speed.HOST_S_PER_LAUNCH == pytest.approx(per_launch, rel=0.02)
    assert speed.STEP_HOST_S == pytest.approx(per_step, abs=0.01)


def test_the_records_mfu_is_the_bench_formula(infos):
    """Each record's MFU is (4 N_frozen_matmul + 6 N_lora + causal attention) x tokens/s / 782e12."""
    for r in speed.SPEED_RECORDS:
        info = infos[r.config]
        frozen = sum(t.weight_params for t in info.targets) + info.hidden_size * info.vocab_size
        lora = sum(t.lora_params(r.lora_rank) for t in info.targets)
        attention = 12 * info.num_hidden_layers * info.target("q_proj").out_features * (r.mean_len + 1) / 2
        mfu = (4 * frozen + 6 * lora + attention) * r.tokens_per_s / speed.MEASURED_MATMUL_FLOPS
        assert mfu == pytest.approx(r.mfu, abs=0.0015), r.config


def test_the_host_bound_records_are_host_bound_in_the_model(infos):
    """The 1B run kept the GPU mostly idle; the 16,384-token 7B run kept it busy."""
    by_name = {r.config: r for r in speed.SPEED_RECORDS}
    for name, host_bound in (("meta-llama__Llama-3.2-1B", True), ("Qwen__Qwen2.5-7B", False)):
        r, info = by_name[name], infos[name]
        t = speed.step_time(info, speed.record_settings(r, info), mean_len=r.mean_len, gpu="NVIDIA H200")
        assert t.host_bound is host_bound, name


# --- What the model ranks --------------------------------------------------------------------------


def test_checkpointing_off_is_faster_and_bigger_micro_batches_amortise_the_host(infos):
    info = infos["meta-llama__Llama-3.2-1B"]
    base = MemorySettings(lora_targets=tuple(info.default_targets), seq_len=1024)

    def tps(**kw):
        return speed.step_time(info, replace(base, **kw), mean_len=300, gpu=H100).tokens_per_s

    assert tps(gradient_checkpointing=False) > tps(gradient_checkpointing=True)
    assert tps(micro_batch_size=1) < tps(micro_batch_size=2) < tps(micro_batch_size=8)


def test_packed_sdpa_rows_cost_more_per_token_as_they_grow_flash_attention_does_not(infos):
    info = infos[LLAMA_8B]
    s = settings_8b(info, gradient_checkpointing=False)

    def tps(micro, attn):  # an effective batch of 16 either way
        t = speed.step_time(info, replace(s, micro_batch_size=micro, attn_implementation=attn),
                            gradient_accumulation_steps=16 // micro, gpu=H100)
        return t.tokens_per_s

    assert tps(8, "sdpa") < tps(2, "sdpa")
    assert tps(8, "flash_attention_2") >= tps(2, "flash_attention_2")


def test_tokens_per_micro_batch_are_micro_batch_times_the_mean_length_capped_by_seq_len(infos):
    info = infos[LLAMA_8B]
    s = settings_8b(info, micro_batch_size=4)
    assert speed.step_time(info, s, mean_len=500).tokens_per_micro_batch == 2000
    assert speed.step_time(info, s, mean_len=5000).tokens_per_micro_batch == 4 * 2048
    assert speed.step_time(info, s).tokens_per_micro_batch == 4 * 2048


def test_gpu_names_find_their_datasheet_rate():
    assert speed.gpu_rate("NVIDIA H100 80GB HBM3").spec_flops == 989e12
    assert speed.gpu_rate("NVIDIA H100 PCIe").spec_flops == 756e12
    assert speed.gpu_rate("NVIDIA A100-SXM4-80GB").spec_flops == 312e12
    assert speed.gpu_rate("NVIDIA L40S").spec_flops == 362e12
    assert speed.gpu_rate("NVIDIA L4").spec_flops == 121e12
    unknown = speed.gpu_rate("Some Future GPU")
    assert not unknown.known and unknown.spec_flops == speed.H100_SPEC_FLOPS
    assert "an H100-class GPU (Some Future GPU, not in the table" in unknown.label
    assert "no GPU named" in speed.gpu_rate(None).label


# --- The search ------------------------------------------------------------------------------------


@pytest.mark.parametrize("micro,accum", [(1, 16), (4, 3), (7, 1), (1, 1), (2, 30)])
def test_every_candidate_keeps_the_effective_batch_exactly(infos, micro, accum):
    info = infos[LLAMA_8B]
    result = speed.fastest_fit(info, settings_8b(info, micro_batch_size=micro), 79 * GIB,
                               gradient_accumulation_steps=accum, mean_len=700, gpu=H100)
    assert result.effective_batch == micro * accum
    for c in (result.choice, *result.alternatives):
        assert c.micro_batch_size * c.gradient_accumulation_steps == micro * accum
        assert c.fits and c.total_bytes <= result.usable_bytes
    assert result.usable_bytes == int(79 * GIB * (1 - speed.FIT_MARGIN))
    shown = [c.tokens_per_s for c in result.alternatives]
    assert shown == sorted(shown, reverse=True)
    assert result.choice.tokens_per_s >= shown[0] * (1 - speed.TIE_SHARE) if shown else True


def test_the_choice_is_the_fastest_that_fits_and_its_estimate_is_the_memory_models(infos):
    info = infos[LLAMA_8B]
    s = settings_8b(info)
    result = speed.fastest_fit(info, s, 79 * GIB, gradient_accumulation_steps=16, gpu=H100)
    c = result.choice
    est = estimate_training_memory(info, replace(s, micro_batch_size=c.micro_batch_size,
                                                 gradient_checkpointing=c.gradient_checkpointing))
    assert c.total_bytes == est.total_bytes
    # No other split that fits is modelled faster (beyond the tie share).
    assert all(a.tokens_per_s <= c.tokens_per_s * (1 + speed.TIE_SHARE) for a in result.alternatives)


def test_8b_on_an_80gb_h100_turns_checkpointing_off_with_a_micro_batch_above_1(infos):
    info = infos[LLAMA_8B]
    result = speed.fastest_fit(info, settings_8b(info), 79 * GIB, gradient_accumulation_steps=16, gpu=H100)
    c = result.choice
    assert c.gradient_checkpointing is False and c.micro_batch_size > 1
    assert c.micro_batch_size * c.gradient_accumulation_steps == 16
    reasons = "\n".join(result.reasons)
    assert "checkpointing off: fits with" in reasons and "saves the recompute" in reasons
    assert f"micro batch {c.micro_batch_size} x accumulation {c.gradient_accumulation_steps} keeps your " \
           "effective batch of 16" in reasons
    assert "your settings (checkpointing on, micro batch 1 x accumulation 16) are modelled at" in reasons
    assert result.summary.startswith(f"checkpointing off, micro batch {c.micro_batch_size} x accumulation")


@pytest.mark.parametrize("budget", [16e9, 24e9, 23 * GIB])
def test_8b_on_16gb_and_24gb_keeps_checkpointing_on(infos, budget):
    info = infos[LLAMA_8B]
    result = speed.fastest_fit(info, settings_8b(info), int(budget), gradient_accumulation_steps=16, gpu=H100)
    assert result.choice.gradient_checkpointing is True
    assert result.choice.micro_batch_size * result.choice.gradient_accumulation_steps == 16
    assert "checkpointing on: without it even micro batch 1 needs" in result.reasons[0]


def test_the_data_lengths_are_used_and_said(infos):
    info = infos[LLAMA_8B]
    known = speed.fastest_fit(info, settings_8b(info), 79 * GIB, gradient_accumulation_steps=16, mean_len=400)
    assert known.lengths_known and known.mean_len == 400
    assert any("the data's mean example of 400 tokens" in r for r in known.reasons)
    unknown = speed.fastest_fit(info, settings_8b(info), 79 * GIB, gradient_accumulation_steps=16)
    assert not unknown.lengths_known
    assert any("every example is taken as 2,048 tokens" in r for r in unknown.reasons)
    # Short examples leave room for a bigger micro batch before the GPU is busy.
    assert known.choice.micro_batch_size >= unknown.choice.micro_batch_size


def test_when_nothing_fits_it_says_so(infos):
    info = infos[LLAMA_8B]
    result = speed.fastest_fit(info, settings_8b(info), 4 * GIB, gradient_accumulation_steps=16, gpu=H100)
    assert not result.found and result.choice is None and result.alternatives == ()
    smallest = estimate_training_memory(info, settings_8b(info)).total_bytes
    assert result.reasons[0] == (f"nothing fits in 3.6 GiB (4.0 GiB less the 10% margin): even micro batch 1 with "
                                 f"checkpointing on needs {smallest / GIB:,.1f} GiB")
    assert result.summary.startswith("nothing fits in 3.6 GiB")
    out = result.to_json()
    assert out["found"] is False and out["choice"] is None and out["current"]["fits"] is False


@pytest.mark.parametrize("kwargs,message", [
    ({"budget_bytes": 0}, "memory budget must be a positive number"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be a whole number"),
    ({"margin": 1.0}, "memory margin must be a share"),
    ({"mean_len": -5}, "mean example length must be a number of tokens above 0"),
])
def test_bad_arguments_are_user_errors(infos, kwargs, message):
    info = infos[LLAMA_8B]
    args = {"budget_bytes": 79 * GIB, **kwargs}
    with pytest.raises(UserError, match=message):
        speed.fastest_fit(info, settings_8b(info), args.pop("budget_bytes"), **args)
