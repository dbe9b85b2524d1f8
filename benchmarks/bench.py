"""This engine against the plain QLoRA recipe and TRL, side by side: ``make bench`` or ``python benchmarks/bench.py``.

All train the same Llama-architecture model (NF4 + double quantization through bitsandbytes,
LoRA through peft, transformers' Trainer) on the same tokenized data, with the same seed, the same
label masking, the same LoRA settings and optimizer, for the same number of optimizer steps:

- plain (``--baseline plain``, the default): the recipe as tutorials write it:
  ``prepare_model_for_kbit_training`` (its defaults: gradient checkpointing on, non-4-bit weights
  upcast to fp32), padded micro batches through ``DataCollatorForSeq2Seq``, default
  TrainingArguments otherwise;
- trl (``--baseline trl``; ``pip install -e '.[bench]'``): TRL's ``SFTTrainer`` in its documented
  padding-free QLoRA setup (``quantization_config`` + ``peft_config``, ``SFTConfig(padding_free=True)``,
  completion-only loss on TRL's pre-tokenized prompt/completion form), see ``trl_worker``;
- engine: this project's real training process, ``python -m engine.train RUN_DIR`` on a preset
  (padding-free packing, no fp32 upcast, cached tokenization, events file).

``--baseline plain,trl`` runs both baselines against the engine in the same rounds. Each run is a
separate process; they alternate over ``--rounds`` rounds (the order reverses every round) so a
disturbance on the machine hits all of them. Throughput counts real tokens only (no padding)
and leaves out the first ``--warmup`` steps. The data is a deterministic generator of alpaca-style
records whose lengths spread from about 40 to 1000 tokens, as real instruction data does; it is
written to a temporary folder and removed afterwards.

``--method dpo`` measures preference tuning instead: the engine's dpo (its training process on a
``training.method: dpo`` preset) against TRL's ``DPOTrainer`` as TRL's docs write QLoRA (``--baseline
trl``, the only one: the plain recipe has no DPO), see ``trl_dpo_worker``. Both train on the same
prompt/chosen/rejected texts (``make_pairs``: prompts and answers of spread lengths, each side
within ``--seq-len``), TRL tokenizing them itself (the worker checks its tokens are the engine's),
with the same beta, sigmoid loss, reference (``--reference``: a pass each step, TRL's default, or
precomputed before the first step), batch, rate, steps and seed. Throughput counts the real tokens
of both sides (the prompt in each); the losses are compared step by step (at step 1 both are
ln 2 = 0.6931 whatever the weights, the fresh adapter's policy being its reference: the later steps
are the test).

``--config DIR`` builds the model with random weights from a real ``config.json`` (for a GPU, where
weights cannot be downloaded); the demo's character-level tokenizer supplies the ids. ``--model DIR``
trains a pretrained model folder with its own tokenizer instead: ``make bench-real`` runs it on the
real Gemma-3-270M (``scripts/real_model.py``) on the CPU against the plain recipe and TRL.

Model FLOPs utilization: FLOPs per real token = 4 N_frozen_matmul + 6 N_lora + attention
(``engine-facts.md``; the head counted for every token, as the plain recipe computes it) times real
tokens per second, against two peaks: the device's dense matmul rate measured by this script in
the same run (a 4096 x 4096 matmul in the compute dtype, fp32 on a CPU, bf16 on CUDA), and on CUDA
also the H100's 989 TFLOP/s dense bf16 specification.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

H100_PEAK_FLOPS = 989e12
WORDS_SEED = 1234
PREFERENCE_LOGS = {"rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy"}
"""TRL's preference figures a baseline's steps record, under the engine's step-event names."""


# --------------------------------------------------------------------------------------------
# Data


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("etaoinshrdlucmfwypvbgk") for _ in range(rng.randint(2, 9)))


def _text(rng: random.Random, n_chars: int) -> str:
    words, size = [], 0
    while size < n_chars:
        w = _word(rng)
        if rng.random() < 0.08:
            w += rng.choice(".,;")
        words.append(w)
        size += len(w) + 1
    text = " ".join(words)[:max(1, n_chars)].strip()
    return (text[0].upper() + text[1:]) if text else "Ok"


def make_records(n: int, seed: int = WORDS_SEED, shortest: int = 40, longest: int = 1000) -> list[dict]:
    """Alpaca records whose rendered length (character tokens) is log-uniform in [shortest, longest]:
    many short examples and a long tail, as in real instruction data. Deterministic."""
    rng = random.Random(seed)
    overhead_in, overhead_no_in = 53, 37  # characters the alpaca template adds, with / without input
    records = []
    for i in range(n):
        total = int(math.exp(rng.uniform(math.log(shortest), math.log(longest))))
        with_input = total > 120 and rng.random() < 0.4
        body = max(8, total - (overhead_in if with_input else overhead_no_in))
        instr = max(4, int(body * rng.uniform(0.1, 0.3)))
        inp = int(body * rng.uniform(0.2, 0.4)) if with_input else 0
        out = max(3, body - instr - inp)
        records.append({
            "instruction": f"{i}: " + _text(rng, instr),
            "input": _text(rng, inp) if inp else "",
            "output": _text(rng, out),
        })
    return records


