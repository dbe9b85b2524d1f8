"""Every family with a profile (``engine.arch``), on a tiny random model of its own: the engine's loss
equals transformers' loss and gradients (fp32 and bf16), the wrapped-model path (DDP, FSDP) hands
the hidden states through untouched, and packed rows give the loss of padded batches, sliding
windows and alternating local/global layers included."""

from __future__ import annotations

import pytest

from engine.arch import PROFILES, profile

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
             eos_token_id=2, tie_word_embeddings=False)
WINDOW = 6
"""A sliding window shorter than the examples below, so it changes what attends to what."""
ALTERNATING = dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

TINY: dict[str, dict] = {
    "llama": {},
    "mistral": dict(sliding_window=WINDOW),
    "ministral": ALTERNATING,
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen2_moe": dict(MOE, shared_expert_intermediate_size=64, decoder_sparse_step=1),
    "qwen3": {},
    "qwen3_moe": dict(MOE, decoder_sparse_step=1),
    "gemma": {},
    "gemma2": dict(ALTERNATING, final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=16),
    # Gemma 3's published configs set no final soft-cap; the forward applies one where set, so the tiny one does.
    "gemma3_text": dict(ALTERNATING, final_logit_softcapping=30.0, query_pre_attn_scalar=16),
    "phi3": dict(sliding_window=WINDOW),
    "phi": dict(partial_rotary_factor=0.5),
    "olmo": {},
    "olmo2": {},
    "granite": dict(logits_scaling=4.0),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, logits_scaling=4.0),
    "cohere": dict(logit_scale=0.5),
    "stablelm": {},
    "starcoder2": dict(sliding_window=WINDOW),
}
"""A tiny configuration of each family whose loss the engine computes (keyed like ``engine.arch.PROFILES``)."""

OWN_LOSS = sorted(t for t, p in PROFILES.items() if p.own_loss and t != "gemma3")


def _config(model_type: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **SMALL, **TINY[model_type])


