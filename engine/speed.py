"""How fast a QLoRA training step runs, modelled, and the fastest settings that fit the GPU's memory.

The model is arithmetic (no torch import, like ``engine.memory``) and exists to *rank* settings of
one run on one GPU: checkpointing on or off, and how an effective batch is split into micro batch x
gradient accumulation. It is not a prediction to quote. Its three constants are fitted to the four
recorded H200 runs in ``SPEED_RECORDS`` and reproduce them within 1 % (``RESIDUALS``); three
constants on four rows shows the form is consistent with them, not that it predicts other models.

One micro batch costs the longer of two times that run side by side:

* GPU time: the FLOPs the kernels execute over the measured bf16 matmul rate times an efficiency
  (``GPU_EFFICIENCY``, fitted). Per token: 4 x N_frozen_matmul (forward and input gradient, no
  weight gradient) + 6 x N_lora + attention as executed (forward once, backward twice); with
  gradient checkpointing the forward runs twice, so + 2 x N_frozen_blocks + 2 x N_lora + one more
  attention forward. transformers' SDPA (and eager) over a packed row gets a dense block-diagonal
  mask and cannot skip the masked blocks (``engine-facts.md``; the records ran so), so it covers
  the whole row, row length squared; the engine's own packed kernels (``engine.attention``) and
  flash-attn's varlen cover each example's causal triangle.
* Host time: the Python and kernel-launch work that feeds the GPU, which does not shrink with
  fewer tokens. Each adapted Linear is bitsandbytes' dequantize and matmul plus peft's casts, two
  matmuls, a scale and an add, a few kernel launches each (counted in ``LAUNCHES``); checkpointing
  runs the forward's launches again (about 1.45x the launches). ``HOST_S_PER_LAUNCH`` (fitted) is
  the host time per launch.

The GPU runs kernels as fast as the host queues them, so a micro batch takes the longer of the
two; the records, each mostly one bound or the other, cannot say how much they overlap in between.
An optimizer step adds a fixed host time (``STEP_HOST_S``, fitted), the same for every way of
splitting one effective batch, so it never changes a ranking. What ranks: bigger micro batches
amortise the host time until the GPU is busy, after which packed SDPA attention makes longer rows
dearer per token; checkpointing off saves the recompute's FLOPs and launches.

Left out, knowingly: memory-bound kernels (dequantization, norms), the chunked loss skipping
prompt positions, Liger's fused kernels, matmul efficiency at small shapes, several GPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from engine.attention import PACKED_SDPA
from engine.errors import UserError
from engine.memory import GIB, MemorySettings, estimate_training_memory, resolve_targets
from engine.modelinfo import ModelInfo

# --- The GPU's matmul rate ---------------------------------------------------------------------

MEASURED_MATMUL_FLOPS = 782e12
"""bf16 8192 x 8192 x 8192 ``torch.mm`` on the H200 the records below ran on (torch 2.11,
2026-11-27; ``engine-facts.md``: 780-800 TFLOP/s). The rate the fitted efficiency is relative to."""

H100_SPEC_FLOPS = 989e12
"""NVIDIA's dense bf16 tensor rate of the H100 SXM and the H200 (the same compute)."""

MATMUL_SHARE_OF_SPEC = MEASURED_MATMUL_FLOPS / H100_SPEC_FLOPS
"""What a large bf16 matmul reaches of the datasheet rate (0.79 on the H200): applied to every
GPU's datasheet figure to get the rate the efficiency is relative to."""

DENSE_BF16_SPEC_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("RTX A6000", 155e12),
    ("T4", 65e12),
    ("V100", 125e12),
)
"""Dense (no sparsity) bf16 tensor rates from NVIDIA's datasheets, fp16 for T4 and V100 (no bf16),
with fp32 accumulation for the GeForce cards; matched as substrings of the NVML name, first match
wins (so ``H100 PCIe`` before ``H100``, ``L40S`` before ``L40`` before ``L4``)."""


