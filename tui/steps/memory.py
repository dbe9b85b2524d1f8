"""The memory step: will it fit? The training memory of the draft by component against the first
visible GPU's free memory (or a typed budget), the largest micro batch and the longest sequence that
fit, and with several GPUs the strategy the run takes and what each GPU holds.

Its form moves the estimate: quantization, micro batch, sequence length, checkpointing, optimizer;
the GPU budget is the step's own field (not in the preset). It needs the model's config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.errors import UserError
from tui.draft import Draft
from tui.steps.base import FormField, Step

NO_GPU_LINE = "no NVIDIA GPU found here: the estimate is for a bf16 GPU"
"""What the memory step says on a machine without a GPU (the estimate assumes one that does bf16)."""


def gpu_line(gpu) -> str:
    """One detected GPU and its memory, as the memory step lists it."""
    from tui.format import gib

    return f"GPU {gpu.index}: {gpu.name}, {gib(gpu.free_bytes)} free of {gib(gpu.total_bytes)}"


def parse_gib(text: str) -> int | None:
    """GPU memory typed in GiB, as bytes; None when nothing is typed."""
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise UserError(f"GPU memory {text!r} is not a number of GiB above 0")
    return int(value * 2**30)


@dataclass(frozen=True)
class MemoryView:
    """The memory step's figures for the draft."""

    estimate: Any
    """``engine.memory.MemoryEstimate``."""
    settings: Any
    """``engine.memory.MemorySettings`` it was made for."""
    budget_bytes: int | None
    """The first visible GPU's free memory (or the typed budget); None without either."""
    budget_name: str
    """The budget in words."""
    fit: Any
    """``engine.memory.FitResult`` against the budget; None without one."""
    kernels: str = ""
    """Which attention and loss kernels the run gets and why (``DevicePlan.kernels_note``)."""
    world_line: str = ""
    """With several GPUs (or DDP/FSDP asked for): how many, which strategy and why, e.g.
    ``2 x NVIDIA H100: DDP, per GPU (...)``; empty for one GPU, where nothing changes."""
    sharing: str = ""
    """With several GPUs: which components are sharded and which every GPU holds whole."""
    largest: str = ""
    """With several GPUs and a budget: the largest reference model each strategy fits on them."""

    @property
    def fits(self) -> bool | None:
        """Whether the estimate fits the budget; None without a budget."""
        return self.estimate.fits(self.budget_bytes)

    @property
    def verdict(self) -> tuple[str | None, str]:
        """``FITS`` / ``DOES NOT FIT`` (None without a budget) and the figures behind it, in words."""
        from tui.format import gib

        total = gib(self.estimate.total_bytes)
        if self.fits is None:
            return None, f"needs {total} at the peak"
        room = self.budget_bytes - self.estimate.total_bytes
        if self.fits:
            share = 100 * self.estimate.total_bytes / self.budget_bytes
            return "FITS", f"{total} of {gib(self.budget_bytes)} ({share:.0f} %), {gib(room)} left"
        return "DOES NOT FIT", f"needs {total}, {gib(self.budget_bytes)} available ({gib(-room)} short)"

    context_line = property(lambda self: cuda_context_line())
    """What the CUDA context costs (``cuda_context_line``)."""


def cuda_context_line() -> str:
    """What the CUDA context costs, which the total includes and torch's counters never show: the
    same on a 16 GB, a 24 GB or an 80 GB card, only the room left differs."""
    from engine.memory import CUDA_CONTEXT_BYTES
    from tui.format import gib

    return (f"the total counts {gib(CUDA_CONTEXT_BYTES)} of CUDA context (measured on an H100 and an H200, "
            "CUDA 13); other cards and drivers take a few hundred MiB more or less")