def _gemma3_config():
    """Gemma 3 with its vision tower (Gemma3ForConditionalGeneration), trained on text as the engine does."""
    from transformers import AutoConfig

    text = dict(SMALL, **TINY["gemma3_text"])
    text.pop("tie_word_embeddings")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)
    return AutoConfig.for_model("gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                image_token_index=95, boi_token_index=93, eoi_token_index=94)


def _model(model_type: str, dtype, attn: str = "sdpa"):
    import torch
    from transformers import AutoModelForCausalLM

    config = _gemma3_config() if model_type == "gemma3" else _config(model_type)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    model.config.use_cache = False
    return model.train(False)


def _attention(model_type: str, packed: bool) -> str:
    """The attention the engine's device plan picks on the CPU for this family."""
    from engine.plan import plan_device
    from engine.preset import preset_from_dict

    preset = preset_from_dict({"model": {"source": "x"}, "data": {"train": "builtin:demo"},
                               "training": {"packing": packed}})
    return plan_device(preset, [], model_type).attn_implementation


EXAMPLES = ([5, 9, 17, 33, 12, 40, 41, 7, 8, 70, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19],
            [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 20, 21, 22])
PROMPT = 3
"""Each example's first tokens are its prompt: not trained (labels -100), as the engine's data has them."""


def _padded():
    import torch

    n = max(len(e) for e in EXAMPLES)
    ids = torch.zeros(len(EXAMPLES), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, e in enumerate(EXAMPLES):
        ids[i, :len(e)] = torch.tensor(e)
        mask[i, :len(e)] = 1
        labels[i, PROMPT:len(e)] = torch.tensor(e[PROMPT:])
    return {"input_ids": ids, "attention_mask": mask}, labels


def _packed():
    """One row, positions restarting at each example, the boundaries as the engine's collator gives them."""
    import torch

    from engine.attention import PACKED_BOUNDS_KEY

    ids, pos, labels, bounds = [], [], [], [0]
    for e in EXAMPLES:
        ids += e
        pos += list(range(len(e)))
        labels += [-100] * PROMPT + e[PROMPT:]
        bounds.append(bounds[-1] + len(e))
    # Each example's first token is prompt (-100): no example is trained to predict the next one's start.
    cu = torch.tensor(bounds, dtype=torch.int32)
    batch = {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([pos]), PACKED_BOUNDS_KEY: tuple(bounds),
             "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(map(len, EXAMPLES)),
             "max_length_k": max(map(len, EXAMPLES))}
    return batch, torch.tensor([labels])


def _engine_loss(model, batch, labels, chunk=4):
    from engine.loss import causal_lm_loss, decoder_and_head, logit_transform

    decoder, head = decoder_and_head(model)
    assert decoder is not None, "the engine computes this family's loss"
    hidden = decoder(**batch).last_hidden_state
    return causal_lm_loss(hidden, head, labels, chunk=chunk, transform=logit_transform(model))


def _grads(model) -> dict:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_every_family_with_its_own_loss_has_a_tiny_model_here():
    assert set(TINY) == set(OWN_LOSS)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("model_type", OWN_LOSS + ["gemma3"])
def test_the_engines_loss_and_gradients_equal_transformers(model_type, dtype_name):
    import torch

    dtype = getattr(torch, dtype_name)
    batch, labels = _padded()
    model = _model(model_type, dtype, _attention(model_type, packed=False))
    ref = model(**batch, labels=labels).loss
    ref.backward()
    want = _grads(model)
    model.zero_grad()
    got = _engine_loss(model, batch, labels)
    got.backward()
    have = _grads(model)

    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(got.item() - ref.item()) <= tol * max(1.0, abs(ref.item())), (got.item(), ref.item())
    assert want.keys() == have.keys() and len(want) > 10
    for name in want:
        if dtype == torch.float32:
            torch.testing.assert_close(have[name], want[name], atol=1e-6, rtol=1e-4, msg=name)
        else:  # bf16: the same sums in another order; compare each gradient as a whole
            err = (have[name] - want[name]).norm() / max(want[name].norm(), 1e-6)
            assert err < 0.05, (name, float(err))


@pytest.mark.parametrize("model_type", OWN_LOSS + ["gemma3"])
def test_the_wrapped_models_forward_hands_the_hidden_states_through_untouched(model_type):
    """What DDP and FSDP run: the model's own forward with the head passing its input on; a soft-cap
    or a logit scale must not touch the hidden states, and is back in place after."""
    import torch

    from engine.loss import decoder_and_head, head_passes_hidden_states

    batch, _ = _padded()
    model = _model(model_type, torch.float32, _attention(model_type, packed=False))
    decoder, head = decoder_and_head(model)
    with torch.no_grad():
        want = decoder(**batch).last_hidden_state
        logits = model(**batch).logits
        with head_passes_hidden_states(head, model):
            got = model(**batch).logits
        again = model(**batch).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(again, logits, atol=0, rtol=0)


@pytest.mark.parametrize("model_type", OWN_LOSS + ["gemma3"])
def test_packed_rows_give_the_loss_of_padded_batches(model_type):
    """The engine packs examples into one row; each must see only itself, its sliding window
    included, so the loss is the padded batch's."""
    import torch

    from engine.attention import register_kernels

    register_kernels()
    padded, padded_labels = _padded()
    packed, packed_labels = _packed()
    assert int(packed_labels.ne(-100).sum()) == int(padded_labels.ne(-100).sum())
    ref_model = _model(model_type, torch.float32, _attention(model_type, packed=False))
    attn = _attention(model_type, packed=True)
    packed_model = _model(model_type, torch.float32, attn)
    with torch.no_grad():
        ref = _engine_loss(ref_model, padded, padded_labels)
        got = _engine_loss(packed_model, packed, packed_labels)
    assert abs(got.item() - ref.item()) < 1e-5 * max(1.0, ref.item()), (attn, got.item(), ref.item())


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "granite", "cohere"])
def test_the_liger_path_hands_the_kernel_the_soft_cap_and_folds_the_scale_into_the_hidden_states(model_type,
                                                                                             monkeypatch):
    """Liger's fused linear cross-entropy runs on CUDA only. On the CPU a plain stand-in with its
    contract (the summed cross-entropy of softcap(head(hidden))) checks what the engine hands it: the
    soft-cap where the family has one, the logit scale folded into the hidden states, and so
    transformers' loss."""
    import torch
    import torch.nn.functional as F

    from engine import kernels
    from engine.loss import causal_lm_loss, decoder_and_head, logit_transform

    seen = {}

    def liger_contract(hidden, head, targets, softcap=None):
        seen["softcap"] = softcap
        logits = head(hidden)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits.float(), targets, reduction="sum")

    monkeypatch.setattr(kernels, "fused_linear_loss", liger_contract)
    batch, labels = _padded()
    model = _model(model_type, torch.float32, _attention(model_type, packed=False))
    decoder, head = decoder_and_head(model)
    with torch.no_grad():
        ref = model(**batch, labels=labels).loss
        got = causal_lm_loss(decoder(**batch).last_hidden_state, head, labels, fused=True,
                             transform=logit_transform(model))
    assert seen["softcap"] == TINY[model_type].get("final_logit_softcapping")
    assert abs(got.item() - ref.item()) < 1e-5 * ref.item(), (got.item(), ref.item())


