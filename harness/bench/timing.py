"""Timing: repeats and their throughput statistics, the peak FLOP/s that MFU divides by (datasheet table or a
timed matmul, cached per process), and the SDPA backends (which are enabled, which one the dispatcher picks)."""
from __future__ import annotations

import contextlib
import inspect
import platform
import statistics
import time
from typing import Any, Callable

import torch

from models.components import CausalSelfAttention

# bf16 dense (no sparsity) tensor-core peaks, TFLOP/s, from the vendors' datasheets. Matched as substrings of
# torch.cuda.get_device_name() in this order (more specific names first). Unknown GPUs: a timed bf16 matmul.
GPU_PEAK_BF16_TFLOPS: list[tuple[str, float, str]] = [
    ("GH200", 989.0, "GH200 bf16 dense"),
    ("H200", 989.0, "H200 bf16 dense"),
    ("H100 NVL", 835.0, "H100 NVL bf16 dense"),
    ("H100 PCIe", 756.0, "H100 PCIe bf16 dense"),
    ("H100", 989.0, "H100 SXM bf16 dense"),
    ("H800", 989.0, "H800 SXM bf16 dense"),
    ("B200", 2250.0, "B200 bf16 dense"),
    ("A100", 312.0, "A100 bf16 dense"),
    ("A800", 312.0, "A800 bf16 dense"),
    ("L40S", 362.0, "L40S bf16 dense"),
    ("L4", 121.0, "L4 bf16 dense"),
]

# torch._fused_sdp_choice's return values
SDPA_NAMES = {-1: "none", 0: "math", 1: "flash_attention", 2: "efficient_attention", 3: "cudnn_attention",
              4: "overrideable"}


# ==========================================================================================================
# Repeats
# ==========================================================================================================
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_repeats(fn: Callable, device: torch.device, warmup: int, repeats: int,
                 setup: Callable | None = None) -> tuple[list[float], float | None]:
    """Run ``fn(setup())`` warmup times untimed, then ``repeats`` timed; the setup is never timed.

    GPU: CUDA events recorded around ``fn`` on the current stream (GPU time, no host sync inside). CPU:
    perf_counter. Returns (seconds per repeat, seconds of the first warm-up call -- compile time included)."""
    first = None
    for i in range(warmup):
        state = setup() if setup else None
        synchronize(device)
        t0 = time.perf_counter()
        fn(state)
        synchronize(device)
        if i == 0:
            first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        state = setup() if setup else None
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn(state)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(state)
            times.append(time.perf_counter() - t0)
    return times, first


def throughput(times: list[float], tokens: int) -> dict[str, Any]:
    """tokens/s: median of the repeats, min / max, interquartile range; and the raw times."""
    ts = sorted(times)
    med = statistics.median(ts)
    if len(ts) >= 2:
        q1, _, q3 = statistics.quantiles(ts, n=4, method="inclusive")
    else:
        q1 = q3 = med
    return {"tokens_per_s": tokens / med, "tokens_per_s_min": tokens / ts[-1], "tokens_per_s_max": tokens / ts[0],
            "tokens_per_s_iqr": [tokens / q3, tokens / q1], "time_s_median": med, "times_s": list(times),
            "tokens": tokens}


