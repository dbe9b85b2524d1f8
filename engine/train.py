"""The training process: ``python -m engine.train RUN_DIR [--resume]``.

It reads ``RUN_DIR/preset.yaml``, checks the data before any weights load, loads the base model
4-bit through bitsandbytes, adds LoRA adapters through peft, and trains with transformers'
Trainer. Everything anyone needs to see goes to ``RUN_DIR/events.jsonl`` as it happens.

It is started detached in its own session (see ``engine.runs``), so a dropped SSH connection or a
closed wizard does not stop it, and holds the run's lock for its whole life. SIGTERM or SIGINT
saves a checkpoint at the end of the step and ends with ``end: stopped``; a second signal changes
nothing, a third abandons that checkpoint (the end event says what is saved). ``--resume``
continues from the newest complete checkpoint. A checkpoint or adapter cut short by a full disk or
an abandoned stop is removed, and the end event names it.

Exit status: 0 finished, 1 failed, 2 bad input, 130 stopped.
"""

from __future__ import annotations

import argparse
import errno
import functools
import math
import os
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine.collector import fewer_collections, kept_while_training
from engine.distributed import (
    RANKS_FILE,
    Control,
    Rank,
    check_count,
    check_numbers,
    clear_stopped,
    describe_dead,
    mark_stopped,
)
from engine.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_STOPPED, UserError, first_line, os_error
from engine.events import EventWriter, NoEvents
from engine.preset import PREFERENCE_METHODS, Preset, load_preset
from engine.runs import (
    ADAPTER_DIR,
    FULL_DISK_BYTES,
    TENSORBOARD_DIR,
    RunLock,
    checkpoint_step,
    free_bytes,
    newest_checkpoint,
    remove_incomplete_checkpoints,
)

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback

    from engine.data import PreparedData
    from engine.distributed import RankRecord, Watchdog
    from engine.memory import MemoryEstimate
    from engine.modelinfo import ModelInfo
    from engine.plan import DevicePlan

    _TrainerBase = Trainer
    _CallbackBase = TrainerCallback
else:
    # The engine's Trainer and callback are written for transformers' classes, which go beneath them
    # when a run first builds one (_on_base): importing transformers takes seconds, importing this must not.
    _TrainerBase = _CallbackBase = object


TRANSFORMERS_OPTIMIZER_NAMES = {"adamw_8bit": "adamw_bnb_8bit"}
"""The preset's optimizer names (``choices("training.optimizer")``) that transformers' TrainingArguments
spells otherwise; the rest it spells the same."""


class StopRequested(BaseException):
    """SIGTERM or SIGINT arrived before the trainer was running: there is nothing to checkpoint yet.

    A BaseException, like KeyboardInterrupt, so library code that catches ``Exception`` while the
    model loads cannot swallow it."""


class AbandonRequested(BaseException):
    """A third signal: stop at once, without the checkpoint the first one asked for."""


ABANDON_AFTER_SIGNALS = 3
"""Signals it takes to abandon the checkpoint of a stop: one asks for it, a second (an impatient
Ctrl-C, a supervisor's repeated TERM) must not throw away the steps trained since the last one."""


class _StopFlag:
    """What SIGTERM/SIGINT do depends on the phase of the run.

    - ``setup`` (data, model loading): nothing is trained yet; the first signal ends the run at once.
    - ``training``: the first signal asks the events callback to checkpoint at the end of the step
      and stop; a second only says that this is under way; the third abandons the checkpoint.
    - ``finishing`` (final validation, writing the adapter): a signal is noted and the run
      finishes, which takes seconds; the third abandons it.
    - ``ending`` (writing the end event): signals are ignored, so the end is always written.
    """

    def __init__(self) -> None:
        self.count = 0
        self.signal_name = ""
        self.phase = "setup"

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.count > 0

    def install(self) -> None:
        """Take over SIGTERM and SIGINT; ignore SIGHUP."""
        self._old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        # Own session already; a hangup of whatever terminal started us must never stop training.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def uninstall(self) -> None:
        """Give the signals back (for in-process use, as in tests)."""
        for sig, handler in getattr(self, "_old", {}).items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.phase == "ending":
            return
        self.count += 1
        self.signal_name = signal.Signals(signum).name
        if self.phase == "setup":
            if self.count == 1:
                raise StopRequested()
            return
        if self.count == ABANDON_AFTER_SIGNALS:
            raise AbandonRequested()
        if self.count < ABANDON_AFTER_SIGNALS:
            doing = ("saving a checkpoint at the end of this step" if self.phase == "training"
                     else "finishing: writing the adapter")
            _say(f"{self.signal_name} ({self.count} of {ABANDON_AFTER_SIGNALS}): {doing}; "
                 f"signal {ABANDON_AFTER_SIGNALS - self.count} more time(s) to abandon it")


