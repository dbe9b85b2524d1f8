"""The memory model: its arithmetic on real model shapes, and against peaks measured on an H100."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from conftest import ROOT
from engine.errors import UserError
from engine.memory import (
    BNB_8BIT_STATE_BYTES,
    COMPONENT_DESCRIPTIONS,
    CUDA_CONTEXT_BYTES,
    GIB,
    LOSS_BYTES_PER_LOGIT,
    MemorySettings,
    estimate_training_memory,
    fit,
    lora_tensor_sizes,
    optimizer_state_bytes,
    quantized_bytes_per_param,
    resolve_targets,
)
from engine.modelinfo import ModelInfo, TargetLayer

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_like(name: str, hidden: int, layers: int, heads: int, kv_heads: int, inter: int, vocab: int,
               tied: bool = False, context: int = 4096, dtype: str = "bfloat16",
               weight_bytes: int | None = None) -> ModelInfo:
    """A Llama-architecture ModelInfo built by hand from the numbers in the model's config.json."""
    hd = hidden // heads
    shapes = {"q_proj": (hidden, heads * hd), "k_proj": (hidden, kv_heads * hd), "v_proj": (hidden, kv_heads * hd),
              "o_proj": (heads * hd, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
              "down_proj": (inter, hidden)}
    targets = tuple(TargetLayer(n, i, o, layers, False) for n, (i, o) in shapes.items())
    quantizable = sum(t.weight_params for t in targets)
    embed, head = vocab * hidden, 0 if tied else vocab * hidden
    norms = 2 * hidden * layers + hidden
    return ModelInfo(
        source=name, model_type="llama", architecture="LlamaForCausalLM", hidden_size=hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=inter, vocab_size=vocab, context_length=context, tie_word_embeddings=tied,
        dtype=dtype, params_total=embed + head + quantizable + norms, params_embedding=embed,
        params_head=head, params_blocks=quantizable + 2 * hidden * layers, params_quantizable=quantizable,
        params_other=norms, targets=targets, default_targets=LLAMA_TARGETS,
        weight_bytes=weight_bytes, weight_bytes_source="index" if weight_bytes else "estimate",
        is_moe=False, family="llama",
    )


# Numbers from each model's config.json (tests/fixtures/hf-configs).
LLAMA2_7B = llama_like("meta-llama/Llama-2-7b-hf", 4096, 32, 32, 32, 11008, 32000, dtype="float16",
                       weight_bytes=13_476_839_424)
LLAMA31_8B = llama_like("meta-llama/Llama-3.1-8B", 4096, 32, 32, 8, 14336, 128256, context=131072,
                        weight_bytes=16_060_522_496)
LLAMA32_1B = llama_like("meta-llama/Llama-3.2-1B", 2048, 16, 32, 8, 8192, 128256, tied=True, context=131072)


def settings(**kw) -> MemorySettings:
    """The calibration runs' settings (NF4 + double quant, bf16, SDPA with the packed mask, packing,
    checkpointing, the default caching allocator), r=16 all linear."""
    base = dict(lora_rank=16, lora_targets=LLAMA_TARGETS, micro_batch_size=1, seq_len=2048,
                expandable_segments=False)
    base.update(kw)
    return MemorySettings(**base)


# --- hand-built shapes agree with the published parameter counts -----------------------------


def test_hand_built_models_match_the_published_parameter_counts():
    assert LLAMA2_7B.params_total == 6_738_415_616
    assert LLAMA31_8B.params_total == 8_030_261_248
    assert LLAMA32_1B.params_total == 1_235_814_400


# --- weights ---------------------------------------------------------------------------------


def test_nf4_bytes_per_param_with_and_without_double_quant():
    assert quantized_bytes_per_param("nf4", False) == 0.5625  # 0.5 + 4/64
    dq = quantized_bytes_per_param("nf4", True)
    assert dq == 0.5 + 1 / 64 + 4 / (64 * 256)
    assert round(dq, 6) == 0.515869
    assert quantized_bytes_per_param("fp4", True) == dq


def test_weight_components_follow_the_quantization():
    est = estimate_training_memory(LLAMA31_8B, settings())
    c = est.components
    assert c["quantized_weights"] == math.ceil(6_979_321_856 * quantized_bytes_per_param("nf4", True))
    # embeddings + untied head + norms, in bf16 (never upcast to fp32)
    assert c["unquantized_weights"] == (2 * 525_336_576 + 266_240) * 2
    single = estimate_training_memory(LLAMA31_8B, settings(double_quant=False)).components
    assert single["quantized_weights"] == math.ceil(6_979_321_856 * 0.5625)
    plain = estimate_training_memory(LLAMA31_8B, settings(quantization="none")).components
    assert plain["quantized_weights"] == 0
    assert plain["unquantized_weights"] == 8_030_261_248 * 2


def test_tied_embeddings_count_once():
    c = estimate_training_memory(LLAMA32_1B, settings()).components
    assert c["unquantized_weights"] == (128256 * 2048 + 2 * 2048 * 16 + 2048) * 2


# --- LoRA and the optimizer ------------------------------------------------------------------


def test_lora_params_llama2_7b_r8_on_q_and_v():
    est = estimate_training_memory(LLAMA2_7B, settings(lora_rank=8, lora_targets=("q_proj", "v_proj")))
    assert est.lora_params == 4_194_304
    assert est.components["lora_weights"] == 4 * 4_194_304  # fp32 adapters
    assert est.components["lora_gradients"] == 4 * 4_194_304
    assert est.components["optimizer_states"] == 8 * 4_194_304  # AdamW: exp_avg + exp_avg_sq in fp32


def test_lora_params_llama31_8b_r16_all_linear():
    # 32 layers x 16 x (2 x 8192 + 2 x 5120 + 3 x 18432); peft printed 41,943,040 on the H100 run
    assert estimate_training_memory(LLAMA31_8B, settings()).lora_params == 41_943_040


def test_empty_targets_mean_the_model_defaults():
    a = estimate_training_memory(LLAMA31_8B, settings(lora_targets=()))
    b = estimate_training_memory(LLAMA31_8B, settings())
    assert a.components == b.components


def test_8bit_adam_bytes_per_tensor():
    # Every LoRA tensor of Llama-3.1-8B at r=16 has >= 4096 elements: all 8-bit.
    est = estimate_training_memory(LLAMA31_8B, settings(optimizer="adamw_8bit"))
    assert est.components["optimizer_states"] == int(41_943_040 * BNB_8BIT_STATE_BYTES)
    assert BNB_8BIT_STATE_BYTES == 2 + 8 / 256
    # A tensor under 4096 elements keeps 32-bit states: r=8 on a 256-wide layer is 2048 elements.
    sizes = [(8 * 256, 10), (8 * 1024, 10)]
    device, paged = optimizer_state_bytes(sizes, "adamw_8bit")
    assert paged == 0
    assert device == int(8 * 2048 * 10 + (2 + 8 / 256) * 8192 * 10)


def test_lora_tensors_are_a_and_b_per_module():
    layers = resolve_targets(LLAMA31_8B, ("k_proj", "down_proj"))
    assert lora_tensor_sizes(layers, 16) == [(16 * 4096, 32), (1024 * 16, 32), (16 * 14336, 32), (4096 * 16, 32)]


def test_paged_optimizer_states_are_flagged_and_left_out_of_reserved():
    est = estimate_training_memory(LLAMA31_8B, settings(optimizer="paged_adamw_8bit"))
    # bitsandbytes pages tensors of 1e5+ elements: down_proj's A (16 x 14336) and gate/up's B (14336 x 16)
    assert est.paged
    assert est.paged_bytes == int(3 * 32 * 229_376 * BNB_8BIT_STATE_BYTES)
    assert est.reserved_bytes == est.total_bytes - CUDA_CONTEXT_BYTES - est.paged_bytes
    assert any("managed memory" in n for n in est.notes)
    plain = estimate_training_memory(LLAMA31_8B, settings())
    assert not plain.paged and plain.paged_bytes == 0


# --- activations and the loss ----------------------------------------------------------------


def test_logits_component_is_linear_in_tokens_and_vocabulary():
    one = estimate_training_memory(LLAMA31_8B, settings(micro_batch_size=1)).components["logits_and_loss"]
    four = estimate_training_memory(LLAMA31_8B, settings(micro_batch_size=4)).components["logits_and_loss"]
    assert one == LOSS_BYTES_PER_LOGIT * 2048 * 128256
    assert four == 4 * one
    small_vocab = replace(LLAMA31_8B, vocab_size=128256 // 2)
    assert estimate_training_memory(small_vocab, settings()).components["logits_and_loss"] * 2 == one


def test_llama3_vocabulary_with_8k_tokens_needs_over_4_gb_for_the_loss():
    est = estimate_training_memory(LLAMA31_8B, settings(micro_batch_size=4, seq_len=2048))
    assert est.components["logits_and_loss"] > 4e9
    # more than all the checkpointed activations
    assert est.components["logits_and_loss"] > est.components["activations"]


def test_gradient_checkpointing_reduces_activations():
    on = estimate_training_memory(LLAMA31_8B, settings(gradient_checkpointing=True)).components["activations"]
    off = estimate_training_memory(LLAMA31_8B, settings(gradient_checkpointing=False)).components["activations"]
    assert on * 10 < off
    # with checkpointing: 32 layer inputs of 2048 x 4096 in bf16 plus one layer recomputed
    assert on > 32 * 2 * 2048 * 4096


def test_activations_grow_with_tokens_and_dropout():
    a1 = estimate_training_memory(LLAMA31_8B, settings(gradient_checkpointing=False)).components["activations"]
    a2 = estimate_training_memory(LLAMA31_8B, settings(gradient_checkpointing=False,
                                                       micro_batch_size=2)).components["activations"]
    assert 2 * a1 <= a2 < 2.2 * a1  # linear, plus the packed mask's quadratic term
    d = estimate_training_memory(LLAMA31_8B, settings(gradient_checkpointing=False, lora_dropout=0.05))
    assert d.components["activations"] > a1


def test_eager_attention_stores_the_scores():
    sdpa = estimate_training_memory(LLAMA31_8B, settings(gradient_checkpointing=False, seq_len=4096))
    eager = estimate_training_memory(LLAMA31_8B, settings(gradient_checkpointing=False, seq_len=4096,
                                                          attn_implementation="eager"))
    # fp32 softmax + bf16 copy: 6 bytes x 32 heads x 4096² per layer, 32 layers
    assert eager.components["activations"] - sdpa.components["activations"] > 32 * 6 * 32 * 4096**2 * 0.9
    assert any("eager" in n for n in eager.notes)


# --- totals, counters, JSON ------------------------------------------------------------------


def test_components_add_up_and_counters_nest():
    est = estimate_training_memory(LLAMA31_8B, settings())
    assert list(est.components) == [
        "quantized_weights", "unquantized_weights", "lora_weights", "lora_gradients", "optimizer_states",
        "cublas_workspace", "activations", "logits_and_loss", "allocator_overhead", "cuda_context",
    ]
    # every component is described, in the descriptions' order (which also hold DDP's and FSDP's)
    assert [name for name in COMPONENT_DESCRIPTIONS if name in est.components] == list(est.components)
    assert est.total_bytes == sum(est.components.values())
    assert est.reserved_bytes == est.total_bytes - est.components["cuda_context"]
    assert est.allocated_bytes < est.reserved_bytes < est.total_bytes
    assert all(v >= 0 for v in est.components.values())


def test_to_json_has_stable_keys_and_fits_against_a_budget():
    est = estimate_training_memory(LLAMA31_8B, settings())
    j = est.to_json()
    for key in ("total_bytes", "reserved_bytes", "allocated_bytes", "components", "inference_rule_bytes",
                "fits", "budget_bytes", "lora_params", "notes", "paged", "paged_bytes"):
        assert key in j
    assert j["fits"] is None
    assert est.to_json(24 * GIB)["fits"] is True
    assert est.to_json(8 * GIB)["fits"] is False
    json.dumps(j)


def test_inference_rule_llama2_7b():
    est = estimate_training_memory(LLAMA2_7B, settings())
    assert est.inference_rule_bytes == round(13_476_839_424 * 1.2)
    assert 16.1e9 < est.inference_rule_bytes < 16.2e9  # the guide: 13.5 GB -> 16.2 GB
    unknown = replace(LLAMA2_7B, weight_bytes=None)  # fp16 checkpoint: params x 2 bytes
    assert estimate_training_memory(unknown, settings()).inference_rule_bytes == round(6_738_415_616 * 2 * 1.2)


def test_llama31_8b_qlora_fits_24gb_at_micro_batch_1_but_not_at_8():
    small = estimate_training_memory(LLAMA31_8B, settings())
    assert small.total_bytes < 0.5 * 24 * GIB  # comfortably: about 11 GiB
    large = estimate_training_memory(LLAMA31_8B, settings(micro_batch_size=8))
    assert large.total_bytes > 24 * GIB


# --- measured on an H100 ---------------------------------------------------------------------

# torch.cuda.max_memory_reserved() of three Trainer steps (transformers Trainer, bf16, NF4 + double
# quant, LoRA r=16 alpha=32 on all seven linears, SDPA, DataCollatorWithFlattening, max_grad_norm 1)
# on random-weight models with these configs; H100 80GB, torch 2.11+cu130, transformers 5.17,
# peft 0.21.2, bitsandbytes 0.50.2. (model, micro batch, seq len, checkpointing, optimizer, dropout, bytes)
MEASURED_RESERVED = [
    (LLAMA31_8B, 1, 2048, True, "adamw_torch", 0.05, 11_142_168_576),
    (LLAMA31_8B, 4, 2048, True, "adamw_torch", 0.05, 25_344_081_920),
    (LLAMA31_8B, 2, 4096, True, "adamw_8bit", 0.05, 24_928_845_824),
    (LLAMA31_8B, 1, 2048, False, "adamw_torch", 0.05, 27_342_667_776),
    (LLAMA31_8B, 1, 2048, True, "adamw_torch", 0.0, 11_251_220_480),
    (LLAMA31_8B, 1, 2048, True, "paged_adamw_8bit", 0.05, 10_789_847_040),
    (LLAMA31_8B, 2, 2048, False, "adamw_torch", 0.0, 41_817_210_880),
    (LLAMA31_8B, 1, 8192, True, "adamw_torch", 0.05, 25_109_200_896),  # one example per row: no mask
    (LLAMA2_7B, 1, 2048, True, "adamw_torch", 0.05, 6_658_457_600),
    (LLAMA2_7B, 4, 2048, True, "adamw_torch", 0.05, 12_352_225_280),
    (LLAMA2_7B, 1, 2048, False, "adamw_torch", 0.05, 22_074_621_952),
    (LLAMA2_7B, 1, 4096, True, "adamw_torch", 0.0, 8_598_323_200),
    (LLAMA2_7B, 2, 4096, True, "adamw_8bit", 0.05, 11_997_806_592),  # gradient accumulation 2
    (LLAMA32_1B, 8, 2048, True, "adamw_torch", 0.05, 33_730_592_768),
    (LLAMA32_1B, 1, 2048, False, "adamw_torch", 0.05, 9_609_150_464),
    (LLAMA32_1B, 2, 2048, True, "adamw_torch", 0.05, 9_384_755_200),
]


@pytest.mark.parametrize("info,mb,seq,ckpt,optim,dropout,measured", MEASURED_RESERVED,
                         ids=lambda v: v.source.split("/")[-1] if isinstance(v, ModelInfo) else str(v))
def test_reserved_estimate_is_within_10_percent_of_the_h100_measurement(info, mb, seq, ckpt, optim, dropout,
                                                                         measured):
    s = settings(micro_batch_size=mb, seq_len=seq, gradient_checkpointing=ckpt, optimizer=optim,
                 lora_dropout=dropout)
    est = estimate_training_memory(info, s)
    assert abs(est.reserved_bytes / measured - 1) < 0.10


# The same kind of runs on models built from the fixture configs, read through inspect_model:
# (folder, attention, micro batch, seq len, checkpointing, optimizer, dropout, max_memory_reserved)
MEASURED_RESERVED_FIXTURES = [
    ("Qwen__Qwen2.5-7B", "sdpa", 1, 2048, True, "adamw_torch", 0.05, 11_267_997_696),
    ("Qwen__Qwen2.5-7B", "sdpa", 2, 4096, True, "adamw_8bit", 0.05, 26_721_910_784),
    ("Qwen__Qwen2.5-7B", "sdpa", 1, 2048, False, "adamw_torch", 0.05, 26_824_671_232),
    ("google__gemma-2b", "sdpa", 1, 2048, True, "adamw_torch", 0.05, 10_322_182_144),
    ("google__gemma-2b", "sdpa", 4, 2048, True, "adamw_torch", 0.05, 33_963_376_640),
    ("google__gemma-2b", "sdpa", 1, 2048, False, "adamw_torch", 0.05, 17_727_225_856),
    ("microsoft__phi-2", "sdpa", 2, 2048, True, "adamw_torch", 0.05, 7_606_370_304),  # LayerNorm: fp32 block
    ("microsoft__phi-2", "sdpa", 1, 2048, False, "adamw_torch", 0.05, 22_022_193_152),
    ("meta-llama__Llama-3.2-1B", "eager", 1, 2048, True, "adamw_torch", 0.05, 6_658_457_600),
    ("meta-llama__Llama-3.2-1B", "eager", 1, 2048, False, "adamw_torch", 0.05, 22_731_030_528),
]


@pytest.mark.parametrize("folder,attn,mb,seq,ckpt,optim,dropout,measured", MEASURED_RESERVED_FIXTURES)
def test_reserved_estimate_of_fixture_models_is_within_10_percent_of_the_h100_measurement(
        hf_configs, folder, attn, mb, seq, ckpt, optim, dropout, measured):
    info = _inspect(hf_configs, folder)
    s = MemorySettings(micro_batch_size=mb, seq_len=seq, gradient_checkpointing=ckpt, optimizer=optim,
                       lora_dropout=dropout, attn_implementation=attn,  # r=16 on the default targets
                       expandable_segments=False)  # as these runs were measured
    est = estimate_training_memory(info, s)
    assert abs(est.reserved_bytes / measured - 1) < 0.10


def test_allocated_estimate_matches_the_h100_peak_with_checkpointing():
    # torch.cuda.max_memory_allocated(): 10,001,455,104 (mb 1) and 21,239,216,128 (mb 4); the estimate
    # also counts the LoRA gradients, which with gradient accumulation live through the loss
    for mb, measured in ((1, 10_001_455_104), (4, 21_239_216_128)):
        est = estimate_training_memory(LLAMA31_8B, settings(micro_batch_size=mb, lora_dropout=0.05))
        assert 0 <= est.allocated_bytes / measured - 1 < 0.03


# --- one step of sft, dpo and orpo, measured on the CPU ---------------------------------------

CPU_STEP_RESULTS = ROOT / "benchmarks" / "results" / "cpu-2026-12-06-preference-memory.json"
"""``benchmarks/preference_memory.py``: what one training step added to the resident set of a real
run (the engine's 4-bit model, LoRA and TRL's trainers) on a random-weight Llama with a 32,000-entry
vocabulary, on this project's 2-core CPU; each case beside the estimate's step components."""


def _cpu_step_cases():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from preference_memory import CASES
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    measured = {r["case"]: r["measured_step_bytes"] for r in json.loads(CPU_STEP_RESULTS.read_text())["results"]}
    return [(case, measured[case[0]]) for case in CASES]


def _cpu_step_estimate(folder, case) -> int:
    from engine.modelinfo import inspect_model
    from engine.plan import memory_settings, plan_device
    from engine.preset import preset_from_dict

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from preference_memory import STEP_COMPONENTS, case_preset
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    info = inspect_model(str(folder))
    data = "builtin:demo" if case[1] == "sft" else "builtin:demo-pairs"
    preset = preset_from_dict(case_preset(folder, data, case))
    plan = plan_device(preset, gpus=[], model_type=info.model_type)  # the CPU, as measured
    est = estimate_training_memory(info, memory_settings(preset, info, plan, case[2]))
    return sum(est.components.get(k, 0) for k in STEP_COMPONENTS)


@pytest.fixture(scope="module")
def cpu_step_model(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from preference_memory import MODEL
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    folder = tmp_path_factory.mktemp("llama-32k")
    (folder / "config.json").write_text(json.dumps(MODEL))
    return folder


@pytest.mark.parametrize("case,measured", _cpu_step_cases(), ids=lambda v: v[0] if isinstance(v, tuple) else "")
def test_one_steps_estimate_of_sft_dpo_and_orpo_is_within_5_percent_of_the_cpu_measurement(cpu_step_model, case,
                                                                                          measured):
    """dpo's TRL head holds a tile of logits and, on the CPU, the torch fold's fp32 copies of it (the
    estimate before counted the engine's 12 B a logit and was 63 % under); orpo holds every position's
    logits; the reference pass adds nothing beyond the backward's peak."""
    assert abs(_cpu_step_estimate(cpu_step_model, case) / measured - 1) < 0.05


def test_dpos_reference_each_step_measured_no_more_than_precomputed_and_the_estimate_says_so(cpu_step_model):
    cases = dict((c[0], (c, m)) for c, m in _cpu_step_cases())
    (each, m_each), (pre, m_pre) = cases["dpo-2x512-each"], cases["dpo-2x512-pre"]
    assert abs(m_each / m_pre - 1) < 0.01
    assert _cpu_step_estimate(cpu_step_model, each) == _cpu_step_estimate(cpu_step_model, pre)


# --- fit -------------------------------------------------------------------------------------


def test_fit_returns_the_largest_batch_and_length_that_fit():
    s = settings()
    budget = 24 * GIB
    r = fit(LLAMA31_8B, s, budget)
    assert r.max_micro_batch is not None and r.max_micro_batch >= 1
    at = estimate_training_memory(LLAMA31_8B, replace(s, micro_batch_size=r.max_micro_batch)).total_bytes
    above = estimate_training_memory(LLAMA31_8B, replace(s, micro_batch_size=r.max_micro_batch + 1)).total_bytes
    assert at <= budget < above
    assert r.max_seq_len is not None and r.max_seq_len % 64 == 0
    at = estimate_training_memory(LLAMA31_8B, replace(s, seq_len=r.max_seq_len)).total_bytes
    above = estimate_training_memory(LLAMA31_8B, replace(s, seq_len=r.max_seq_len + 64)).total_bytes
    assert at <= budget < above
    assert r.to_json()["max_micro_batch"] == r.max_micro_batch


def test_fit_reports_none_when_nothing_fits_and_stops_at_the_caps():
    r = fit(LLAMA31_8B, settings(), 4 * GIB)  # the weights alone are 5.3 GiB
    assert r.max_micro_batch is None and r.max_seq_len is None
    huge = fit(LLAMA2_7B, settings(), 10**15)
    assert huge.max_micro_batch == 1024
    assert huge.max_seq_len == 4096  # Llama-2's context length
    beyond = fit(LLAMA2_7B, settings(), 10**15, max_seq_len=16384, seq_len_step=128)
    assert beyond.max_seq_len == 16384


def test_fit_is_fast():
    start = time.perf_counter()
    fit(LLAMA31_8B, settings(), 80 * GIB)
    assert time.perf_counter() - start < 0.5


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    dict(quantization="int8"), dict(compute_dtype="fp8"), dict(load_dtype="int4"), dict(lora_rank=0),
    dict(lora_rank=8.5), dict(lora_rank=True), dict(micro_batch_size=0), dict(seq_len=-1),
    dict(optimizer="sgd"), dict(attn_implementation="flash3"), dict(lora_dropout=1.0),
    dict(lora_dropout=-0.1), dict(gradient_checkpointing="yes"), dict(packing=1), dict(double_quant=None),
    dict(lora_targets="q_proj"), dict(lora_targets=("q_proj", "")),
])
def test_bad_settings_raise_user_error(bad):
    with pytest.raises(UserError):
        settings(**bad)


def test_unknown_target_names_the_models_layers():
    with pytest.raises(UserError) as e:
        estimate_training_memory(LLAMA31_8B, settings(lora_targets=("q_proj", "c_attn")))
    assert "c_attn" in str(e.value) and "gate_proj" in str(e.value)
    with pytest.raises(UserError):
        fit(LLAMA31_8B, settings(lora_targets=("nope",)), 24 * GIB)


def test_bad_budget_raises_user_error():
    with pytest.raises(UserError):
        fit(LLAMA31_8B, settings(), 0)


def test_tokens_per_micro_batch():
    assert settings(micro_batch_size=3, seq_len=1000).tokens_per_micro_batch == 3000


# --- the real configs, through inspect_model --------------------------------------------------


def _inspect(hf_configs, folder):
    modelinfo = pytest.importorskip("engine.modelinfo")
    if not hasattr(modelinfo, "inspect_model"):
        pytest.skip("engine.modelinfo.inspect_model is not there yet")
    return modelinfo.inspect_model(str(hf_configs / folder))


def test_inspected_llama2_7b_lora_params(hf_configs):
    info = _inspect(hf_configs, "meta-llama__Llama-2-7b-hf")
    est = estimate_training_memory(info, settings(lora_rank=8, lora_targets=("q_proj", "v_proj")))
    assert est.lora_params == 4_194_304


def test_inspected_llama31_8b_matches_the_hand_built_shapes(hf_configs):
    info = _inspect(hf_configs, "meta-llama__Llama-3.1-8B")
    a = estimate_training_memory(info, settings())
    b = estimate_training_memory(LLAMA31_8B, settings())
    assert a.components == b.components
    assert a.total_bytes < 0.5 * 24 * GIB


@pytest.mark.parametrize("folder", [
    "meta-llama__Llama-2-7b-hf", "meta-llama__Meta-Llama-3-8B", "meta-llama__Llama-3.1-8B",
    "meta-llama__Llama-3.2-1B", "mistralai__Mistral-7B-v0.1", "mistralai__Mixtral-8x7B-v0.1",
    "Qwen__Qwen2.5-7B", "Qwen__Qwen2.5-0.5B", "google__gemma-2b", "google__gemma-2-9b", "microsoft__phi-2",
    "openai-community__gpt2", "EleutherAI__gpt-j-6b", "TinyLlama__TinyLlama-1.1B-Chat-v1.0",
])
def test_every_fixture_model_gets_a_sane_estimate(hf_configs, folder):
    info = _inspect(hf_configs, folder)
    s = MemorySettings(seq_len=512)  # the model's default targets
    est = estimate_training_memory(info, s)
    c = est.components
    assert est.lora_params > 0
    assert c["quantized_weights"] + c["unquantized_weights"] < info.params_total * 2
    assert c["activations"] > 0 and est.loss_peak_bytes == 12 * 512 * info.vocab_size
    assert est.total_bytes == sum(c.values())
    r = fit(info, s, 80 * GIB)
    if est.total_bytes <= 80 * GIB:
        assert r.max_micro_batch is not None and r.max_micro_batch >= 1


def test_mixtral_notes_the_expert_approximation(hf_configs):
    info = _inspect(hf_configs, "mistralai__Mixtral-8x7B-v0.1")
    est = estimate_training_memory(info, MemorySettings(seq_len=512))
    assert any("mixture of experts" in n for n in est.notes)


# --- no heavy imports ------------------------------------------------------------------------


def test_memory_lr_gpu_import_no_torch_or_pynvml():
    code = ("import sys, engine.memory, engine.lr, engine.gpu\n"
            "print([m for m in ('torch', 'transformers', 'pynvml', 'textual', 'rich') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_mixtral_says_what_is_and_is_not_modelled(hf_configs):
    info = _inspect(hf_configs, "mistralai__Mixtral-8x7B-v0.1")
    note = next(n for n in estimate_training_memory(info, MemorySettings(seq_len=512)).notes if "mixture" in n)
    assert "not modelled" in note and "+-20 %" in note


def test_vision_language_models_are_stated_never_silently_estimated(tmp_path):
    """A VLM transformers loads as a causal LM gets an estimate that says it is text-only; one it
    does not is refused with one line naming what is not modelled."""
    import json

    from transformers import CONFIG_MAPPING

    from engine.errors import UserError
    from engine.modelinfo import inspect_model

    gemma3 = tmp_path / "gemma3"
    gemma3.mkdir()
    (gemma3 / "config.json").write_text(json.dumps(CONFIG_MAPPING["gemma3"]().to_dict()))
    info = inspect_model(str(gemma3))
    assert info.vision
    notes = estimate_training_memory(info, MemorySettings(seq_len=512)).notes
    assert any("text-only training" in n and "images and their activations are not modelled" in n for n in notes)

    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "config.json").write_text(json.dumps(CONFIG_MAPPING["llava"]().to_dict()))
    with pytest.raises(UserError, match="is a vision-language model .*neither its vision tower nor image data"):
        inspect_model(str(llava))