@dataclass(frozen=True)
class GpuRate:
    """The matmul rate the model assumes for a GPU."""

    name: str
    """The GPU in words."""
    spec_flops: float
    """Its datasheet dense bf16 rate."""
    known: bool
    """Whether the name was found in ``DENSE_BF16_SPEC_FLOPS`` (else an H100-class GPU is assumed)."""

    @property
    def matmul_flops(self) -> float:
        """The rate a large bf16 matmul reaches: the datasheet figure x ``MATMUL_SHARE_OF_SPEC``."""
        return self.spec_flops * MATMUL_SHARE_OF_SPEC

    @property
    def label(self) -> str:
        """How reasons name it."""
        if self.known:
            return f"{self.name} ({self.spec_flops / 1e12:,.0f} TFLOP/s bf16)"
        what = f"{self.name}, not in the table" if self.name else "no GPU named"
        return f"an H100-class GPU ({what}; {self.spec_flops / 1e12:,.0f} TFLOP/s bf16)"


def gpu_rate(name: str | None) -> GpuRate:
    """The matmul rate of the GPU called ``name`` (NVML's name), or an H100-class one when unknown."""
    for key, flops in DENSE_BF16_SPEC_FLOPS:
        if name and key.lower() in name.lower():
            return GpuRate(name, flops, True)
    return GpuRate(name or "", H100_SPEC_FLOPS, False)


# --- Host work: kernel launches, counted from the source ------------------------------------------

LAUNCHES = {
    "adapted_forward": 9,
    "adapted_backward": 12,
    "quantized_forward": 3,
    "quantized_backward": 3,
    "dropout": 1,
    "layer_forward": 35,
    "layer_backward": 40,
    "liger_layer_forward": 15,
    "liger_layer_backward": 18,
    "example_attention_forward": 4,
    "example_attention_backward": 6,
}
"""Kernel launches per module per micro batch, counted (roughly) from bitsandbytes 0.50, peft 0.21
and transformers 5's Llama layer. A 4-bit Linear: dequantize the absmax, dequantize the weight,
matmul, in the forward and again in the backward (input gradient). Its LoRA adapter adds in the
forward the autocast casts of A and B, two matmuls, the scale and the add (6); in the backward four
matmuls, the scale, the casts back and the gradient accumulation (9). Dropout above 0: one kernel
each way. The rest of a decoder layer (two RMSNorms in Python, RoPE, repeating k/v, SDPA, the
residual adds, the activation): about 35 forward, 40 backward; with Liger's fused RMSNorm, RoPE and
SwiGLU about 15 and 18. SDPA once per example of a packed row (``engine.attention.PACKED_SDPA``)
adds per example and layer the k/v repeat, the kernel and the output copy (4), and their backward
with the slices' gradients (6). Checkpointing repeats the forward."""

DENSE_MASK_KERNELS = frozenset({"sdpa", "eager"})
"""Kernels that see a packed row as one sequence with a dense block-diagonal mask: every pair of
the row's positions is computed. The others (flash-attn's and PyTorch's varlen kernels, SDPA per
example) compute each example's causal triangle only."""

# --- Fitted constants (see ``fit_constants`` and ``RESIDUALS``) -----------------------------------

GPU_EFFICIENCY = 0.47
"""Share of ``MEASURED_MATMUL_FLOPS`` the executed FLOPs run at once the GPU is busy (fitted: 0.467).
It covers everything but the matmuls' FLOPs: SDPA's memory-efficient kernel, dequantization, norms."""

HOST_S_PER_LAUNCH = 35e-6
"""Host seconds per counted kernel launch, the Python around it included (fitted: 35.3 us; a bare
launch is 5-10 us, the rest is autograd, peft and bitsandbytes in Python)."""

STEP_HOST_S = 0.38
"""Host seconds per optimizer step beyond the micro batches (fitted: 0.38): AdamW over every adapter
tensor, clipping, the scheduler, the per-step log line and its ``.item()`` sync, the events line."""


# --- The recorded runs the constants are fitted to ---------------------------------------------