def _say(line: str) -> None:
    """One line to train.log from anywhere, a signal handler included: an unbuffered write, so it
    cannot re-enter a buffered stream the interrupted code was writing, and never raises."""
    try:
        os.write(2, (line + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


@dataclass
class RunState:
    """What one training process knows of its run so far: the callback and every path that ends the
    run (finished, stopped, abandoned, failed, a rank lost) read and write this one object."""

    rank: Rank = field(default_factory=Rank)
    """This process's place among the run's processes."""
    run_dir: Path | None = None
    """The run directory."""
    events: EventWriter | NoEvents = field(default_factory=NoEvents)
    """Where the run's events go (``NoEvents`` on every rank but local rank 0)."""
    stop: _StopFlag = field(default_factory=_StopFlag)
    """SIGTERM and SIGINT so far, and the phase of the run that decides what they do."""
    started: float = field(default_factory=time.time)
    """When the run began (``time.time()``): every end event's ``elapsed_s`` counts from it."""
    control: Control = field(init=False)
    """The ranks' agreement channel (answers locally in a single-process run)."""
    preset: Preset | None = None
    """The preset as run, once read."""
    estimate: MemoryEstimate | None = None
    """The memory estimate, once made."""
    callback: EventsCallback | None = None
    """The events callback, once the trainer exists (it keeps the device's peak)."""
    device: str = "cpu"
    """``cuda`` or ``cpu``, once planned."""
    device_index: int = 0
    """The NVML index of this process's GPU."""
    step: int = 0
    """The last optimizer step done."""
    tokens: int = 0
    """Real tokens this process trained on."""
    device_used_before: int | None = None
    """What the GPU held before this process touched it."""
    writing_adapter: bool = False
    """This process is writing the adapter (an end while it does removes the part written)."""
    adapter_partial: Path | None = None
    """The scratch folder the adapter is being written to (removed if the write is cut short)."""
    nonfinite_step: int | None = None
    """The step whose loss was not finite (training stopped there)."""
    last_eval_step: int | None = None
    """The step of the last validation."""
    stop_agreed: bool = False
    """Every rank agreed to checkpoint and stop at this step (a stop reached at least one of them)."""
    ranks: list[RankRecord] = field(default_factory=list)
    """The record of each rank on this machine (several processes only)."""
    watchdog: Watchdog | None = None
    """The thread that notices another rank of this machine dying (local rank 0 of several only)."""

    def __post_init__(self) -> None:
        self.control = Control(self.rank)


REAL_TOKENS_KEY = "real_tokens"
"""The batch key the engine's collator adds: the micro batch's real tokens, counted on the host."""


def _count_tokens(inputs: dict) -> int:
    """Real tokens in a micro batch: the attention mask's ones when padded, every token when packed."""
    mask = inputs.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())


def _memory_now(device: str, index: int = 0) -> dict:
    """Memory in use right now: torch's counters and the device total on CUDA, RSS on the CPU."""
    if device == "cuda":
        import torch

        out = {
            "mem_allocated": torch.cuda.memory_allocated(),
            "mem_reserved": torch.cuda.memory_reserved(),
        }
        used = _nvml_used_bytes(index)
        if used is not None:
            out["mem_device_used"] = used
        return out
    return {"mem_rss": _rss_bytes()}


def _rss_bytes() -> int:
    """Resident memory of this process now."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _peak_rss_bytes() -> int:
    """Peak resident memory of this process."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_NVML_HANDLE = None


def _nvml_used_bytes(index: int = 0) -> int | None:
    """Memory used on this process's GPU as nvidia-smi shows it (includes the CUDA context and managed memory)."""
    global _NVML_HANDLE
    try:
        import pynvml

        if _NVML_HANDLE is None:
            pynvml.nvmlInit()
            _NVML_HANDLE = pynvml.nvmlDeviceGetHandleByIndex(index)
        return int(pynvml.nvmlDeviceGetMemoryInfo(_NVML_HANDLE).used)
    except Exception:
        return None


PREFERENCE_LOGS = {"rewards/chosen": "rewards_chosen", "rewards/rejected": "rewards_rejected",
                   "rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy", "nll_loss": "nll_loss"}
"""TRL's DPO and ORPO log names, and the step event's fields they become."""


def _preference_figures(logs: dict, prefix: str = "") -> dict:
    """The preference figures among a training log's (or with ``prefix`` ``eval_``, a validation's)
    values, under the step event's names; nothing for sft."""
    return {field: float(logs[prefix + name]) for name, field in PREFERENCE_LOGS.items() if prefix + name in logs}


class EventsCallback(_CallbackBase):
    """A TrainerCallback (``_on_base`` puts transformers' ``TrainerCallback`` beneath it) that turns the
    trainer's progress into step, eval and checkpoint events (on the rank that writes them) and a stop
    asked of any rank into checkpoint-and-stop on all of them at the same step."""

    def __init__(self, run: RunState) -> None:
        self.run = run
        """The run's state: its events, its stop, its step and tokens."""
        self.last_time = time.time()
        """When the last step event (or a validation, or a checkpoint) was done: its speed counts from here."""
        self.last_tokens = 0
        """Real tokens all ranks had trained on at the last step event."""
        self.peak_device_used = 0
        """The most the device held at any step event (the highest of the ranks')."""

    def on_train_begin(self, args, state, control, **kw):
        """The speed of the first step counts from here."""
        self.last_time = time.time()
        self.last_tokens = self._all_tokens(self.run.tokens)

    def _all_tokens(self, mine: int) -> int:
        run = self.run
        return sum(run.control.gather(mine, check_count)) if run.rank.distributed else mine

    def on_step_end(self, args, state, control, **kw):
        """The step done; a stop asked of any rank checkpoints this step and stops, on every rank."""
        run = self.run
        run.step = state.global_step
        # Every rank asks every step (a one-integer gloo all-reduce, no GPU sync): a stop that
        # reached one rank is seen by all before the next step, so they checkpoint the same step.
        if run.control.any(run.stop.requested):
            run.stop_agreed = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kw):
        """A training log becomes a step event (loss, speed, memory, every rank's when several); a
        non-finite loss stops training."""
        logs = logs or {}
        if "loss" not in logs:
            return control
        run = self.run
        now = time.time()
        mem = _memory_now(run.device, run.device_index)
        mine = {"rank": run.rank.rank, "tokens": run.tokens, **mem}
        every = run.control.gather(mine, check_numbers)  # every rank logs the same steps (the loss is all-reduced)
        seen = sum(r["tokens"] for r in every)
        tokens = seen - self.last_tokens
        dt = max(now - self.last_time, 1e-9)
        self.last_time, self.last_tokens = now, seen
        if run.rank.distributed:
            mem = {k: max(r.get(k) or 0 for r in every) for k in mem}
        self.peak_device_used = max(self.peak_device_used, mem.get("mem_device_used", 0))
        loss = float(logs["loss"])
        run.events.emit(
            "step",
            step=state.global_step,
            total_steps=state.max_steps,
            epoch=round(float(state.epoch or 0), 4),
            loss=loss,
            learning_rate=logs.get("learning_rate"),
            grad_norm=logs.get("grad_norm"),
            tokens=tokens,
            tokens_per_s=tokens / dt,
            tokens_seen=seen,
            ranks=every if run.rank.distributed else None,
            **mem,
            **_preference_figures(logs),
        )
        if not math.isfinite(loss):
            run.nonfinite_step = state.global_step
            control.should_training_stop = True
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        """A validation becomes an eval event."""
        # Time spent validating is not training time: the next step's speed starts from here.
        self.last_time = time.time()
        metrics = metrics or {}
        self.run.last_eval_step = state.global_step
        if "eval_loss" in metrics:
            self.run.events.emit("eval", step=state.global_step, epoch=round(float(state.epoch or 0), 4),
                                 eval_loss=float(metrics["eval_loss"]),
                                 **{f"eval_{k}": v for k, v in _preference_figures(metrics, "eval_").items()
                                    if k in ("reward_margin", "reward_accuracy")})
        return control

    def on_save(self, args, state, control, **kw):
        """A checkpoint written becomes a checkpoint event, its files given the run's modes."""
        self.last_time = time.time()  # nor is time spent writing a checkpoint
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        _settle_modes(path)
        self.run.events.emit("checkpoint", step=state.global_step, path=str(path))
        return control


def _settle_modes(folder: Path) -> None:
    """Give a folder the libraries wrote (safetensors makes its files 0600) the modes the umask asks
    for, like every other file of the run (``engine.files``)."""
    from engine.files import settle_tree

    try:
        settle_tree(folder)
    except OSError:
        pass  # a mode is not worth failing a run over


def _oom_advice(preset: Preset, estimate) -> str:
    """Concrete changes that lower the peak, most effective first."""
    t = preset.training
    tips = []
    if t.micro_batch_size > 1:
        tips.append(f"micro batch {t.micro_batch_size} -> {max(1, t.micro_batch_size // 2)} "
                    f"(raise gradient accumulation to keep the effective batch)")
    if not t.gradient_checkpointing:
        tips.append("turn gradient checkpointing on")
    if t.seq_len > 512:
        tips.append(f"sequence length {t.seq_len} -> {t.seq_len // 2}")
    if t.optimizer == "adamw_torch":
        tips.append("optimizer adamw_8bit")
    if preset.lora.targets == "all-linear" or len(preset.lora.targets) > 2:
        tips.append("fewer LoRA targets or a smaller rank")
    est = f"the estimate for these settings was {estimate.total_bytes / 2**30:.1f} GiB; " if estimate else ""
    return est + "try: " + "; ".join(tips or ["a GPU with more free memory"])


def _attn_implementation(preset: Preset, device_plan) -> str:
    """The attention kernel the model loads with (the plan's; the engine's own kernels for packed
    rows are registered with transformers first)."""
    from engine.attention import PACKED_KERNELS, register_kernels

    if device_plan.attn_implementation in PACKED_KERNELS:
        register_kernels()
    return device_plan.attn_implementation


def _checked_plan(device_plan):
    """The plan, with PyTorch's varlen kernel checked on this GPU against per-example SDPA first;
    where it fails or differs, per-example SDPA instead, and the reason in the plan's note."""
    from dataclasses import replace

    from engine.attention import PACKED_SDPA, VARLEN_TORCH, describe_kernel, probe_varlen

    if device_plan.attn_implementation != VARLEN_TORCH:
        return device_plan
    problem = probe_varlen(device_plan.compute_dtype)
    if problem is None:
        return device_plan
    rest = device_plan.kernels_note.split("; ", 1)[-1]
    return replace(device_plan, attn_implementation=PACKED_SDPA,
                   kernels_note=f"{describe_kernel(PACKED_SDPA)}, because PyTorch's varlen kernel failed its check "
                                f"on this GPU ({problem}); {rest}")