# ==========================================================================================================
# Peak FLOP/s (the MFU denominator)
# ==========================================================================================================
_PEAK_CACHE: dict[tuple[str, str], dict[str, Any]] = {}


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n @ n x n matmul (2 n^3 FLOPs) over ``repeats`` timed calls after 2 warm-ups."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def peak_flops(device: torch.device, dtype: str, fresh: bool = False) -> dict[str, Any]:
    """The MFU denominator: {"peak_flops", "peak_flops_source"}. GPU + bf16: the datasheet table when the
    device name is known, else a timed 8192^2 bf16 matmul; GPU + fp32: a timed fp32 matmul; CPU: always a
    timed 2048^2 matmul in the compute dtype (fp32 unless --dtype bf16). Measured once per process unless
    ``fresh``; the bench measures again after its rows and keeps the best (see run_bench)."""
    key = (str(device), dtype)
    if key in _PEAK_CACHE and not fresh:
        return _PEAK_CACHE[key]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if dtype == "bf16":
            for pattern, tflops, label in GPU_PEAK_BF16_TFLOPS:
                if pattern in name:
                    out = {"peak_flops": tflops * 1e12, "peak_flops_measured": False,
                           "peak_flops_source": f"table: {label} {tflops:g} TFLOP/s ({name})"}
                    _PEAK_CACHE[key] = out
                    return out
        n, tdtype = 8192, (torch.bfloat16 if dtype == "bf16" else torch.float32)
    else:
        name = platform.processor() or platform.machine()
        n, tdtype = 2048, (torch.bfloat16 if dtype == "bf16" else torch.float32)
    flops = measure_matmul_flops(device, tdtype, n)
    previous = _PEAK_CACHE.get(key)
    if previous is not None and previous["peak_flops"] >= flops:
        return previous
    tname = str(tdtype).replace("torch.", "")
    out = {"peak_flops": flops, "peak_flops_measured": True, "peak_flops_source":
           f"measured: {tname} matmul {n}x{n}, best timed call, {flops / 1e9:,.1f} GFLOP/s on {device.type} "
           f"({name}, {torch.get_num_threads()} threads)"}
    _PEAK_CACHE[key] = out
    return out


# ==========================================================================================================
# SDPA backends: which are enabled, which one runs
# ==========================================================================================================
def _sdpa_kernel(backends: list, priority: bool):
    from torch.nn.attention import sdpa_kernel
    if priority and "set_priority" in inspect.signature(sdpa_kernel).parameters:
        return sdpa_kernel(backends, set_priority=True)
    return sdpa_kernel(backends)


def sdpa_order(backend: str, device: torch.device) -> list | None:
    """The SDPA backends enabled for ``backend`` on ``device``, in priority order; None: torch's defaults.

    auto on CUDA: cuDNN attention first on Hopper and newer (sm_90+), flash first before that, then
    memory-efficient, with math last so that shapes no fused kernel takes still run. auto on CPU: torch's
    default (the fused flash_attention_for_cpu kernel where it applies, math otherwise)."""
    from torch.nn.attention import SDPBackend
    if backend == "auto":
        if device.type != "cuda":
            return None
        major, _ = torch.cuda.get_device_capability(device)
        if major >= 9:
            return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH]
        return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                SDPBackend.MATH]
    return [{"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend]]


def sdpa_context(backend: str, device: torch.device):
    """Enable the SDPA backends ``backend`` asks for (with priority order where torch supports it)."""
    order = sdpa_order(backend, device)
    if order is None:
        return contextlib.nullcontext()
    return _sdpa_kernel(order, priority=len(order) > 1)


def attention_backend(model, device: torch.device, dtype: torch.dtype, q_len: int, kv_len: int,
                      mask: bool = False, grad: bool = False) -> str | None:
    """Which SDPA backend the dispatcher selects for this model's attention at these shapes under the
    backends enabled now (call inside sdpa_context). None for a model without attention.

    Probes ``torch._fused_sdp_choice`` with the model's head layout (batch 1): training is causal
    (``is_causal``), a cached prefill passes a boolean mask, a decode step one query and no mask."""
    attn = next((m for m in model.modules() if isinstance(m, CausalSelfAttention)), None)
    if attn is None:
        return None
    shape_q, shape_k = (1, attn.n_heads, q_len, attn.head_dim), (1, attn.n_heads, kv_len, attn.head_dim)
    q = torch.empty(shape_q, device=device, dtype=dtype, requires_grad=grad)
    k = torch.empty(shape_k, device=device, dtype=dtype, requires_grad=grad)
    v = torch.empty(shape_k, device=device, dtype=dtype, requires_grad=grad)
    attn_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len) if mask else None
    try:
        idx = int(torch._fused_sdp_choice(q, k, v, attn_mask, 0.0, (not mask) and q_len > 1))
    except Exception as e:  # a private API: report rather than fail the row
        return f"sdpa(unknown: {type(e).__name__})"
    name = SDPA_NAMES.get(idx, f"backend{idx}")
    if device.type == "cpu":
        return "sdpa-cpu(flash_attention_for_cpu)" if idx == 1 else name
    return f"sdpa-cuda({name})"