@dataclass(frozen=True)
class SpeedRecord:
    """One measured training run of this engine."""

    config: str
    """The model's config folder in ``tests/fixtures/hf-configs`` (random weights were built from it)."""
    micro_batch_size: int
    seq_len: int
    mean_len: float
    """Mean example length in tokens (real tokens per micro batch / micro batch)."""
    gradient_checkpointing: bool
    lora_rank: int
    lora_dropout: float
    tokens_per_s: float
    """Real (unpadded) tokens per second, measured."""
    mfu: float
    """(4 N_frozen_matmul + 6 N_lora + causal attention) x tokens/s / 782e12, as recorded."""
    note: str = ""


SPEED_RECORDS: tuple[SpeedRecord, ...] = (
    SpeedRecord("meta-llama__Llama-3.2-1B", 8, 1024, 325.0, True, 16, 0.0, 4_628, 0.030,
                "make bench recipe: 40-1000-token examples, ~2,600 tokens per micro batch; "
                "GPU mostly idle, the process used 1.2 CPU cores (host-bound)"),
    SpeedRecord("meta-llama__Llama-3.1-8B", 1, 2048, 2048.0, True, 16, 0.05, 2_680, 0.109,
                "benchmarks/gpu_check.py case Llama-3.1-8B:2048:1:ckpt:all:16 (LoRA dropout 0.05 as it sets "
                "it), every micro batch full"),
    SpeedRecord("Qwen__Qwen2.5-7B", 4, 4096, 4096.0, True, 16, 0.05, 4_776, 0.189,
                "benchmarks/gpu_check.py case Qwen2.5-7B:4096:4:ckpt:all:16, 16,384 tokens per micro batch"),
    SpeedRecord("Qwen__Qwen2.5-0.5B", 4, 4096, 4096.0, True, 16, 0.05, 21_649, 0.071,
                "benchmarks/gpu_check.py case Qwen2.5-0.5B:4096:4:ckpt:all:16, 16,384 tokens per micro batch"),
)
"""This engine's training process (``python -m engine.train``: NF4 + double quantization, bf16,
SDPA, padding-free packing, LoRA on all linear layers, AdamW, gradient accumulation 1) on an NVIDIA
H200, recorded 2026-11-27 with torch 2.11, transformers 5.17, peft 0.21, bitsandbytes 0.50.2;
models with random weights built from the real configs in ``tests/fixtures/hf-configs``."""

RESIDUALS = {
    "meta-llama__Llama-3.2-1B": 1.005,
    "meta-llama__Llama-3.1-8B": 1.003,
    "Qwen__Qwen2.5-7B": 1.006,
    "Qwen__Qwen2.5-0.5B": 1.003,
}
"""Modelled / measured tokens per second of each record at the constants above, which are
``fit_constants``' optimum (0.467, 35.3 us, 0.38 s) rounded (``residuals()`` recomputes these;
``tests/test_speed.py`` checks both). Modelled: 4,649, 2,688, 4,805 and 21,718 tokens/s against
4,628, 2,680, 4,776 and 21,649 measured. In the model the 1B and the 8B runs are host-bound
(launches 0.18 s against 0.06 s of GPU work per micro batch; 0.39 s against 0.27 s), the two
16,384-token Qwen runs GPU-bound (3.05 s against 0.34 s; 0.38 s against 0.29 s)."""

RECORD_FACTOR = 1.1
"""The model reproduces every record's tokens per second within this factor."""


# --- The model -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepTime:
    """The modelled time of one optimizer step."""

    tokens_per_micro_batch: float
    """Real tokens in one micro batch: micro batch x mean example length (capped by seq_len)."""
    flops_per_micro_batch: float
    """FLOPs the kernels execute for one micro batch (recompute and masked attention included)."""
    gpu_s: float
    """GPU seconds per micro batch."""
    host_s: float
    """Host seconds per micro batch (kernel launches)."""
    micro_batches: int
    """Micro batches per optimizer step (the gradient accumulation)."""
    step_s: float
    """Seconds per optimizer step."""

    @property
    def host_bound(self) -> bool:
        """Whether the host's launches, not the GPU's work, set the pace."""
        return self.host_s > self.gpu_s

    @property
    def tokens_per_s(self) -> float:
        """Real tokens per second."""
        return self.micro_batches * self.tokens_per_micro_batch / self.step_s