def _load_model(preset: Preset, source: str, device_plan):
    """The base model, 4-bit through bitsandbytes (or 16-bit for plain LoRA), ready for adapters."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = getattr(torch, device_plan.load_dtype)
    kwargs = dict(
        dtype=dtype,
        attn_implementation=_attn_implementation(preset, device_plan),
        revision=preset.model.revision,
        trust_remote_code=preset.model.trust_remote_code,
    )
    if device_plan.fsdp:
        # FSDP-QLoRA as bitsandbytes, peft and accelerate document it: the 4-bit weights are packed
        # in the compute dtype (FSDP shards only float tensors, and every tensor of a unit must share
        # a dtype), the model loads in that dtype, and only rank 0 reads the weights from disk
        # (the others start on the meta device and get them from rank 0 when FSDP wraps the model).
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"
        storage = getattr(torch, device_plan.compute_dtype)
        kwargs["dtype"] = storage
    else:
        storage = torch.uint8
    if preset.quantization.method != "none":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=preset.quantization.method,
            bnb_4bit_use_double_quant=preset.quantization.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, device_plan.compute_dtype),
            bnb_4bit_quant_storage=storage,
        )
    if device_plan.device == "cuda" and not device_plan.fsdp:
        # Each DDP rank holds the whole 4-bit model on its own GPU; FSDP places the shards itself.
        kwargs["device_map"] = {"": device_plan.local_rank}
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if device_plan.liger:
        from engine.kernels import apply_liger

        apply_liger(model)  # before the adapters wrap the Linear layers it leaves alone
    # The KV cache path ignores packed position_ids and lets packed examples attend to each other.
    model.config.use_cache = False
    # peft's prepare_model_for_kbit_training would cast embeddings, head and norms to fp32
    # (Llama-3-8B: +2.1 GB). They stay in the load dtype; only the adapters train, in fp32.
    for p in model.parameters():
        p.requires_grad_(False)
    if device_plan.device == "cpu" and preset.quantization.method != "none":
        import bitsandbytes as bnb

        # bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks a Linear4bit's weight into an
        # inference-only layout at its first no-grad forward (an evaluation); training afterwards
        # goes through gemv_4bit, which has no autograd, and the adapters below stop learning.
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    return model


def _add_lora(model, preset: Preset, targets: tuple[str, ...]):
    """Wrap the model with peft LoRA adapters on the chosen layers, fresh or from ``lora.init_from``."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if preset.lora.init_from:
        config = LoraConfig.from_pretrained(preset.lora.init_from)
        config.lora_dropout = preset.lora.dropout
        config.inference_mode = False
        try:
            return PeftModel.from_pretrained(model, preset.lora.init_from, is_trainable=True, config=config)
        except Exception as exc:  # shapes or names of another base model
            raise UserError(f"the adapter in {preset.lora.init_from} does not fit {preset.model.source}: "
                            f"{first_line(exc, 200)}", "start from an adapter trained on this base model") from None

    config = LoraConfig(
        r=preset.lora.r,
        lora_alpha=preset.lora.alpha,
        lora_dropout=preset.lora.dropout,
        target_modules=list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _training_args(preset: Preset, run_dir: Path, device_plan, steps: int, spe: int, validate: bool):
    """transformers TrainingArguments for this preset and device."""
    from transformers import TrainingArguments

    return TrainingArguments(**_training_kwargs(preset, run_dir, device_plan, steps, spe, validate))


def _training_kwargs(preset: Preset, run_dir: Path, device_plan, steps: int, spe: int, validate: bool) -> dict:
    """The TrainingArguments for this preset and device, as keywords (TRL's configs for dpo and orpo
    take the same, and their method's own)."""
    from engine.plan import report_to

    t = preset.training
    optim = TRANSFORMERS_OPTIMIZER_NAMES.get(t.optimizer, t.optimizer)
    if device_plan.device == "cpu" and optim.startswith("paged"):
        # Paged optimizers page between GPU and CPU memory; on the CPU there is nothing to page.
        optim = "adamw_bnb_8bit" if optim.endswith("8bit") else "adamw_torch"
    cuda = device_plan.device == "cuda"
    if cuda and optim == "adamw_torch":
        optim = "adamw_torch_fused"  # one kernel for all adapter tensors instead of a launch per tensor
    eval_every = t.eval_steps or spe
    return dict(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_steps=steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a share of the steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=optim,
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must be seen, not averaged away
        eval_strategy="steps" if validate else "no",
        eval_steps=eval_every,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        bf16=device_plan.device == "cuda" and device_plan.compute_dtype == "bfloat16",
        fp16=device_plan.device == "cuda" and device_plan.compute_dtype == "float16",
        use_cpu=device_plan.device == "cpu",
        gradient_checkpointing=t.gradient_checkpointing,
        # Non-reentrant checkpointing, except under FSDP-QLoRA, whose documented recipe (peft's
        # accelerate/fsdp guide) runs the reentrant one.
        gradient_checkpointing_kwargs={"use_reentrant": device_plan.fsdp} if t.gradient_checkpointing else None,
        remove_unused_columns=False,
        **_distributed_args(preset, device_plan),
        # On a GPU, collation runs in a worker and batches come from pinned memory, so the host
        # prepares the next micro batch while the GPU computes; on the CPU a worker only competes.
        dataloader_num_workers=1 if cuda else 0,
        dataloader_pin_memory=cuda,
        dataloader_persistent_workers=cuda,
        # training.report_to; TensorBoard's folder is set on its callback (_log_tensorboard_to), as
        # transformers 5 has no logging_dir argument.
        report_to=report_to(preset) or "none",
        disable_tqdm=True,
        save_only_model=False,
        # Keep evaluation from holding every logit (batch x seq x vocab) on the device.
        prediction_loss_only=True,
    )


FSDP_CONFIG = {
    # FSDP-QLoRA as peft's and accelerate's guides configure it (peft docs: accelerate/fsdp.md).
    "backward_prefetch": "backward_pre",
    "forward_prefetch": False,
    "use_orig_params": False,  # with peft's auto-wrap policy (set after the Trainer is built): real savings
    "cpu_ram_efficient_loading": True,
    "sync_module_states": True,
    "offload_params": False,  # speed first; the memory estimate assumes the shards stay on the GPU
    "state_dict_type": "SHARDED_STATE_DICT",
}
"""transformers' ``fsdp_config`` for ``distributed.strategy: fsdp``. Validated on GPUs: not yet."""


def _distributed_args(preset: Preset, device_plan) -> dict:
    """TrainingArguments for several processes: DDP's or FSDP's settings, checkpoints on every
    machine when there are several (no shared file system assumed)."""
    if not device_plan.distributed:
        return {}
    args = {
        "ddp_backend": "nccl" if device_plan.device == "cuda" else "gloo",
        # Every LoRA weight takes part in every step: DDP need not search the graph for unused ones.
        "ddp_find_unused_parameters": False,
        "save_on_each_node": device_plan.nodes > 1,
    }
    if device_plan.fsdp:
        args["fsdp"] = "full_shard auto_wrap"
        args["fsdp_config"] = dict(FSDP_CONFIG)
    return args


def _log_tensorboard_to(trainer, run_dir: Path) -> None:
    """Point transformers' TensorBoard callback (when ``report_to`` has one) at ``RUN_DIR/tensorboard``
    instead of a time-stamped folder under the checkpoints."""
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback):
            cb.logging_dir = str(run_dir / TENSORBOARD_DIR)


TRAINED_POSITIONS_KEY = "trained_positions"
"""The batch key the engine's collator adds where the engine computes the loss: the flat indices of
the positions whose next token is trained, found on the host so the loss never reads labels back
from the GPU."""


