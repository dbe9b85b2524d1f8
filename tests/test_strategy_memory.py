"""Memory per GPU on several GPUs (DDP and FSDP), the largest reference model that fits on N cards,
and what ``estimate --gpus N --strategy ...``, the memory step and the plain wizard say of them.

Nothing here has been measured on GPUs yet: the tests hold the arithmetic to what the module
docstrings say DDP and FSDP keep on each GPU, and the front ends to saying it."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from conftest import run_cli
from engine.distributed import World
from engine.errors import UserError
from engine.gpu import GpuInfo
from engine.memory import (
    COMPONENT_DESCRIPTIONS,
    GIB,
    NCCL_BUFFER_BYTES,
    MemorySettings,
    estimate_training_memory,
    fit,
)
from engine.modelinfo import inspect_model
from engine.sizes import REFERENCE_MODELS, largest_fitting, largest_words, reference_info

LLAMA31_8B = "meta-llama__Llama-3.1-8B"
TEST_GPUS = [GpuInfo(i, "Test GPU 24GB", 24 * 2**30, 23 * 2**30, (8, 9)) for i in range(2)]
"""Two 24 GiB cards, as the wizard tests pretend to have one."""
FOUR_GPUS = [GpuInfo(i, "Test GPU 24GB", 24 * 2**30, 23 * 2**30, (8, 9)) for i in range(4)]
"""Four of them: where FSDP's sharding outweighs what it adds (gathered layers, the root unit,
transformers' whole-sequence loss instead of the engine's chunked one) for an 8B model."""


@pytest.fixture(scope="module")
def llama8b(hf_configs):
    """Llama-3.1-8B's facts, read from its real config."""
    return inspect_model(str(hf_configs / LLAMA31_8B))


def settings(**kw) -> MemorySettings:
    """The memory tests' calibration settings: NF4 + double quant, bf16, r=16 on all linear layers."""
    return MemorySettings(**{"lora_rank": 16, "seq_len": 2048, "expandable_segments": False, **kw})


def per_gpu(info, strategy: str, n: int, **kw):
    return estimate_training_memory(info, settings(strategy=strategy, world_size=n, **kw))


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


# --- the arithmetic ---------------------------------------------------------------------------


def test_fsdp_per_gpu_total_falls_with_the_gpus_and_is_below_ddp(llama8b):
    single = per_gpu(llama8b, "single", 1).total_bytes
    fsdp = {n: per_gpu(llama8b, "fsdp", n).total_bytes for n in (1, 2, 4, 8)}
    ddp = {n: per_gpu(llama8b, "ddp", n).total_bytes for n in (2, 4, 8)}
    assert fsdp[1] == single  # FSDP on one GPU is NO_SHARD: nothing gathered, nothing duplicated
    assert fsdp[2] > fsdp[4] > fsdp[8]
    for n in (2, 4, 8):
        assert fsdp[n] < ddp[n]  # same NCCL buffers, but the model is split
    assert fsdp[4] < single and fsdp[8] < single
    # At 2 GPUs an 8B with a 128k vocabulary gains nothing: the root unit's extra shard (embeddings and
    # head, 0.98 GiB), two gathered layers and NCCL's buffers cost what halving the blocks saves.
    assert abs(fsdp[2] - single) < 0.1 * GIB
    assert single - fsdp[8] > 2 * GIB


def test_ddp_is_single_plus_exactly_its_buckets_and_nccl(llama8b):
    one = per_gpu(llama8b, "single", 1)
    for n in (2, 8):
        est = per_gpu(llama8b, "ddp", n)
        c = dict(est.components)
        assert c.pop("ddp_buckets") == 4 * est.lora_params  # a second fp32 copy of the adapters' gradients
        assert c.pop("communication") == NCCL_BUFFER_BYTES
        assert c == one.components
        assert est.total_bytes == one.total_bytes + 4 * est.lora_params + NCCL_BUFFER_BYTES
        # NCCL allocates outside torch: the reserved peak counts the buckets, not the buffers
        assert est.reserved_bytes == one.reserved_bytes + 4 * est.lora_params
        assert est.sharded == () and "ddp_buckets" in est.replicated
    assert per_gpu(llama8b, "ddp", 1).total_bytes == one.total_bytes  # one process: no DDP at all