@dataclass(frozen=True)
class _Work:
    """What one micro batch asks of the GPU (FLOPs at efficiency 1) and of the host (launches)."""

    real_tokens: float
    flops: float
    launches: float


def _attention_width(info: ModelInfo) -> int:
    """Width of the attention's queries (heads x head dim)."""
    for t in info.targets:
        if t.name in ("q_proj", "query", "q"):
            return t.out_features
    return info.hidden_size


def _work(info: ModelInfo, s: MemorySettings, mean_len: float | None, max_len: int | None) -> _Work:
    """FLOPs and kernel launches of one micro batch at settings ``s``."""
    n = min(float(mean_len or s.seq_len), float(s.seq_len))
    real = s.micro_batch_size * n
    adapted = resolve_targets(info, s.lora_targets)
    adapted_names = {t.name for t in adapted}
    L = max(1, info.num_hidden_layers)
    # Frozen matmul weights that run per token: the block linears (of a mixture of experts, the
    # top-2 experts' share of the expert weights) and the head.
    blocks = sum(t.weight_params for t in info.targets)
    if info.is_moe and info.num_experts:
        expert_linears = sum(t.weight_params for t in info.targets if t.count > L)
        fused = max(0, info.params_blocks - blocks)  # fused expert tensors are not targets
        blocks += (2 / info.num_experts - 1) * expert_linears + 2 / info.num_experts * fused
    head = info.hidden_size * info.vocab_size
    lora = sum(t.lora_params(s.lora_rank) for t in adapted)

    # Tokens the kernels see, and attention: query-key pairs per layer in the forward.
    d = _attention_width(info)
    dense = s.attn_implementation in DENSE_MASK_KERNELS
    if s.packing:
        executed = real
        # one row with a dense block-diagonal mask: every pair computed; else each example's triangle
        pairs = real * real if dense else s.micro_batch_size * n * (n + 1) / 2
    else:
        row = float(min(s.seq_len, max_len or s.seq_len))  # padded to the longest in the batch
        executed = s.micro_batch_size * row
        pairs = s.micro_batch_size * (row * row if dense else n * (n + 1) / 2)
    attn_forward = 4 * d * pairs * L  # QK^T and PV, 2 FLOPs per multiply-add
    recompute = s.gradient_checkpointing
    flops = executed * (4 * (blocks + head) + 6 * lora) + 3 * attn_forward
    if recompute:
        flops += executed * (2 * blocks + 2 * lora) + attn_forward

    # Host: launches per module, the forward's repeated under checkpointing.
    fwd_passes = 2 if recompute else 1
    drop = LAUNCHES["dropout"] if s.lora_dropout > 0 else 0
    layer = ("liger_layer_forward", "liger_layer_backward") if s.liger else ("layer_forward", "layer_backward")
    launches = L * (LAUNCHES[layer[0]] * fwd_passes + LAUNCHES[layer[1]])
    if s.packing and s.attn_implementation == PACKED_SDPA:
        launches += L * s.micro_batch_size * (LAUNCHES["example_attention_forward"] * fwd_passes
                                              + LAUNCHES["example_attention_backward"])
    for t in info.targets:
        if t.name in adapted_names:
            per = (LAUNCHES["adapted_forward"] + drop) * fwd_passes + LAUNCHES["adapted_backward"] + drop
        else:  # a block linear without an adapter: bitsandbytes' part only
            per = LAUNCHES["quantized_forward"] * fwd_passes + LAUNCHES["quantized_backward"]
        launches += per * t.count
    return _Work(real, flops, launches)


def _step(work: _Work, accum: int, matmul_flops: float, efficiency: float, per_launch: float,
          per_step: float) -> StepTime:
    gpu = work.flops / (matmul_flops * efficiency)
    host = work.launches * per_launch
    return StepTime(work.real_tokens, work.flops, gpu, host, accum, accum * max(gpu, host) + per_step)