def make_pairs(n: int, seq_len: int, seed: int = WORDS_SEED, shortest: int = 40) -> list[dict]:
    """Preference pairs (``prompt``, ``chosen``, ``rejected`` texts) whose prompt + longer answer is
    log-uniform in [shortest, seq_len - 2] characters (character tokens; the 2 for BOS and EOS, so
    nothing is cut): a prompt of 10-40 % of it, the chosen answer the rest, the rejected one 30-100 %
    of the chosen's length, either the longer. Deterministic."""
    rng = random.Random(seed)
    longest = max(shortest + 1, seq_len - 2)
    records = []
    for i in range(n):
        total = int(math.exp(rng.uniform(math.log(min(shortest, longest - 1)), math.log(longest))))
        head = f"{i}: "
        prompt_chars = max(len(head) + 4, int(total * rng.uniform(0.1, 0.4)))
        long_side = max(4, total - prompt_chars)
        short_side = max(3, int(long_side * rng.uniform(0.3, 1.0)))
        chosen, rejected = _text(rng, long_side), _text(rng, short_side)
        if rng.random() < 0.5:
            chosen, rejected = rejected, chosen
        if chosen == rejected:
            rejected += "."
        records.append({"prompt": head + _text(rng, prompt_chars - len(head) - 1) + "\n",
                        "chosen": chosen, "rejected": rejected})
    return records


# --------------------------------------------------------------------------------------------
# Model


def build_random_model(config_dir: Path, out_dir: Path, tokenizer_dir: Path, dtype: str, seed: int) -> Path:
    """A model with random weights from a real config (no download), saved with the demo tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(config_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if config.vocab_size < len(tok):
        raise SystemExit(f"{config_dir}: vocabulary {config.vocab_size} is smaller than the demo tokenizer's")
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(seed)
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        # On the GPU where there is one: an 8B init takes seconds there and minutes on its CPU.
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def matmul_flops(cuda: bool, seconds: float = 3.0, n: int = 4096) -> float:
    """The dense matmul rate this device reaches now (FLOP/s): n x n matmuls in the compute dtype
    (bf16 on CUDA, fp32 on the CPU, with all of torch's threads) for about ``seconds``, the best
    of three timed stretches after a warm-up."""
    import torch

    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def stretch(reps: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    one = max(stretch(1), 1e-6)  # warm-up, and the size of a stretch
    reps = max(1, int(seconds / 3 / one))
    return 2 * n ** 3 * reps / min(stretch(reps) for _ in range(3))


def flops_per_token(model_dir: Path, lora_r: int, lengths: list[int]) -> dict:
    """4 N_frozen_matmul + 6 N_lora + attention (12 L d ctx, ctx the mean causal context of a real token)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n_frozen = n_lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            n_frozen += module.in_features * module.out_features
            if name.split(".")[-1] != "lm_head":
                n_lora += lora_r * (module.in_features + module.out_features)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    d_attn = config.num_attention_heads * head_dim
    ctx = sum(n * (n + 1) / 2 for n in lengths) / max(1, sum(lengths))
    attn = 12 * config.num_hidden_layers * d_attn * ctx
    return {"n_frozen_matmul": n_frozen, "n_lora": n_lora, "attention": attn,
            "flops_per_token": 4 * n_frozen + 6 * n_lora + attn}


# --------------------------------------------------------------------------------------------
# The plain recipe (a worker process)


def _recorder(steps: list[dict], counter: dict):
    """A TrainerCallback that appends each logged step's loss, time and token counts to ``steps``."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                steps.append({"step": state.global_step, "time": time.time(), "loss": float(logs["loss"]),
                              "tokens": counter["tokens"], "padded": counter["padded"],
                              **{field: float(logs[name]) for name, field in PREFERENCE_LOGS.items() if name in logs}})

    return Recorder()


def _per_step_tokens_and_peak(steps: list[dict], cuda: bool) -> dict:
    """Turn the recorder's running token totals into per-step counts (in place); the run's peak memory."""
    import resource

    import torch

    prev_t, prev_p = 0, 0
    for s in steps:
        s["tokens"], prev_t = s["tokens"] - prev_t, s["tokens"]
        s["padded"], prev_p = s["padded"] - prev_p, s["padded"]
    if cuda:
        return {"peak_reserved": torch.cuda.max_memory_reserved(), "peak_allocated": torch.cuda.max_memory_allocated()}
    return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _trainer_args(spec: dict, cuda: bool) -> dict:
    """The TrainingArguments both baselines share: the engine's batch, schedule, optimizer and seed."""
    return dict(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        learning_rate=spec["learning_rate"],
        lr_scheduler_type=spec["lr_scheduler"],
        warmup_steps=spec["warmup_ratio"],
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        seed=spec["seed"],
        bf16=cuda,
        use_cpu=not cuda,
        report_to="none",
        disable_tqdm=True,
    )


def plain_worker(spec: dict, out: Path) -> None:
    """The plain recipe as tutorials write it, with a callback that only records time, tokens and loss."""

    import datasets
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForSeq2Seq,
                              Trainer, TrainingArguments)

    transformers.logging.set_verbosity_error()
    cuda = torch.cuda.is_available()
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    train = datasets.load_from_disk(spec["tokenized"])
    transformers.set_seed(spec["seed"])
    compute = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"],
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute),
        device_map={"": 0} if cuda else None,
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec["gradient_checkpointing"])
    model = get_peft_model(model, LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                                             target_modules=spec["targets"], bias="none", task_type="CAUSAL_LM"))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    steps: list[dict] = []
    counter = {"tokens": 0, "padded": 0}

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, *args, **kwargs):
            counter["tokens"] += int(inputs["attention_mask"].sum())
            counter["padded"] += int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, *args, **kwargs)

    args = TrainingArguments(**_trainer_args(spec, cuda))
    trainer = CountingTrainer(
        model=model, args=args, train_dataset=train,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt"),
        callbacks=[_recorder(steps, counter)],
    )
    train_start = time.time()
    trainer.train()
    mem = _per_step_tokens_and_peak(steps, cuda)
    out.write_text(json.dumps({"train_start": train_start, "started": started, "steps": steps, **mem,
                               "elapsed_s": time.time() - started}))


