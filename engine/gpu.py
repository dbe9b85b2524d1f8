"""What GPUs this machine has, through NVML (``nvidia-ml-py``); an empty list where there are none.

NVML is the driver's own library, so this works without initializing CUDA or importing torch, and
it reports the free memory other processes leave, which is what a run can actually use.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

BF16_MIN_COMPUTE_CAPABILITY = (8, 0)
"""bfloat16 matmuls need Ampere (compute capability 8.0) or newer (CUDA programming guide)."""


@dataclass(frozen=True)
class GpuInfo:
    """One NVIDIA GPU as NVML reports it."""

    index: int
    """NVML device index (the order nvidia-smi lists, which is CUDA's with CUDA_DEVICE_ORDER=PCI_BUS_ID)."""
    name: str
    """Marketing name, e.g. ``NVIDIA H100 80GB HBM3``."""
    total_bytes: int
    """Memory on the card."""
    free_bytes: int
    """Memory not used by any process right now."""
    compute_capability: tuple[int, int]
    """(major, minor), e.g. (9, 0) for Hopper."""

    @property
    def bf16_supported(self) -> bool:
        """Whether the GPU computes in bfloat16 (compute capability 8.0+)."""
        return tuple(self.compute_capability) >= BF16_MIN_COMPUTE_CAPABILITY

    def to_json(self) -> dict:
        """A JSON-ready dict."""
        return {
            "index": self.index,
            "name": self.name,
            "total_bytes": self.total_bytes,
            "free_bytes": self.free_bytes,
            "compute_capability": list(self.compute_capability),
            "bf16_supported": self.bf16_supported,
        }


def _text(value) -> str:
    """NVML strings are bytes in older bindings, str in newer ones."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def probe_gpus() -> list[GpuInfo]:
    """Every NVIDIA GPU NVML sees; an empty list (never an error) without a driver or ``nvidia-ml-py``."""
    try:
        import pynvml
    except Exception:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:
        return []  # no driver, or no NVIDIA GPU
    try:
        count = pynvml.nvmlDeviceGetCount()
    except Exception:
        count = 0
    gpus = []
    try:
        for index in range(count):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                name = _text(pynvml.nvmlDeviceGetName(handle))
            except Exception:
                continue  # a device that cannot be queried (lost, in reset): leave it out, keep the others
            gpus.append(GpuInfo(index=index, name=name, total_bytes=int(mem.total), free_bytes=int(mem.free),
                                compute_capability=(int(major), int(minor))))
        return gpus
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def flash_attn_available() -> bool:
    """Whether the ``flash_attn`` package is installed (looked up, not imported: importing it loads CUDA)."""
    try:
        return importlib.util.find_spec("flash_attn") is not None
    except (ImportError, ValueError):
        return False
