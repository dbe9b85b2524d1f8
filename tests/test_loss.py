"""The engine's own loss (trained positions only, in chunks) against transformers' loss, on the real
demo model with LoRA adapters: the same value and the same adapter gradients."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.loss import LOSS_CHUNK_TOKENS, chunked_loss_applies, loss_chunk_tokens

DEMO = Path(__file__).resolve().parent.parent / "presets" / "tiny-demo.yaml"


@pytest.fixture(scope="module")
def demo_batches():
    """Six demo examples, packed as the engine packs them and padded as the plain recipe pads them."""
    from transformers import DataCollatorForSeq2Seq

    from engine import data as data_mod
    from engine.plan import plan_device
    from engine.preset import load_preset
    from engine.train import _collator

    preset = load_preset(DEMO)
    tok = data_mod.load_tokenizer(preset.model)
    prepared = data_mod.prepare_data(preset.data, tok, preset.training.seq_len, preset.training.seed)
    feats = [{"input_ids": prepared.train[i]["input_ids"], "labels": prepared.train[i]["labels"]} for i in range(6)]
    packed = _collator(preset, tok, plan_device(preset, []))(feats)
    padded = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100, return_tensors="pt")(feats)
    return packed, padded


def _lora_model(attn: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from engine.demo import ensure_demo_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(ensure_demo_model(), dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    with torch.no_grad():  # adapters that already do something, so every gradient is non-zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("items", ["counted", "mean"])
def test_chunked_loss_gives_transformers_loss_and_adapter_gradients(demo_batches, layout, items):
    import torch

    from engine.attention import PACKED_SDPA
    from engine.loss import causal_lm_loss, decoder_and_head, trained_positions

    packed, padded = demo_batches
    batch = dict(packed if layout == "packed" else padded)
    labels = batch.pop("labels")
    trained = int(labels[..., 1:].ne(-100).sum())
    assert trained > 30  # several chunks of 8 below
    # The Trainer's count over two accumulated micro batches, say: the loss is a share of their sum.
    n = torch.tensor(trained * 2) if items == "counted" else None
    model = _lora_model(PACKED_SDPA if layout == "packed" else "sdpa")

    ref = model(**batch, labels=labels, **({"num_items_in_batch": n} if n is not None else {})).loss
    ref.backward()
    want = _grads(model)
    model.zero_grad()

    decoder, head = decoder_and_head(model)
    hidden = decoder(**batch).last_hidden_state
    # the trained positions as the engine's collator finds them on the host, or found here
    positions = trained_positions(labels) if items == "counted" else None
    got = causal_lm_loss(hidden, head, labels, num_items_in_batch=n, chunk=8, positions=positions)
    got.backward()
    have = _grads(model)

    assert abs(got.item() - ref.item()) < 1e-6 * max(1.0, ref.item())
    assert want.keys() == have.keys() and len(want) == 2 * len(model.base_model.model.model.layers) * 2
    for name in want:
        torch.testing.assert_close(have[name], want[name], atol=1e-7, rtol=1e-4, msg=name)


def test_without_gradients_the_chunks_are_not_checkpointed_and_the_loss_is_the_same(demo_batches):
    import torch

    from engine.attention import PACKED_SDPA
    from engine.loss import causal_lm_loss, decoder_and_head

    batch = dict(demo_batches[0])
    labels = batch.pop("labels")
    model = _lora_model(PACKED_SDPA)
    decoder, head = decoder_and_head(model)
    with torch.no_grad():
        ref = model(**batch, labels=labels).loss
        got = causal_lm_loss(decoder(**batch).last_hidden_state, head, labels, chunk=16)
    assert abs(got.item() - ref.item()) < 1e-6 * ref.item()


def test_a_micro_batch_with_nothing_trained_gives_zero_and_zero_gradients(demo_batches):
    import torch

    from engine.attention import PACKED_SDPA
    from engine.loss import causal_lm_loss, decoder_and_head

    batch = dict(demo_batches[0])
    labels = torch.full_like(batch.pop("labels"), -100)
    model = _lora_model(PACKED_SDPA)
    decoder, head = decoder_and_head(model)
    loss = causal_lm_loss(decoder(**batch).last_hidden_state, head, labels)
    loss.backward()
    assert loss.item() == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in _grads(model).values())


def test_only_what_the_engine_cannot_reproduce_keeps_its_own_forward():
    """Soft-capped or scaled logits are the engine's to compute (the profile says how); a mixture of
    experts with its router loss switched on, and a family without a profile, keep transformers'."""
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, MixtralConfig

    from engine.loss import decoder_and_head, logit_transform

    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=64, head_dim=8)
    gemma2 = AutoModelForCausalLM.from_config(Gemma2Config(**small, final_logit_softcapping=30.0))
    assert decoder_and_head(gemma2) == (gemma2.model, gemma2.lm_head)
    assert logit_transform(gemma2).softcap == 30.0
    llama = AutoModelForCausalLM.from_config(LlamaConfig(**small))
    decoder, head = decoder_and_head(llama)
    assert decoder is llama.model and head is llama.lm_head
    assert logit_transform(llama).softcap is None and logit_transform(llama).scale == 1.0
    moe = dict(small, num_local_experts=2, num_experts_per_tok=1)
    assert decoder_and_head(AutoModelForCausalLM.from_config(MixtralConfig(**moe)))[0] is not None
    routed = AutoModelForCausalLM.from_config(MixtralConfig(**moe, output_router_logits=True))
    assert decoder_and_head(routed) == (None, None)
    for own in ("llama", "qwen2", "gemma2", "gemma3_text", "granite", "mixtral"):
        assert chunked_loss_applies(own), own
    for other in ("gpt2", "falcon", "llama4_text", "some_new_family", None):
        assert not chunked_loss_applies(other), other