# --------------------------------------------------------------------------------------------
# TRL's SFTTrainer, padding-free (a worker process)


def _trl_qlora_trainer(trainer_cls: type, trl_module, spec: dict, compute, before_lora=None, **kwargs):
    """TRL's trainer as its docs write QLoRA: the model by path with ``quantization_config`` (NF4, double
    quantization) and ``peft_config`` (LoRA). TRL casts the adapters of a quantized model to bf16 right
    after creating them (QLoRA paper, section 3); their fp32 values as created are kept on the trainer
    (``created_adapters``), for ``_restore_created_adapters``. ``before_lora(model)`` runs on the
    quantized model before the adapters are added."""
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    created: dict = {}
    make_peft_model = trl_module.get_peft_model

    def get_peft_model(model, config, **kw):
        if before_lora is not None:
            before_lora(model)
        model = make_peft_model(model, config, **kw)
        created.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return model

    trl_module.get_peft_model = get_peft_model
    try:
        trainer = trainer_cls(
            model=spec["model"],
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute),
            peft_config=LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                                   target_modules=spec["targets"], bias="none", task_type="CAUSAL_LM"),
            **kwargs,
        )
    finally:
        trl_module.get_peft_model = make_peft_model
    if not created:
        raise SystemExit("TRL created no adapters where expected (its get_peft_model was not called)")
    trainer.created_adapters = created
    return trainer


def _restore_created_adapters(trainer, spec: dict) -> list[str]:
    """The trainable weights' dtypes as TRL left them; then, unless ``trl_bf16_adapters``, the adapters put
    back to their fp32 values as created (the engine and the plain recipe train fp32 adapters)."""
    dtypes = sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad})
    if not spec.get("trl_bf16_adapters"):
        for n, p in trainer.model.named_parameters():
            if n in trainer.created_adapters:
                p.data = trainer.created_adapters[n].to(p.device)
    return dtypes


def _train_and_record(trainer, steps: list[dict], cuda: bool, started: float, out: Path, **facts) -> None:
    """Train a TRL baseline and write what it measured (per-step tokens and peak, times, TRL's version, the
    adapters' dtype as trained, and ``facts``) to ``out``."""
    import torch
    import trl

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    train_start = time.time()
    trainer.train()
    mem = _per_step_tokens_and_peak(steps, cuda)
    trained = sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad})
    out.write_text(json.dumps({"train_start": train_start, "started": started, "steps": steps, **mem,
                               "elapsed_s": time.time() - started, "trl_version": trl.__version__, **facts,
                               "adapter_dtype_trained": trained}))


def trl_worker(spec: dict, out: Path) -> None:
    """TRL's ``SFTTrainer`` in its documented padding-free QLoRA setup: the model given by path with
    ``quantization_config`` (NF4 + double quantization) and ``peft_config`` (LoRA), ``SFTConfig(padding_free=True)``
    (its own ``DataCollatorForLanguageModeling`` flattens each micro batch into one row with per-example
    ``position_ids``), completion-only loss, its own chunked log-prob loss (``add_fused_lm_head``). The data are the
    same token ids: TRL's pre-tokenized form (``input_ids`` + ``completion_mask``), from which TRL builds the labels
    itself; the worker checks that they are the engine's labels, token for token.

    Two deliberate departures from TRL's defaults, both to train the same thing as the other two: ``bf16`` only on
    CUDA (on the CPU everything is fp32, as in the plain recipe), and (unless ``trl_bf16_adapters``) the LoRA weights
    put back to their fp32 values as created after TRL casts them to bf16 for quantized models (the engine and the
    plain recipe train fp32 adapters, and bf16 ones train different losses)."""
    import importlib.util

    import datasets
    import torch
    import transformers
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    transformers.logging.set_verbosity_error()
    cuda = torch.cuda.is_available()
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    tokenized = datasets.load_from_disk(spec["tokenized"])
    engine_labels = [list(x) for x in tokenized["labels"]]
    # TRL's pre-tokenized prompt-completion form: the trained positions are the completion.
    train = datasets.Dataset.from_dict({
        "input_ids": [list(x) for x in tokenized["input_ids"]],
        "completion_mask": [[int(v != -100) for v in lab] for lab in engine_labels],
    })
    compute = torch.bfloat16 if cuda else torch.float32
    # TRL documents padding-free for FlashAttention; without flash-attn (and no Hub kernels offline) it is SDPA,
    # where transformers builds a block-diagonal mask from the packed position_ids.
    attn = "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"
    model_init_kwargs = {"dtype": compute, "attn_implementation": attn}
    if cuda:
        model_init_kwargs["device_map"] = {"": 0}
    args = SFTConfig(
        **_trainer_args(spec, cuda),
        gradient_checkpointing=spec["gradient_checkpointing"],
        padding_free=True,
        max_length=None,  # already truncated to seq_len; TRL refuses max_length with padding_free and no packing
        completion_only_loss=True,
        model_init_kwargs=model_init_kwargs,
    )
    steps: list[dict] = []
    counter = {"tokens": 0, "padded": 0}

    class CountingTrainer(SFTTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            # One flattened row per micro batch, no attention mask and no padding (pad_to_multiple_of is
            # TRL's "auto": none off Neuron); main() checks the tokens per step against the engine's.
            if "attention_mask" in inputs:
                counter["tokens"] += int(inputs["attention_mask"].sum())
            else:
                counter["tokens"] += int(inputs["input_ids"].numel())
            counter["padded"] += int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, *args, **kwargs)

    import trl.trainer.sft_trainer as sft_module

    trainer = _trl_qlora_trainer(CountingTrainer, sft_module, spec, compute, args=args, train_dataset=train,
                                 processing_class=tokenizer, callbacks=[_recorder(steps, counter)])
    if list(trainer.train_dataset["labels"]) != engine_labels:
        raise SystemExit("TRL's labels differ from the engine's")
    adapter_dtypes = _restore_created_adapters(trainer, spec)
    _train_and_record(trainer, steps, cuda, started, out, attn_implementation=attn,
                      adapter_dtype_from_trl=adapter_dtypes)