class _EngineCollator:
    """transformers' collator, plus what the engine needs as host-side values, so nothing is read
    back from the GPU per micro batch: the real tokens (``REAL_TOKENS_KEY``), the packed examples'
    boundaries as ints (``engine.attention.PACKED_BOUNDS_KEY``) and the trained positions."""

    def __init__(self, inner, bounds: bool, positions: bool) -> None:
        self.inner, self.bounds, self.positions = inner, bounds, positions

    def __call__(self, features):
        batch = self.inner(features)
        batch[REAL_TOKENS_KEY] = _count_tokens(batch)  # here, before the batch is on the GPU
        if self.bounds:
            from engine.attention import add_packed_bounds

            add_packed_bounds(batch)
        if self.positions:
            from engine.loss import trained_positions

            batch[TRAINED_POSITIONS_KEY] = trained_positions(batch.get("labels"), batch.get("shift_labels"))
        return batch


def _collator(preset: Preset, tokenizer, device_plan, own_loss: bool = False):
    """Padding-free packing (one row per micro batch, positions restarting per example) or padding.
    ``own_loss``: the engine computes the loss (it gets the trained positions with each batch)."""
    from engine.attention import PACKED_KERNELS

    attn = _attn_implementation(preset, device_plan)
    if preset.training.packing:
        from transformers import DataCollatorWithFlattening

        inner = DataCollatorWithFlattening(
            return_position_ids=True,
            separator_id=-100,
            # Example boundaries for flash-attn's varlen kernel and for the engine's packed kernels.
            return_flash_attn_kwargs=attn == "flash_attention_2" or attn in PACKED_KERNELS,
        )
    else:
        from transformers import DataCollatorForSeq2Seq

        inner = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    return _EngineCollator(inner, bounds=preset.training.packing and attn in PACKED_KERNELS, positions=own_loss)


