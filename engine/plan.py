"""From a preset to concrete decisions: device precision, attention kernel, steps, memory settings.

The training run and the planners (``estimate``, ``lr``, the wizard) call these same functions,
so what is estimated is what is run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.distributed import Rank
from engine.errors import UserError
from engine.preset import PREFERENCE_METHODS, Preset

CPU_DTYPE = "float32"
"""On the CPU, bitsandbytes' NF4 kernels and the optimizers are exact and well tested in float32."""


@dataclass(frozen=True)
class DevicePlan:
    """Where and in which precision a run computes."""

    device: str
    """``cuda`` or ``cpu``."""
    compute_dtype: str
    """The dtype of the 4-bit matmuls (``bnb_4bit_compute_dtype``) and of autocast."""
    load_dtype: str
    """The dtype of everything not quantized: embeddings, head, norms (never upcast to fp32)."""
    attn_implementation: str
    """The kernel the model loads with: ``flash_attention_2``, ``sdpa``, ``eager``, or one of the
    engine's kernels for packed rows (``engine.attention.PACKED_SDPA``, ``VARLEN_TORCH``)."""
    name: str
    """The device in words (GPU name, or ``CPU``)."""
    liger: bool = False
    """Liger Kernel's fused blocks and loss run (``engine.kernels``)."""
    kernels_note: str = ""
    """Which attention and loss kernels run and why, in words (memory step, start event)."""
    strategy: str = "single"
    """``single``, ``ddp`` or ``fsdp`` (``engine.distributed.choose_strategy``)."""
    strategy_reason: str = ""
    """Why this strategy, in words."""
    place: Rank = field(default_factory=Rank)
    """This process's rank, its rank on its machine, and the world's size (rank 0 of the run's
    world when planning; rank 0 of 1 in a single-process run)."""

    @property
    def world_size(self) -> int:
        """Processes training the run, on all machines: the effective batch counts them."""
        return self.place.world_size

    @property
    def nodes(self) -> int:
        """Machines."""
        return max(1, self.place.world_size // max(1, self.place.local_world_size))

    @property
    def local_rank(self) -> int:
        """This process's rank on its machine: the GPU it uses."""
        return self.place.local_rank

    @property
    def distributed(self) -> bool:
        """More than one process trains the run."""
        return self.place.distributed

    @property
    def fsdp(self) -> bool:
        """The model is sharded across the ranks (FSDP-QLoRA)."""
        return self.strategy == "fsdp"


def plan_device(preset: Preset, gpus: list | None = None, model_type: str | None = None, *,
                assumed: bool = False) -> DevicePlan:
    """Pick precision, attention and fused kernels for the first detected GPU, or the CPU when there is none.

    ``gpus`` is ``engine.gpu.probe_gpus()``'s list; it is probed when not given. Packed rows never
    get transformers' dense block mask: flash-attn's varlen kernel where installed, else PyTorch's
    varlen kernel on a GPU that has it, else SDPA once per example (``engine.attention``).
    ``assumed``: the GPU is not this machine's (an estimate made elsewhere); what the preset asks
    to install there (``fused_kernels: liger``) is taken as installed.
    """
    from engine.arch import profile
    from engine.attention import PACKED_SDPA, VARLEN_TORCH, describe_kernel, torch_varlen_supported

    # Soft-capped attention scores (Gemma 2): SDPA cannot do them, eager (or flash-attn) can.
    fallback = "eager" if profile(model_type).attention_softcap else "sdpa"
    if gpus is None:
        from engine.gpu import probe_gpus

        gpus = probe_gpus()
    q, m, t = preset.quantization, preset.model, preset.training
    from engine.loss import chunked_loss_applies

    # dpo and orpo: TRL's loss on padded pairs (no packing, no engine loss, no Liger).
    pairs = t.method in PREFERENCE_METHODS
    packing = t.packing and not pairs
    own_loss = t.chunked_loss and chunked_loss_applies(model_type) and not pairs
    fused = "off" if pairs else t.fused_kernels
    if not gpus:
        compute = CPU_DTYPE if q.compute_dtype == "auto" else q.compute_dtype
        attn = fallback if m.attn_implementation in ("auto", "flash_attention_2") else m.attn_implementation
        if attn == "sdpa" and packing:
            attn = PACKED_SDPA
        liger, why = _fused_decision(fused, "cpu", model_type, own_loss, pairs)
        return DevicePlan("cpu", compute, CPU_DTYPE, attn, "CPU", liger, f"{describe_kernel(attn)}; {why}")
    gpu = gpus[0]
    # bnb_4bit_compute_dtype defaults to float32, which is slow; bf16 needs compute capability 8.0+.
    best16 = "bfloat16" if gpu.bf16_supported else "float16"
    compute = best16 if q.compute_dtype == "auto" else q.compute_dtype
    attn = m.attn_implementation
    if attn == "auto":
        from engine.gpu import flash_attn_available

        # flash-attn 2 runs on Ampere (8.0) and newer.
        attn = "flash_attention_2" if flash_attn_available() and gpu.compute_capability >= (8, 0) else fallback
    if attn == "sdpa" and packing:
        attn = VARLEN_TORCH if torch_varlen_supported(gpu.compute_capability) else PACKED_SDPA
    liger, why = _fused_decision(fused, "cuda", model_type, own_loss, pairs,
                                 installed=True if assumed and fused == "liger" else None)
    return DevicePlan("cuda", compute, best16, attn, gpu.name, liger, f"{describe_kernel(attn)}; {why}")


def _fused_decision(setting: str, device: str, model_type: str | None, own_loss: bool, pairs: bool,
                    installed: bool | None = None) -> tuple[bool, str]:
    """Liger or not, and why (``engine.kernels.liger_decision``); for dpo and orpo, TRL's loss says so."""
    from engine.kernels import liger_decision

    if pairs:
        return False, "TRL's dpo/orpo loss on padded pairs (log-probabilities in chunks for dpo)"
    return liger_decision(setting, device, model_type, own_loss=own_loss, installed=installed)


def assumed_gpu(preset: Preset, model_type: str | None = None) -> DevicePlan:
    """What an estimate assumes when it is made away from the GPU it is for: a bf16-capable one."""
    from engine.gpu import GpuInfo

    return plan_device(preset, [GpuInfo(0, "a bf16-capable GPU", 0, 0, (8, 0))], model_type, assumed=True)


def steps_per_epoch(examples: int, micro_batch_size: int, grad_accum: int, world_size: int = 1) -> int:
    """Optimizer steps in one pass over ``examples``, counted as transformers' Trainer counts them.

    With several processes accelerate deals the micro batches out in turn (``BatchSamplerShard``,
    even batches: the last round is filled from the start), so each process sees
    ceil(batches / world_size) of them, and every optimizer step takes
    micro batch x accumulation x world size examples."""
    if examples <= 0:
        return 0
    batches = math.ceil(math.ceil(examples / micro_batch_size) / max(1, world_size))
    return max(1, math.ceil(batches / grad_accum))


def effective_batch(preset: Preset, world_size: int = 1) -> int:
    """Examples per optimizer step: micro batch x gradient accumulation x processes (GPUs x machines)."""
    t = preset.training
    return t.micro_batch_size * t.gradient_accumulation_steps * max(1, world_size)


def total_steps(preset: Preset, examples: int, world_size: int = 1) -> int:
    """Optimizer steps the run will take: ``max_steps`` if set, else epochs x steps per epoch."""
    t = preset.training
    if t.max_steps:
        return t.max_steps
    spe = steps_per_epoch(examples, t.micro_batch_size, t.gradient_accumulation_steps, world_size)
    return max(1, math.ceil(t.epochs * spe))


def planned_world_size(preset: Preset, gpus: list | None = None) -> int:
    """The processes a run of ``preset`` would start here (GPUs x machines), for the planners; 1
    where the preset asks for more GPUs than this machine shows (the run itself refuses that)."""
    from engine.distributed import plan_world

    try:
        return plan_world(preset, gpus).size
    except UserError:
        return 1


def with_world(plan: DevicePlan, preset: Preset, info, world, rank=None, strategy: str | None = None,
               budget_bytes: int | None = None) -> DevicePlan:
    """``plan`` for one process of ``world`` (``engine.distributed.World``): its rank, the world's
    size and the strategy (``strategy`` when already decided, as on resume; else
    ``engine.distributed.choose_strategy`` against ``budget_bytes`` per GPU)."""
    from dataclasses import replace

    from engine.distributed import choose_strategy

    rank = rank or Rank()
    place = Rank(rank.rank, rank.local_rank, world.size, world.procs_per_node, rank.node_rank)
    if strategy is None:
        def fits(candidate: str) -> bool | None:
            if budget_bytes is None or info is None:
                return None
            from engine.memory import estimate_training_memory

            trial = replace(plan, strategy=candidate, place=place)
            return estimate_training_memory(info, memory_settings(preset, info, trial)).total_bytes <= budget_bytes

        strategy, why = choose_strategy(preset, world, fits)
    else:
        why = "as the run began"
    if strategy == "fsdp" and plan.liger:
        # Liger's fused loss takes the head's weight outside the model's forward, which FSDP shards:
        # the FSDP recipe runs transformers' own loss, and the blocks stay as transformers builds them.
        rest = plan.kernels_note.split("; ", 1)[0]
        plan = replace(plan, liger=False, kernels_note=f"{rest}; transformers' loss (FSDP shards the output head; "
                                                      "Liger Kernel is not combined with FSDP here)")
    return replace(plan, strategy=strategy, strategy_reason=why, place=place)


def with_init_adapter(preset: Preset) -> Preset:
    """The preset with LoRA rank, alpha and targets taken from ``lora.init_from``'s adapter, whose
    weights fix them; the preset itself when it starts from fresh adapters.

    Raises :class:`UserError` (one line) when the folder is not a LoRA adapter in PEFT format.
    """
    import json
    from pathlib import Path

    folder = preset.lora.init_from
    if not folder:
        return preset
    config_path = Path(folder) / "adapter_config.json"
    if not Path(folder).is_dir():
        raise UserError(f"lora.init_from: there is no adapter folder at {folder}",
                        "name a folder in PEFT format, such as a finished run's adapter/")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except OSError:
        raise UserError(f"lora.init_from: {folder} has no adapter_config.json, so it is not a PEFT adapter",
                        "name a finished run's adapter/ folder") from None
    except ValueError as exc:
        raise UserError(f"lora.init_from: {config_path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise UserError(f"lora.init_from: {folder} is not a LoRA adapter (peft_type {kind!r})")
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        raise UserError(f"lora.init_from: {folder} names its target layers by a pattern ({targets!r})",
                        "start from an adapter saved with a list of layer names")
    from pydantic import ValidationError

    from engine.preset import LoraSettings, describe_validation_error

    adopted = {"r": config.get("r"), "alpha": config.get("lora_alpha"),
               "targets": sorted(targets) if isinstance(targets, list) else targets}
    try:
        lora = LoraSettings.model_validate({**preset.lora.model_dump(), **adopted})
    except ValidationError as exc:
        raise UserError(describe_validation_error(exc, str(config_path))) from None
    return preset.model_copy(update={"lora": lora})


def report_to(preset: Preset) -> list[str]:
    """transformers' ``report_to`` for ``training.report_to``: auto is tensorboard where the tensorboard
    package is installed (the tensorboard extra), else nothing; a named one must be installed."""
    import importlib.util

    choice = preset.training.report_to
    if choice == "none":
        return []
    installed = importlib.util.find_spec("tensorboard" if choice == "auto" else choice) is not None
    if choice == "auto":
        return ["tensorboard"] if installed else []
    if not installed:
        extra = "pip install 'qlora-wizard[tensorboard]'" if choice == "tensorboard" else f"pip install {choice}"
        raise UserError(f"training.report_to: {choice} needs the {choice} package, which is not installed",
                        f"install it ({extra}) or set training.report_to: none")
    return [choice]


def resolve_targets(preset: Preset, info) -> tuple[str, ...]:
    """The layer names LoRA adapts: the preset's list (checked against the model) or all block linears."""
    targets = preset.lora.targets
    if targets == "all-linear":
        return tuple(info.default_targets)
    known = set(info.lora_target_candidates)
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise UserError(
            f"lora.targets names {', '.join(unknown)}, which {info.source} does not have",
            f"its layers are: {', '.join(info.lora_target_candidates)}",
        )
    return tuple(targets)


def memory_settings(preset: Preset, info, device: DevicePlan | None = None, reference: str | None = None):
    """The memory model's settings for this preset on this device (``engine.memory.MemorySettings``).
    ``reference``: how dpo gets its reference (``engine.preference.reference_mode``) where the run
    knows it; else the preset's, ``auto`` counted as each step (the data decides; it adds no memory
    beyond the backward's peak on the models measured)."""
    from engine.loss import chunked_loss_applies, loss_chunk_tokens
    from engine.memory import MemorySettings

    device = device or assumed_gpu(preset, info.model_type)
    t = preset.training
    # dpo and orpo (TRL) put both answers of each pair in one padded batch: twice the rows, no packing;
    # the memory model knows their losses (TRL's tiled log-probability head for dpo, every position's
    # logits for orpo), not the engine's chunks.
    pairs = t.method in PREFERENCE_METHODS
    loss_chunk = (loss_chunk_tokens(info.vocab_size) if not pairs and t.chunked_loss
                  and chunked_loss_applies(info.model_type) else None)
    if t.method == "dpo" and reference is None:
        reference = "each_step" if t.reference == "auto" else t.reference
    return MemorySettings(
        quantization=preset.quantization.method,
        double_quant=preset.quantization.double_quant,
        compute_dtype=device.compute_dtype,
        load_dtype=device.load_dtype,
        lora_rank=preset.lora.r,
        lora_targets=resolve_targets(preset, info),
        micro_batch_size=t.micro_batch_size * (2 if pairs else 1),
        seq_len=t.seq_len,
        gradient_checkpointing=t.gradient_checkpointing,
        optimizer=t.optimizer,
        attn_implementation=device.attn_implementation,
        packing=t.packing and not pairs,
        lora_dropout=preset.lora.dropout,
        # Trainer autocasts to bf16/fp16 on a GPU; on the CPU it computes in fp32.
        autocast=device.device == "cuda",
        # What engine.train does: the loss a chunk of positions at a time where it can (under DDP and
        # FSDP too, through the wrapped model's own forward with the head handing the hidden states on).
        loss_chunk=loss_chunk,
        liger=device.liger,
        # Per GPU: the strategy decides what each GPU holds (engine.memory), the world what it shares.
        strategy=device.strategy,
        world_size=device.world_size,
        method=t.method,
        reference=reference if t.method == "dpo" else None,
        triton=device.device == "cuda",
    )
