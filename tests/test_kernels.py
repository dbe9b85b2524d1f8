"""Which attention and loss kernels a run gets, per machine, and what the memory model makes of them.

Packed rows never go through transformers' dense block mask (issue 11): the kernel chosen for a
packed run is flash-attn's varlen, PyTorch's varlen, or SDPA once per example. Liger runs only on
CUDA where installed, for the architectures it patches; asked for where it cannot run, it is an
error. The equal-loss proof of the packed kernel on the CPU is in test_train.py.
"""

from __future__ import annotations

import pytest

from engine.attention import PACKED_SDPA, VARLEN_TORCH, describe_kernel, torch_varlen_supported
from engine.errors import UserError
from engine.gpu import GpuInfo
from engine.kernels import liger_decision
from engine.memory import GIB, MemorySettings, estimate_training_memory
from engine.modelinfo import inspect_model
from engine.plan import plan_device
from engine.preset import preset_from_dict

H100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", 80 * GIB, 79 * GIB, (9, 0))
T4 = GpuInfo(0, "Tesla T4", 15 * GIB, 14 * GIB, (7, 5))


def preset(**training):
    return preset_from_dict({"model": {"source": "builtin:tiny-llama"}, "data": {"train": "builtin:demo"},
                             "training": training})


@pytest.mark.parametrize("gpus", [[], [H100], [T4]], ids=["cpu", "h100", "t4"])
def test_packed_rows_never_get_the_dense_mask(gpus, monkeypatch):
    monkeypatch.setattr("engine.gpu.flash_attn_available", lambda: False)
    plan = plan_device(preset(packing=True), gpus, "llama")
    assert plan.attn_implementation in (PACKED_SDPA, VARLEN_TORCH)
    if gpus == [T4]:  # flash kernels need Ampere
        assert plan.attn_implementation == PACKED_SDPA
    if gpus == [H100]:
        want = VARLEN_TORCH if torch_varlen_supported((9, 0)) else PACKED_SDPA
        assert plan.attn_implementation == want
    assert plan.kernels_note.startswith(describe_kernel(plan.attn_implementation))
    assert "no mask" in plan.kernels_note


def test_flash_attn_is_preferred_where_installed_and_padding_keeps_sdpa(monkeypatch):
    monkeypatch.setattr("engine.gpu.flash_attn_available", lambda: True)
    assert plan_device(preset(packing=True), [H100], "llama").attn_implementation == "flash_attention_2"
    assert plan_device(preset(packing=False), [T4], "llama").attn_implementation == "sdpa"
    monkeypatch.setattr("engine.gpu.flash_attn_available", lambda: False)
    # a person who asks for sdpa by name gets it without the mask for packed rows
    p = preset_from_dict({"model": {"source": "builtin:tiny-llama", "attn_implementation": "sdpa"},
                          "data": {"train": "builtin:demo"}})
    assert plan_device(p, [T4], "llama").attn_implementation == PACKED_SDPA


def test_liger_runs_only_on_cuda_where_installed_for_the_models_it_patches():
    assert liger_decision("auto", "cuda", "llama", installed=True) == (
        True, "Liger Kernel: fused RMSNorm, RoPE, SwiGLU and linear cross-entropy")
    on, why = liger_decision("auto", "cpu", "llama", installed=True)
    assert not on and "CUDA GPUs only" in why
    on, why = liger_decision("auto", "cuda", "phi", installed=True)
    assert not on and "phi" in why
    on, why = liger_decision("auto", "cuda", "llama", installed=False)
    assert not on and "pip install 'qlora-wizard[gpu]'" in why
    on, why = liger_decision("auto", "cuda", "llama", own_loss=False, installed=True)
    assert not on and "chunked_loss: false" in why
    assert liger_decision("off", "cuda", "llama", installed=True)[0] is False


def test_asking_for_liger_where_it_cannot_run_is_one_clear_error():
    with pytest.raises(UserError, match="CUDA GPUs only") as e:
        liger_decision("liger", "cpu", "llama", installed=True)
    assert "fused_kernels to auto or off" in str(e.value)
    with pytest.raises(UserError, match="not installed"):
        liger_decision("liger", "cuda", "llama", installed=False)
    with pytest.raises(UserError, match="CUDA GPUs only"):  # the plan on this CPU says the same
        plan_device(preset(fused_kernels="liger"), [], "llama")


