"""How much GPU memory a QLoRA training run needs: the peak, by component, from arithmetic alone.

The model follows what this project's training run does (``engine.train``): bitsandbytes NF4 with
double quantization, embeddings/head/norms kept in the load dtype (no fp32 upcast), LoRA adapters
in fp32, transformers' Trainer with bf16 autocast, non-reentrant gradient checkpointing, SDPA,
padding-free packing (one row of ``micro_batch_size x seq_len`` tokens) and transformers' standard
causal-LM loss. Every tensor counted below was found in library source and checked against a
census of the tensors autograd saves, and the totals against ``torch.cuda.max_memory_allocated`` /
``max_memory_reserved`` and nvidia-smi of 26 real Trainer runs on an H100 (random-weight models
with the configs of Llama-3.1-8B, Llama-2-7B, Llama-3.2-1B, Qwen2.5-7B, Gemma-2B and phi-2;
micro batch 1-8, 2k-8k tokens, checkpointing on and off, LoRA dropout 0 and 0.05, three
optimizers, SDPA and eager): reserved peaks within 5.5 %, allocated peaks 0-5 % over, device
totals within 5.5 %. ``tests/test_memory.py`` holds those measurements.

There are two moments in a step where memory peaks, and they never hold memory at the same time:

* the loss: the logits in fp32 and their gradients (``logits_and_loss``), for one chunk of positions
  where the engine computes the loss itself (``engine.loss``; with Liger's fused linear
  cross-entropy only a small chunk of compute-dtype logits), else for the whole micro batch;
* the backward pass through one decoder layer: its recomputed activations, its gradients and a
  dequantized weight (part of ``activations``).

``torch.cuda.max_memory_allocated`` sees only the larger of the two. What ``max_memory_reserved``
(the number a run reports and an OOM is decided by) sees depends on the caching allocator:

* with ``expandable_segments`` (what the engine's training process sets, ``engine.train.main``)
  the allocator maps pages into one growing segment per stream and hands the pages the loss freed
  to the layer's backward: reserved is the allocated peak plus a fragmentation of about a third of
  the loss's peak (``EXPANDABLE_FRAGMENTATION``, measured on an H200 and an H100). The loss's
  component is then only what it needs beyond the layer's backward;
* with the default allocator the loss's large blocks are cut from fresh segments and stay cached
  while the layer reuses the blocks of the forward pass, so reserved holds both phases
  (``expandable_segments=False``; the 26 calibration runs of ``tests/test_memory.py`` ran so).

``total_bytes``, ``reserved_bytes`` and the components add up to the reserved peak plus the CUDA
context; ``allocated_bytes`` takes the allocator's share back out.

Several GPUs (``settings.strategy``, ``settings.world_size``): the estimate is per GPU. DDP holds
everything a single GPU does, plus its gradient buckets and NCCL's buffers; FSDP (FULL_SHARD,
FSDP-QLoRA) shards the blocks' weights, the adapters, their gradients and the optimizer states, and
adds the layers it gathers. Both are modelled from library source; neither has been measured on
GPUs yet (``estimate_training_memory`` says which parts are assumed).

No torch import: pure arithmetic, fast enough to search for the largest batch that fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.arch import LAYER_ROLES, RMSNORM_BLOCK, profile, unknown_note
from engine.attention import PACKED_KERNELS
from engine.errors import UserError
from engine.modelinfo import ModelInfo, TargetLayer
from engine.preset import choices

MIB = 1024**2
GIB = 1024**3

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per element of the dtypes a run can compute or load in."""

QUANTIZATIONS = choices("quantization.method")
"""bitsandbytes 4-bit formats, or ``none`` for plain LoRA on a 16-bit base (the preset's choices)."""

OPTIMIZERS = choices("training.optimizer")
"""Optimizers the estimate knows: the preset's choices."""

ATTN_IMPLEMENTATIONS = tuple(a for a in choices("model.attn_implementation") if a != "auto") + PACKED_KERNELS
"""Attention kernels a run can load: the preset's choices once ``auto`` is decided, and the engine's
own kernels for packed rows (``engine.attention``). ``sdpa`` here means transformers' SDPA with a
materialized mask, which the engine no longer uses for packed rows."""

STRATEGIES = tuple(s for s in choices("distributed.strategy") if s != "auto")
"""How a run spreads over GPUs once ``auto`` is decided (the preset's choices): ``single``, ``ddp``, ``fsdp``."""

COMPONENT_DESCRIPTIONS = {
    "quantized_weights": "the block's Linear weights in 4 bit, with their block scales",
    "unquantized_weights": "embeddings, output head, norms and biases in the load dtype",
    "block_weights": "this GPU's shard of the decoder blocks' weights (4-bit data, norms, biases)",
    "quantization_scales": "the 4-bit weights' block scales, whole on every GPU (not sharded)",
    "root_weights": "embeddings, output head and final norm: gathered whole for the step, plus their shard",
    "lora_weights": "the LoRA adapters, in fp32",
    "lora_gradients": "the adapters' gradients, in fp32",
    "optimizer_states": "AdamW's two moments per adapter weight (fp32 or 8 bit)",
    "ddp_buckets": "DDP's gradient buckets: a second fp32 copy of the adapters' gradients",
    "gathered_layers": "two decoder layers gathered whole (computing, prefetched), one layer's LoRA gradients",
    "cublas_workspace": "cuBLAS/cuBLASLt scratch space",
    "activations": "tensors kept for the backward pass, plus one layer's backward",
    "logits_and_loss": "logits and their gradients at the loss (beyond what a layer's backward frees for them)",
    "allocator_overhead": "memory PyTorch's caching allocator holds but does not use",
    "communication": "NCCL's buffers for the collectives, outside PyTorch's counters (assumed)",
    "cuda_context": "CUDA context and kernels, outside PyTorch's counters",
}
"""One line per component, for tables and help text. Each strategy's components are a subsequence:
single and DDP hold ``quantized_weights``/``unquantized_weights``, FSDP the three weight parts that
it shards differently (``block_weights``, ``quantization_scales``, ``root_weights``)."""

# --- Constants, each with its source ---------------------------------------------------------

QUANT_BLOCKSIZE = 64
"""bitsandbytes 4-bit block: one fp32 absmax per 64 weights (``quantize_4bit(blocksize=64)``,
the default of transformers' ``BitsAndBytesConfig``; QLoRA paper, Dettmers et al. 2023, sec. 3)."""

DOUBLE_QUANT_BLOCKSIZE = 256
"""Double quantization stores the absmax values in 8 bit, in blocks of 256 with one fp32 scale
each (QLoRA paper sec. 3 "Double Quantization"; bitsandbytes ``compress_statistics``)."""

ADAMW_STATE_BYTES = 8.0
"""torch AdamW: ``exp_avg`` and ``exp_avg_sq`` in the parameter's dtype (fp32 adapters): 2 x 4 B."""

BNB_8BIT_STATE_BYTES = 2.0 + 8.0 / 256
"""bitsandbytes 8-bit AdamW: two uint8 states plus two fp32 absmax per block of 256
(``Optimizer2State.init_state``: ``blocksize = 256``, ``absmax1``/``absmax2`` fp32)."""