def test_the_memory_estimate_counts_one_chunk_of_logits_where_the_engine_chunks():
    import json

    from engine.memory import LOSS_BYTES_PER_LOGIT, estimate_training_memory
    from engine.modelinfo import inspect_model
    from engine.plan import memory_settings
    from engine.preset import preset_from_dict

    from conftest import FIXTURES as configs

    def loss(name: str, tokens: int, chunked: bool = True) -> tuple[int, object]:
        info = inspect_model(str(configs / name))
        preset = preset_from_dict({"model": {"source": str(configs / name)}, "data": {"train": "builtin:demo"},
                                   "training": {"seq_len": tokens, "micro_batch_size": 1, "chunked_loss": chunked}})
        s = memory_settings(preset, info)  # what the wizard and the training process use
        return estimate_training_memory(info, s).loss_peak_bytes, info

    # Llama: one chunk of logits whatever the micro batch, plus the hidden states and their gradients (bf16).
    for tokens in (512, 2048, 8192):
        got, llama = loss("meta-llama__Llama-3.1-8B", tokens)
        assert got == LOSS_BYTES_PER_LOGIT * min(tokens, LOSS_CHUNK_TOKENS) * llama.vocab_size \
            + 3 * 2 * tokens * llama.hidden_size
    assert loss("meta-llama__Llama-3.1-8B", 8192)[0] < 0.15 * LOSS_BYTES_PER_LOGIT * 8192 * llama.vocab_size
    # The preset can ask for transformers' loss; the estimate follows.
    assert loss("meta-llama__Llama-3.1-8B", 8192, chunked=False)[0] == LOSS_BYTES_PER_LOGIT * 8192 * llama.vocab_size
    # Gemma-2 soft-caps its logits, and the engine's loss does the same a chunk at a time.
    assert json.loads((configs / "google__gemma-2-9b" / "config.json").read_text())["final_logit_softcapping"]
    got, gemma2 = loss("google__gemma-2-9b", 8192)
    # Its 256,000-entry vocabulary gets 576 positions per chunk (engine.loss.LOSS_CHUNK_LOGITS), not 1,024.
    assert loss_chunk_tokens(gemma2.vocab_size) == 576
    assert got == LOSS_BYTES_PER_LOGIT * 576 * gemma2.vocab_size + 3 * 2 * 8192 * gemma2.hidden_size
    # GPT-2 keeps transformers' loss: every position's logits.
    got, gpt2 = loss("openai-community__gpt2", 1024)
    assert got == LOSS_BYTES_PER_LOGIT * 1024 * gpt2.vocab_size


def test_the_head_hands_the_hidden_states_through_and_is_itself_again_after():
    """Under DDP the engine runs the wrapped model's own forward (so the gradients are all-reduced)
    with the head handing the hidden states through; afterwards the head is as it was, an
    instance-level hook (accelerate's) included."""
    import torch

    from engine.loss import head_passes_hidden_states

    head = torch.nn.Linear(4, 8, bias=False)
    x = torch.randn(2, 4)
    with head_passes_hidden_states(head):
        assert head(x) is x
    assert head(x).shape == (2, 8) and "forward" not in head.__dict__

    def hooked(t):
        return t * 2

    head.forward = hooked
    with head_passes_hidden_states(head):
        assert head(x) is x
    assert head.forward is hooked
