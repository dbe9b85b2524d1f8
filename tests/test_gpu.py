"""GPU facts through NVML: nothing (never an error) without a driver; NVML's answers read right."""

from __future__ import annotations

import sys
import types

import pytest

from engine import gpu
from engine.gpu import GpuInfo, flash_attn_available, probe_gpus

GIB = 1024**3


def _fake_pynvml(devices, init_error: Exception | None = None, fail_index: int | None = None):
    """A stand-in for the ``pynvml`` module that reports ``devices`` (name, total, free, (major, minor))."""
    calls = {"init": 0, "shutdown": 0}
    mod = types.ModuleType("pynvml")

    def nvmlInit():
        calls["init"] += 1
        if init_error:
            raise init_error

    def nvmlShutdown():
        calls["shutdown"] += 1

    def handle(i):
        if i == fail_index:
            raise RuntimeError("GPU is lost")
        return i

    mod.nvmlInit = nvmlInit
    mod.nvmlShutdown = nvmlShutdown
    mod.nvmlDeviceGetCount = lambda: len(devices)
    mod.nvmlDeviceGetHandleByIndex = handle
    mod.nvmlDeviceGetName = lambda h: devices[h][0]
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=devices[h][1], free=devices[h][2],
                                                                    used=devices[h][1] - devices[h][2])
    mod.nvmlDeviceGetCudaComputeCapability = lambda h: devices[h][3]
    mod.calls = calls
    return mod


def test_no_gpu_here_gives_an_empty_list():
    # This machine has no NVIDIA driver: NVML fails to initialize, and that is not an error.
    assert probe_gpus() == []


def test_two_fake_gpus_are_read_right(monkeypatch):
    fake = _fake_pynvml([
        ("NVIDIA H100 80GB HBM3", 80 * GIB, 79 * GIB, (9, 0)),
        (b"Tesla T4", 15 * GIB, 14 * GIB, (7, 5)),  # older bindings return bytes
    ])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    gpus = probe_gpus()
    assert gpus == [
        GpuInfo(0, "NVIDIA H100 80GB HBM3", 80 * GIB, 79 * GIB, (9, 0)),
        GpuInfo(1, "Tesla T4", 15 * GIB, 14 * GIB, (7, 5)),
    ]
    assert gpus[0].bf16_supported and not gpus[1].bf16_supported
    assert gpus[0].compute_capability >= (8, 0)
    assert gpus[1].to_json() == {"index": 1, "name": "Tesla T4", "total_bytes": 15 * GIB, "free_bytes": 14 * GIB,
                                 "compute_capability": [7, 5], "bf16_supported": False}
    assert fake.calls == {"init": 1, "shutdown": 1}


def test_ampere_is_the_bf16_threshold():
    assert GpuInfo(0, "A100", 1, 1, (8, 0)).bf16_supported
    assert GpuInfo(0, "RTX 3090", 1, 1, (8, 6)).bf16_supported
    assert not GpuInfo(0, "V100", 1, 1, (7, 0)).bf16_supported


def test_init_failure_gives_an_empty_list(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([], init_error=RuntimeError("NVML Shared Library Not Found")))
    assert probe_gpus() == []


def test_a_device_that_cannot_be_queried_is_left_out_and_nvml_is_shut_down(monkeypatch):
    fake = _fake_pynvml([("A", 8 * GIB, 8 * GIB, (8, 0)), ("B", 8 * GIB, 8 * GIB, (8, 0))], fail_index=0)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert [g.name for g in probe_gpus()] == ["B"]
    assert fake.calls["shutdown"] == 1


def test_missing_pynvml_gives_an_empty_list(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    assert probe_gpus() == []


def test_flash_attn_is_looked_up_not_imported(monkeypatch):
    assert flash_attn_available() is False  # not installed here
    seen = []
    monkeypatch.setattr(gpu.importlib.util, "find_spec", lambda name: seen.append(name) or object())
    assert flash_attn_available() is True
    assert seen == ["flash_attn"] and "flash_attn" not in sys.modules


@pytest.mark.parametrize("exc", [ImportError, ValueError])
def test_flash_attn_lookup_errors_mean_unavailable(monkeypatch, exc):
    def boom(name):
        raise exc(name)

    monkeypatch.setattr(gpu.importlib.util, "find_spec", boom)
    assert flash_attn_available() is False
