"""Backend dispatch for the SSM ops (``causal_conv``, ``selective_scan``, ``ssd``): which path a call takes.

Two implementations of every SSM op live behind one function each:

* the **reference path** -- plain PyTorch, runs anywhere (CPU, CUDA without kernels, the ``meta`` device).
  It is *parallel over the sequence* (chunks with a log-depth scan inside, never a Python loop over every
  position) so it is usable for training small models on CPU, and its state is always fp32.
* the **kernel path** -- mamba-ssm's CUDA / Triton kernels and causal-conv1d, used on CUDA tensors when they
  import. They are imported lazily *inside* the CUDA branch: on CPU this package never touches ``mamba_ssm``
  (which is never a dependency of this project, only an optional accelerator).

This module owns all of the dispatch state, and nothing else does:
  * the backend labels ``REFERENCE`` ("torch_reference") and ``MAMBA_SSM`` ("mamba_ssm");
  * the thread-local force-reference switch: ``use_reference()`` (a context manager, used by the
    kernel-vs-reference parity tests) and ``reference_forced()`` (is it on in this thread);
  * the process-global record of the last backend: ``record(backend)`` (every op calls it when it runs a scan
    or a state step) and ``last_backend()`` (what the bench reports);
  * the lazily imported kernels: ``kernels()`` -> ``Kernels``, ``kernels_for(tensor)`` (the kernels an op on
    that tensor may use, or None), ``scan_backend(device, arch)`` (which path a forward on ``device`` would
    take) and ``kernel_status()`` (which pieces imported, and why not).

The ops call ``dispatch.kernels_for(...)`` / ``dispatch.record(...)`` through the module (never a
``from``-import of the function), so patching ``dispatch.kernels_for`` reroutes every op and every model at
once (the CPU simulation of the kernel path in tests/models/test_mamba.py relies on it).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

REFERENCE = "torch_reference"
MAMBA_SSM = "mamba_ssm"

# ----------------------------------------------------------------------------------------------------------
# Backend bookkeeping
# ----------------------------------------------------------------------------------------------------------
_state = threading.local()
_last_backend: str | None = None


def reference_forced() -> bool:
    """Whether ``use_reference()`` is in effect in this thread."""
    return getattr(_state, "force_reference", False)


@contextlib.contextmanager
def use_reference(enabled: bool = True):
    """Force the reference path even on CUDA with kernels installed (thread-local, nestable)."""
    previous = reference_forced()
    _state.force_reference = enabled
    try:
        yield
    finally:
        _state.force_reference = previous


def record(backend: str) -> str:
    """Note that a scan / state step just ran on ``backend`` (``REFERENCE`` or ``MAMBA_SSM``); returns it."""
    global _last_backend
    _last_backend = backend
    return backend


def last_backend() -> str | None:
    """Backend of the most recent scan call in this process ("mamba_ssm" / "torch_reference"), None if none ran."""
    return _last_backend


# ----------------------------------------------------------------------------------------------------------
# Lazy kernel loading (CUDA only)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Kernels:
    """What imported from mamba-ssm / causal-conv1d; None for each piece that did not (errors say why)."""

    selective_scan_fn: Optional[Callable] = None  # mamba_ssm.ops.selective_scan_interface (CUDA extension)
    mamba_inner_fn: Optional[Callable] = None  # same module; also needs causal-conv1d's CUDA extension
    selective_state_update: Optional[Callable] = None  # mamba_ssm.ops.triton.selective_state_update (Triton)
    mamba_chunk_scan_combined: Optional[Callable] = None  # mamba_ssm.ops.triton.ssd_combined (Triton)
    causal_conv1d_fn: Optional[Callable] = None  # causal_conv1d (CUDA extension)
    causal_conv1d_update: Optional[Callable] = None
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def mamba1(self) -> bool:
        return self.selective_scan_fn is not None

    @property
    def mamba2(self) -> bool:
        return self.mamba_chunk_scan_combined is not None


_kernels: Kernels | None = None


def _import_mamba_ssm(modname: str):
    """Import a ``mamba_ssm`` submodule, without its package ``__init__`` if that is what fails.

    ``mamba_ssm/__init__.py`` eagerly imports the whole package (MambaLMHeadModel -> transformers,
    Mamba2 -> huggingface_hub, ...). The kernel modules need none of that, so when the plain import fails we
    register a bare package object (its ``__path__`` only, ``__init__`` not executed) and import the submodule
    through it; then only the submodule's own needs (the CUDA extension, triton, einops) must be present.
    """
    try:
        return importlib.import_module(modname)
    except ImportError as first:
        if "mamba_ssm" in sys.modules:  # the package imported fine: the submodule itself is what failed
            raise
        spec = importlib.util.find_spec("mamba_ssm")
        if spec is None or not spec.submodule_search_locations:
            raise first
        sys.modules["mamba_ssm"] = importlib.util.module_from_spec(spec)
        return importlib.import_module(modname)


def kernels() -> Kernels:
    """Import the kernels once (only ever called on the CUDA branch). Failures leave the piece as None."""
    global _kernels
    if _kernels is not None:
        return _kernels
    k = Kernels()
    try:
        ssi = _import_mamba_ssm("mamba_ssm.ops.selective_scan_interface")
        k.selective_scan_fn = ssi.selective_scan_fn
        # mamba_inner_fn asserts on causal-conv1d's extension inside; only offer it when that is present
        # (the attribute: 2.2.6+ imports causal_conv1d.cpp_functions, 2.2.4 and older causal_conv1d_cuda)
        if any(getattr(ssi, a, None) is not None for a in ("causal_conv1d_fwd_function", "causal_conv1d_cuda")):
            k.mamba_inner_fn = ssi.mamba_inner_fn
    except Exception as e:  # ImportError, or an OSError from a CUDA extension built for another torch
        k.errors["selective_scan"] = f"{type(e).__name__}: {e}"
    try:
        ssu = _import_mamba_ssm("mamba_ssm.ops.triton.selective_state_update")
        k.selective_state_update = ssu.selective_state_update
    except Exception as e:
        k.errors["selective_state_update"] = f"{type(e).__name__}: {e}"
    try:
        k.mamba_chunk_scan_combined = _import_mamba_ssm("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined
    except Exception as e:
        k.errors["ssd_combined"] = f"{type(e).__name__}: {e}"
    try:
        cc = importlib.import_module("causal_conv1d")
        k.causal_conv1d_fn, k.causal_conv1d_update = cc.causal_conv1d_fn, cc.causal_conv1d_update
    except Exception as e:
        k.errors["causal_conv1d"] = f"{type(e).__name__}: {e}"
    _kernels = k
    return k


def kernels_for(t: torch.Tensor) -> Kernels | None:
    """The kernels if ``t`` lives on CUDA, the reference is not forced and something imported; else None.

    Each op checks the one piece it needs (``k.selective_scan_fn is not None`` ...) and otherwise falls back to
    its reference path."""
    if t.device.type != "cuda" or reference_forced():
        return None
    return kernels()


def scan_backend(device: torch.device | str | None = None, arch: str = "mamba") -> str:
    """Which backend a forward on ``device`` would use for the scan ("mamba_ssm" or "torch_reference").
    ``arch``: "mamba" (the selective scan) or "mamba2" (the SSD)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda" or reference_forced():
        return REFERENCE
    k = kernels()
    ok = k.mamba2 if arch == "mamba2" else k.mamba1
    return MAMBA_SSM if ok else REFERENCE


def kernel_status() -> dict[str, Any]:
    """Which kernel pieces are usable (imports them: call it on a CUDA machine), and the import errors."""
    if not torch.cuda.is_available():
        return {"cuda": False, "backend": REFERENCE}
    k = kernels()
    return {
        "cuda": True,
        "selective_scan_fn": k.selective_scan_fn is not None,
        "mamba_inner_fn": k.mamba_inner_fn is not None,
        "selective_state_update": k.selective_state_update is not None,
        "mamba_chunk_scan_combined": k.mamba_chunk_scan_combined is not None,
        "causal_conv1d": k.causal_conv1d_fn is not None,
        "errors": dict(k.errors),
    }


__all__ = [
    "REFERENCE", "MAMBA_SSM", "use_reference", "reference_forced", "record", "last_backend",
    "Kernels", "kernels", "kernels_for", "scan_backend", "kernel_status",
]