def draft_world(draft: Draft):
    """The GPUs a run of the draft would train on (``engine.distributed.World``, as CUDA GPUs: the
    estimate is for a GPU even on a machine without one), when there are several or the preset asks
    for DDP or FSDP; None otherwise (one GPU: the memory step shows what it always did)."""
    from engine.distributed import World
    from engine.plan import planned_world_size

    d = draft.preset.distributed
    size = planned_world_size(draft.preset, draft.gpus)
    if size < 2 and d.strategy not in ("ddp", "fsdp"):
        return None
    return World(max(1, size // d.nodes), d.nodes, "cuda")


def _first_gpu(draft: Draft):
    """The first GPU CUDA will use (``CUDA_VISIBLE_DEVICES`` applied); None without one."""
    from engine.distributed import visible_gpus

    gpus = visible_gpus(draft.gpus) if draft.gpus else []
    return gpus[0] if gpus else None


def draft_device(draft: Draft, budget_bytes: int | None = None, world=None):
    """The device plan of the draft: the first visible GPU, or an assumed bf16 one
    (``engine.plan.DevicePlan``); for several GPUs (``world``, else ``draft_world``) also the strategy,
    chosen against ``budget_bytes`` per GPU (else the first visible GPU's free memory)."""
    from engine.distributed import visible_gpus
    from engine.plan import assumed_gpu, plan_device, with_world

    info = draft.info
    gpus = visible_gpus(draft.gpus) if draft.gpus else []
    plan = plan_device(draft.preset, gpus, info.model_type) if gpus else assumed_gpu(draft.preset, info.model_type)
    world = world or draft_world(draft)
    if world is None:
        return plan
    if budget_bytes is None and _first_gpu(draft) is not None:
        budget_bytes = _first_gpu(draft).free_bytes
    return with_world(plan, draft.preset, info, world, budget_bytes=budget_bytes)


def draft_estimate(draft: Draft, device=None) -> tuple[Any, Any]:
    """The memory settings of the draft on the first GPU (or an assumed bf16 one) and their estimate."""
    from engine.memory import estimate_training_memory
    from engine.plan import memory_settings

    settings = memory_settings(draft.preset, draft.info, device or draft_device(draft))
    return settings, estimate_training_memory(draft.info, settings)


def fit_line(fit, seq_len: int) -> str:
    """What fits a budget (``engine.memory.FitResult``), in one line: the largest micro batch at this
    sequence length and the longest sequence at micro batch 1."""
    mb, sl = fit.max_micro_batch, fit.max_seq_len
    return (f"largest micro batch at {seq_len:,} tokens: {mb if mb else 'none fits'}; "
            f"longest sequence at micro batch 1: {f'{sl:,}' if sl else 'none fits'}")


def memory_budget(draft: Draft, budget_bytes: int | None) -> tuple[int | None, str]:
    """The memory to check against (typed, else the first visible GPU's free memory) and it in words."""
    from tui.format import gib

    if budget_bytes is not None:
        return budget_bytes, f"{gib(budget_bytes)} (typed)"
    gpu = _first_gpu(draft)
    if gpu is not None:
        return gpu.free_bytes, f"{gpu.name}: {gib(gpu.free_bytes)} free of {gib(gpu.total_bytes)}"
    return None, "no NVIDIA GPU here: type the GPU's memory to check against"


def memory_view(draft: Draft, budget_bytes: int | None = None) -> MemoryView:
    """Estimate the draft's training memory against ``budget_bytes`` (else the first visible GPU's free
    memory); with several GPUs per GPU, for the strategy the run would take, and the largest reference
    model each strategy fits on them (``engine.sizes``)."""
    from engine.memory import fit

    typed = budget_bytes
    budget_bytes, name = memory_budget(draft, budget_bytes)
    device = draft_device(draft, budget_bytes)
    settings, est = draft_estimate(draft, device)
    result = fit(draft.info, settings, budget_bytes) if budget_bytes else None
    view = MemoryView(est, settings, budget_bytes, name, result, f"kernels: {device.kernels_note}")
    world = draft_world(draft)
    if world is None:
        return view
    from dataclasses import replace

    from engine.distributed import STRATEGY_SHORT
    from engine.sizes import largest_fitting, largest_words
    from tui.format import gib

    gpu = _first_gpu(draft)
    card = gpu.name if gpu is not None else "a bf16-capable GPU"
    machines = f" x {world.nodes} machines" if world.nodes > 1 else ""
    per_gpu = ", per GPU" if world.distributed else ""
    line = (f"{world.procs_per_node} x {card}{machines}: {STRATEGY_SHORT[device.strategy]}{per_gpu} "
            f"({device.strategy_reason})")
    largest = ""
    if budget_bytes and world.distributed:
        words = f"{gib(budget_bytes)}" if typed is not None or gpu is None else f"{card} ({gib(budget_bytes)} free)"
        largest = largest_words(largest_fitting(settings, budget_bytes, world.size, ("ddp", "fsdp")), world.size, words)
    return replace(view, world_line=line, sharing=est.sharing_words(), largest=largest)


def fastest_fit_for(draft: Draft, budget_bytes: int | None = None):
    """The fastest checkpointing, micro batch and accumulation that fit (``engine.speed.fastest_fit``)
    for the draft on the first visible GPU (or an assumed one) against ``budget_bytes`` (else the GPU's
    free memory), keeping the draft's effective batch and using the checked data's lengths when the data
    check is current. A UserError when there is no budget to fit."""
    from engine.speed import fastest_fit

    budget, _ = memory_budget(draft, budget_bytes)
    if not budget:
        raise UserError("no GPU memory to fit against", "type the GPU's memory in GiB")
    settings, _ = draft_estimate(draft)
    stats = draft.data.stats if draft.data_ready else None
    gpu = _first_gpu(draft)
    return fastest_fit(
        draft.info, settings, budget,
        gradient_accumulation_steps=draft.preset.training.gradient_accumulation_steps,
        mean_len=(stats.mean_len or None) if stats else None,
        max_len=(stats.max_len or None) if stats else None,
        gpu=gpu.name if gpu is not None else None,
    )


def fastest_fit_lines(result, lengths_hint: str | None = None) -> list[str]:
    """What both front ends show of a ``FastestFit``: the choice in one line, then each reason, and
    ``lengths_hint`` when the data's lengths were not known (by default: check the data for them)."""
    if lengths_hint is None:
        from tui.steps import step_ref

        lengths_hint = f"check the data ({step_ref('data')}) for its real lengths"
    head = f"fastest that fits: {result.summary}" if result.found else result.reasons[0]
    reasons = list(result.reasons if result.found else result.reasons[1:])
    if result.found and not result.lengths_known:
        reasons.append(lengths_hint)
    return [head, *(f"  - {r}" for r in reasons)]


MEMORY_FORM: tuple[FormField, ...] = (
    FormField("quantization", "quantization.method"),
    FormField("micro batch", "training.micro_batch_size", "int"),
    FormField("sequence length", "training.seq_len", "int", "tokens"),
    FormField("grad checkpointing", "training.gradient_checkpointing", "bool",
              ask="gradient checkpointing (far less memory, about 30 % slower)?"),
    FormField("optimizer", "training.optimizer"),
)
"""The settings that move the estimate, in the screen's order; the prompts ask the micro batch last,
with the largest that fits as its default."""

STEP = Step("memory", "Memory", MEMORY_FORM, needs="model")
"""The memory step."""
