"""Where and how a model runs: the device a spec names, the autocast dtype and context, peak memory, and the
environment a record describes. One copy, shared by the training loop, validation, the lm-eval adapter, the
bench and the GPU check. Imports torch and the standard library only (the GPU check loads it without numpy).

    device = resolve_device("auto")                  # cuda when available, else cpu
    amp = autocast_dtype("auto", device)             # bfloat16 on CUDA, None (fp32) on CPU
    with autocast(device, amp): logits = model(x)
    peak_memory_bytes(device)                        # CUDA allocator peak, or the process's peak RSS on CPU
    environment()                                    # python/torch/platform (+ GPU 0 when CUDA is present)
    environment(device)                              # ... + that GPU's name, CUDA, cuDNN, capability, kernels
"""
from __future__ import annotations

import contextlib
import os
import platform
import resource
import sys
from typing import Any, Iterable

import torch

AUTO = (None, "", "auto")


class DeviceError(ValueError):
    """A device spec that names no usable device. ``kind``: unknown (not a torch device), no_cuda (CUDA asked
    for, none here) or unsupported (a device type the caller does not run on)."""

    def __init__(self, message: str, kind: str, spec: Any):
        super().__init__(message)
        self.kind, self.spec = kind, spec


def resolve_device(spec: str | torch.device | None = "auto", *, error: type[Exception] = DeviceError,
                   field: str = "device", types: Iterable[str] | None = None) -> torch.device:
    """The device ``spec`` names: ``auto`` (or None / ""), cpu, cuda, cuda:N, or a ``torch.device``.

    Raises ``error`` (default :class:`DeviceError`; a caller passes its own error class, e.g. ConfigError)
    with a one-line message starting with ``field``: for a spec torch does not parse, for CUDA asked for on a
    machine without it, and (when ``types`` is given) for a device type outside ``types``."""
    if spec in AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise _device_error(error, f"{field}: {spec!r} is not a device (auto, cpu, cuda or cuda:N)",
                            "unknown", spec) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _device_error(error, f"{field}: {spec!r} asked for but CUDA is not available on this machine",
                            "no_cuda", spec)
    if types is not None and device.type not in tuple(types):
        raise _device_error(error, f"{field}: {spec!r} is not a {' or '.join(types)} device", "unsupported", spec)
    return device


def _device_error(error: type[Exception], message: str, kind: str, spec: Any) -> Exception:
    return DeviceError(message, kind, spec) if error is DeviceError else error(message)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a run's ``precision`` (TrainConfig.precision: auto | fp32 | bf16) on ``device``:
    None (fp32, no autocast) for fp32, and for auto off CUDA; bfloat16 otherwise."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """bf16 autocast (the training fast path on CUDA) or nothing (fp32); the loop, validation and bench share it."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def peak_memory_bytes(device: torch.device) -> int:
    """The CUDA allocator's peak on ``device``; on CPU the peak resident set size of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def device_name(device: torch.device) -> str:
    """The GPU's name, or ``cpu (N threads)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """What a record says it ran on: python, torch, platform, CPU count and torch threads, plus

    - ``device`` None (a training record): ``gpu`` (GPU 0's name) and ``cuda`` when CUDA is available;
    - ``device`` given (a bench record): on a CUDA device, that GPU's ``gpu``, ``cuda``, ``cudnn``,
      ``capability`` ([major, minor]) and ``mamba_kernels`` (models.ops.dispatch.kernel_status()); on CPU nothing more.
    """
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device is None:
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    elif device.type == "cuda":
        from models.ops import dispatch
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), capability=list(torch.cuda.get_device_capability(device)))
        info["mamba_kernels"] = dispatch.kernel_status()
    return info