def test_fsdp_sharded_components_divide_and_the_rest_stays(llama8b):
    whole = per_gpu(llama8b, "fsdp", 1).components
    root = whole["root_weights"]
    for n in (2, 4, 8):
        est = per_gpu(llama8b, "fsdp", n)
        c = est.components
        assert est.sharded == ("block_weights", "lora_weights", "lora_gradients", "optimizer_states")
        for name in est.sharded:
            assert c[name] == math.ceil(whole[name] / n), name
        assert sum(c[k] for k in est.sharded) * n == pytest.approx(sum(whole[k] for k in est.sharded), abs=n * 8)
        assert c["root_weights"] == root + math.ceil(root / n)  # gathered whole all step, plus its shard
        for name in ("quantization_scales", "activations", "logits_and_loss", "cublas_workspace", "cuda_context"):
            assert c[name] == whole[name], name
        assert c["communication"] == NCCL_BUFFER_BYTES
        # two layers' 4-bit data and norms (+ adapters) gathered, one layer's adapter gradients unsharded
        layer = (whole["block_weights"] + whole["lora_weights"]) / 32
        assert c["gathered_layers"] == pytest.approx(2 * layer + whole["lora_gradients"] / 32, abs=2)
        assert set(est.replicated) == set(c) - set(est.sharded)
        assert [k for k in COMPONENT_DESCRIPTIONS if k in c] == list(c)


def test_fsdp_keeps_the_4bit_scales_whole_and_shards_the_4bit_data(llama8b):
    one = per_gpu(llama8b, "single", 1).components
    c = per_gpu(llama8b, "fsdp", 1).components
    assert c["block_weights"] + c["quantization_scales"] + c["root_weights"] == (
        one["quantized_weights"] + one["unquantized_weights"])
    assert c["quantization_scales"] == pytest.approx(llama8b.params_quantizable * (1 / 64 + 4 / (64 * 256)), abs=1)
    plain = per_gpu(llama8b, "fsdp", 4, quantization="none").components
    assert plain["quantization_scales"] == 0
    assert plain["block_weights"] == math.ceil(llama8b.params_blocks * 2 / 4)


def test_estimate_says_per_gpu_the_strategy_and_what_is_sharded(llama8b):
    est = per_gpu(llama8b, "fsdp", 4)
    note = next(n for n in est.notes if n.startswith("per GPU"))
    assert "4 GPUs" in note and "FSDP" in note and "sharded 1/4" in note and "no multi-GPU run has been measured" in note
    j = est.to_json(24 * GIB)
    assert (j["strategy"], j["world_size"]) == ("fsdp", 4)
    assert j["sharded"] == list(est.sharded) and "activations" in j["replicated"]
    assert j["total_bytes"] == sum(j["components"].values())
    json.dumps(j)
    words = est.sharing_words()
    assert words.startswith("sharded (1/4 on each GPU): block weights, lora weights")
    assert "replicated (whole on each GPU): quantization scales, root weights" in words
    one = per_gpu(llama8b, "single", 1)
    assert (one.to_json()["sharded"], one.to_json()["replicated"], one.sharing_words()) == ([], [], "")
    assert not any(n.startswith("per GPU") for n in one.notes)
    ddp = per_gpu(llama8b, "ddp", 2)
    assert "DDP" in next(n for n in ddp.notes if n.startswith("per GPU"))
    assert ddp.sharing_words().startswith("sharded (1/2 on each GPU): nothing; replicated")


def test_fit_and_the_speed_model_work_per_gpu(llama8b):
    from engine.speed import fastest_fit

    s = settings(strategy="fsdp", world_size=8)
    assert fit(llama8b, s, 24 * GIB).max_micro_batch >= fit(llama8b, settings(), 24 * GIB).max_micro_batch
    assert fastest_fit(llama8b, s, 24 * GIB, gradient_accumulation_steps=4).found


@pytest.mark.parametrize("bad", [dict(strategy="zero3"), dict(world_size=0), dict(world_size=True),
                                 dict(strategy="single", world_size=2)])
def test_bad_strategy_settings_raise_user_error(bad):
    with pytest.raises(UserError):
        MemorySettings(**bad)


# --- the plan: the strategy reaches the memory model ------------------------------------------