def test_an_estimate_for_a_gpu_elsewhere_takes_the_asked_for_liger_as_installed(hf_configs):
    from engine.plan import assumed_gpu, memory_settings

    p = preset(fused_kernels="liger", seq_len=2048)
    info = inspect_model(str(hf_configs / "meta-llama__Llama-3.1-8B"))
    plan = assumed_gpu(p, info.model_type)
    assert plan.liger
    assert memory_settings(p, info, plan).liger


def test_the_memory_model_follows_the_kernels_that_run(hf_configs):
    info = inspect_model(str(hf_configs / "meta-llama__Llama-3.1-8B"))
    base = dict(micro_batch_size=4, seq_len=4096, gradient_checkpointing=False, loss_chunk=1024)
    dense = estimate_training_memory(info, MemorySettings(attn_implementation="sdpa", **base))
    packed = estimate_training_memory(info, MemorySettings(attn_implementation=PACKED_SDPA, **base))
    varlen = estimate_training_memory(info, MemorySettings(attn_implementation=VARLEN_TORCH, **base))
    liger = estimate_training_memory(info, MemorySettings(attn_implementation=VARLEN_TORCH, liger=True, **base))
    tokens, layers = 4 * 4096, info.num_hidden_layers
    # the dense mask (bf16, saved per layer) and k/v repeated to all 32 heads are gone
    mask = 2 * tokens * tokens * layers + tokens * tokens
    repeated_kv = 2 * 2 * (4096 - 1024) * tokens * layers
    saved = dense.components["activations"] - packed.components["activations"]
    assert mask + repeated_kv <= saved <= 1.05 * (mask + repeated_kv)
    assert varlen.total_bytes == packed.total_bytes
    # Liger: no fp32 logits at the loss, the norms' input kept in bf16, the MLP saves gate and up
    assert liger.loss_peak_bytes < 0.5 * varlen.loss_peak_bytes
    assert liger.components["activations"] < varlen.components["activations"]
    assert any("Liger Kernel" in n for n in liger.notes)


def test_planning_a_gpu_run_does_not_import_torch():
    """The wizard plans on its UI thread: whether PyTorch has a varlen kernel is read, not imported."""
    import subprocess
    import sys

    from conftest import ROOT

    code = "\n".join([
        "import sys",
        "from engine.attention import torch_varlen_supported",
        "planned = torch_varlen_supported((9, 0))",
        "imported = 'torch' in sys.modules",
        "import torch",
        "from engine.attention import _varlen_function",
        "print(planned, imported, planned == (_varlen_function() is not None))",
    ])
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    _, imported_before, agrees = out.stdout.split()
    assert imported_before == "False" and agrees == "True"


def test_per_example_sdpa_keeps_a_sliding_window_exact():
    """Mistral-style sliding windows: an example longer than the window sees only the last `window`
    tokens, in the packed kernel as in transformers' own masked path."""
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    from engine.attention import PACKED_BOUNDS_KEY, register_kernels

    register_kernels()
    config = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=50, sliding_window=5, use_cache=False)
    torch.manual_seed(0)
    lengths = (12, 4, 9)
    ids = [torch.randint(0, 50, (n,)) for n in lengths]

    def model(attn):
        torch.manual_seed(1)
        config._attn_implementation = attn
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()

    with torch.no_grad():
        alone = [model("sdpa")(input_ids=x[None]).logits[0] for x in ids]
        bounds = (0, 12, 16, 25)
        packed = model(PACKED_SDPA)(input_ids=torch.cat(ids)[None],
                                    position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
                                    **{PACKED_BOUNDS_KEY: bounds}).logits[0]
    for (a, b), want in zip(zip(bounds[:-1], bounds[1:]), alone):
        torch.testing.assert_close(packed[a:b], want, atol=1e-5, rtol=1e-4)


def test_a_varlen_kernel_that_fails_its_check_hands_over_to_per_example_sdpa_and_says_why():
    """At the start of a GPU run PyTorch's varlen kernel is checked against per-example SDPA; where
    it cannot run (here: no GPU at all) the run uses per-example SDPA and the start event says why."""
    from engine.train import _checked_plan

    plan = plan_device(preset(packing=True), [H100], "llama")
    if plan.attn_implementation != VARLEN_TORCH:
        pytest.skip("this torch has no varlen kernel with grouped heads")
    checked = _checked_plan(plan)
    assert checked.attn_implementation == PACKED_SDPA
    assert checked.kernels_note.startswith(
        "SDPA per example (packed rows, no mask), because PyTorch's varlen kernel failed its check on this GPU (")
    assert checked.kernels_note.endswith(plan.kernels_note.split("; ", 1)[1])
