"""Liger Kernel on CUDA: fused RMSNorm, RoPE and SwiGLU in the blocks, fused linear cross-entropy at
the loss (the logits never exist whole), where the package is installed (the ``gpu`` extra).

Liger is Triton code: it runs on CUDA GPUs only. Everywhere else (the CPU, architectures whose
profile has no Liger patch, ``engine.arch``, ``training.fused_kernels: off``) the engine keeps its own chunked loss
(``engine.loss``) and transformers' blocks. The memory model follows whichever runs
(``MemorySettings.liger``).

The blocks are patched on the loaded model instance (``_apply_liger_kernel_to_instance``, Liger's
documented way for a model already loaded) before the LoRA adapters wrap its Linear layers; Liger's
own causal-LM forward is not used, because the engine calls the decoder itself and hands the
trained positions' hidden states to Liger's fused linear cross-entropy (``fused_linear_loss``).
"""

from __future__ import annotations

import functools
import importlib.util


@functools.lru_cache(maxsize=1)
def liger_installed() -> bool:
    """Whether ``liger_kernel`` is installed (looked up, not imported: importing it loads Triton)."""
    try:
        return importlib.util.find_spec("liger_kernel") is not None
    except (ImportError, ValueError):
        return False


def liger_supported(model_type: str | None) -> bool:
    """Whether the engine applies Liger to this architecture: its profile (``engine.arch``) has a
    Liger patch and the engine computes its loss (Liger's fused linear cross-entropy is that loss)."""
    from engine.arch import profile

    p = profile(model_type)
    return p.liger and p.own_loss


def liger_decision(setting: str, device: str, model_type: str | None, *, own_loss: bool = True,
                   installed: bool | None = None) -> tuple[bool, str]:
    """Whether a run uses Liger, and why, for ``training.fused_kernels`` on this device and model.

    ``own_loss``: the engine computes the loss itself (``training.chunked_loss``); with transformers'
    loss Liger is not used. ``liger`` asked for where it cannot run is an error (``UserError``), not
    a silent fallback."""
    from engine.errors import UserError

    installed = liger_installed() if installed is None else installed
    if setting == "off":
        return False, "engine's chunked loss (training.fused_kernels: off)"
    if not own_loss:
        if setting == "liger":
            raise UserError("training.fused_kernels: liger needs the engine's own loss, and training.chunked_loss is false",
                            "set training.chunked_loss: true, or fused_kernels: auto")
        return False, "transformers' loss (training.chunked_loss: false)"
    reasons = []
    if device != "cuda":
        reasons.append("Liger Kernel runs on CUDA GPUs only")
    if not liger_supported(model_type):
        reasons.append(f"Liger Kernel has no patch the engine uses for {model_type or 'this model'}")
    if not installed:
        reasons.append("liger-kernel is not installed (pip install 'qlora-wizard[gpu]')")
    if not reasons:
        return True, "Liger Kernel: fused RMSNorm, RoPE, SwiGLU and linear cross-entropy"
    if setting == "liger":
        raise UserError(f"training.fused_kernels: liger, but {'; '.join(reasons)}",
                        "set training.fused_kernels to auto or off")
    return False, "engine's chunked loss (" + "; ".join(reasons) + ")"


def apply_liger(model) -> None:
    """Patch the loaded (not yet LoRA-wrapped) model's norms, rotary embeddings and MLPs in place."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    from engine.errors import UserError

    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise UserError(f"the installed liger-kernel has no patch for {model_type}",
                        "upgrade it (pip install -U 'qlora-wizard[gpu]'), or set training.fused_kernels: off")

    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)


def fused_linear_loss(hidden, head, targets, softcap: float | None = None):
    """Summed cross-entropy of ``head(hidden)`` against ``targets`` without materializing the logits
    (Liger's fused linear cross-entropy, chunked inside the kernel), the logits soft-capped first
    where ``softcap`` is set (Gemma 2). ``head`` is the model's plain output Linear; its weight is
    frozen, as in every LoRA run."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    weight = head.weight
    return liger_fused_linear_cross_entropy(hidden.to(weight.dtype), weight, targets,
                                            bias=getattr(head, "bias", None), reduction="sum", softcap=softcap)