def test_memory_settings_carry_the_plans_strategy_and_with_world_picks_fsdp_when_ddp_does_not_fit(llama8b):
    from engine.plan import assumed_gpu, memory_settings, with_world
    from engine.preset import preset_from_dict

    preset = preset_from_dict({"model": {"source": "x"}, "data": {"train": "builtin:demo"}})
    from engine.distributed import Rank

    plan = assumed_gpu(preset, "llama")
    four = Rank(world_size=4, local_world_size=4)
    s = memory_settings(preset, llama8b, replace(plan, strategy="fsdp", place=four))
    assert (s.strategy, s.world_size) == ("fsdp", 4)
    world = World(4, 1, "cuda")
    ddp = estimate_training_memory(llama8b, memory_settings(preset, llama8b, replace(plan, strategy="ddp", place=four)))
    fsdp = estimate_training_memory(llama8b, s)
    assert with_world(plan, preset, llama8b, world, budget_bytes=ddp.total_bytes).strategy == "ddp"
    between = (ddp.total_bytes + fsdp.total_bytes) // 2
    chosen = with_world(plan, preset, llama8b, world, budget_bytes=between)
    assert (chosen.strategy, chosen.world_size) == ("fsdp", 4)
    assert memory_settings(preset, llama8b, chosen).strategy == "fsdp"


def test_fsdp_keeps_the_engines_chunked_loss_so_sharding_lowers_the_per_gpu_figure(llama8b):
    """Under FSDP the engine's loss runs through the sharded model's forward (tests/test_families.py),
    so the estimate counts one chunk of logits as on one GPU, not every position's (11.1 GiB per GPU
    on two GPUs against 9.25 GiB on one when FSDP fell back to transformers' loss)."""
    from engine.distributed import Rank
    from engine.loss import LOSS_CHUNK_TOKENS
    from engine.plan import assumed_gpu, memory_settings
    from engine.preset import preset_from_dict

    preset = preset_from_dict({"model": {"source": "x"}, "data": {"train": "builtin:demo"},
                               "training": {"seq_len": 2048, "micro_batch_size": 1}})
    plan = assumed_gpu(preset, "llama")
    one = estimate_training_memory(llama8b, memory_settings(preset, llama8b, plan))
    by_gpus = {}
    for n in (2, 4, 8):
        s = memory_settings(preset, llama8b, replace(plan, strategy="fsdp", place=Rank(world_size=n, local_world_size=n)))
        assert s.loss_chunk == LOSS_CHUNK_TOKENS
        est = estimate_training_memory(llama8b, s)
        assert est.loss_peak_bytes == one.loss_peak_bytes
        by_gpus[n] = est.total_bytes
    # Two GPUs: half the model each, but NCCL's buffers and the gathered layers on top.
    assert by_gpus[2] < one.total_bytes + 0.05 * GIB
    assert by_gpus[8] < by_gpus[4] < one.total_bytes - GIB


# --- reference models: the largest that fits --------------------------------------------------


def test_reference_models_have_the_published_parameter_counts():
    published = {"Llama-3.2-1B": 1_235_814_400, "Llama-3.2-3B": 3_212_749_824, "Llama-3.1-8B": 8_030_261_248,
                 "Llama-3.1-70B": 70_553_706_496, "Llama-3.1-405B": 405_853_388_800}
    assert {r.name: r.info.params_total for r in REFERENCE_MODELS} == published
    assert [r.info.params_total for r in REFERENCE_MODELS] == sorted(published.values())


@pytest.mark.parametrize("name, folder", [("Llama-3.1-8B", LLAMA31_8B), ("Llama-3.2-1B", "meta-llama__Llama-3.2-1B")])
def test_reference_models_match_inspect_model_on_the_real_configs(hf_configs, name, folder):
    ref = next(r for r in REFERENCE_MODELS if r.name == name)
    built, read = reference_info(ref), inspect_model(str(hf_configs / folder))
    for field in ("params_total", "params_embedding", "params_head", "params_blocks", "params_quantizable",
                  "params_other", "targets", "default_targets", "hidden_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size",
                  "tie_word_embeddings", "context_length", "model_type"):
        assert getattr(built, field) == getattr(read, field), field
    for strategy, n in (("single", 1), ("ddp", 2), ("fsdp", 4)):
        a, b = (estimate_training_memory(i, settings(strategy=strategy, world_size=n)) for i in (built, read))
        assert a.components == b.components


def test_largest_fitting_per_strategy():
    s = settings(loss_chunk=1024)
    fits = largest_fitting(s, 40 * GIB, 4)  # four A100 40GB
    assert list(fits) == ["single", "ddp", "fsdp"]
    assert fits["single"].world_size == 1 and fits["fsdp"].world_size == 4
    assert fits["ddp"].model.name == "Llama-3.1-8B"  # 70B's 4-bit weights alone are 35 GB on each GPU
    assert fits["fsdp"].model.name == "Llama-3.1-70B"  # a quarter of them per GPU
    assert fits["fsdp"].total_bytes <= 40 * GIB
    big = estimate_training_memory(REFERENCE_MODELS[-1].info, replace(s, strategy="fsdp", world_size=4))
    assert big.total_bytes > 40 * GIB  # and 405B does not fit
    assert list(largest_fitting(s, 24 * GIB, 1)) == ["single"]
    none = largest_fitting(s, 2 * GIB, 2, ("ddp", "fsdp"))
    assert none["ddp"].model is None and none["ddp"].to_json()["model"] is None
    line = largest_words(fits, 4, "40 GiB")
    assert line.startswith("the largest reference model that fits on 4 x 40 GiB: single: Llama-3.1-8B-class, "
                           "ddp: Llama-3.1-8B-class, fsdp: Llama-3.1-70B-class")
    assert "none of them" in largest_words(none, 2, "2 GiB")