class CountingTrainer(_TrainerBase):
    """Trainer (``_on_base`` puts transformers' ``Trainer`` beneath it) that counts the real tokens of
    each training micro batch (not evaluation's) and computes the loss itself where ``engine.loss``
    can (trained positions only, in chunks, or through Liger's fused linear cross-entropy)."""

    def __init__(self, *, run: RunState, own_loss: bool, fused: bool, chunk: int, **kwargs) -> None:
        self.run = run
        """Where the real tokens are counted (``RunState.tokens``)."""
        self.own_loss = own_loss
        """The engine computes the loss (``engine.loss.chunked_loss_applies``); else transformers does."""
        self.fused = fused
        """The engine's loss goes through Liger's fused linear cross-entropy (the plan's ``liger``)."""
        self.chunk = chunk
        """Positions per chunk of the engine's loss (``engine.loss.loss_chunk_tokens``)."""
        super().__init__(**kwargs)

    def training_step(self, model, inputs, *args, **kwargs):
        """One training micro batch, its real tokens counted (the collator's count, else the mask's)."""
        inputs = dict(inputs)
        tokens = inputs.pop(REAL_TOKENS_KEY, None)
        self.run.tokens += _count_tokens(inputs) if tokens is None else tokens
        return super().training_step(model, inputs, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The loss through ``engine.loss`` where it applies (a training or evaluation batch with
        labels), else transformers'."""
        from engine.loss import causal_lm_loss, decoder_and_head, head_passes_hidden_states, logit_transform

        inputs = dict(inputs)
        inputs.pop(REAL_TOKENS_KEY, None)  # evaluation batches carry it too
        positions = inputs.pop(TRAINED_POSITIONS_KEY, None)
        unwrapped = self.accelerator.unwrap_model(model)
        decoder, head = decoder_and_head(unwrapped) if self.own_loss else (None, None)
        if decoder is None or ("labels" not in inputs and "shift_labels" not in inputs):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        labels, shift_labels = inputs.pop("labels", None), inputs.pop("shift_labels", None)
        transform = logit_transform(unwrapped)
        # The model's forward runs under the mixed-precision autocast accelerate wraps it in;
        # the decoder called directly needs the same.
        with self.accelerator.autocast():
            if model is not unwrapped:
                # DDP or FSDP: the wrapped model's own forward must run (DDP's prepares the
                # gradients' all-reduce, FSDP's gathers the shards); the head hands the hidden
                # states through (FSDP keeps the root unit's weights, the head's among them,
                # gathered until the backward) and the loss below applies it in chunks.
                with head_passes_hidden_states(head, unwrapped):
                    hidden = model(**inputs).logits
            else:
                hidden = decoder(**inputs).last_hidden_state
            loss = causal_lm_loss(hidden, head, labels, shift_labels=shift_labels,
                                  num_items_in_batch=num_items_in_batch, positions=positions,
                                  fused=self.fused, transform=transform, chunk=self.chunk)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # The Trainer counts the trained tokens of all ranks (num_items_in_batch is their sum)
            # and DDP averages the ranks' gradients: scale back by the ranks, as its own loss does.
            loss = loss * self.accelerator.num_processes
        return (loss, {"loss": loss}) if return_outputs else loss


@functools.cache
def _on_base(cls: type, base: type) -> type:
    """``cls`` (``EventsCallback``, ``CountingTrainer``, ``engine.preference``'s trainers) as a subclass
    of the transformers or TRL class it is written for, ``base``: made when a run first builds one, so
    that importing this module does not import transformers."""
    return type(cls.__name__, (cls, base), {"__doc__": cls.__doc__})


def _peak_memory(run: RunState, gather: bool = False) -> dict:
    """Peak memory of the run: torch's reserved/allocated and the device total on CUDA, RSS on the CPU.

    ``gather``: every rank of a multi-process run reaches this point together (finished, stopped,
    its last collective): the peaks of all of them, the highest at the top level and each in
    ``ranks``. After it the ranks part ways and exit on their own, so the watchdog stops here."""
    if gather:
        try:
            return _gathered_peaks(run)
        finally:
            if run.watchdog is not None:
                run.watchdog.stop()
    return _own_peak(run)


def _check_strategy(value) -> None:
    """Rank 0's decision as the others receive it: a strategy and its reason."""
    from engine.memory import STRATEGIES

    if not (isinstance(value, list) and len(value) == 2 and value[0] in STRATEGIES and isinstance(value[1], str)):
        raise ValueError("not a strategy and its reason")


def _gathered_peaks(run: RunState) -> dict:
    mine = _own_peak(run)
    if not run.rank.distributed:
        return mine
    try:
        every = run.control.gather({"rank": run.rank.rank, **mine}, check_numbers)
    except Exception:  # a peer already gone: this rank's own peak is still worth saying
        return mine
    top = {k: max((r.get(k) or 0 for r in every), default=0) or None for k in mine}
    return {**top, "ranks": every}


def _own_peak(run: RunState) -> dict:
    """This process's peaks."""
    if run.device == "cuda":
        import torch

        return {
            "peak_reserved": torch.cuda.max_memory_reserved(),
            "peak_allocated": torch.cuda.max_memory_allocated(),
            "peak_device_used": getattr(run.callback, "peak_device_used", 0) or None,
            "device_used_before": run.device_used_before,
        }
    return {"peak_rss": _peak_rss_bytes()}


LOST_RANK_WAIT_S = 2.0
"""How long a rank whose collective failed waits to see which sibling is gone: the collective breaks
when the sibling's sockets close, a moment before the kernel shows the process as ended."""


def _lost_rank(run: RunState, wait_s: float = LOST_RANK_WAIT_S) -> tuple[str, int, bool] | None:
    """A rank of this machine that is gone: in words, its rank, and whether a stop ended it (and
    every other gone one); None when all are alive (after ``wait_s``)."""
    if not run.rank.distributed or not run.ranks:
        return None
    from engine.distributed import dead_ranks, left_for_a_stop

    deadline = time.time() + wait_s
    while True:
        dead = dead_ranks(run.ranks, run.run_dir)
        if dead or time.time() >= deadline:
            break
        time.sleep(0.1)
    return (describe_dead(dead), dead[0].rank, left_for_a_stop(run.run_dir, dead)) if dead else None


def _end_for_lost_rank(run: RunState, dead: list[RankRecord]) -> None:
    """The watchdog's verdict: another rank of this machine died; end the run as failed, naming it,
    and leave at once (the collective this process waits in would never return).

    Not when a stop reached this process before training began: then every rank ends at once, each
    on its own, and a sibling already gone is no fault (once training runs, the ranks agree on the
    step and leave only after their last collective, where the watchdog stops)."""
    stop = run.stop
    if (stop.phase == "setup" and stop.requested) or stop.phase == "ending":
        return
    from engine.distributed import left_for_a_stop

    if left_for_a_stop(run.run_dir, dead):
        # The sibling was stopped: the same stop is on its way here (or was sent to it alone): take it.
        os.kill(os.getpid(), signal.SIGTERM)
        return
    stop.phase = "ending"
    saved = _clean_up_unfinished(run.run_dir, run)
    message = (f"{describe_dead(dead)}; the run cannot go on without it; {saved}; "
               f"`qlora-wizard resume {run.run_dir}` continues from the newest checkpoint")
    _emit(run.events, "error", message=message, step=run.step)
    _emit(run.events, "end", status="failed", message=message, step=run.step, failed_rank=dead[0].rank,
          elapsed_s=time.time() - run.started, checkpoint=_str(newest_checkpoint(run.run_dir)),
          **_peak_memory(run))
    _say(f"error: {message}")
    os._exit(EXIT_FAILED)


def run_training(run_dir: Path, resume: bool = False, callbacks: tuple = (), lock_fd: int | None = None,
                 launched: bool = False) -> int:
    """Train the run in ``run_dir``; returns the exit status. Never raises for the run's own failures.

    ``lock_fd`` is the run's lock handed over by the launcher (``engine.runs.start_process``);
    without one the lock is taken here, and a run that another process trains is refused before
    anything is written. ``launched``: one rank of several started by torchrun, which holds the
    lock for all of them; only local rank 0 writes events. ``callbacks`` are extra
    ``TrainerCallback``s (tests use one to look at the weights, or to send signals at exact moments).
    """
    run_dir = Path(run_dir)
    rank = Rank.from_env() if launched else Rank()
    lock = RunLock(run_dir, lock_fd)
    try:
        if lock_fd is None and not launched:
            lock.acquire()
        events = EventWriter(run_dir) if rank.is_local_main else NoEvents()
    except UserError as exc:
        _say(f"error: {exc.one_line()}")
        lock.release()
        return EXIT_BAD_INPUT
    except OSError as exc:
        _say(f"error: {os_error(exc, 'write', exc.filename or run_dir).one_line()}")
        lock.release()
        return EXIT_BAD_INPUT
    stop = _StopFlag()
    stop.install()
    run = RunState(rank=rank, run_dir=run_dir, events=events, stop=stop, started=time.time())
    recipe = TrainingRecipe(run, resume, callbacks)
    try:
        recipe.setup()
        recipe.train()
        if recipe.outcome == "finished":
            recipe.save()
        return recipe.end()
    except StopRequested:
        return recipe.end_stopped_early()
    except AbandonRequested:
        return recipe.end_abandoned()
    except UserError as exc:
        return recipe.end_bad_input(exc)
    except Exception as exc:  # the run's own failure: report it in words, keep the traceback in the log
        return recipe.end_failed(exc)
    finally:
        # The recipe's model, Trainer and data go first, before the ranks' process group closes: a DDP
        # model freed after it waits forever for a gloo thread that needs the interpreter lock.
        del recipe
        if run.watchdog is not None:
            run.watchdog.stop()
        stop.uninstall()
        events.close()
        lock.release()
        run.control.close()


def _str(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def _ordinal(n: int) -> str:
    return {1: "first", 2: "second", 3: "third"}.get(n, f"{n}th")


def _emit(events: EventWriter, kind: str, **payload) -> None:
    """Write an event where a failure to write it must not hide the reason (a full disk): to train.log instead."""
    try:
        events.emit(kind, **payload)
    except OSError as exc:
        _say(f"could not write the {kind} event to {events.path}: {exc.strerror or exc}; it was: {payload}")


def _clean_up_unfinished(run_dir: Path, run: RunState) -> str:
    """Remove what a cut-short write left (a part-written checkpoint or adapter) and say what is saved."""
    removed = remove_incomplete_checkpoints(run_dir)
    if run.writing_adapter:
        if run.adapter_partial is not None:
            shutil.rmtree(run.adapter_partial, ignore_errors=True)
        removed.append("adapter (part-written)")
    ckpt = newest_checkpoint(run_dir)
    saved_step = checkpoint_step(ckpt) if ckpt else 0
    step = run.step
    said = f"saved: {ckpt.name} (step {saved_step})" if ckpt else "nothing saved (no checkpoint yet)"
    if step == saved_step + 1:
        said += f"; step {step} was not saved and resume trains it again"
    elif step > saved_step:
        said += f"; steps {saved_step + 1}-{step} were not saved and resume trains them again"
    if removed:
        said += f"; removed the unfinished {', '.join(removed)}"
    return said


def _describe_failure(exc: Exception, run: RunState, run_dir: Path) -> tuple[str, int]:
    """A failure in words a person can act on, with what is saved. Removes a checkpoint or adapter
    the failure cut short (it could never be resumed, and a full disk needs the space back)."""
    try:
        import torch

        oom = isinstance(exc, torch.OutOfMemoryError)
    except Exception:
        oom = False
    oom = oom or "out of memory" in str(exc).lower()
    free = None if oom else _free_bytes_if_full(exc, run_dir)  # before the clean-up frees space
    saved = _clean_up_unfinished(run_dir, run)
    if oom:
        advice = _oom_advice(run.preset, run.estimate) if run.preset is not None else ""
        return f"the GPU ran out of memory: {advice}; {saved}", EXIT_FAILED
    if free is not None:
        return (f"the disk holding {run_dir} is full ({free / 2**20:.1f} MiB left; what failed is in train.log); "
                f"{saved}; free space on it, then `qlora-wizard resume {run_dir}` continues"), EXIT_FAILED
    if isinstance(exc, OSError):
        return f"{os_error(exc, 'write', exc.filename).message}; {saved}", EXIT_FAILED
    return f"{type(exc).__name__}: {first_line(exc)} (the full traceback is in train.log); {saved}", EXIT_FAILED


def _free_bytes_if_full(exc: BaseException, run_dir: Path) -> int | None:
    """The free bytes on the run's file system when the failure is (most likely) a full disk, else None."""
    free = free_bytes(run_dir)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return free or 0
    if "no space left" in str(exc).lower() or (free is not None and free < FULL_DISK_BYTES):
        return free or 0
    return None


class TrainingRecipe:
    """The run of one training process, as a recipe read top to bottom: ``setup`` (the preset, the
    device, the data, the model with its adapters, the Trainer), ``train`` (the Trainer's loop, from
    the newest checkpoint on a resume), ``save`` (a last validation, the adapter) and ``end`` (the end
    event, the exit status). The ``end_*`` methods end it on every other path: a stop before training,
    an abandoned stop, bad input, a failure (the watchdog's ``_end_for_lost_rank`` ends it when another
    rank is lost). What every end reads is in ``run``, which the events callback and the watchdog read
    and write too; the recipe itself, with the model and the Trainer, is freed before the ranks'
    process group closes (``run_training``)."""

    def __init__(self, run: RunState, resume: bool = False, callbacks: tuple[TrainerCallback, ...] = ()) -> None:
        self.run = run
        """The run's state: its directory, events, stop, step, and what every end reads."""
        self.resume = resume
        """Continue from the newest complete checkpoint."""
        self.callbacks = callbacks
        """Extra ``TrainerCallback``s, after the events callback."""
        self.preset: Preset | None = None
        """The preset as run (``run.preset`` too, for a failure's advice)."""
        self.source = ""
        """The model as ``from_pretrained`` loads it (a .gguf's converted folder, the demo's folder)."""
        self.info: ModelInfo | None = None
        """The model's description, read before any weights."""
        self.device_plan: DevicePlan | None = None
        """Where and in which precision the run computes (with the ranks' strategy, when several)."""
        self.world: dict | None = None
        """The start event's ``world``: the ranks, the strategy and why (several processes only)."""
        self.tokenizer: PreTrainedTokenizerBase | None = None
        """The model's tokenizer."""
        self.prepared: PreparedData | None = None
        """The tokenized training (and validation) examples."""
        self.targets: tuple[str, ...] = ()
        """The layer names LoRA adapts."""
        self.estimate: MemoryEstimate | None = None
        """The memory estimate for these settings (``run.estimate`` too)."""
        self.steps = 0
        """Optimizer steps the run trains to."""
        self.steps_per_epoch = 0
        """Optimizer steps in one pass over the data."""
        self.checkpoint: Path | None = None
        """The checkpoint a resume continues from."""
        self.model: PeftModel | None = None
        """The base model with its LoRA adapters."""
        self.trainer: CountingTrainer | None = None
        """The Trainer."""
        self.outcome = ""
        """How the Trainer's loop ended: ``finished``, ``stopped`` (a stop, before the last step) or
        ``failed`` (a non-finite loss)."""
        self.adapter_dir: Path | None = None
        """The adapter written (None on every rank but the one that writes it)."""
        self.reference: str | None = None
        """dpo: how the reference log-probabilities are had (``engine.preference.reference_mode``)."""

    def setup(self) -> None:
        """Everything before the first step, cheapest checks first: the preset and its data, the
        device, the tokenized data and the estimate, the start event, the model, the Trainer."""
        self._read_preset()
        self._plan_device()
        self._prepare_data()
        self._emit_start()
        self._build_model()
        self._build_trainer()

    def _read_preset(self) -> None:
        """The preset as run, its loggers, and its data, checked before anything heavy loads, so a bad
        line is reported within seconds."""
        from engine.plan import with_init_adapter

        self.preset = self.run.preset = with_init_adapter(load_preset(self.run.run_dir / "preset.yaml"))
        from engine.plan import report_to

        report_to(self.preset)  # a logger that is not installed is said now, not after the model has loaded
        from engine import data as data_mod

        data_mod.check_records(self.preset.data, method=self.preset.training.method)

    def _plan_device(self) -> None:
        """The model's description (no weights yet), this process's GPU and what it held before, and
        the plan: precision, attention, kernels; with several processes, the ranks met and their
        strategy agreed."""
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        from engine.demo import resolve_model_source
        from engine.distributed import visible_gpus
        from engine.gguf import local_model
        from engine.gpu import probe_gpus
        from engine.modelinfo import inspect_model, require_weights
        from engine.plan import plan_device

        run, rank, preset = self.run, self.run.rank, self.preset
        # A .gguf becomes its converted bf16 folder (converted once, normally already by start_run).
        self.source = local_model(resolve_model_source(preset.model.source))
        self.info = inspect_model(self.source, revision=preset.model.revision,
                                  trust_remote_code=preset.model.trust_remote_code)
        require_weights(self.info)
        gpus = visible_gpus(probe_gpus()) if torch.cuda.is_available() else []
        if gpus and rank.local_rank >= len(gpus):
            raise UserError(f"rank {rank.rank} was started for GPU {rank.local_rank}, but this machine shows "
                            f"{len(gpus)} GPU(s)", "start it again with no more processes per machine than GPUs")
        run.device_index = gpus[rank.local_rank].index if gpus else 0
        # What the device held before this process touched it (driver reserve, other processes), so the
        # end event can tell this run's own footprint from the device total nvidia-smi shows.
        run.device_used_before = _nvml_used_bytes(run.device_index) if gpus else None
        mine = gpus[rank.local_rank:rank.local_rank + 1]
        if mine:
            torch.cuda.set_device(rank.local_rank)  # before anything touches CUDA: each rank its own GPU
        self.device_plan = _checked_plan(plan_device(preset, mine, self.info.model_type))
        run.device = self.device_plan.device
        run.control.start(self.device_plan.device)
        if rank.distributed:
            self._meet_the_ranks()
            self._agree_on_strategy(gpus)

    def _meet_the_ranks(self) -> None:
        """Every rank says who it is; local rank 0 records this machine's ranks (``ranks.json``, which
        ``stop`` signals) and starts watching them."""
        from dataclasses import asdict

        from engine.distributed import RankRecord, Watchdog, this_rank_record, write_ranks

        run = self.run
        clear_stopped(run.run_dir, run.rank)  # an earlier launch's stop is not this one's
        every = run.control.gather(asdict(this_rank_record(run.run_dir, run.rank)))
        # Each peer's record is checked field by field: a peer's word is data, never trusted as it comes.
        every = [RankRecord.from_json(r, f"rank {i}'s record") for i, r in enumerate(every)]
        run.ranks = [r for r in every if r.node == run.rank.node_rank]  # this machine's: the ones it can see
        if not run.rank.is_local_main:
            return
        local = run.ranks
        try:
            write_ranks(run.run_dir, local)
        except OSError as exc:
            raise os_error(exc, "write", exc.filename or run.run_dir) from None
        run.watchdog = Watchdog(local, lambda dead: _end_for_lost_rank(run, dead), run.run_dir).start()

    def _agree_on_strategy(self, gpus: list) -> None:
        """Rank 0 chooses the strategy (on a resume, the one the checkpoints were written with) and
        every rank runs the same; ``gpus`` are this machine's."""
        from dataclasses import replace

        from engine.distributed import World
        from engine.plan import with_world

        run, rank, preset, info = self.run, self.run.rank, self.preset, self.info
        strategy = _strategy_as_begun(run.run_dir) if self.resume else None
        world = World(rank.local_world_size, max(1, rank.world_size // max(1, rank.local_world_size)),
                      self.device_plan.device)
        budget = min(g.free_bytes for g in gpus) if gpus else None
        decided = None
        if rank.is_main:
            chosen = with_world(self.device_plan, preset, info, world, rank, strategy, budget)
            decided = (chosen.strategy, chosen.strategy_reason)
        strategy, why = run.control.share(decided, _check_strategy)  # rank 0 decides; every rank runs the same
        self.device_plan = replace(with_world(self.device_plan, preset, info, world, rank, strategy),
                                   strategy_reason=why)
        self.world = {**world.to_json(), "describe": world.describe(), "strategy": strategy, "reason": why,
                      "backend": world.backend, "ranks_file": RANKS_FILE}

    def _prepare_data(self) -> None:
        """The tokenizer and the tokenized examples, the LoRA targets, the memory estimate and the
        steps."""
        from engine import data as data_mod
        from engine.memory import estimate_training_memory
        from engine.plan import memory_settings, resolve_targets, steps_per_epoch, total_steps
        from engine.preference import reference_mode

        preset, info = self.preset, self.info
        t = preset.training
        self.tokenizer = data_mod.load_tokenizer(preset.model)
        self.prepared = prepared = data_mod.prepare_data(preset.data, self.tokenizer, t.seq_len, t.seed,
                                                         method=t.method)
        if prepared.stats.examples == 0:
            raise UserError(f"no training examples left in {preset.data.train} after cleaning",
                            "check data.drop_phrases, data.dedupe and the sequence length")
        if self.run.rank.is_main and prepared.stats.unstopped:
            print(prepared.stats.stop_line(), flush=True)  # in train.log: examples that do not teach stopping

        self.targets = resolve_targets(preset, info)
        world_size = self.device_plan.world_size
        self.steps_per_epoch = steps_per_epoch(prepared.stats.examples, t.micro_batch_size,
                                               t.gradient_accumulation_steps, world_size)
        self.steps = total_steps(preset, prepared.stats.examples, world_size)
        self.reference = reference_mode(preset, prepared.stats.examples, self.steps, world_size)
        self.estimate = self.run.estimate = estimate_training_memory(
            info, memory_settings(preset, info, self.device_plan, self.reference))

    def _emit_start(self) -> None:
        """The checkpoint a resume continues from, and the start event: everything the run was set up with."""
        import torch
        import transformers

        from engine.modelinfo import remote_code_words

        run, preset, plan = self.run, self.preset, self.device_plan
        self.checkpoint = newest_checkpoint(run.run_dir) if self.resume else None
        resumed_from = checkpoint_step(self.checkpoint) if self.checkpoint else None
        run.step = resumed_from or 0
        if plan.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        run.events.emit(
            "start",
            preset=preset.model_dump(mode="json"),
            model=self.info.to_json() | {"source": preset.model.source, "resolved_source": self.source}
            | ({"remote_code": remote_code_words(preset.model.source, preset.model.revision)}
               if preset.model.trust_remote_code else {}),
            targets=list(self.targets),
            data=self.prepared.stats.to_json(),
            estimate=self.estimate.to_json(),
            device=plan.device,
            device_name=plan.name,
            compute_dtype=plan.compute_dtype,
            attn_implementation=_attn_implementation(preset, plan),
            kernels=plan.kernels_note,
            fused_kernels=plan.liger,
            total_steps=self.steps,
            steps_per_epoch=self.steps_per_epoch,
            method=preset.training.method,
            reference=self.reference,
            resumed_from_step=resumed_from,
            resume_requested=self.resume,
            pid=os.getpid(),
            versions={"torch": torch.__version__, "transformers": transformers.__version__},
            world=self.world,
        )

    def _build_model(self) -> None:
        """The model: the 4-bit base (``_load_model``), LoRA adapters on it (``_add_lora``)."""
        import transformers

        transformers.set_seed(self.preset.training.seed)
        model = _load_model(self.preset, self.source, self.device_plan)
        self.model = _add_lora(model, self.preset, self.targets)

    def _build_trainer(self) -> None:
        """The Trainer: the events callback first, then ``callbacks``; the engine's loss where it applies."""
        from transformers import Trainer, TrainerCallback

        from engine.loss import chunked_loss_applies, loss_chunk_tokens

        run, preset, plan = self.run, self.preset, self.device_plan
        run.callback = _on_base(EventsCallback, TrainerCallback)(run)
        if preset.training.method in PREFERENCE_METHODS:
            self._build_preference_trainer()
            return
        own_loss = preset.training.chunked_loss and chunked_loss_applies(self.info.model_type)
        self.trainer = trainer = _on_base(CountingTrainer, Trainer)(
            run=run,
            own_loss=own_loss,
            fused=plan.liger,
            chunk=loss_chunk_tokens(self.info.vocab_size),  # fewer positions per chunk for a very large vocabulary
            model=self.model,
            args=_training_args(preset, run.run_dir, plan, self.steps, self.steps_per_epoch,
                                self.prepared.validation is not None),
            train_dataset=self.prepared.train,
            eval_dataset=self.prepared.validation,
            data_collator=_collator(preset, self.tokenizer, plan, own_loss=own_loss),
            processing_class=self.tokenizer,
            callbacks=[run.callback, *self.callbacks],
        )
        if plan.fsdp and getattr(trainer.accelerator.state, "fsdp_plugin", None) is not None:
            from peft.utils.other import fsdp_auto_wrap_policy

            # Trainable (LoRA) and frozen weights in separate FSDP units, so use_orig_params=False shards both.
            trainer.accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(trainer.model)
        _log_tensorboard_to(trainer, run.run_dir)

    def _build_preference_trainer(self) -> None:
        """TRL's DPO or ORPO trainer (``engine.preference``) on the engine's tokenized pairs."""
        from engine.preference import build_preference_trainer, preference_args

        run, preset, plan = self.run, self.preset, self.device_plan
        kwargs = _training_kwargs(preset, run.run_dir, plan, self.steps, self.steps_per_epoch,
                                  self.prepared.validation is not None)
        self.trainer = build_preference_trainer(
            run=run, preset=preset, model=self.model, args=preference_args(preset, kwargs, self.reference),
            train_dataset=self.prepared.train, eval_dataset=self.prepared.validation, tokenizer=self.tokenizer,
            callbacks=[run.callback, *self.callbacks],
        )
        _log_tensorboard_to(self.trainer, run.run_dir)

    def train(self) -> None:
        """The Trainer's loop (from the checkpoint on a resume), and how it ended (``outcome``). A stop
        asked for while it runs checkpoints at the end of the step, on every rank the same."""
        run, stop, trainer = self.run, self.run.stop, self.trainer
        stop.phase = "training"
        with kept_while_training():
            trainer.train(resume_from_checkpoint=str(self.checkpoint) if self.checkpoint else None)
        stop.phase = "finishing"
        run.step = trainer.state.global_step
        if run.nonfinite_step is not None:
            self.outcome = "failed"
        elif (stop.requested or run.stop_agreed) and run.step < trainer.state.max_steps:
            self.outcome = "stopped"
        else:
            self.outcome = "finished"

    def save(self) -> None:
        """A last validation when the schedule did not end on one, so the curve has its final point
        (transformers' own end-of-training evaluation, where it makes one, counts); then the adapter."""
        if self.prepared.validation is not None and self.run.last_eval_step != self.run.step:
            self.trainer.evaluate()
        self.adapter_dir = self._write_adapter()

    def _write_adapter(self) -> Path | None:
        """Save the LoRA adapter (PEFT format) and the tokenizer to ``adapter/``, whole or not at all: written
        into a scratch folder beside it and renamed into place.

        An ``adapter/`` already there (a run whose target was raised keeps its earlier one as
        ``adapter-step-N/``; anything else is renamed aside with the time) is never overwritten.
        Several processes: rank 0 writes it (DDP ranks hold equal adapters); under FSDP every rank takes
        part in gathering the full adapter and rank 0 writes. None on other ranks."""
        import tempfile

        run = self.run
        run_dir = run.run_dir
        fsdp_trainer = self.trainer if self.device_plan.fsdp else None
        final = run_dir / ADAPTER_DIR
        main = run.rank.is_main
        if fsdp_trainer is not None:
            partial = run_dir / FSDP_ADAPTER_PARTIAL
            if main:
                if partial.is_symlink():
                    partial.unlink()
                shutil.rmtree(partial, ignore_errors=True)
        else:
            partial = (Path(tempfile.mkdtemp(prefix=f".{ADAPTER_DIR}.", suffix=".partial", dir=run_dir)) if main
                       else None)
        run.adapter_partial = partial if main else None
        run.writing_adapter = main
        if fsdp_trainer is not None:
            fsdp_trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
            fsdp_trainer.save_model(str(partial))  # collective: every rank gathers, rank 0 writes
        elif main:
            # Only the trained adapter: dpo keeps a frozen copy of the starting one beside it ("ref").
            self.model.save_pretrained(partial, selected_adapters=["default"])
        if not main:
            return None
        self.tokenizer.save_pretrained(partial)
        _settle_modes(partial)
        if final.exists():
            final.rename(run_dir / f"{ADAPTER_DIR}-replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        partial.rename(final)
        run.writing_adapter, run.adapter_partial = False, None
        return final

    def end(self) -> int:
        """The end of a run the Trainer's loop ended: failed (a non-finite loss), stopped, or finished
        with the adapter saved; the end event, with the peak memory beside the estimate, and the exit
        status."""
        run, stop, events = self.run, self.run.stop, self.run.events
        step = run.step
        estimate = self.estimate
        estimate_bytes = {"estimate_total": estimate.total_bytes, "estimate_reserved": estimate.reserved_bytes}
        if self.outcome == "failed":
            peak = _peak_memory(run, gather=True)
            msg = (f"the loss became non-finite at step {run.nonfinite_step}; try a lower learning rate "
                   f"(now {self.preset.training.learning_rate:g}), max_grad_norm 1.0, or compute dtype bfloat16 "
                   f"instead of float16")
            stop.phase = "ending"
            events.emit("error", message=msg, step=step)
            events.emit("end", status="failed", message=msg, step=step, elapsed_s=time.time() - run.started,
                        checkpoint=_str(newest_checkpoint(run.run_dir)), **peak, **estimate_bytes)
            return EXIT_FAILED
        if self.outcome == "stopped":
            peak = _peak_memory(run, gather=True)
            ckpt = newest_checkpoint(run.run_dir)
            saved = f"saved: {ckpt.name}" if ckpt else "nothing saved"
            by = stop.signal_name or "a stop sent to another rank"
            stop.phase = "ending"
            mark_stopped(run.run_dir, run.rank)
            events.emit("end", status="stopped", signal=stop.signal_name or None, step=step, checkpoint=_str(ckpt),
                        message=f"stopped at step {step} by {by}; {saved}",
                        elapsed_s=time.time() - run.started, **peak, **estimate_bytes)
            return EXIT_STOPPED if not run.rank.distributed else EXIT_OK
        peak = _peak_memory(run, gather=True)  # after the adapter: the other ranks wait until it is written
        stop.phase = "ending"
        elsewhere = (None if self.adapter_dir
                     else "finished; rank 0 on machine 0 wrote the adapter (this machine keeps the checkpoints)")
        events.emit("end", status="finished", step=step, adapter=_str(self.adapter_dir), message=elsewhere,
                    elapsed_s=time.time() - run.started, **peak, **estimate_bytes)
        return EXIT_OK

    def end_stopped_early(self) -> int:
        """A stop before training began (or resumed): nothing trained, nothing to save; every rank ends at once."""
        run, stop = self.run, self.run.stop
        stop.phase = "ending"
        mark_stopped(run.run_dir, run.rank)
        ckpt = newest_checkpoint(run.run_dir)
        message = (f"stopped before training resumed; {ckpt.name} is as it was" if ckpt and self.resume
                   else "stopped before training began; nothing to save")
        _emit(run.events, "end", status="stopped", signal=stop.signal_name or None, step=run.step,
              checkpoint=_str(ckpt), message=message, elapsed_s=time.time() - run.started)
        return EXIT_OK if run.rank.distributed else EXIT_STOPPED

    def end_abandoned(self) -> int:
        """A third signal: what the stop was writing is removed, and the end says what is saved."""
        run, stop = self.run, self.run.stop
        stop.phase = "ending"
        mark_stopped(run.run_dir, run.rank)
        saved = _clean_up_unfinished(run.run_dir, run)
        doing = "writing the adapter" if run.writing_adapter else f"step {run.step}"
        message = f"abandoned at {doing} by a {_ordinal(stop.count)} {stop.signal_name}: {saved}"
        _emit(run.events, "end", status="stopped", signal=stop.signal_name, step=run.step, abandoned=True,
              checkpoint=_str(newest_checkpoint(run.run_dir)), message=message,
              elapsed_s=time.time() - run.started, **_peak_memory(run))
        return EXIT_STOPPED

    def end_bad_input(self, exc: UserError) -> int:
        """The preset, the data or the model cannot be run as they are: the reason and what to change."""
        run = self.run
        run.stop.phase = "ending"
        _emit(run.events, "error", message=exc.one_line(), bad_input=True)
        _emit(run.events, "end", status="failed", message=exc.one_line(), elapsed_s=time.time() - run.started)
        return EXIT_BAD_INPUT

    def end_failed(self, exc: Exception) -> int:
        """The run's own failure (called while it is handled): in words, with what is saved, and its
        traceback in the log. A collective broken by another rank that is gone names that rank; one
        that left for a stop makes this a stop."""
        run, stop = self.run, self.run.stop
        run_dir = run.run_dir
        was = stop.phase
        stop.phase = "ending"
        try:
            traceback.print_exc()
        except OSError:
            pass
        lost = _lost_rank(run)
        if lost is not None and lost[2]:
            # A stop reached the ranks and a sibling left first (it was still loading, before the
            # ranks could agree on a step), breaking the collective this rank was in: stopped, not lost.
            if was == "setup":
                return self.end_stopped_early()
            mark_stopped(run_dir, run.rank)
            saved = _clean_up_unfinished(run_dir, run)
            _emit(run.events, "end", status="stopped", signal=stop.signal_name or None, step=run.step,
                  checkpoint=_str(newest_checkpoint(run_dir)), elapsed_s=time.time() - run.started,
                  message=f"stopped at step {run.step}: another rank left for the stop before the ranks could "
                          f"agree on a step to save; {saved}")
            return EXIT_OK
        message, exit_code = _describe_failure(exc, run, run_dir)
        if lost is not None:  # a collective failed because a peer is gone: that is the cause
            saved = _clean_up_unfinished(run_dir, run)
            message = (f"{lost[0]}; the run cannot go on without it; {saved}; "
                       f"`qlora-wizard resume {run_dir}` continues from the newest checkpoint")
        _emit(run.events, "error", message=message, exception=type(exc).__name__)
        _emit(run.events, "end", status="failed", message=message, step=run.step,
              elapsed_s=time.time() - run.started, checkpoint=_str(newest_checkpoint(run_dir)),
              failed_rank=lost[1] if lost else (run.rank.rank if run.rank.distributed else None),
              **_peak_memory(run))
        return exit_code



def _strategy_as_begun(run_dir: Path) -> str | None:
    """The strategy the run's first start event recorded: a resume must shard (or not) as the
    checkpoints were written."""
    from engine.events import StartEvent, read_events

    for event in read_events(run_dir):
        if isinstance(event, StartEvent) and event.world is not None and event.world.strategy:
            return event.world.strategy
    return None


FSDP_ADAPTER_PARTIAL = f".{ADAPTER_DIR}.fsdp.partial"
"""Where rank 0 writes the adapter under FSDP, where every rank names the folder of the collective save:
the one scratch name that is fixed (inside the run's own directory; a link planted there is removed,
never written through). Everywhere else the scratch folder is an ``mkdtemp`` one beside ``adapter/``."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the training process."""
    # Expandable segments let the caching allocator grow one mapping instead of caching blocks of
    # every size the loss's large, short-lived tensors come in; that fragmentation otherwise costs
    # up to 1.5x the fp32 logits in reserved-but-unused memory (measured on an H100, Qwen2.5-0.5B).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    fewer_collections()
    parser = argparse.ArgumentParser(prog="python -m engine.train", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the run directory (holds preset.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("--lock-fd", type=int, help="the run's lock, taken by the launcher (engine.runs)")
    parser.add_argument("--launched", action="store_true",
                        help="one rank of several, started by torchrun (which holds the run's lock)")
    args = parser.parse_args(argv)
    if not (args.run_dir / "preset.yaml").exists():
        print(f"error: {args.run_dir} has no preset.yaml; create runs with qlora-wizard", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.launched and Rank.from_env().distributed:
        _log_to_own_file(args.run_dir, Rank.from_env())
    return run_training(args.run_dir, resume=args.resume, lock_fd=args.lock_fd, launched=args.launched)


def _log_to_own_file(run_dir: Path, rank: Rank) -> None:
    """Each rank of a multi-process run writes its output to ``logs/rank-R.log`` (``train.log`` keeps
    the launcher's own lines), so the tail of a failed rank's log is its own."""
    from engine.distributed import log_path
    from engine.files import open_append

    path = log_path(run_dir, rank.rank)
    try:
        path.parent.mkdir(exist_ok=True)
        fd = open_append(path)
    except OSError as exc:
        _say(f"rank {rank.rank}: cannot write {path} ({exc.strerror or exc}); its output stays in train.log")
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