def step_time(
    info: ModelInfo,
    settings: MemorySettings,
    *,
    gradient_accumulation_steps: int = 1,
    mean_len: float | None = None,
    max_len: int | None = None,
    gpu: str | GpuRate | None = None,
) -> StepTime:
    """The modelled time of one optimizer step of ``gradient_accumulation_steps`` micro batches.

    ``mean_len``: the data's mean example length in tokens (None: every example ``seq_len`` long);
    ``max_len``: its longest (padded batches are padded to it). ``gpu``: the GPU's name (its
    datasheet rate, ``gpu_rate``) or a :class:`GpuRate`; None assumes an H100-class GPU.
    """
    _positive("gradient_accumulation_steps", gradient_accumulation_steps)
    if mean_len is not None and (isinstance(mean_len, bool) or not isinstance(mean_len, (int, float))
                                 or not mean_len > 0):
        raise UserError(f"mean example length must be a number of tokens above 0, not {mean_len!r}")
    rate = gpu if isinstance(gpu, GpuRate) else gpu_rate(gpu)
    return _step(_work(info, settings, mean_len, max_len), gradient_accumulation_steps, rate.matmul_flops,
                 GPU_EFFICIENCY, HOST_S_PER_LAUNCH, STEP_HOST_S)


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a whole number of at least 1, not {value!r}")


# --- Calibration ---------------------------------------------------------------------------------


def record_settings(record: SpeedRecord, info: ModelInfo) -> MemorySettings:
    """The settings a record ran with (all linear layers, SDPA, packing)."""
    return MemorySettings(lora_rank=record.lora_rank, lora_targets=tuple(info.default_targets),
                          micro_batch_size=record.micro_batch_size, seq_len=record.seq_len,
                          gradient_checkpointing=record.gradient_checkpointing, lora_dropout=record.lora_dropout)


def residuals(infos: dict[str, ModelInfo], constants: tuple[float, float, float] | None = None) -> dict[str, float]:
    """Modelled / measured tokens per second of every record (``infos``: config folder -> ModelInfo),
    at ``constants`` (efficiency, seconds per launch, seconds per step) or the module's."""
    eff, per_launch, per_step = constants or (GPU_EFFICIENCY, HOST_S_PER_LAUNCH, STEP_HOST_S)
    out = {}
    for r in SPEED_RECORDS:
        info = infos[r.config]
        work = _work(info, record_settings(r, info), r.mean_len, None)
        t = _step(work, 1, MEASURED_MATMUL_FLOPS, eff, per_launch, per_step)
        out[r.config] = t.tokens_per_s / r.tokens_per_s
    return out


def fit_constants(infos: dict[str, ModelInfo]) -> tuple[float, float, float]:
    """(efficiency, seconds per launch, seconds per step) that minimise the squared log error of the
    records' tokens per second: a coarse grid, then a finer one around its best point."""
    works = [(_work(infos[r.config], record_settings(r, infos[r.config]), r.mean_len, None), r)
             for r in SPEED_RECORDS]

    def loss(eff: float, per_launch: float, per_step: float) -> float:
        total = 0.0
        for w, r in works:
            t = _step(w, 1, MEASURED_MATMUL_FLOPS, eff, per_launch, per_step)
            total += math.log(t.tokens_per_s / r.tokens_per_s) ** 2
        return total

    def grid(effs, launches, steps):
        return min((loss(e, h, s), e, h, s) for e in effs for h in launches for s in steps)

    _, e, h, s = grid([0.05 + 0.05 * i for i in range(20)], [1e-6 * 2 ** (i / 2) for i in range(20)],
                      [0.05 * i for i in range(21)])
    for k in range(4):  # narrow around the best point, halving the span each time
        span = 0.2 / 2 ** k
        _, e, h, s = grid([e * (1 + span * (i - 5) / 5) for i in range(11)],
                          [h * (1 + span * (i - 5) / 5) for i in range(11)],
                          [max(0.0, s + span / 2 * (i - 5) / 5) for i in range(11)])
    return e, h, s


# --- The fastest settings that fit --------------------------------------------------------------

FIT_MARGIN = 0.10
"""Share of the memory budget kept free when choosing the fastest settings: the estimate is within
about 5 % of measured peaks (``engine.memory``), and the GPU's free memory moves."""