# --------------------------------------------------------------------------------------------
# TRL's DPOTrainer (a worker process, --method dpo)


class _HostCounter:
    """A collator whose batches' real and computed tokens are counted on the host, before they go to the
    device (as the engine's collator counts them: no read-back from the GPU per micro batch), queued in
    the order collated; ``take`` adds the oldest to the counter as its micro batch trains (the data
    loader collates a batch ahead)."""

    def __init__(self, inner, counter: dict) -> None:
        import collections

        self.inner, self.counter, self.queue = inner, counter, collections.deque()

    def __call__(self, features):
        batch = self.inner(features)
        self.queue.append((int(batch["attention_mask"].sum()), int(batch["input_ids"].numel())))
        return batch

    def take(self) -> None:
        tokens, padded = self.queue.popleft()
        self.counter["tokens"] += tokens
        self.counter["padded"] += padded


def trl_dpo_worker(spec: dict, out: Path) -> None:
    """TRL's ``DPOTrainer`` as its docs write QLoRA: the model given by path with ``quantization_config``
    (NF4 + double quantization) and ``peft_config`` (LoRA), ``DPOConfig`` with the engine's batch, rate,
    schedule, steps, seed, beta, sigmoid loss, ``max_length`` (the engine's seq_len) and reference
    (``precompute_ref_log_probs`` for ``precomputed``; else TRL's default, a pass with the adapter
    disabled beside each step), on the pair texts themselves, which TRL tokenizes; the worker checks its
    tokens against the engine's, pair by pair.

    Departures, each to train the same thing as the engine: ``bf16`` only on CUDA; the LoRA weights put
    back to their fp32 values as created after TRL casts them to bf16 (unless ``trl_bf16_adapters``); on
    the CPU, bitsandbytes' AVX512-BF16 inference repacking off, as the engine's process turns it off (a
    no-grad forward in eval mode, as precomputing the reference is, would repack the 4-bit weights into
    a layout with no backward); and the real tokens counted in the collator, on the host, taken as each
    micro batch trains."""
    import datasets
    import torch
    import transformers
    import trl.trainer.dpo_trainer as dpo_module
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    transformers.logging.set_verbosity_error()
    cuda = torch.cuda.is_available()
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    records = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines() if line.strip()]
    train = datasets.Dataset.from_list(records)
    compute = torch.bfloat16 if cuda else torch.float32
    model_init_kwargs = {"dtype": compute}
    if cuda:
        model_init_kwargs["device_map"] = {"": 0}
    args = DPOConfig(
        # AdamW as transformers' default has it on CUDA (fused), which the engine runs there too
        **(_trainer_args(spec, cuda) | {"optim": "adamw_torch_fused" if cuda else "adamw_torch"}),
        gradient_checkpointing=spec["gradient_checkpointing"],
        beta=spec["beta"],
        loss_type=["sigmoid"],
        max_length=spec["seq_len"],
        precompute_ref_log_probs=spec["reference"] == "precomputed",
        model_init_kwargs=model_init_kwargs,
    )
    steps: list[dict] = []
    counter = {"tokens": 0, "padded": 0}

    def cpu_repacking_off(model) -> None:
        if not cuda:
            import bitsandbytes as bnb

            for module in model.modules():
                if isinstance(module, bnb.nn.Linear4bit):
                    module.support_avx512bf16_for_cpu = False

    class CountingTrainer(DPOTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            self.data_collator.take()
            return super().training_step(model, inputs, *args, **kwargs)

    trainer = _trl_qlora_trainer(CountingTrainer, dpo_module, spec, compute, before_lora=cpu_repacking_off,
                                 args=args, train_dataset=train, processing_class=tokenizer,
                                 callbacks=[_recorder(steps, counter)])
    engine_pairs = datasets.load_from_disk(spec["tokenized"])
    mismatch = _first_pair_mismatch(trainer.train_dataset, engine_pairs, spec["seq_len"])
    if mismatch:
        raise SystemExit(f"TRL's tokens differ from the engine's: {mismatch}")
    adapter_dtypes = _restore_created_adapters(trainer, spec)
    trainer.data_collator = _HostCounter(trainer.data_collator, counter)
    _train_and_record(trainer, steps, cuda, started, out, adapter_dtype_from_trl=adapter_dtypes,
                      reference="precomputed" if args.precompute_ref_log_probs else "adapter disabled")


def _first_pair_mismatch(trl_pairs, engine_pairs, seq_len: int) -> str | None:
    """Where TRL's tokenized pairs first differ from the engine's (each answer cut where the engine cuts
    it, at seq_len - the prompt's length, as TRL's collator does); None when they are the same."""
    if len(trl_pairs) != len(engine_pairs):
        return f"{len(trl_pairs)} pairs against the engine's {len(engine_pairs)}"
    for i, (t, e) in enumerate(zip(trl_pairs, engine_pairs)):
        prompt = list(t["prompt_ids"])
        room = seq_len - len(prompt)
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            mine = prompt if key == "prompt_ids" else list(t[key])[:room]
            if mine != [int(x) for x in e[key]]:
                return f"pair {i}, {key}: {mine[:12]}... against {list(e[key])[:12]}..."
    return None


# --------------------------------------------------------------------------------------------
# The engine (its real training process)


def engine_result(run_dir: Path) -> dict:
    """Steps, losses and peak memory from the engine's own events file."""
    from engine.events import fold_history, read_events

    h = fold_history(read_events(run_dir))
    end = h.end
    if end is None or end.status != "finished":
        raise SystemExit(f"engine run {run_dir} ended {end.status if end else 'without an end'}: "
                         f"{end.message if end else ''}")
    steps = [{"step": s.step, "time": s.time, "loss": float(s.loss), "tokens": s.tokens,
              **{f: getattr(s, f) for f in PREFERENCE_LOGS.values() if getattr(s, f, None) is not None}}
             for s in h.steps]
    mem = {k: getattr(end, k) for k in ("peak_rss", "peak_reserved", "peak_allocated") if getattr(end, k) is not None}
    return {"steps": steps, "started": h.start.time, "elapsed_s": end.elapsed_s, **mem}


# --------------------------------------------------------------------------------------------
# Measuring


def throughput(steps: list[dict], warmup: int) -> float:
    """Real tokens per second over the steps after ``warmup`` (timed from the end of step ``warmup``)."""
    steps = sorted(steps, key=lambda s: s["step"])
    if len(steps) <= warmup + 1:
        raise SystemExit("too few steps for the warm-up asked for")
    base = steps[warmup - 1]["time"] if warmup else None
    timed = steps[warmup:]
    if base is None:
        raise SystemExit("--warmup must be at least 1 (the first step's start is not in the events)")
    return sum(s["tokens"] for s in timed) / (timed[-1]["time"] - base)


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def _stats(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


WORKERS = {"plain": plain_worker, "trl": trl_worker}
"""The baselines, each a worker process of its own."""

PREFERENCE_WORKERS = {"trl": trl_dpo_worker}
"""The baselines of ``--method dpo`` (the worker a spec with ``method: dpo`` runs)."""

BASELINE_NAMES = {"sft": {"plain": "plain recipe", "trl": "TRL SFTTrainer"}, "dpo": {"trl": "TRL DPOTrainer"}}
"""Each method's baselines, as the tables name them."""


def parse_baselines(text: str) -> list[str]:
    """``plain``, ``trl`` or both (``plain,trl``), in the order given, each once."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    bad = [n for n in names if n not in WORKERS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: baselines are {', '.join(WORKERS)}, or several joined by commas")
    return names


def summarize(results: dict[str, list[dict]], baselines: list[str], cuda: bool) -> dict:
    """Medians over rounds and the engine's ratios to each baseline; losses and tokens from the first round.
    The keys of a plain-only run are as before (``throughput_ratio``, ``ratio``, ``max_step_diff`` and
    ``padding_share`` against the first baseline); ``*_ratios``, ``max_step_diffs`` and ``padding_shares`` have
    one entry per baseline."""
    sides = [*baselines, "engine"]
    summary: dict = {}
    for k in sides:
        med, lo, hi = _stats([x["tokens_per_s"] for x in results[k]])
        summary[k] = {"median": med, "min": lo, "max": hi}
    ratios = {b: summary["engine"]["median"] / summary[b]["median"] for b in baselines}
    summary["throughput_ratios"] = ratios
    summary["throughput_ratio"] = ratios[baselines[0]]
    for key in (("peak_reserved", "peak_allocated") if cuda else ("peak_rss",)):
        pk = {k: statistics.median([x[key] for x in results[k]]) for k in sides}
        mem_ratios = {b: pk["engine"] / pk[b] for b in baselines}
        summary[key] = pk | {"ratio": mem_ratios[baselines[0]], "ratios": mem_ratios}
    en = results["engine"][0]["steps"]
    diffs, first, same, padding = {}, {}, {}, {}
    for b in baselines:
        bl = results[b][0]["steps"]
        diffs[b] = max(abs(x["loss"] - y["loss"]) for x, y in zip(bl, en)) if len(bl) == len(en) else math.inf
        first[b] = abs(bl[0]["loss"] - en[0]["loss"])
        same[b] = [x["tokens"] for x in bl] == [y["tokens"] for y in en]
        padded = sum(s["padded"] for s in bl)
        padding[b] = (padded - sum(s["tokens"] for s in bl)) / padded
    summary["final_loss"] = ({k: results[k][0]["steps"][-1]["loss"] for k in sides}
                             | {"max_step_diff": diffs[baselines[0]], "max_step_diffs": diffs,
                                "first_step_diffs": first})
    summary["same_tokens"] = same
    summary["padding_share"] = padding[baselines[0]]
    summary["padding_shares"] = padding
    return summary


def results_table(summary: dict, baselines: list[str], cuda: bool, steps: int, method: str = "sft") -> str:
    """The summary as a Markdown table: one column per baseline, then the engine."""
    sides = [*baselines, "engine"]
    names = BASELINE_NAMES[method] | {"engine": "engine"}
    rows = [["", *(names[k] for k in sides)], ["---", *("---:" for _ in sides)]]
    rows.append(["real tokens/s, median (min-max)",
                 *(f"{summary[k]['median']:,.0f} ({summary[k]['min']:,.0f}-{summary[k]['max']:,.0f})" for k in sides)])
    rows.append(["engine / this, throughput", *(f"**{summary['throughput_ratios'][b]:.2f}x**" for b in baselines), ""])
    for key in (("peak_reserved", "peak_allocated") if cuda else ("peak_rss",)):
        label = {"peak_rss": "peak RSS", "peak_reserved": "peak reserved", "peak_allocated": "peak allocated"}[key]
        rows.append([f"{label}, median", *(_gib(summary[key][k]) for k in sides)])
        rows.append([f"engine / this, {label}", *(f"**{summary[key]['ratios'][b]:.2f}**" for b in baselines), ""])
    rows.append([f"loss at step {steps} (same examples)", *(f"{summary['final_loss'][k]:.4f}" for k in sides)])
    if method != "sft":  # at step 1 both are ln 2; what the later steps differ by is the test
        rows.append(["loss difference from the engine at step 1",
                     *(f"{summary['final_loss']['first_step_diffs'][b]:.1e}" for b in baselines), ""])
    rows.append(["largest per-step loss difference from the engine",
                 *(f"{summary['final_loss']['max_step_diffs'][b]:.1e}" for b in baselines), ""])
    rows.append(["real tokens per step as the engine's",
                 *("yes" if summary["same_tokens"][b] else "**no**" for b in baselines), ""])
    # dpo: both pad each micro batch's rows to its longest, with TRL's collator, so the same share
    rows.append(["padding computed", *(f"{summary['padding_shares'][b]:.0%}" for b in baselines),
                 "0%" if method == "sft" else "the same (TRL's collator)"])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def loss_table(results: dict[str, list[dict]], baselines: list[str]) -> str:
    """The first round's steps side by side, a Markdown table: each side's loss (and the baseline's
    difference from the engine's), reward margin and preference accuracy."""
    sides = [*baselines, "engine"]
    head = ["step", *(f"{k} loss" for k in sides), *(f"{b} - engine" for b in baselines),
            *(f"{k} margin" for k in sides), *(f"{k} accuracy" for k in sides)]
    rows = [head, ["---:" for _ in head]]

    def num(x, fmt):
        return "" if x is None else format(x, fmt)

    for i, e in enumerate(results["engine"][0]["steps"]):
        at = {k: (results[k][0]["steps"][i] if i < len(results[k][0]["steps"]) else {}) for k in sides}
        rows.append([str(e["step"]), *(num(at[k].get("loss"), ".6f") for k in sides),
                     *(num(at[b].get("loss") - e["loss"] if "loss" in at[b] else None, "+.1e") for b in baselines),
                     *(num(at[k].get("reward_margin"), "+.5f") for k in sides),
                     *(num(at[k].get("reward_accuracy"), ".3f") for k in sides)])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each runs both)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the throughput")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--examples", type=int, default=400)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="turn it off everywhere (prepare_model_for_kbit_training and TRL turn it on by default)")
    p.add_argument("--config", type=Path, help="build the model with random weights from this config folder")
    p.add_argument("--model", type=Path, help="a pretrained model folder (weights and tokenizer) to train instead, "
                                              "e.g. the real model of scripts/real_model.py (make bench-real)")
    p.add_argument("--engine-masked-sdpa", action="store_true",
                   help="run the engine with plain SDPA on packed rows (a dense block-diagonal mask), as it "
                        "was before its per-example attention, for comparison")
    p.add_argument("--engine-full-loss", action="store_true",
                   help="the engine with transformers' loss (every position's logits at once; the preset's "
                        "training.chunked_loss false) instead of its own chunked loss, to measure that change")
    p.add_argument("--matmul-size", type=int, default=4096,
                   help="n of the n x n matmuls that measure the device's peak rate (for the MFU); a dry run "
                        "gives a small one, whose rate means nothing but whose code runs")
    p.add_argument("--matmul-seconds", type=float, default=3.0,
                   help="how long those matmuls run (a dry run gives a fraction of a second)")
    p.add_argument("--json", type=Path, help="also write every measurement here")
    p.add_argument("--keep", type=Path, help="keep the work folder here instead of a temporary one")
    p.add_argument("--baseline", type=parse_baselines, default=None, metavar="NAMES",
                   help="what the engine is measured against: plain (the recipe as tutorials write it, the "
                        "default), trl (TRL's SFTTrainer, padding-free; needs the 'bench' extra), or plain,trl "
                        "(both, in the same interleaved rounds); with --method dpo trl (TRL's DPOTrainer), the "
                        "only one")
    p.add_argument("--method", choices=("sft", "dpo"), default="sft",
                   help="sft (the default) or dpo: the engine's dpo against TRL's DPOTrainer on the same pairs")
    p.add_argument("--beta", type=float, default=0.1, help="dpo's beta (both sides)")
    p.add_argument("--reference", choices=("each_step", "precomputed"), default="each_step",
                   help="dpo's reference log-probabilities: a pass beside each step (TRL's default) or "
                        "precomputed before the first step (both sides)")
    p.add_argument("--trl-bf16-adapters", action="store_true",
                   help="keep TRL's cast of the LoRA weights to bf16 (its default for quantized models) instead of "
                        "training fp32 adapters as the engine and the plain recipe do")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        spec = json.loads(a.spec.read_text())
        (PREFERENCE_WORKERS if spec.get("method") == "dpo" else WORKERS)[a.worker](spec, a.out)
        return 0
    dpo = a.method == "dpo"
    baselines = a.baseline or (["trl"] if dpo else ["plain"])
    if dpo and (set(baselines) - set(PREFERENCE_WORKERS) or a.engine_masked_sdpa or a.engine_full_loss):
        p.error("--method dpo runs against --baseline trl only (TRL's DPOTrainer), without the --engine-* options")
    if "trl" in baselines:
        import importlib.util

        if importlib.util.find_spec("trl") is None:
            raise SystemExit("--baseline trl needs TRL: pip install -e '.[bench]' (or 'trl>=1.0')")

    import resource
    import signal

    import torch
    import yaml

    from engine.demo import ensure_demo_model

    def _terminate(signum, frame):
        raise SystemExit(128 + signum)  # through the finally below: the work folder is removed

    signal.signal(signal.SIGTERM, _terminate)
    from engine.preset import load_preset

    cuda = torch.cuda.is_available()
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="qlora-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.time()
        demo_dir = ensure_demo_model()
        if a.model:
            from transformers import AutoConfig

            model_dir = a.model.resolve()
            model_desc = f"{model_dir.name} ({AutoConfig.from_pretrained(model_dir).model_type}, pretrained weights)"
        elif a.config:
            model_dir = build_random_model(a.config, work / "model", demo_dir,
                                           "bfloat16" if cuda else "float32", seed=0)
            model_desc = f"{a.config.name} architecture, random weights"
        else:
            model_dir = demo_dir
            model_desc = "the demo model builtin:tiny-llama (pretrained briefly)"
        data_file = work / "data.jsonl"
        records = make_pairs(a.examples, a.seq_len) if dpo else make_records(a.examples)
        data_file.write_text("".join(json.dumps(r) + "\n" for r in records))

        gc = not a.no_gradient_checkpointing
        preset = yaml.safe_load((ROOT / "presets" / "tiny-demo.yaml").read_text())
        preset["description"] = "benchmark against " + " and ".join(baselines)
        preset["model"]["source"] = str(model_dir)
        preset["lora"].update(r=a.lora_r, alpha=2 * a.lora_r, dropout=0.0, targets="all-linear")
        preset["data"].update(train=str(data_file), validation_split=0.0)
        preset["training"].update(seq_len=a.seq_len, micro_batch_size=a.micro_batch, gradient_accumulation_steps=1,
                                  max_steps=a.steps, learning_rate=a.lr, gradient_checkpointing=gc,
                                  save_steps=a.steps + 1000, eval_steps=None, logging_steps=1, seed=42,
                                  chunked_loss=not a.engine_full_loss)
        if dpo:  # the same pairs in the same order on both sides: none dropped as duplicates, none held out
            preset["data"].update(format="preference", dedupe=False)
            preset["training"].update(method="dpo", beta=a.beta, dpo_loss="sigmoid", reference=a.reference)
        preset["output"] = {"runs_dir": str(work / "runs")}
        preset_file = work / "preset.yaml"
        preset_file.write_text(yaml.safe_dump(preset, sort_keys=False))

        # The tokenized data both train on: the engine's own prepare_data (its cache serves the
        # engine's runs below), saved for the plain recipe as a datasets folder.
        from engine.data import load_tokenizer, prepare_data
        from engine.modelinfo import inspect_model
        from engine.plan import resolve_targets

        pr = load_preset(preset_file)
        tokenizer = load_tokenizer(pr.model)
        tk0 = time.time()
        prepared = prepare_data(pr.data, tokenizer, pr.training.seq_len, pr.training.seed, method=pr.training.method)
        tokenize_s = time.time() - tk0
        prepared.train.save_to_disk(str(work / "tokenized"))
        if dpo:  # each side of a pair is a row of its own: the prompt and that answer
            t = prepared.train
            lengths = [len(p) + len(x) for p, c, r in zip(t["prompt_ids"], t["chosen_ids"], t["rejected_ids"])
                       for x in (c, r)]
        else:
            lengths = [len(x) for x in prepared.train["input_ids"]]
        targets = list(resolve_targets(pr, inspect_model(str(model_dir))))
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_dir)
        spec = {
            "model": str(model_dir), "tokenized": str(work / "tokenized"), "seed": pr.training.seed,
            "gradient_checkpointing": gc, "lora_r": a.lora_r, "lora_alpha": 2 * a.lora_r, "targets": targets,
            "micro_batch_size": a.micro_batch, "steps": a.steps, "learning_rate": a.lr,
            "lr_scheduler": pr.training.lr_scheduler, "warmup_ratio": pr.training.warmup_ratio,
            "output_dir": str(work / "baseline-out"), "trl_bf16_adapters": a.trl_bf16_adapters,
        }
        if dpo:
            spec.update(method="dpo", data=str(data_file), seq_len=a.seq_len, beta=a.beta, reference=a.reference)
        spec_file = work / "spec.json"
        spec_file.write_text(json.dumps(spec))
        fl = flops_per_token(model_dir, a.lora_r, lengths)
        if dpo and a.reference == "each_step":  # and the reference's forward of every row: 2 N + attention's third
            fl["reference_forward"] = 2 * fl["n_frozen_matmul"] + fl["attention"] / 3
            fl["flops_per_token"] += fl["reference_forward"]
        n_params = fl["n_frozen_matmul"]
        print(f"model: {model_desc}; hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
              f"vocab {cfg.vocab_size}; linear weights {n_params:,}; LoRA r={a.lora_r} on {', '.join(targets)} "
              f"({fl['n_lora']:,} params)")
        what = f"{len(lengths) // 2} pairs ({len(lengths)} rows, prompt + one answer each)" if dpo else \
            f"{len(lengths)} examples"
        print(f"data: {what}, {sum(lengths):,} tokens, length min {min(lengths)} / median "
              f"{int(statistics.median(lengths))} / mean {sum(lengths) / len(lengths):.0f} / max {max(lengths)}; "
              f"engine tokenization {tokenize_s:.2f} s (cached afterwards)")
        print(f"runs: {a.steps} optimizer steps x micro batch {a.micro_batch}, seed {pr.training.seed}, lr {a.lr}, "
              f"gradient checkpointing {'on' if gc else 'off'} in all; "
              f"{f'dpo, beta {a.beta}, sigmoid loss, reference {a.reference}; ' if dpo else ''}"
              f"engine against {' and '.join(BASELINE_NAMES[a.method][b] for b in baselines)}, {a.rounds} rounds, "
              f"first {a.warmup} steps left out; device {'CUDA ' + torch.cuda.get_device_name(0) if cuda else 'CPU'} "
              f"({os.cpu_count()} cores)", flush=True)

        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        sides = [*baselines, "engine"]
        results: dict[str, list[dict]] = {k: [] for k in sides}
        for r in range(a.rounds):
            order = sides if r % 2 == 0 else sides[::-1]
            for which in order:
                w0 = time.time()
                ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                if which in WORKERS:
                    out = work / f"{which}-{r}.json"
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", which,
                           "--spec", str(spec_file), "--out", str(out)]
                    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                    if proc.returncode:
                        print(proc.stderr[-4000:], file=sys.stderr)
                        raise SystemExit(f"the {which} baseline failed (exit {proc.returncode})")
                    res = json.loads(out.read_text())
                else:
                    run_dir = work / "runs" / f"engine-{r}"
                    shutil.rmtree(run_dir, ignore_errors=True)  # events.jsonl is appended to
                    run_dir.mkdir(parents=True)
                    shutil.copy(preset_file, run_dir / "preset.yaml")
                    cmd = [sys.executable, "-m", "engine.train", str(run_dir)]
                    # The same entry point with one of the engine's changes put back, to measure it.
                    patches = []
                    if a.engine_masked_sdpa:  # transformers' SDPA with its dense mask on packed rows
                        patches.append("t._attn_implementation = lambda preset, plan: plan.attn_implementation")
                    if patches:
                        cmd = [sys.executable, "-c", "import sys, engine.train as t; " + "; ".join(patches)
                               + "; sys.exit(t.main(sys.argv[1:]))", str(run_dir)]
                    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                    if proc.returncode:
                        print(proc.stderr[-4000:], file=sys.stderr)
                        raise SystemExit(f"the engine failed (exit {proc.returncode})")
                    res = engine_result(run_dir)
                res["tokens_per_s"] = throughput(res["steps"], a.warmup)
                res["wall_s"] = time.time() - w0
                ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                # Cores this process kept busy on average: well under the machine's count means
                # something else took CPU time during the run (a disturbed round; re-run).
                res["cores_used"] = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / res["wall_s"]
                results[which].append(res)
                mem = res.get("peak_reserved") or res.get("peak_rss")
                print(f"  round {r + 1} {which:6s}: {res['tokens_per_s']:8.0f} real tok/s, peak "
                      f"{_gib(mem)}, final loss {res['steps'][-1]['loss']:.4f}, process {res['wall_s']:.1f} s "
                      f"using {res['cores_used']:.2f} cores",
                      flush=True)

        print()
        summary = summarize(results, baselines, cuda)
        for k in sides:
            s = summary[k]
            print(f"{k:6s} real tokens/s: median {s['median']:.0f}  min {s['min']:.0f}  max {s['max']:.0f}")
        for b in baselines:
            print(f"throughput ratio engine / {b} (medians): {summary['throughput_ratios'][b]:.2f}x")
        for key in (("peak_reserved", "peak_allocated") if cuda else ("peak_rss",)):
            pk = summary[key]
            print(f"{key} (median over rounds): " + "  ".join(f"{k} {_gib(pk[k])}" for k in sides) + "  "
                  + "  ".join(f"engine / {b} {pk['ratios'][b]:.2f}" for b in baselines))
        en = results["engine"][0]["steps"]
        for b in baselines:
            bl = results[b][0]["steps"]
            fl_b = summary["final_loss"]
            print(f"final loss (step {bl[-1]['step']}, same examples): {b} {bl[-1]['loss']:.4f}  engine "
                  f"{en[-1]['loss']:.4f}; largest per-step difference {fl_b['max_step_diffs'][b]:.2e} over "
                  f"{len(bl)} steps; real tokens per step identical: {summary['same_tokens'][b]}")
            padded = sum(s["padded"] for s in bl)
            real = sum(s["tokens"] for s in bl)
            print(f"{b} padding: {padded - real:,} of {padded:,} computed positions ({(padded - real) / padded:.0%})")
        f = fl["flops_per_token"]
        peak = matmul_flops(cuda, seconds=a.matmul_seconds, n=a.matmul_size)
        summary["matmul_flops_measured"] = peak
        where = "this GPU's bf16" if cuda else "this CPU's fp32"
        for k in sides:
            achieved = summary[k]["median"] * f
            summary[k]["model_flops_per_s"] = achieved
            summary[k]["mfu_vs_measured_matmul"] = achieved / peak
            line = (f"MFU {k}: {achieved / peak:.2%} of {where} matmul rate measured now ({peak / 1e12:.2f} "
                    f"TFLOP/s); {achieved / 1e9:.2f} GFLOP/s at {f / 1e9:.4f} GFLOP per real token")
            if cuda:
                summary[k]["mfu"] = achieved / H100_PEAK_FLOPS
                line += f"; {achieved / H100_PEAK_FLOPS:.2%} of the H100's 989 TFLOP/s bf16 peak"
            print(line)
        if dpo:
            print()
            print(loss_table(results, baselines))
        print()
        print(results_table(summary, baselines, cuda, a.steps, a.method))
        print()
        print(f"benchmark wall time {time.time() - t0:.0f} s")
        if a.json:
            a.json.write_text(json.dumps({"summary": summary, "flops": fl, "spec": spec, "lengths": lengths,
                                          "results": results, "method": a.method}, indent=1))
        return 0
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
            cached = getattr(locals().get("prepared"), "cache_path", None)
            if cached:  # the engine's data cache entry for this temporary data file
                shutil.rmtree(cached, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