def test_largest_fitting_keeps_the_targets_a_reference_has():
    qv = largest_fitting(settings(lora_targets=("q_proj", "v_proj")), 40 * GIB, 1)["single"]
    odd = largest_fitting(settings(lora_targets=("c_attn",)), 40 * GIB, 1)["single"]  # GPT-2's name: all linear
    assert qv.model is not None and odd.model is not None
    assert qv.total_bytes < estimate_training_memory(qv.model.info, settings()).total_bytes


# --- the command line -------------------------------------------------------------------------


def test_estimate_fsdp_on_two_gpus_names_the_strategy_the_shares_and_the_largest_model(hf_configs):
    src = str(hf_configs / LLAMA31_8B)
    r = run_cli("estimate", src, "--gpus", "2", "--strategy", "fsdp", "--gpu-mem", "80")
    assert r.returncode == 0, r.stderr
    out = flat(r.stdout)
    assert "strategy: FSDP (the model, adapters and optimizer states are sharded across the GPUs) on 2 GPUs " \
           "(--strategy fsdp); the table is per GPU" in out
    assert "sharded (1/2 on each GPU): block weights, lora weights, lora gradients, optimizer states; " \
           "replicated (whole on each GPU): quantization scales, root weights, gathered layers" in out
    assert "the largest reference model that fits on 2 x 80 GiB: ddp: Llama-3.1-" in out
    assert "fsdp: Llama-3.1-70B-class" in out
    assert "per GPU, on each of 2 GPUs (FSDP, FULL_SHARD)" in out
    for row in ("block weights", "root weights", "gathered layers", "communication", "cuda context"):
        assert row in out

    j = json.loads(run_cli("estimate", src, "--gpus", "2", "--strategy", "fsdp", "--gpu-mem", "80", "--json").stdout)
    assert (j["strategy"], j["world_size"], j["strategy_reason"]) == ("fsdp", 2, "asked for in the preset")
    assert j["sharded"] == ["block_weights", "lora_weights", "lora_gradients", "optimizer_states"]
    assert j["largest_reference"]["fsdp"]["model"] == "Llama-3.1-70B"
    assert j["total_bytes"] == sum(j["components"].values()) and j["fits"] is True


def test_estimate_auto_takes_ddp_when_it_fits_each_gpu_else_fsdp(hf_configs):
    src = str(hf_configs / LLAMA31_8B)

    def total(*args):
        return json.loads(run_cli("estimate", src, "--gpus", "4", *args, "--json").stdout)

    ddp, fsdp = total("--strategy", "ddp")["total_bytes"], total("--strategy", "fsdp")["total_bytes"]
    assert fsdp < ddp
    roomy = total("--gpu-mem", f"{(ddp + GIB) / GIB:.3f}")
    tight = total("--gpu-mem", f"{(ddp + fsdp) / 2 / GIB:.3f}")
    assert (roomy["strategy"], tight["strategy"]) == ("ddp", "fsdp")
    assert tight["fits"] is True and "sharded" in tight["strategy_reason"]
    unknown = total()  # no memory to check against: DDP, the faster
    assert (unknown["world_size"], unknown["strategy"]) == (4, "ddp")
    one = json.loads(run_cli("estimate", src, "--json").stdout)  # no --gpus: one GPU, as before
    assert (one["world_size"], one["strategy"], one["sharded"]) == (1, "single", [])


@pytest.mark.parametrize("args", [["--gpus", "0"], ["--gpus", "1", "--strategy", "fsdp"], ["--strategy", "ddp"],
                                  ["--gpus", "2", "--strategy", "single"], ["--gpus", "-3"]])
def test_estimate_bad_gpu_and_strategy_combinations_are_one_error_line(hf_configs, args):
    r = run_cli("estimate", str(hf_configs / LLAMA31_8B), *args)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "--gpus" in lines[0] or "--strategy" in lines[0]


# --- the wizard: the memory step and the plain prompts ----------------------------------------