BNB_MIN_8BIT_SIZE = 4096
"""bitsandbytes keeps 32-bit states for tensors under 4096 elements (``min_8bit_size=4096``)."""

BNB_PAGED_MIN_SIZE = 100_000
"""bitsandbytes pages only state tensors of 1e5+ elements (``get_state_buffer``:
``if not self.is_paged or p.numel() < 1e5``); smaller ones are ordinary device tensors."""

LOSS_BYTES_PER_LOGIT = 12
"""Peak of transformers' ``ForCausalLMLoss`` per logit, in the backward pass: the log-softmax
output (fp32, saved by ``cross_entropy``), the gradient ``nll_loss`` hands back (fp32, a dense
zeros-and-scatter tensor) and the gradient ``log_softmax`` returns (fp32): 3 x 4 B. The forward
holds less (lm_head's logits in the compute dtype, their fp32 upcast, the log-softmax output:
2 + 4 + 4 B) and the Trainer has dropped the compute-dtype logits before ``backward``. Checked on
an H100: the allocated peak of a Llama-3.1-8B step is this plus the saved activations to 0.5 %."""

NORM_FP32_BYTES = 4
"""RMSNorm upcasts its input to fp32 (``hidden_states.to(torch.float32)``) and saves that copy;
LayerNorm runs in fp32 under autocast. One fp32 copy of the residual stream per norm."""

CUBLAS_WORKSPACE_BYTES = 64 * MIB
"""cuBLAS and cuBLASLt workspaces: torch allocates them through its caching allocator
(``CublasHandlePool.cpp``), so they count as allocated; cuBLAS recommends 32 MiB each on Hopper
and 4 MiB before (cuBLAS docs, ``cublasSetWorkspace``). Seen as a constant 64 MiB gap between the
tensors counted here and the allocated peak of every H100 run."""

CUDA_CONTEXT_BYTES = 767 * MIB
"""CUDA context, loaded kernels (torch, bitsandbytes) and driver-side handles: nvidia-smi's used
memory minus torch's reserved memory, measured after training steps on an H100 80GB (driver 580,
torch 2.11 + CUDA 13; 621 MiB right after CUDA init). Invisible to torch's counters. Other GPUs,
drivers and CUDA versions differ by a few hundred MiB; the design notes say 'a few hundred MiB to
over 1 GiB'."""

LOSS_FRAGMENTATION = 0.05
"""Reserved-but-unused memory the caching allocator leaves around the loss's large blocks (block
rounding and splitting), as a share of the loss peak. Fitted to the reserved peaks of the H100
runs (it puts all 26 within 5.5 %). Together with the two phases' blocks that torch keeps
reserved (see the module docstring) this is the design notes' 10-30 % between allocated and
reserved peaks: 3-47 % in those runs. Those runs used the default allocator; the engine's training
process sets ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (``engine.train.main``), which
shrinks this gap, so for the engine's own runs the constant errs high until it is refitted on them."""

EXPANDABLE_FRAGMENTATION = 0.30
"""Reserved-but-unused memory with ``expandable_segments:True``, as a share of the loss's peak: the
loss's short-lived tensors come in several sizes (compute-dtype logits, their fp32 copy, the
log-softmax, gradients) and leave holes in the segment that later, larger requests cannot use.
Fitted to the engine's own runs: on an H200 (chunked loss; Llama-3.1-8B 2048 x1, Qwen2.5-0.5B and
Qwen2.5-7B 4096 x4) the reserved peak is the estimated allocated peak plus 0.16-0.43 of the loss
peak; on an H100 (transformers' loss, six cases) 0.07-0.34. 0.30 puts all nine within 10 %, none
more than 5 % under (``tests/test_gpu_results.py``)."""

LIGER_FLCE_MAX_CHUNK = 65536 // 2
"""Liger Kernel's fused linear cross-entropy: rows per chunk are the next power of two of
tokens / ceil(vocabulary / hidden size) (``fused_linear_cross_entropy_forward``: ``inc_factor``,
``chunk_size``), so a chunk's logits are about the size of the hidden states; they are computed in
the compute dtype and the kernel writes their gradient in place."""

TRL_LOGPROB_TOKEN_TILE = 4096
"""Positions whose log-probabilities TRL's dpo head (``trl.kernels.chunked_logprob``, added by
``trl.trainer.utils.add_fused_lm_head``) projects at once: ``TOKEN_CHUNK_SIZE``."""

TRL_LOGPROB_VOCAB_TILE = 32768
"""Vocabulary entries per tile of that head (``_CHUNKED_LOGPROB_CHUNK_SIZE`` in ``trl.trainer.utils``):
a tile is at most 4,096 x 32,768 logits, computed into one reused buffer in the compute dtype."""

TRL_TORCH_TILE_BYTES_PER_LOGIT = 29
"""Where Triton does not run (the CPU), TRL folds each tile with torch operations on the whole tile
(``_backward_tile``): beside the tile buffer, the backward holds the scaled tile, z, log p, p, the
gradient, the target indicator's difference and its product with the incoming gradient in fp32
(7 x 4 B) and a boolean target mask (1 B). Measured on the CPU (``benchmarks/preference_memory.py``):
one step of 4 rows of 512 positions over a 32,000-entry vocabulary took 2,079 MiB, 2,082 MiB
estimated with this (769 MiB with the 12 B a logit of transformers' loss). On a GPU the Triton
kernel folds the tile in place."""

TRL_TORCH_FORWARD_TILE_BYTES_PER_LOGIT = 13
"""The same fold in the forward (``_forward_tile``): z, the mask of entries before the target and its
masked copy, or the shifted z and its exponential (2 x 4 B + 4 B + 1 B) beside the tile buffer."""

ORPO_BYTES_PER_LOGIT = 13.5
"""Peak of TRL's orpo loss per logit, in the backward pass: it keeps every position's logits (for its
logged mean logits), a contiguous copy of the chosen half for the supervised part (nn.CrossEntropyLoss,
whose log-softmax is saved), the per-token log-probabilities of both halves (``selective_log_softmax``)
and the logits' gradient. Measured on the CPU in fp32 for 4 rows of 512 positions over a 32,000-entry
vocabulary (``benchmarks/preference_memory.py``): 13.9 B a logit beside the estimated activations with
gradient checkpointing, 12.7 without; 13.5 puts both within 5 %. On a GPU the logits are bf16 under
autocast; the fp32 figure is kept there (an upper bound, unmeasured)."""

MOE_TOKENS_PER_EXPERT_FACTOR = 2
"""Mixture of experts: each token runs through top-k experts; k = 2 for Mixtral (Jiang et al.
2024). ``ModelInfo`` does not carry k, so the activations of MoE models are approximate."""

NCCL_BUFFER_BYTES = 768 * MIB
"""NCCL's own device memory per GPU once the collectives of a run have connected (channel buffers,
NVLS buffers on NVSwitch systems, its kernels), allocated outside PyTorch's allocator, so torch's
counters never show it. ASSUMED, not measured in this project: reported figures are 519-656 MiB per
GPU on 4 A100s with NVLink after one all-reduce (NVIDIA/nccl#964), about 1 GiB on 8 H100s before any
all-to-all (NVIDIA/nccl#1685), of which NVLS alone is 288 MiB per rank (vllm-project/vllm#9699);
PCIe pairs use fewer channels and less. 768 MiB sits between the A100 and H100 figures; refit it
on the first multi-GPU runs."""