FSDP_FAMILIES = ("llama", "gemma2", "granite")
"""A plain head, a soft-capped one and a scaled one."""


def _fsdp_worker(rank: int, world: int, port: int, out: str):
    """One rank: each family's model sharded by FSDP as the engine configures it (FULL_SHARD, one unit
    per decoder layer, ``use_orig_params=False``), its forward run with the head handing the hidden
    states through, the engine's loss on them; rank 0 writes the loss and the gradients' norm."""
    import json
    import os

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from engine.loss import causal_lm_loss, decoder_and_head, head_passes_hidden_states, logit_transform
    from engine.train import FSDP_CONFIG

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for model_type in FSDP_FAMILIES:
        batch, labels = _padded()
        model = _model(model_type, torch.float32, _attention(model_type, packed=False))
        wrapped = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({type(model.model.layers[0])}),
                       device_id=torch.device("cpu"), sharding_strategy=ShardingStrategy.FULL_SHARD,
                       use_orig_params=FSDP_CONFIG["use_orig_params"])
        decoder, head = decoder_and_head(model)
        with head_passes_hidden_states(head, model):
            hidden = wrapped(**batch).logits
        loss = causal_lm_loss(hidden, head, labels, chunk=4, transform=logit_transform(model))
        loss.backward()
        norm = wrapped.clip_grad_norm_(float("inf"))  # over every rank's shard
        results[model_type] = [loss.item(), float(norm)]
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()  # both ranks past every collective before either tears its connections down
    dist.destroy_process_group()


def test_under_fsdp_the_engines_loss_runs_through_the_sharded_model_and_equals_transformers(tmp_path):
    """FSDP keeps the engine's loss (the memory estimate counts one chunk of logits per GPU): on two
    CPU processes the loss and the gradients' norm are transformers' on the unsharded model."""
    import json
    import socket

    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "fsdp.json"
    torch.multiprocessing.spawn(_fsdp_worker, args=(2, port, str(out)), nprocs=2)
    got = json.loads(out.read_text())
    for model_type in FSDP_FAMILIES:
        batch, labels = _padded()
        model = _model(model_type, torch.float32, _attention(model_type, packed=False))
        ref = model(**batch, labels=labels).loss
        ref.backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
        loss, fsdp_norm = got[model_type]
        assert abs(loss - ref.item()) < 1e-5 * ref.item(), (model_type, loss, ref.item())
        assert abs(fsdp_norm - float(norm)) < 1e-4 * float(norm), (model_type, fsdp_norm, float(norm))


def _fixture_folders() -> list[str]:
    from conftest import FIXTURES

    return sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file())


@pytest.mark.parametrize("folder", _fixture_folders())
def test_the_estimate_runs_from_each_real_config_with_its_familys_loss(folder):
    """Every vendored real config (tests/fixtures/hf-configs) has a profile, and its estimate counts one
    chunk of logits where the engine computes the loss, every position's where it does not."""
    from conftest import FIXTURES

    from engine.loss import loss_chunk_tokens
    from engine.memory import LOSS_BYTES_PER_LOGIT, estimate_training_memory
    from engine.modelinfo import inspect_model
    from engine.plan import memory_settings
    from engine.preset import preset_from_dict

    source = str(FIXTURES / folder)
    info = inspect_model(source, trust_remote_code=False) if "falcon" not in folder else None
    if info is None:
        pytest.skip("the 2023 Falcon config needs the model's own code (tests/test_remote_code.py covers it)")
    p = profile(info.model_type)
    assert p.known, f"{folder}: {info.model_type} has no profile in engine/arch.py"
    preset = preset_from_dict({"model": {"source": source}, "data": {"train": "builtin:demo"},
                               "training": {"seq_len": 4096, "micro_batch_size": 1}})
    s = memory_settings(preset, info)
    est = estimate_training_memory(info, s)
    assert est.total_bytes > info.params_total * 0.5 // 2  # at least the 4-bit weights
    if p.uses_own_loss():
        assert s.loss_chunk == loss_chunk_tokens(info.vocab_size) <= 1024
        assert est.loss_peak_bytes < LOSS_BYTES_PER_LOGIT * 4096 * info.vocab_size / 3
        assert est.loss_peak_bytes < 2.2 * 2**30
    else:
        assert s.loss_chunk is None
        assert est.loss_peak_bytes >= LOSS_BYTES_PER_LOGIT * 4096 * info.vocab_size
    assert not any("no profile" in n for n in est.notes)