def _draft(hf_configs, gpus: list, **distributed):
    from engine.preset import preset_from_dict
    from tui.draft import Draft

    draft = Draft(preset_from_dict({"model": {"source": str(hf_configs / LLAMA31_8B)}, "data": {"train": "builtin:demo"},
                                    "training": {"seq_len": 2048, "micro_batch_size": 1},
                                    "distributed": distributed}))
    draft.accept_model(("key",), inspect_model(str(hf_configs / LLAMA31_8B)))
    draft.gpus = gpus
    return draft


def test_memory_view_of_a_two_gpu_draft_says_the_strategy_per_gpu(hf_configs):
    from tui.steps.memory import memory_view

    view = memory_view(_draft(hf_configs, TEST_GPUS))
    assert view.world_line == "2 x Test GPU 24GB: DDP, per GPU (the model fits on each GPU: DDP, the faster of the two)"
    assert view.estimate.strategy == "ddp" and "ddp_buckets" in view.estimate.components
    assert view.sharing.startswith("sharded (1/2 on each GPU): nothing; replicated (whole on each GPU):")
    assert view.largest.startswith("the largest reference model that fits on 2 x Test GPU 24GB (23.00 GiB free): "
                                   "ddp: Llama-3.1-8B-class, fsdp: ")

    fsdp = memory_view(_draft(hf_configs, TEST_GPUS, strategy="fsdp"))
    assert fsdp.world_line.startswith("2 x Test GPU 24GB: FSDP, per GPU")
    assert "block weights" in fsdp.sharing
    assert fsdp.estimate.loss_peak_bytes == view.estimate.loss_peak_bytes  # the engine's loss under FSDP too

    ddp4 = memory_view(_draft(hf_configs, FOUR_GPUS))
    fsdp4 = memory_view(_draft(hf_configs, FOUR_GPUS, strategy="fsdp"))
    assert fsdp4.estimate.total_bytes < ddp4.estimate.total_bytes
    between = (ddp4.estimate.total_bytes + fsdp4.estimate.total_bytes) // 2  # typed: too small for DDP
    typed = memory_view(_draft(hf_configs, FOUR_GPUS), between)
    assert typed.estimate.strategy == "fsdp" and typed.fits
    assert "fits sharded" in typed.world_line and f"on 4 x {between / GIB:.2f} GiB:" in typed.largest


def test_one_gpu_draft_shows_nothing_new(hf_configs):
    from tui.steps.memory import memory_view

    view = memory_view(_draft(hf_configs, TEST_GPUS[:1]))
    assert (view.world_line, view.sharing, view.largest) == ("", "", "")
    assert view.estimate.strategy == "single" and "ddp_buckets" not in view.estimate.components
    asked = memory_view(_draft(hf_configs, TEST_GPUS[:1], strategy="ddp"))  # asked for, but one GPU
    assert asked.world_line.startswith("1 x Test GPU 24GB: one GPU (ddp asked for")
    assert asked.estimate.total_bytes == view.estimate.total_bytes


def test_plain_memory_step_says_the_strategy_for_two_gpus(hf_configs, capsys):
    from tui.draft import Services
    from tui.plain import PlainWizard

    PlainWizard(_draft(hf_configs, TEST_GPUS, strategy="fsdp"), Services()).show_memory()
    out = flat(capsys.readouterr().out)
    assert "2 x Test GPU 24GB: FSDP, per GPU (asked for in the preset)" in out
    assert "sharded (1/2 on each GPU): block weights" in out
    assert "the largest reference model that fits on 2 x Test GPU 24GB (23.00 GiB free): ddp:" in out


async def test_memory_screen_shows_the_strategy_line_for_two_gpus(hf_configs, tmp_path, monkeypatch):
    from screen import wait_for
    from tui.draft import Services
    from tui.wizard import WizardApp

    monkeypatch.chdir(tmp_path)
    draft = _draft(hf_configs, [], strategy="fsdp")
    draft.info = draft.info_key = None  # read by the app, as in use
    app = WizardApp(draft, services=Services(probe_gpus=lambda: TEST_GPUS), start="memory")
    async with app.run_test(size=(120, 40)) as pilot:
        text = await wait_for(pilot, "FSDP, per GPU", region="#estimate-box", timeout=120)
        assert "2 x Test GPU 24GB: FSDP, per GPU (asked for in the preset)" in flat(text)
        assert "sharded (1/2 on each GPU): block weights" in flat(text)
        assert "the largest reference model that fits on 2 x Test GPU 24GB" in flat(text)
        assert "root weights" in flat(text) and "gathered layers" in flat(text)