FSDP_GATHERED_LAYERS = 2
"""Decoder layers whose weights FSDP holds gathered at once: the one computing and the next,
prefetched (``BackwardPrefetch.BACKWARD_PRE``, FSDP's default; ``limit_all_gathers`` lets at most
two all-gathers be in flight). From torch's FSDP source; not measured."""

INFERENCE_RULE_FACTOR = 1.2
"""The guide's rule for inference: memory = size on disk x 1.2 (LLaMA 7B: 13.5 GB -> 16.2 GB)."""

def _fp32_flow(info: ModelInfo, s: "MemorySettings") -> bool:
    """Whether the block's activations and residual stream are fp32: a LayerNorm architecture under
    autocast with bitsandbytes layers (which return their input's dtype)."""
    return profile(info.model_type).block.layernorm and s.autocast and s.quantization != "none"


def _choice(name: str, value, allowed: tuple) -> None:
    """Raise a UserError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise UserError(f"memory settings: {name} must be one of {', '.join(allowed)}, not {value!r}")


def _positive_int(name: str, value) -> None:
    """Raise a UserError unless ``value`` is an int >= 1 (bools are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"memory settings: {name} must be a whole number of at least 1, not {value!r}")


def _flag(name: str, value) -> None:
    """Raise a UserError unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise UserError(f"memory settings: {name} must be true or false, not {value!r}")


@dataclass(frozen=True)
class MemorySettings:
    """The training choices that decide memory; checked on creation."""

    quantization: str = "nf4"
    """``nf4`` or ``fp4`` (bitsandbytes 4-bit base), or ``none`` (plain LoRA, base in ``load_dtype``)."""
    double_quant: bool = True
    """Quantize the 4-bit scales again (8 bit, blocks of 256): 0.516 instead of 0.5625 B/param."""
    compute_dtype: str = "bfloat16"
    """Dtype of the matmuls and of autocast: ``bfloat16``, ``float16`` or ``float32``."""
    load_dtype: str = "bfloat16"
    """Dtype of everything not quantized (embeddings, head, norms, biases); this engine never upcasts them."""
    lora_rank: int = 16
    """LoRA rank r: each adapted module gets r x (in + out) trainable parameters."""
    lora_targets: tuple[str, ...] = ()
    """Layer names to adapt, from ``ModelInfo.targets``; empty means the model's ``default_targets``."""
    micro_batch_size: int = 1
    """Examples per forward pass (per GPU)."""
    seq_len: int = 2048
    """Tokens per example (the longest an example is allowed to be)."""
    gradient_checkpointing: bool = True
    """Keep only each layer's input and recompute the rest in the backward pass."""
    optimizer: str = "adamw_torch"
    """``adamw_torch`` (fp32 states), ``adamw_8bit``, ``paged_adamw_8bit`` or ``paged_adamw_32bit``."""
    attn_implementation: str = "sdpa"
    """``sdpa``, ``flash_attention_2`` or ``eager`` (eager stores the seq x seq attention scores)."""
    packing: bool = True
    """Padding-free packing: a micro batch is one row of up to micro_batch_size x seq_len tokens."""
    lora_dropout: float = 0.0
    """Dropout on the adapter input; above 0 every adapted module keeps its own dropped copy and mask."""
    autocast: bool = True
    """The forward runs under ``torch.autocast`` (Trainer with bf16/fp16 on); without it peft casts
    each adapter's input to fp32."""
    loss_chunk: int | None = None
    """Positions whose logits exist at once when the engine computes the loss itself
    (``engine.loss.loss_chunk_tokens``, for the architectures it does that for); None for
    transformers' own loss, every position's logits at once (what the H100 measurements in
    ``benchmarks/GPU-RESULTS.md`` ran)."""
    liger: bool = False
    """Liger Kernel's fused RMSNorm, SwiGLU and RoPE in the blocks and its fused linear
    cross-entropy at the loss (``engine.kernels``, on CUDA where installed): the norms save their
    input in its own dtype, the MLP saves gate and up only, and the loss never holds fp32 logits."""
    expandable_segments: bool = True
    """PyTorch's caching allocator runs with ``expandable_segments:True`` (the engine's training
    process sets it): the loss and a layer's backward share pages. False: the default allocator,
    which keeps both phases' blocks reserved (see the module docstring)."""
    strategy: str = "single"
    """How the run spreads over GPUs: ``single``, ``ddp`` (every GPU holds the whole model) or
    ``fsdp`` (FULL_SHARD: weights, adapters, gradients and optimizer states sharded)."""
    world_size: int = 1
    """GPUs training the run, on all machines (1 for ``single``); the estimate is per GPU."""
    method: str = "sft"
    """The training method: ``sft`` (the loss above), ``dpo`` (TRL's fused log-probability head: tiles
    of logits, never all of them; with ``reference: each_step`` a no-gradient pass of the reference
    beside every step) or ``orpo`` (TRL's loss over every position's logits). The micro batch of a
    pair method counts both answers' rows (2 x pairs)."""
    reference: str | None = None
    """dpo's reference log-probabilities: ``each_step`` (computed beside every step, between the
    policy's forward and its backward) or ``precomputed`` (once, before training); None otherwise."""
    triton: bool = True
    """Whether TRL's kernels run in Triton (CUDA) or fold their tiles with torch operations (the CPU)."""

    def __post_init__(self) -> None:
        _choice("quantization", self.quantization, QUANTIZATIONS)
        _flag("double_quant", self.double_quant)
        _choice("compute_dtype", self.compute_dtype, tuple(DTYPE_BYTES))
        _choice("load_dtype", self.load_dtype, tuple(DTYPE_BYTES))
        _positive_int("lora_rank", self.lora_rank)
        if isinstance(self.lora_targets, str) or not all(isinstance(t, str) and t for t in self.lora_targets):
            raise UserError(f"memory settings: lora_targets must be a list of layer names, not {self.lora_targets!r}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        _positive_int("micro_batch_size", self.micro_batch_size)
        _positive_int("seq_len", self.seq_len)
        if self.loss_chunk is not None:
            _positive_int("loss_chunk", self.loss_chunk)
        _flag("gradient_checkpointing", self.gradient_checkpointing)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        _flag("packing", self.packing)
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0 <= self.lora_dropout < 1:
            raise UserError(f"memory settings: lora_dropout must be at least 0 and below 1, not {self.lora_dropout!r}")
        _flag("autocast", self.autocast)
        _flag("liger", self.liger)
        _flag("expandable_segments", self.expandable_segments)
        _choice("strategy", self.strategy, STRATEGIES)
        _positive_int("world_size", self.world_size)
        _choice("method", self.method, ("sft", "dpo", "orpo"))
        if self.reference not in ((None, "each_step", "precomputed") if self.method == "dpo" else (None,)):
            raise UserError(f"memory settings: reference {self.reference!r} for method {self.method}",
                            "dpo takes each_step or precomputed; the other methods have none")
        _flag("triton", self.triton)
        if self.strategy == "single" and self.world_size != 1:
            raise UserError(f"memory settings: strategy single trains on one GPU, not {self.world_size}",
                            "pick ddp or fsdp for several GPUs")

    @property
    def tokens_per_micro_batch(self) -> int:
        """Tokens in one forward pass: micro_batch_size x seq_len (packed or padded)."""
        return self.micro_batch_size * self.seq_len


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimated peak of a training step, by component, in bytes."""

    components: dict[str, int]
    """Ordered name -> bytes; they add up to ``total_bytes``."""
    lora_params: int
    """Trainable (LoRA) parameters."""
    inference_rule_bytes: int
    """The guide's inference rule: weights on disk x 1.2 (for comparison, not for training)."""
    paged: bool = False
    """Optimizer states (partly) in CUDA managed memory: nvidia-smi counts them, torch's counters do not."""
    paged_bytes: int = 0
    """The part of ``optimizer_states`` in managed memory."""
    loss_peak_bytes: int = 0
    """Memory the loss adds at its peak (``components['logits_and_loss']`` with the default allocator;
    with expandable segments that component is only what exceeds ``layer_backward_bytes``)."""
    layer_backward_bytes: int = 0
    """Memory the backward pass through one layer adds at its peak (part of ``activations``)."""
    notes: tuple[str, ...] = ()
    """Things a person should know about this estimate."""
    phases_share_memory: bool = True
    """The loss and one layer's backward reuse each other's pages (expandable segments): the
    components already hold only the larger of the two."""
    strategy: str = "single"
    """``single``, ``ddp`` or ``fsdp``: the components are what each GPU holds."""
    world_size: int = 1
    """GPUs training the run."""
    sharded: tuple[str, ...] = ()
    """The components split across the GPUs (each holds 1/world_size of them); the others are whole on each."""

    @property
    def replicated(self) -> tuple[str, ...]:
        """The components every GPU holds whole; empty on one GPU."""
        if self.world_size == 1:
            return ()
        return tuple(name for name in self.components if name not in self.sharded)

    def sharing_words(self) -> str:
        """Which parts are split across the GPUs and which each holds whole, in words ('' on one GPU)."""
        if self.world_size == 1:
            return ""

        def words(names) -> str:
            return ", ".join(n.replace("_", " ") for n in names if self.components.get(n)) or "nothing"

        return (f"sharded (1/{self.world_size} on each GPU): {words(self.sharded)}; "
                f"replicated (whole on each GPU): {words(self.replicated)}")

    @property
    def total_bytes(self) -> int:
        """Everything on the device: what nvidia-smi would show for the process at the peak."""
        return sum(self.components.values())

    @property
    def reserved_bytes(self) -> int:
        """What ``torch.cuda.max_memory_reserved()`` should show: total minus what torch does not
        allocate (CUDA context, NCCL's buffers) and paged states."""
        outside = self.components["cuda_context"] + self.components.get("communication", 0)
        return self.total_bytes - outside - self.paged_bytes

    @property
    def allocated_bytes(self) -> int:
        """What ``torch.cuda.max_memory_allocated()`` should show: reserved minus the allocator's
        overhead and, where the allocator keeps both reserved, the smaller of the two peaks that never
        coexist (loss, one layer's backward)."""
        overlap = 0 if self.phases_share_memory else min(self.loss_peak_bytes, self.layer_backward_bytes)
        return self.reserved_bytes - self.components["allocator_overhead"] - overlap

    def fits(self, budget_bytes: int | None) -> bool | None:
        """Whether the total fits in ``budget_bytes`` (None when there is no budget)."""
        return None if budget_bytes is None else self.total_bytes <= budget_bytes

    def to_json(self, budget_bytes: int | None = None) -> dict:
        """The stable JSON form (``qlora-wizard estimate --json``, the run's ``start`` event)."""
        return {
            "total_bytes": self.total_bytes,
            "reserved_bytes": self.reserved_bytes,
            "allocated_bytes": self.allocated_bytes,
            "components": dict(self.components),
            "inference_rule_bytes": self.inference_rule_bytes,
            "budget_bytes": budget_bytes,
            "fits": self.fits(budget_bytes),
            "lora_params": self.lora_params,
            "paged": self.paged,
            "paged_bytes": self.paged_bytes,
            "loss_peak_bytes": self.loss_peak_bytes,
            "layer_backward_bytes": self.layer_backward_bytes,
            "phases_share_memory": self.phases_share_memory,
            "notes": list(self.notes),
            "strategy": self.strategy,
            "world_size": self.world_size,
            "sharded": list(self.sharded),
            "replicated": list(self.replicated),
        }


@dataclass(frozen=True)
class FitResult:
    """The largest settings that fit a memory budget (None where even the smallest does not)."""

    budget_bytes: int
    """The budget compared against ``MemoryEstimate.total_bytes``."""
    seq_len: int
    """The sequence length at which ``max_micro_batch`` was searched."""
    max_micro_batch: int | None
    """Largest micro batch at ``seq_len`` that fits; None if micro batch 1 does not."""
    max_seq_len: int | None
    """Longest sequence length (a multiple of ``seq_len_step``) that fits at micro batch 1; None if none does."""
    seq_len_step: int
    """The granularity of ``max_seq_len``."""
    seq_len_cap: int
    """The longest sequence length searched (the model's context length unless raised)."""

    def to_json(self) -> dict:
        """A JSON-ready dict."""
        return {
            "budget_bytes": self.budget_bytes,
            "seq_len": self.seq_len,
            "max_micro_batch": self.max_micro_batch,
            "max_seq_len": self.max_seq_len,
            "seq_len_step": self.seq_len_step,
            "seq_len_cap": self.seq_len_cap,
        }


# --- Pieces of arithmetic ---------------------------------------------------------------------


def quantized_bytes_per_param(quantization: str, double_quant: bool) -> float:
    """Bytes per quantized weight: 4 bits plus the block scales (0.5625, or 0.515869 with double quant)."""
    _choice("quantization", quantization, QUANTIZATIONS)
    if quantization == "none":
        raise UserError("quantized_bytes_per_param: quantization 'none' keeps weights in the load dtype")
    if double_quant:
        # 8-bit absmax per 64 weights + one fp32 scale per 256 of those.
        return 0.5 + 1 / QUANT_BLOCKSIZE + 4 / (QUANT_BLOCKSIZE * DOUBLE_QUANT_BLOCKSIZE)
    return 0.5 + 4 / QUANT_BLOCKSIZE


def resolve_targets(info: ModelInfo, targets: tuple[str, ...]) -> tuple[TargetLayer, ...]:
    """The model's layers for ``targets`` (its defaults when empty); UserError for a name it lacks."""
    names = targets or tuple(info.default_targets)
    known = {t.name: t for t in info.targets}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(
            f"LoRA target {', '.join(repr(n) for n in unknown)} is not a layer of {info.source}",
            f"its targetable layers are: {', '.join(info.lora_target_candidates) or '(none found)'}",
        )
    return tuple(known[n] for n in dict.fromkeys(names))


def lora_tensor_sizes(layers: tuple[TargetLayer, ...], rank: int) -> list[tuple[int, int]]:
    """(elements, how many) for every LoRA tensor: A is r x in, B is out x r, one pair per module."""
    sizes: list[tuple[int, int]] = []
    for t in layers:
        # A name can stand for modules of several shapes (GPT-2's c_proj in attention and MLP).
        for fan_in, fan_out, count in t.shapes or ((t.in_features, t.out_features, t.count),):
            sizes.append((rank * fan_in, count))
            sizes.append((fan_out * rank, count))
    return sizes


def optimizer_state_bytes(sizes: list[tuple[int, int]], optimizer: str) -> tuple[int, int]:
    """(device bytes, paged bytes) of the optimizer states for LoRA tensors of these sizes."""
    _choice("optimizer", optimizer, OPTIMIZERS)
    device = paged = 0.0
    for numel, count in sizes:
        if optimizer in ("adamw_8bit", "paged_adamw_8bit") and numel >= BNB_MIN_8BIT_SIZE:
            per = BNB_8BIT_STATE_BYTES * numel
        else:
            per = ADAMW_STATE_BYTES * numel
        if optimizer.startswith("paged") and numel >= BNB_PAGED_MIN_SIZE:
            paged += per * count
        else:
            device += per * count
    return int(device), int(paged)


def inference_rule_bytes(info: ModelInfo) -> int:
    """The guide's rule: size on disk x 1.2 (params x dtype size where the size on disk is unknown)."""
    on_disk = info.weight_bytes
    if on_disk is None:
        on_disk = info.params_total * DTYPE_BYTES.get(info.dtype, 2)
    return round(on_disk * INFERENCE_RULE_FACTOR)


@dataclass(frozen=True)
class _Widths:
    """The tensor widths of one decoder layer."""

    hidden: int
    q: int
    kv: int
    intermediate: int
    heads: int
    head_dim: int
    gated: bool
    mlp_factor: int


def _widths(info: ModelInfo) -> _Widths:
    """Read the layer's widths from the model facts (q/k widths from the projections where named)."""
    h = info.hidden_size
    names = {t.name: t for t in info.targets}
    q = names["q_proj"].out_features if "q_proj" in names else h
    if "k_proj" in names:
        kv = names["k_proj"].out_features
    else:
        kv = q * info.num_key_value_heads // max(1, info.num_attention_heads)
    inter = info.intermediate_size
    # A gated MLP (SwiGLU/GeGLU) has two h -> I projections (or one fused h -> 2I); MoE models all do.
    up_like = [t for t in info.targets if t.in_features == h and t.out_features in (inter, 2 * inter)]
    gated = info.is_moe or len(up_like) >= 2 or any(t.out_features == 2 * inter for t in up_like)
    return _Widths(
        hidden=h, q=q, kv=kv, intermediate=inter, heads=info.num_attention_heads,
        head_dim=q // max(1, info.num_attention_heads), gated=gated,
        mlp_factor=MOE_TOKENS_PER_EXPERT_FACTOR if info.is_moe else 1,
    )


def layer_role(name: str) -> str | None:
    """Which input a layer name reads inside a block (``attn_in``, ``attn_out``, ``mlp_in``,
    ``mlp_out``), or None when the name is not a known one."""
    for role, names in LAYER_ROLES.items():
        if name in names:
            return role
    return None


def _sdpa_with_mask(s: MemorySettings) -> bool:
    """Whether SDPA gets a materialized mask. Packed rows (position ids restarting) make transformers
    build a block-causal mask, and padded batches carry padding; then it also repeats k/v to every
    head, and SDPA saves the mask. Only a row holding a single example goes without (counted anyway)."""
    return s.attn_implementation == "sdpa"


def layer_saved_bytes(info: ModelInfo, s: MemorySettings, layers: tuple[TargetLayer, ...]) -> int:
    """Bytes autograd saves for one decoder layer's backward at these settings (census-checked on an H100).

    Per token, with c the compute dtype's bytes: an fp32 copy of the input per norm (4h); attention
    saves q after RoPE, k and v (repeated to all heads when SDPA gets a mask, as transformers does
    for packed rows) and its output (4c·q with a mask); the gated MLP saves gate, activation and up
    (3c·I); LoRA saves each adapter's input (shared under autocast without dropout; a dropped copy
    plus a 1-byte mask per module with dropout; an fp32 copy per module without autocast). SDPA
    with a mask saves that mask in the compute dtype per layer (c x row²); eager attention saves
    the softmax in fp32 and its compute-dtype copy ((4 + c) x heads x row²). LayerNorm
    architectures (phi, GPT-2, GPT-J, Falcon) keep their projections and MLP activations in fp32
    under autocast (see ``engine.arch.Block``).
    """
    w = _widths(info)
    c = DTYPE_BYTES[s.compute_dtype]
    t = s.tokens_per_micro_batch
    rows, row_len = (1, t) if s.packing else (s.micro_batch_size, s.seq_len)
    L = max(1, info.num_hidden_layers)
    h, q, kv, inter = w.hidden, w.q, w.kv, w.intermediate * w.mlp_factor

    block = profile(info.model_type).block
    attn = s.attn_implementation
    # dtype of the block's projections and MLP activations (fp32 after a LayerNorm, see engine.arch.Block)
    fp32_flow = _fp32_flow(info, s)
    m = 4 if fp32_flow else c

    if s.liger and not block.layernorm:
        per_token = block.norms * (c * h + 4)  # Liger's RMSNorm saves its input as it is, and fp32 rstd
    else:
        per_token = block.norms * (NORM_FP32_BYTES * h + 8)  # fp32 copy of the input + fp32 mean/rstd
    if block.qk_norms:
        per_token += NORM_FP32_BYTES * (w.q + w.kv)  # RMSNorm over the queries and keys: fp32 copies of q and k
    per_token += block.dropout_masks * h  # residual dropout masks, 1 byte each
    if attn == "eager" or _sdpa_with_mask(s):
        k_and_v = 2 * c * q  # repeat_kv copies k and v to every head
    else:
        # flash-attn (read from transformers' varlen path, not measured here) takes grouped k/v as they are
        k_and_v = 2 * c * kv
    per_token += c * q + k_and_v  # q after RoPE, k, v
    if attn != "eager":
        per_token += c * q + 4 * w.heads  # output and fp32 logsumexp
    quadratic_per_row = 0  # bytes per layer per row, x row_len²
    if _sdpa_with_mask(s):
        quadratic_per_row = c  # the boolean mask converted to the compute dtype, saved per call
    elif attn == "eager":
        quadratic_per_row = (4 + c) * w.heads  # fp32 softmax + its compute-dtype copy
    if w.gated:
        # gate, activation and up; Liger's SwiGLU saves gate and up and recomputes the activation
        per_token += (2 if s.liger else 3) * m * inter
    else:
        per_token += block.act_saves * m * inter  # the activation's saved intermediates

    # What LoRA adds: the adapters' inputs (lora_A needs them for its weight gradient).
    dropout = s.lora_dropout > 0
    adapters = 0
    lora_a_out = 0
    if s.autocast and not dropout:
        role_width = {"attn_in": h, "attn_out": 0 if attn != "eager" else q, "mlp_in": h, "mlp_out": inter}
        # The attention output doubles as o_proj's input (same storage) except in eager attention.
        # An fp32 input is cast by autocast once per module, so fp32 inputs are not shared.
        seen_roles: set[str] = set()
        for layer in layers:
            role = layer_role(layer.name)
            per_layer = layer.count / L
            if role is None or (fp32_flow and role != "attn_out"):
                adapters += c * layer.in_features * per_layer
            elif role not in seen_roles:
                seen_roles.add(role)
                adapters += c * role_width[role]
    else:
        if s.autocast:
            per_elem = c + 1  # dropped copy in the compute dtype + 1-byte mask
        else:
            per_elem = 4 + (1 if dropout else 0)  # peft casts x to fp32 per module (+ dropout mask)
        for layer in layers:
            adapters += per_elem * layer.in_features * layer.count / L
    for layer in layers:
        lora_a_out += (c if s.autocast else 4) * s.lora_rank * layer.count / L
    per_token += adapters + lora_a_out

    saved = per_token * t + quadratic_per_row * rows * row_len * row_len
    return int(saved)


def layer_backward_working_bytes(info: ModelInfo, s: MemorySettings) -> int:
    """Extra memory while backpropagating through one layer: the MLP's input gradients (two of width I
    alive at once), one dequantized 4-bit weight, and eager attention's score gradients."""
    w = _widths(info)
    c = DTYPE_BYTES[s.compute_dtype]
    m = 4 if _fp32_flow(info, s) else c
    t = s.tokens_per_micro_batch
    rows, row_len = (1, t) if s.packing else (s.micro_batch_size, s.seq_len)
    working = 2 * m * w.intermediate * w.mlp_factor * t
    if s.quantization != "none" and info.targets:
        # MatMul4Bit.backward dequantizes the whole weight to compute the input gradient.
        working += c * max(x.in_features * x.out_features for x in info.targets)
    if s.attn_implementation == "eager":
        working += (4 + 2 * c) * w.heads * rows * row_len * row_len
    return int(working)


def _stash_bytes(info: ModelInfo, s: MemorySettings, saved_per_layer: int, lora_params: int) -> int:
    """Activations held from the forward pass until the backward reaches them."""
    w = _widths(info)
    c = DTYPE_BYTES[s.compute_dtype]
    # The residual stream has the embeddings' dtype, or fp32 once an fp32 MLP output is added to it.
    stream = 4 if _fp32_flow(info, s) else DTYPE_BYTES[s.load_dtype]
    t = s.tokens_per_micro_batch
    rows, row_len = (1, t) if s.packing else (s.micro_batch_size, s.seq_len)
    L = info.num_hidden_layers
    if s.gradient_checkpointing:
        held = L * stream * w.hidden * t  # each layer's input, kept by the non-reentrant checkpoint
    else:
        held = L * saved_per_layer
        if s.autocast and c < 4:
            held += c * lora_params  # autocast's cached low-precision copies of the adapter weights
    held += (NORM_FP32_BYTES * w.hidden + 4) * t  # the final norm's fp32 copy
    held += 2 * c * w.head_dim * t  # RoPE cos and sin, shared by all layers
    held += 3 * 8 * t  # input ids, labels, position ids (int64)
    if _sdpa_with_mask(s):
        held += rows * row_len * row_len  # the boolean block-causal mask, built once per step
    elif s.attn_implementation == "eager":
        held += c * rows * row_len * row_len  # eager's additive mask
    return int(held)


def _trl_tile_logits(info: ModelInfo, s: MemorySettings) -> int:
    """Logits in one tile of TRL's fused log-probability head (dpo): at most 4,096 positions (every
    position is counted; on a GPU only the answers' are scored) by 32,768 vocabulary entries."""
    return min(s.tokens_per_micro_batch, TRL_LOGPROB_TOKEN_TILE) * min(info.vocab_size, TRL_LOGPROB_VOCAB_TILE)


def reference_pass_bytes(info: ModelInfo, s: MemorySettings) -> int:
    """Peak of dpo's reference pass computed each step: a forward without gradients that runs after the
    policy's forward and before its backward (TRL's ``_compute_loss``), so the policy's stash is held
    meanwhile. It holds the residual stream in and out of one layer, that layer's working tensors (q,
    k, v and the attention output, gate, up and their product, a dequantized 4-bit weight) and one
    forward fold of the head's tile. 0 for precomputed reference log-probabilities and other methods."""
    if s.method != "dpo" or s.reference != "each_step":
        return 0
    w = _widths(info)
    c = DTYPE_BYTES[s.compute_dtype]
    m = 4 if _fp32_flow(info, s) else c
    t = s.tokens_per_micro_batch
    stream = 2 * (4 if _fp32_flow(info, s) else DTYPE_BYTES[s.load_dtype]) * w.hidden * t
    layer = (c * (2 * w.q + 2 * w.kv) + 3 * m * w.intermediate * w.mlp_factor) * t
    if s.quantization != "none" and info.targets:
        layer += c * max(x.in_features * x.out_features for x in info.targets)
    fold = c + (0 if s.triton else TRL_TORCH_FORWARD_TILE_BYTES_PER_LOGIT)
    return int(stream + layer + fold * _trl_tile_logits(info, s))


def loss_peak_bytes(info: ModelInfo, s: MemorySettings) -> int:
    """What the loss adds at its peak for one micro batch.

    transformers' own loss (``s.loss_chunk`` None): ``LOSS_BYTES_PER_LOGIT`` for every position's
    every vocabulary entry. The engine's chunked loss (``engine.loss``): that for one chunk of
    positions, plus the trained positions' hidden states gathered for the head and the gradients
    of those and of all the final hidden states (compute dtype), at most every position each.
    """
    t = s.tokens_per_micro_batch
    c = DTYPE_BYTES[s.compute_dtype]
    if s.method == "dpo":
        # TRL's fused head: one tile of logits in the compute dtype (and the CPU's torch fold of it), the
        # positions' hidden states gathered for it (compute dtype) and their gradient accumulated in fp32.
        per_logit = c + (0 if s.triton else TRL_TORCH_TILE_BYTES_PER_LOGIT)
        return per_logit * _trl_tile_logits(info, s) + (2 * c + 4) * t * info.hidden_size
    if s.method == "orpo":
        return int(ORPO_BYTES_PER_LOGIT * t * info.vocab_size)
    gathered = 3 * c * t * info.hidden_size  # trained positions' hidden states, their and all positions' gradients
    if s.liger:
        # Liger's fused linear cross-entropy: its gradient of the input (compute dtype), a per-token
        # fp32 loss, and one chunk of compute-dtype logits with its in-place gradient and a temporary.
        inc = max(1, math.ceil(info.vocab_size / max(1, info.hidden_size)))
        chunk = min(t, LIGER_FLCE_MAX_CHUNK, 1 << max(0, math.ceil(t / inc) - 1).bit_length())
        return gathered + c * t * info.hidden_size + 4 * t + 2 * c * chunk * info.vocab_size
    if s.loss_chunk is None:
        return LOSS_BYTES_PER_LOGIT * t * info.vocab_size
    return LOSS_BYTES_PER_LOGIT * min(t, s.loss_chunk) * info.vocab_size + gathered


def estimate_training_memory(info: ModelInfo, settings: MemorySettings) -> MemoryEstimate:
    """The peak GPU memory of one training step at ``settings``, by component."""
    s = settings
    layers = resolve_targets(info, s.lora_targets)
    load = DTYPE_BYTES[s.load_dtype]
    c = DTYPE_BYTES[s.compute_dtype]
    t = s.tokens_per_micro_batch
    notes: list[str] = []

    # Weights: only the Linear/Conv1D weights inside the blocks are quantized.
    if s.quantization == "none":
        quantized = 0
        unquantized = info.params_total * load
    else:
        quantized = math.ceil(info.params_quantizable * quantized_bytes_per_param(s.quantization, s.double_quant))
        unquantized = (info.params_total - info.params_quantizable) * load

    sizes = lora_tensor_sizes(layers, s.lora_rank)
    lora_params = sum(n * k for n, k in sizes)
    lora_weights = 4 * lora_params  # fp32: peft's autocast_adapter_dtype
    lora_grads = 4 * lora_params  # fp32, kept across micro batches with gradient accumulation
    opt_device, opt_paged = optimizer_state_bytes(sizes, s.optimizer)

    saved_layer = layer_saved_bytes(info, s, layers)
    working = layer_backward_working_bytes(info, s)
    stash = _stash_bytes(info, s, saved_layer, lora_params)
    # With checkpointing, the backward first recomputes the layer (its saved tensors come back).
    layer_backward = working + (saved_layer if s.gradient_checkpointing else 0)
    loss_peak = loss_peak_bytes(info, s)
    activations = stash + layer_backward
    if s.expandable_segments:
        # The loss and the layer's backward share pages: the loss adds only what it needs beyond.
        loss_component = max(0, loss_peak - layer_backward)
        overhead = int(EXPANDABLE_FRAGMENTATION * loss_peak)
    else:
        loss_component = loss_peak
        overhead = int(LOSS_FRAGMENTATION * loss_peak)

    per_gpu = {
        "cublas_workspace": CUBLAS_WORKSPACE_BYTES,
        "activations": activations,
        "logits_and_loss": loss_component,
        "allocator_overhead": overhead,
    }
    reference = reference_pass_bytes(info, s)
    if s.method == "dpo":
        # The reference pass comes before the backward: it adds only what it needs beyond the backward's peak.
        per_gpu["reference_pass"] = max(0, reference - (layer_backward + loss_component))
    n = s.world_size
    sharded: tuple[str, ...] = ()
    if s.strategy == "fsdp":
        parts = _fsdp_parts(info, s, quantized, sizes, lora_params)
        opt_device, opt_paged = parts.pop("_optimizer")
        components = {**parts, **per_gpu,
                      "communication": NCCL_BUFFER_BYTES if n > 1 else 0, "cuda_context": CUDA_CONTEXT_BYTES}
        sharded = ("block_weights", "lora_weights", "lora_gradients", "optimizer_states")
    else:
        components = {
            "quantized_weights": quantized,
            "unquantized_weights": unquantized,
            "lora_weights": lora_weights,
            "lora_gradients": lora_grads,
            "optimizer_states": opt_device + opt_paged,
        }
        if s.strategy == "ddp":
            # DistributedDataParallel(gradient_as_bucket_view=False), what transformers and accelerate
            # pass: the Reducer allocates one flat bucket tensor per ~25 MiB of trainable parameters at
            # wrap time and copies every gradient into it for the all-reduce, so the gradients exist
            # twice for the whole run (torch/nn/parallel/distributed.py, reducer.cpp).
            components["ddp_buckets"] = lora_grads if n > 1 else 0
        components.update(per_gpu)
        if s.strategy == "ddp":
            components["communication"] = NCCL_BUFFER_BYTES if n > 1 else 0
        components["cuda_context"] = CUDA_CONTEXT_BYTES

    if opt_paged:
        notes.append(
            f"{s.optimizer} keeps {opt_paged / MIB:.0f} MiB of optimizer states in CUDA managed memory: "
            "nvidia-smi counts it (page granularity can make it show more), torch's reserved counter does not"
        )
    full_loss = LOSS_BYTES_PER_LOGIT * t * info.vocab_size
    if s.liger:
        notes.append(
            f"Liger Kernel: fused linear cross-entropy ({loss_peak / GIB:.2f} GiB at the loss instead of "
            f"{full_loss / GIB:.1f} GiB of fp32 logits), fused RMSNorm, SwiGLU and RoPE in the blocks"
        )
    elif s.method == "dpo":
        notes.append(
            f"dpo: TRL computes the answers' log-probabilities a tile of at most {TRL_LOGPROB_TOKEN_TILE:,} positions x "
            f"{TRL_LOGPROB_VOCAB_TILE:,} vocabulary entries at a time ({loss_peak / GIB:.2f} GiB at its peak"
            + ("" if s.triton else ", folded with torch operations on the CPU")
            + f"), where a loss over all {t:,} positions' logits would hold {full_loss / GIB:.1f} GiB")
    elif s.loss_chunk is not None and full_loss - loss_peak > 256 * MIB:
        notes.append(
            f"the loss runs {s.loss_chunk:,} positions at a time (training.chunked_loss): {loss_peak / GIB:.1f} GiB instead "
            f"of {full_loss / GIB:.1f} GiB for the fp32 logits of all {t:,} tokens at once (transformers' loss)"
        )
    elif loss_peak > layer_backward and loss_peak > 0.25 * (sum(components.values())):
        notes.append(
            f"the loss dominates: {t:,} tokens x {info.vocab_size:,} vocabulary in fp32 with its gradients "
            f"take {loss_peak / GIB:.1f} GiB; fewer tokens per micro batch (raise gradient accumulation "
            "instead) lowers it linearly"
        )
    if s.method == "dpo" and s.reference == "each_step":
        extra = per_gpu["reference_pass"]
        notes.append(
            f"dpo's reference pass each step (no gradients, {reference / MIB:,.0f} MiB at its peak) runs between "
            "the policy's forward and backward, beside the activations: "
            + (f"it adds {extra / MIB:,.0f} MiB beyond the backward's peak" if extra else
               "it stays under the backward's peak and adds no memory")
            + "; precomputed reference log-probabilities (training.reference) cost one pass over the pairs "
            "before the first step instead of one forward each step")
    elif s.method == "dpo" and s.reference == "precomputed":
        notes.append("dpo's reference log-probabilities are computed once, before the first step (a pass over "
                     "the pairs without gradients): no reference pass beside the steps")
    if s.attn_implementation == "eager":
        notes.append("eager attention stores the full seq x seq attention matrix per layer; sdpa or "
                     "flash_attention_2 do not")
    if info.is_moe:
        notes.append("mixture of experts: modelled are the weights (fused expert parameters counted unquantized, "
                     "as bitsandbytes leaves them) and activations as if each token visits 2 experts (top-2); "
                     "not modelled: the router's choices (an unbalanced batch holds more), its auxiliary loss, "
                     "and LoRA on the fused experts. No run of one has been measured: treat the total as +-20 %")
    if info.vision:
        notes.append(f"vision-language model ({info.architecture}): the estimate is for text-only training; the "
                     "vision tower's weights are counted, images and their activations are not modelled")
    unknown = unknown_note(info.model_type)
    if unknown:
        notes.append(unknown)
    elif not _widths(info).gated and profile(info.model_type).block is RMSNORM_BLOCK:
        notes.append(f"{info.model_type}: a non-gated MLP this estimate has no measurements for; its "
                     "activations are approximate (GELU variants save different intermediates)")
    if s.quantization != "none" and c == 4:
        notes.append("compute dtype float32: bitsandbytes' 4-bit matmuls are slow in fp32; bfloat16 "
                     "(compute capability 8.0+) or float16 halve the activations")
    if n > 1 and s.strategy == "ddp":
        notes.append(
            f"per GPU, on each of {n} GPUs (DDP): every GPU holds the whole model and trains its share of "
            f"each batch; DDP adds a second fp32 copy of the adapters' gradients ({lora_grads / MIB:,.0f} MiB, "
            f"its all-reduce buckets) and NCCL's buffers (an assumed {NCCL_BUFFER_BYTES / MIB:.0f} MiB). "
            "Modelled from library source; no multi-GPU run has been measured yet"
        )
    elif n > 1 and s.strategy == "fsdp":
        notes.append(
            f"per GPU, on each of {n} GPUs (FSDP, FULL_SHARD): the blocks' weights, the adapters, their "
            f"gradients and the optimizer states are sharded 1/{n} per GPU; the 4-bit scales, the embeddings "
            f"and head (FSDP's root unit, gathered for the whole step), {FSDP_GATHERED_LAYERS} gathered layers, "
            "activations and the loss are whole on each, and NCCL's buffers are an assumed "
            f"{NCCL_BUFFER_BYTES / MIB:.0f} MiB. Modelled from library source; no multi-GPU run has been "
            "measured yet, nor what FSDP's gathers add to the allocator's overhead"
        )

    return MemoryEstimate(
        components=components,
        lora_params=lora_params,
        inference_rule_bytes=inference_rule_bytes(info),
        paged=opt_paged > 0,
        paged_bytes=opt_paged,
        loss_peak_bytes=loss_peak,
        layer_backward_bytes=layer_backward,
        notes=tuple(notes),
        phases_share_memory=s.expandable_segments,
        strategy=s.strategy,
        world_size=n,
        sharded=sharded if n > 1 else (),
    )


def _fsdp_parts(info: ModelInfo, s: MemorySettings, quantized: int, sizes: list[tuple[int, int]],
                lora_params: int) -> dict:
    """What FSDP-QLoRA holds per GPU of the weights, adapters and optimizer, and what it gathers.

    Read from torch's FSDP (``FullyShardedDataParallel``, FULL_SHARD, transformer-block auto-wrap as
    transformers + accelerate set it up) and bitsandbytes, not measured:

    * each decoder block is one unit: its flat parameter (the 4-bit data, stored as the compute dtype
      through ``bnb_4bit_quant_storage`` so it is the same bytes, plus norms and biases) is split
      1/world_size per GPU; so are the adapters (peft wraps them as their own units), their
      gradients (reduce-scattered) and the optimizer states (they follow the shards);
    * the block scales (``quant_state``: absmax and, with double quantization, its 8-bit copy) are
      not parameters: bitsandbytes keeps them on the module (``Linear4bit.quant_state``) and FSDP
      never shards them, so every GPU holds them all;
    * the root unit (embeddings, head, final norm) is not freed after the forward pass (FSDP keeps
      the root gathered for the backward, and its frozen parameters are resharded only at the end
      of the backward): its full size plus its shard;
    * ``FSDP_GATHERED_LAYERS`` blocks gathered whole at once (storage bytes, plus their adapters),
      and one block's adapter gradients unsharded before the reduce-scatter.

    With one GPU FSDP switches to NO_SHARD: nothing is gathered or duplicated. Also returns the
    optimizer's (device, paged) bytes under ``_optimizer``.
    """
    n = s.world_size
    load = DTYPE_BYTES[s.load_dtype]
    L = max(1, info.num_hidden_layers)
    q = info.params_quantizable if s.quantization != "none" else 0
    data = math.ceil(q / 2)  # 4 bits per weight, whatever dtype stores them
    scales = max(0, quantized - data)
    block_params = info.params_blocks if info.num_hidden_layers else 0
    in_blocks = data + (block_params - q) * load  # the blocks' storage: 4-bit data, the rest in load dtype
    root = (info.params_total - block_params) * load
    lora = 4 * lora_params  # fp32 adapters (peft's autocast_adapter_dtype)
    if n == 1:
        gathered, root_held = 0, root
    else:
        gathered = FSDP_GATHERED_LAYERS * (in_blocks + lora) // L + lora // L
        root_held = root + math.ceil(root / n)
    optimizer = optimizer_state_bytes([(math.ceil(numel / n), count) for numel, count in sizes], s.optimizer)
    return {
        "block_weights": math.ceil(in_blocks / n),
        "quantization_scales": scales,
        "root_weights": root_held,
        "lora_weights": math.ceil(lora / n),
        "lora_gradients": math.ceil(lora / n),
        "optimizer_states": sum(optimizer),
        "gathered_layers": gathered,
        "_optimizer": optimizer,
    }


def _largest_true(lo: int, hi: int, ok) -> int | None:
    """The largest n in [lo, hi] with ok(n), for ok monotonically true-then-false; None if ok(lo) is false."""
    if hi < lo or not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def fit(
    info: ModelInfo,
    settings: MemorySettings,
    budget_bytes: int,
    *,
    max_micro_batch: int = 1024,
    seq_len_step: int = 64,
    max_seq_len: int | None = None,
) -> FitResult:
    """The largest micro batch at ``settings.seq_len`` and the longest sequence at micro batch 1 that fit.

    Compared against ``total_bytes`` (what the device must hold). ``max_seq_len`` raises the
    search's cap above the model's context length (for RoPE scaling, say).
    """
    from dataclasses import replace

    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, float)) or budget_bytes <= 0:
        raise UserError(f"memory budget must be a positive number of bytes, not {budget_bytes!r}")
    _positive_int("max_micro_batch", max_micro_batch)
    _positive_int("seq_len_step", seq_len_step)
    cap = max_seq_len if max_seq_len is not None else info.context_length
    _positive_int("max_seq_len", cap)
    resolve_targets(info, settings.lora_targets)  # a bad name is reported once, up front

    def fits_batch(b: int) -> bool:
        return estimate_training_memory(info, replace(settings, micro_batch_size=b)).total_bytes <= budget_bytes

    def fits_len(k: int) -> bool:
        est = estimate_training_memory(info, replace(settings, micro_batch_size=1, seq_len=k * seq_len_step))
        return est.total_bytes <= budget_bytes

    best_batch = _largest_true(1, max_micro_batch, fits_batch)
    best_k = _largest_true(1, cap // seq_len_step, fits_len)
    return FitResult(
        budget_bytes=int(budget_bytes),
        seq_len=settings.seq_len,
        max_micro_batch=best_batch,
        max_seq_len=None if best_k is None else best_k * seq_len_step,
        seq_len_step=seq_len_step,
        seq_len_cap=cap,
    )