MAX_MICRO_BATCH = 4096
"""The largest micro batch considered (the preset's limit on ``training.micro_batch_size``)."""

TIE_SHARE = 0.01
"""Candidates modelled within 1 % of the fastest count as equally fast; the one needing the least
memory among them is chosen."""


@dataclass(frozen=True)
class SpeedCandidate:
    """One way to run the effective batch, with its memory and modelled speed."""

    gradient_checkpointing: bool
    micro_batch_size: int
    gradient_accumulation_steps: int
    total_bytes: int
    """The memory estimate's total at micro batch x seq_len (the worst case)."""
    tokens_per_s: float
    """Modelled real tokens per second."""
    step_s: float
    """Modelled seconds per optimizer step."""
    host_bound: bool
    """Whether host work, not the GPU, sets the pace."""
    fits: bool
    """Whether ``total_bytes`` is within the budget less the margin."""

    @property
    def words(self) -> str:
        """E.g. ``checkpointing off, micro batch 8 x accumulation 2``."""
        return (f"checkpointing {'on' if self.gradient_checkpointing else 'off'}, micro batch "
                f"{self.micro_batch_size} x accumulation {self.gradient_accumulation_steps}")

    def to_json(self) -> dict:
        """A JSON-ready dict."""
        return {
            "gradient_checkpointing": self.gradient_checkpointing,
            "micro_batch_size": self.micro_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "total_bytes": self.total_bytes,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "step_s": round(self.step_s, 4),
            "host_bound": self.host_bound,
            "fits": self.fits,
        }


@dataclass(frozen=True)
class FastestFit:
    """The fastest checkpointing, micro batch and accumulation that keep the effective batch and fit."""

    effective_batch: int
    """Examples per optimizer step (micro batch x accumulation), kept exactly."""
    budget_bytes: int
    """The memory budget (the GPU's free memory, or as typed)."""
    margin: float
    """Share of the budget kept free."""
    choice: SpeedCandidate | None
    """The fastest candidate that fits; None when nothing does."""
    current: SpeedCandidate
    """The settings as they were, for comparison."""
    alternatives: tuple[SpeedCandidate, ...]
    """The other candidates that fit, fastest first."""
    reasons: tuple[str, ...]
    """Why, in plain words."""
    mean_len: float
    """Tokens per example the speed was modelled with."""
    lengths_known: bool
    """Whether ``mean_len`` is the data's (else every example was taken as ``seq_len`` tokens)."""
    seq_len: int
    """Tokens per example the memory was checked at (the worst case)."""
    gpu: str
    """The GPU whose matmul rate the speed was modelled with, in words."""

    @property
    def usable_bytes(self) -> int:
        """The budget less the margin: what a candidate's estimate must stay within."""
        return int(self.budget_bytes * (1 - self.margin))

    @property
    def found(self) -> bool:
        """Whether anything fits."""
        return self.choice is not None

    @property
    def summary(self) -> str:
        """One line: what was chosen (or that nothing fits)."""
        if self.choice is None:
            return (f"nothing fits in {_gib(self.usable_bytes)}: even micro batch 1 with checkpointing on "
                    f"needs more")
        c = self.choice
        return (f"{c.words}: {_gib(c.total_bytes)} of {_gib(self.usable_bytes)} usable, "
                f"~{c.tokens_per_s:,.0f} tokens/s modelled")

    def to_json(self) -> dict:
        """The stable JSON form (``qlora-wizard estimate --fit --json``)."""
        return {
            "effective_batch": self.effective_batch,
            "budget_bytes": self.budget_bytes,
            "margin": self.margin,
            "usable_bytes": self.usable_bytes,
            "found": self.found,
            "choice": None if self.choice is None else self.choice.to_json(),
            "current": self.current.to_json(),
            "alternatives": [c.to_json() for c in self.alternatives],
            "reasons": list(self.reasons),
            "mean_len": self.mean_len,
            "lengths_known": self.lengths_known,
            "seq_len": self.seq_len,
            "gpu": self.gpu,
        }


def _gib(n: float) -> str:
    return f"{n / GIB:,.1f} GiB"


def divisors(n: int) -> list[int]:
    """Every whole number that divides ``n``, ascending."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def fastest_fit(
    info: ModelInfo,
    settings: MemorySettings,
    budget_bytes: int,
    *,
    gradient_accumulation_steps: int = 1,
    mean_len: float | None = None,
    max_len: int | None = None,
    gpu: str | None = None,
    margin: float = FIT_MARGIN,
    max_micro_batch: int = MAX_MICRO_BATCH,
) -> FastestFit:
    """The fastest (modelled) checkpointing, micro batch and accumulation for ``settings``' model,
    sequence length, LoRA and optimizer, keeping the effective batch (micro batch x accumulation)
    exactly and the memory estimate within ``budget_bytes`` less ``margin``.

    Candidates: checkpointing on and off, every micro batch that divides the effective batch. When
    nothing fits even at micro batch 1 with checkpointing on, the result says so (``choice`` None);
    a UserError is only for bad arguments.
    """
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, float)) or budget_bytes <= 0:
        raise UserError(f"memory budget must be a positive number of bytes, not {budget_bytes!r}")
    _positive("gradient_accumulation_steps", gradient_accumulation_steps)
    _positive("max_micro_batch", max_micro_batch)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise UserError(f"memory margin must be a share of at least 0 and below 1, not {margin!r}")
    rate = gpu_rate(gpu)
    effective = settings.micro_batch_size * gradient_accumulation_steps
    usable = int(budget_bytes * (1 - margin))
    n = min(float(mean_len or settings.seq_len), float(settings.seq_len))

    def candidate(checkpointing: bool, micro: int) -> SpeedCandidate:
        s = replace(settings, micro_batch_size=micro, gradient_checkpointing=checkpointing)
        total = estimate_training_memory(info, s).total_bytes
        t = step_time(info, s, gradient_accumulation_steps=effective // micro, mean_len=mean_len, max_len=max_len,
                      gpu=rate)
        return SpeedCandidate(checkpointing, micro, effective // micro, total, t.tokens_per_s, t.step_s,
                              t.host_bound, total <= usable)

    micro_batches = [d for d in divisors(effective) if d <= max_micro_batch or d == settings.micro_batch_size]
    every = {(ck, mb): candidate(ck, mb) for ck in (True, False) for mb in micro_batches}
    current = every[(settings.gradient_checkpointing, settings.micro_batch_size)]
    fitting = sorted((c for c in every.values() if c.fits), key=lambda c: (-c.tokens_per_s, c.total_bytes))
    common = {"effective_batch": effective, "budget_bytes": int(budget_bytes), "margin": float(margin),
              "current": current, "mean_len": n, "lengths_known": mean_len is not None,
              "seq_len": settings.seq_len, "gpu": rate.label}
    if not fitting:
        smallest = every[(True, 1)]
        reasons = (
            (f"nothing fits in {_gib(usable)} ({_gib(budget_bytes)} less the {margin:.0%} margin): even micro "
             f"batch 1 with checkpointing on needs {_gib(smallest.total_bytes)}"),
            "try a shorter sequence length, an 8-bit optimizer, fewer LoRA targets or a GPU with more memory",
        )
        return FastestFit(choice=None, alternatives=(), reasons=reasons, **common)
    fastest = fitting[0].tokens_per_s
    tied = [c for c in fitting if c.tokens_per_s >= fastest * (1 - TIE_SHARE)]
    choice = min(tied, key=lambda c: c.total_bytes)
    alternatives = tuple(c for c in fitting if c is not choice)
    reasons = _reasons(choice, fitting[0], every, micro_batches, settings, usable, budget_bytes, margin, effective,
                       mean_len, n, rate)
    return FastestFit(choice=choice, alternatives=alternatives, reasons=tuple(reasons), **common)


def _reasons(choice: SpeedCandidate, fastest: SpeedCandidate, every: dict, micro_batches: list[int],
             settings: MemorySettings, usable: int,
             budget: int, margin: float, effective: int, mean_len: float | None, n: float,
             rate: GpuRate) -> list[str]:
    """Why ``choice``, in plain words, one reason per line."""
    ck, mb = choice.gradient_checkpointing, choice.micro_batch_size
    best = {flag: max((c for (f, _), c in every.items() if f == flag and c.fits),
                      key=lambda c: c.tokens_per_s, default=None) for flag in (True, False)}
    reasons = []
    if not ck:
        other = best[True]
        ratio = f" ({choice.tokens_per_s / other.tokens_per_s:.1f}x modelled)" if other else ""
        reasons.append(f"checkpointing off: fits with {_gib(usable - choice.total_bytes)} to spare and saves the "
                       f"recompute{ratio}")
    elif best[False] is None:
        off = every[(False, 1)]
        reasons.append(f"checkpointing on: without it even micro batch 1 needs {_gib(off.total_bytes)}, more than "
                       f"the {_gib(usable)} usable")
    else:
        other = best[False]
        reasons.append(f"checkpointing on: it makes room for micro batch {mb}, "
                       f"{choice.tokens_per_s / other.tokens_per_s:.1f}x the modelled speed of the fastest "
                       f"without it (micro batch {other.micro_batch_size})")
    acc = choice.gradient_accumulation_steps
    if acc > 1:
        reasons.append(f"micro batch {mb} x accumulation {acc} keeps your effective batch of {effective}")
    else:
        reasons.append(f"micro batch {mb} with no accumulation keeps your effective batch of {effective}")
    if choice is not fastest:
        reasons.append(f"{fastest.words} is modelled within {TIE_SHARE:.0%} of this and needs more memory "
                       f"({_gib(fastest.total_bytes)} against {_gib(choice.total_bytes)})")
    larger = [d for d in micro_batches if d > mb]
    if larger:
        nxt = every[(ck, larger[0])]
        if not nxt.fits:
            reasons.append(f"micro batch {nxt.micro_batch_size} would need {_gib(nxt.total_bytes)}, over the "
                           f"{_gib(usable)} usable ({_gib(budget)} less the {margin:.0%} margin)")
        elif nxt is not fastest and nxt.tokens_per_s < choice.tokens_per_s * (1 - TIE_SHARE):
            why = ""
            if settings.packing and settings.attn_implementation in DENSE_MASK_KERNELS:
                why = (f": {settings.attn_implementation} attends over the whole packed row, which grows with "
                       "the micro batch")
            reasons.append(f"micro batch {nxt.micro_batch_size} also fits but is modelled slower "
                           f"({nxt.tokens_per_s:,.0f} tokens/s){why}")
        elif nxt is not fastest:
            reasons.append(f"micro batch {nxt.micro_batch_size} also fits but is modelled no faster "
                           f"({nxt.tokens_per_s:,.0f} tokens/s: the GPU is already busy) and needs "
                           f"{_gib(nxt.total_bytes - choice.total_bytes)} more")
    else:
        reasons.append("the whole effective batch fits in one micro batch")
    pace = ("host-bound: the kernel launches of every layer outlast the GPU's work at this size"
            if choice.host_bound else "the GPU is busy: launches no longer set the pace")
    reasons.append(f"modelled {choice.tokens_per_s:,.0f} tokens/s, {choice.step_s:.2f} s per optimizer step; {pace}")
    if mean_len:
        reasons.append(f"tokens per micro batch: {mb} x the data's mean example of {n:,.0f} tokens; memory is "
                       f"checked at the worst case, {mb} x {settings.seq_len:,}")
    else:
        reasons.append(f"the data's lengths are not known: every example is taken as {settings.seq_len:,} tokens")
    reasons.append(f"speed modelled for {rate.label}")
    current = every[(settings.gradient_checkpointing, settings.micro_batch_size)]
    if current is choice:
        reasons.append("these are the settings you had")
    elif current.fits:
        reasons.append(f"your settings ({current.words}) are modelled at {current.tokens_per_s:,.0f} tokens/s: "
                       f"this is {choice.tokens_per_s / current.tokens_per_s:.2f}x")
    else:
        reasons.append(f"your settings ({current.words}) need {_gib(current.total_bytes)}, over the "
                       f"{_gib(usable)} usable")
    return reasons
