"""`harness bench`: training and inference throughput, MFU and memory, per model x preset x seq_len x batch.

One row per (model, preset, seq_len, batch_size) measures

* **training** -- tokens/s of a full step: forward, cross-entropy, backward, AdamW step (the training loop's
  parameter groups), zero_grad; bf16 autocast on CUDA (fp32 master weights, fused AdamW), optional
  ``torch.compile`` of forward + loss;
* **MFU** -- ``flops_per_token(seq_len)`` (the registry's training FLOPs, 3 x forward) x tokens/s / the device
  peak: a datasheet table of known GPUs (bf16 dense), else a timed matmul (always on CPU);
* **peak memory** -- CUDA ``max_memory_allocated``; CPU: peak resident-set growth over a baseline taken
  right before the model is built, sampled every few ms by a thread (tracemalloc does not see torch);
* **inference** -- prefill tokens/s (``model.step(prompt, cache)`` on a fresh cache) and cached-decode
  tokens/s (``allocate_cache`` + one-token ``step`` calls, greedy), weights and cache in the row's dtype;
* **cache bytes per sequence** -- KV cache (``KVCache.nbytes()``) at seq_len, or Mamba's constant conv + SSM
  state, for a batch of one;
* **backends** -- the SDPA backend the dispatcher selects for the row's training / prefill / decode shapes,
  and the selective-scan backend that actually ran (``model.backends_ran()``).

Timing: warm-up calls excluded; CUDA events around each repeat on GPU (host timer after synchronize on CPU);
the median of the repeats with min/max and the interquartile range. Bad requests raise :class:`BenchError`
(a ValueError: the CLI prints one line and exits 2); an out-of-memory phase is recorded as status "OOM" and
the sweep continues.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import inspect
import os
import platform
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from models import registry, ssm_ops
from models.components import CausalSelfAttention
from models.pattention import IMPLS as PATTENTION_IMPLS
from models.pattention import Pattention

from . import store
from .train.validate import autocast  # the training loop's own: bench times what the loop runs

DEFAULT_MODELS = ("tokenformer", "transformer_pp", "mamba", "gpt2")
DEFAULT_PRESETS = ("tiny",)
DEFAULT_ROOT = Path("results") / "bench"
BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
DTYPES = ("auto", "bf16", "fp32")
CPU_SWEEP = (128, 256, 512, 1024, 2048)
GPU_SWEEP = (512, 1024, 2048, 4096, 8192)
BYTES_PER_PARAM_TRAINING = 16  # fp32 weights 4 + gradients 4 + AdamW exp_avg 4 + exp_avg_sq 4

# per-device defaults: (seq_lens, batch_sizes, decode_batches, decode_tokens, repeats, warmup)
CPU_DEFAULTS = dict(seq_lens=[256], batch_sizes=[8], decode_batches=[1, 8], decode_tokens=32, repeats=5, warmup=2)
GPU_DEFAULTS = dict(seq_lens=[2048], batch_sizes=[8], decode_batches=[1, 64], decode_tokens=128, repeats=10, warmup=3)

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

_SDPA_NAMES = {-1: "none", 0: "math", 1: "flash_attention", 2: "efficient_attention", 3: "cudnn_attention",
               4: "overrideable"}


class BenchError(ValueError):
    """A bad bench request (unknown model / preset / backend / dtype, a preset too large for the device)."""


# ==========================================================================================================
# The request
# ==========================================================================================================
@dataclasses.dataclass
class BenchSpec:
    cells: list[tuple[str, str]]          # (model, preset), in the order asked
    seq_lens: list[int]
    batch_sizes: list[int]
    decode_batches: list[int]
    decode_tokens: int
    repeats: int
    warmup: int
    device: torch.device
    dtype: str                            # bf16 | fp32 (resolved)
    compile: bool
    backend: str                          # auto | flash | cudnn | efficient | math
    out: Path
    sweep: bool = False
    # Pattention implementations to measure, one row each, for models that have Pattentions (None: each
    # model's configured one); a model without Pattentions gets a single row
    pattention_impls: list[str] | None = None

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.dtype == "bf16" else None

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bf16" else torch.float32


def _split(value, what: str) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        out += [s.strip() for s in str(item).split(",") if s.strip()]
    return out


def _ints(value, what: str, minimum: int) -> list[int] | None:
    items = _split(value, what)
    if not items:
        return None
    out = []
    for s in items:
        try:
            n = int(s)
        except ValueError:
            raise BenchError(f"{what}: expected integers (comma-separated), got {s!r}") from None
        if n < minimum:
            raise BenchError(f"{what}: must be >= {minimum}, got {n}")
        out.append(n)
    return list(dict.fromkeys(out))


def resolve_device(spec: str | None) -> torch.device:
    spec = spec or "auto"
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise BenchError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"device {spec!r} asked for but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"device {spec!r}: the bench runs on cpu or cuda")
    return device


def device_memory_bytes(device: torch.device) -> tuple[int, str]:
    """Memory a model may use on ``device``: the GPU's total memory, or the RAM available now on CPU."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(props.total_memory), f"{props.name} memory"
    from .preflight import mem_available_bytes
    free = mem_available_bytes()
    if free is not None:
        return free, "available RAM"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"


def _check_cpu_rows(cells, seq_lens, batch_sizes, dtype: str, memory: tuple[int, str]) -> None:
    """Refuse a (model, preset, seq_len, batch) whose estimated training-step memory (harness.preflight, a low
    estimate) exceeds the memory available."""
    from .preflight import memory_message, training_memory_bytes
    for name, p in cells:
        base = registry.get_config(name, p)
        for seq in seq_lens:
            cfg = registry.get_config(name, p, **({"max_seq_len": seq} if seq > base.max_seq_len else {}))
            for batch in batch_sizes:
                why = memory_message(training_memory_bytes(cfg, seq, batch, 2 if dtype == "bf16" else 4), memory)
                if why:
                    raise BenchError(f"--seq-len {seq} x --batch-size {batch}: a training step of {name}/{p} {why}")


def make_spec(model=None, preset=None, seq_len=None, batch_size=None, decode_batch=None, decode_tokens=None,
              repeats=None, warmup=None, device="auto", dtype="auto", compile=False, out=None, sweep=False,
              backend="auto", pattention_impl=None) -> BenchSpec:
    """Validate a request (comma strings or lists) into a BenchSpec; raise BenchError naming what is wrong.

    ``model`` entries may carry their own preset, ``name:preset`` (``transformer_pp:350m,tokenformer:450m``);
    the others take every ``preset``."""
    dev = resolve_device(device)
    backend = (backend or "auto").strip().lower()
    if backend not in BACKENDS:
        raise BenchError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if dev.type == "cpu" and backend in ("cudnn", "efficient"):
        raise BenchError(f"attention backend {backend!r} needs CUDA; on cpu use auto, flash or math")
    dtype = (dtype or "auto").strip().lower()
    if dtype not in DTYPES:
        raise BenchError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"

    impls = _split(pattention_impl, "--pattention-impl") or None
    for impl in impls or ():
        if impl not in PATTENTION_IMPLS:
            raise BenchError(f"--pattention-impl: unknown implementation {impl!r}; valid: {', '.join(PATTENTION_IMPLS)}")
        if impl == "triton" and dev.type != "cuda":
            raise BenchError("--pattention-impl triton needs CUDA: on the CPU Triton runs only its interpreter, "
                             "which is for correctness tests, not timing")
    if impls:
        impls = list(dict.fromkeys(impls))

    presets = _split(preset, "--preset") or list(DEFAULT_PRESETS)
    cells: list[tuple[str, str]] = []
    for entry in _split(model, "--model") or list(DEFAULT_MODELS):
        name, _, own = entry.partition(":")
        registry.get(name)  # UnknownModelError (a ValueError) naming the valid models
        for p in ([own] if own else presets):
            registry.get_config(name, p)  # unknown preset: one line naming the valid ones
            if (name, p) not in cells:
                cells.append((name, p))

    memory, what = device_memory_bytes(dev)
    for name, p in cells:
        n = registry.get_config(name, p).num_params()
        need = n * BYTES_PER_PARAM_TRAINING
        if need > memory:
            raise BenchError(
                f"preset {p!r} of {name} is too large for {dev.type}: {n / 1e9:.2f}B parameters need "
                f"~{need / 2**30:.1f} GiB for weights, gradients and AdamW state ({BYTES_PER_PARAM_TRAINING} B/param) "
                f"but the device has {memory / 2**30:.1f} GiB ({what})")

    defaults = GPU_DEFAULTS if dev.type == "cuda" else CPU_DEFAULTS
    seq_lens = _ints(seq_len, "--seq-len", 2)
    if sweep:
        seq_lens = list(GPU_SWEEP if dev.type == "cuda" else CPU_SWEEP)

    def single(value, what, minimum, default):
        values = _ints(value, what, minimum)
        if values and len(values) > 1:
            raise BenchError(f"{what}: expected one integer, got {value!r}")
        return values[0] if values else default

    repeats = single(repeats, "--repeats", 1, defaults["repeats"])
    warmup = single(warmup, "--warmup", 0, defaults["warmup"])
    if compile:  # the first call compiles: never time it
        warmup = max(warmup, 1)
    seq_lens = seq_lens or list(defaults["seq_lens"])
    batch_sizes = _ints(batch_size, "--batch-size", 1) or list(defaults["batch_sizes"])
    if dev.type == "cpu":
        # on CUDA a row that runs out of memory is caught and recorded as "OOM" (a result); on the CPU the
        # kernel's OOM killer ends the whole bench instead, so a row that cannot fit is refused up front
        _check_cpu_rows(cells, seq_lens, batch_sizes, dtype, (memory, what))
    return BenchSpec(
        cells=cells,
        seq_lens=seq_lens,
        batch_sizes=batch_sizes,
        decode_batches=_ints(decode_batch, "--decode-batch", 1) or list(defaults["decode_batches"]),
        decode_tokens=single(decode_tokens, "--decode-tokens", 1, defaults["decode_tokens"]),
        repeats=repeats, warmup=warmup,
        device=dev, dtype=dtype, compile=bool(compile), backend=backend,
        out=Path(out) if out else DEFAULT_ROOT, sweep=bool(sweep), pattention_impls=impls)


# ==========================================================================================================
# Fast paths: SDPA backend selection, compile (autocast is the training loop's, imported above)
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
    name = _SDPA_NAMES.get(idx, f"backend{idx}")
    if device.type == "cpu":
        return "sdpa-cpu(flash_attention_for_cpu)" if idx == 1 else name
    return f"sdpa-cuda({name})"


def make_loss_fn(model, compile: bool = False) -> Callable:
    """forward + cross-entropy; compiled with torch.compile when asked (backward follows through AOTAutograd)."""
    def loss_fn(inputs, targets):
        logits = model(inputs)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    return torch.compile(loss_fn) if compile else loss_fn


def train_step(model, optimizer, loss_fn, inputs, targets, amp_dtype):
    """One training step: forward + loss under autocast, backward, AdamW step, zero_grad."""
    with autocast(inputs.device, amp_dtype):
        loss = loss_fn(inputs, targets)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def saved_activation_bytes(model, loss_fn, inputs, targets, amp_dtype) -> dict[str, int]:
    """What autograd keeps for backward after one forward + loss -- the activation memory a training step
    holds at its peak, between forward and backward: the bytes of every distinct storage a saved tensor points
    at, parameters excluded (they are resident anyway), and the part saved inside Pattention modules.

    Counted through ``torch.autograd.graph.saved_tensors_hooks`` (eager only: a compiled graph decides its own
    saved set), so it is exact and independent of the allocator, unlike a resident-set peak. A storage saved by
    several ops counts once, for the first module that saved it."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, bool]] = {}
    depth = [0]  # > 0 while a Pattention's forward runs

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = (st.nbytes(), depth[0] > 0)
        return t  # the graph holds t as it would without the hook: the storages stay alive until it dies

    def enter(*_):
        depth[0] += 1

    def leave(*_):
        depth[0] -= 1
    handles = []
    for m in model.modules():
        if isinstance(m, Pattention):
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(inputs.device, amp_dtype):
            loss = loss_fn(inputs, targets)
        del loss  # the graph and everything it saved
    finally:
        for h in handles:
            h.remove()
    return {"saved_activation_bytes": sum(n for n, _ in seen.values()),
            "pattention_saved_bytes": sum(n for n, inside in seen.values() if inside)}


def prefill_step(model, tokens, cache):
    """A prefill: every prompt token through the cache API (the cache advances by T)."""
    return model.step(tokens, cache)


def decode_step(model, tokens, cache):
    """One cached decoding step for (B, 1) tokens; returns the greedy next tokens (B, 1)."""
    return model.step(tokens, cache)[:, -1].argmax(-1, keepdim=True)


# ==========================================================================================================
# Measurement helpers
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


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release_memory(device: torch.device, collect: bool = True) -> None:
    """Free what can be freed: gc (slow with torch loaded: only between rows and after a failure), the CUDA
    caching allocator's unused blocks, glibc's free heap."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:  # hand freed heap back to the OS so that the next baseline is honest (glibc only)
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


class MemoryMeter:
    """Peak memory of a phase. CUDA: ``torch.cuda.max_memory_allocated`` (reset per phase; absolute, so it
    includes the weights). CPU: the peak resident set, sampled every ``interval`` s by a thread while
    ``sampling()`` is active, minus the RSS at ``start()`` (taken before the model is built, after gc +
    malloc_trim): weights, gradients, optimizer state, activations and allocator slack -- approximate, and
    blind to spikes shorter than the interval. The bench samples during one extra *untimed* call after the
    timed repeats: on a 2-core machine a waking thread stalls torch's OpenMP barriers and would skew timings."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device, self.interval = device, interval
        self.baseline, self._peak = 0, 0
        self._stop = threading.Event()
        self.method = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                       else f"RSS growth over the pre-build baseline, sampled every {interval * 1e3:.0f} ms "
                            f"during an extra untimed call")
        if device.type != "cuda" and _rss_bytes() is None:
            self.method = "ru_maxrss growth (no /proc: a lower bound)"

    def start(self) -> "MemoryMeter":
        release_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        rss = _rss_bytes()
        if rss is None:
            self.baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        else:
            self.baseline = self._peak = rss
        return self

    @contextlib.contextmanager
    def sampling(self):
        """Sample the RSS in a thread for the duration (CPU); nothing to do on CUDA."""
        if self.device.type == "cuda" or _rss_bytes() is None:
            yield self
            return
        self._stop.clear()
        thread = threading.Thread(target=self._sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self._observe()

    def _observe(self) -> None:
        rss = _rss_bytes()
        if rss is not None and rss > self._peak:
            self._peak = rss

    def _sample(self):
        self._observe()
        while not self._stop.wait(self.interval):
            self._observe()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._peak = _rss_bytes() or self._peak

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if _rss_bytes() is None:
            return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.baseline)
        self._observe()
        return max(0, self._peak - self.baseline)

    def stop(self) -> None:
        self._stop.set()


def cache_nbytes(cache) -> int:
    """Bytes held by a decoding cache (models.base.DecodeCache.nbytes: KV buffers, or conv + SSM state)."""
    return int(cache.nbytes())


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


def environment(device: torch.device) -> dict[str, Any]:
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), capability=list(torch.cuda.get_device_capability(device)))
        info["mamba_kernels"] = ssm_ops.kernel_status()
    return info


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


# ==========================================================================================================
# One row
# ==========================================================================================================
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _train_phase(spec: BenchSpec, model, seq_len: int, batch: int, vocab: int,
                 meter: MemoryMeter | None = None) -> dict[str, Any]:
    """Timed training steps on random tokens, then (CPU) one untimed step sampled for peak memory; the
    optimizer and data die with this frame."""
    from .config import OptimConfig
    from .train.optim import build_optimizer
    device = spec.device
    model.train()
    optimizer = build_optimizer(model, OptimConfig(), device)
    loss_fn = make_loss_fn(model, spec.compile)
    g = torch.Generator(device="cpu").manual_seed(1)
    data = torch.randint(0, vocab, (batch, seq_len + 1), generator=g).to(device)
    inputs, targets = data[:, :-1], data[:, 1:]
    try:
        times, first = time_repeats(
            lambda _: train_step(model, optimizer, loss_fn, inputs, targets, spec.amp_dtype),
            device, spec.warmup, spec.repeats)
        if meter is not None and device.type != "cuda":  # CUDA: max_memory_allocated saw the timed steps
            with meter.sampling():
                train_step(model, optimizer, loss_fn, inputs, targets, spec.amp_dtype)
        saved = ({} if spec.compile else
                 saved_activation_bytes(model, loss_fn, inputs, targets, spec.amp_dtype))
    finally:
        model.zero_grad(set_to_none=True)
    out = {f"train_{k}": v for k, v in throughput(times, batch * seq_len).items()}
    out.update(saved)
    out["train_first_step_s"] = first
    if meter is not None:
        out["peak_memory_bytes"] = meter.peak()
    return out


def _prefill_phase(spec: BenchSpec, model, seq_len: int, batch: int, vocab: int,
                   meter: MemoryMeter | None = None) -> dict[str, Any]:
    """Prefill of ``batch`` prompts of seq_len tokens into a fresh cache (allocation not timed); then (CPU) one
    untimed prefill sampled for peak memory."""
    g = torch.Generator(device="cpu").manual_seed(2)
    prompt = torch.randint(0, vocab, (batch, seq_len), generator=g).to(spec.device)
    times, _ = time_repeats(lambda c: prefill_step(model, prompt, c), spec.device, spec.warmup, spec.repeats,
                            setup=lambda: model.allocate_cache(batch, seq_len))
    out = {f"prefill_{k}": v for k, v in throughput(times, batch * seq_len).items()}
    out["prefill_batch"] = batch
    if meter is not None and spec.device.type != "cuda":
        cache = model.allocate_cache(batch, seq_len)
        with meter.sampling():
            prefill_step(model, prompt, cache)
    return out


def _decode_phase(spec: BenchSpec, model, seq_len: int, batch: int, vocab: int) -> dict[str, Any]:
    """Greedy cached decoding of ``new`` tokens after a prompt of seq_len - new (prefill not timed), so the
    context ends at seq_len; ``new`` = min(decode_tokens, seq_len // 2)."""
    new = max(1, min(spec.decode_tokens, seq_len // 2))
    g = torch.Generator(device="cpu").manual_seed(3)
    prompt = torch.randint(0, vocab, (batch, seq_len - new), generator=g).to(spec.device)

    def setup():
        cache = model.allocate_cache(batch, seq_len)
        nxt = prefill_step(model, prompt, cache)[:, -1].argmax(-1, keepdim=True)
        return cache, nxt

    def run(state):
        cache, tok = state
        for _ in range(new):
            tok = decode_step(model, tok, cache)
        return tok

    times, _ = time_repeats(run, spec.device, spec.warmup, spec.repeats, setup=setup)
    tp = throughput(times, batch * new)
    return {"batch": batch, "prompt_len": seq_len - new, "new_tokens": new, "status": "ok",
            "ms_per_token": 1e3 * tp["time_s_median"] / new, **tp}


def bench_row(spec: BenchSpec, model_name: str, preset: str, seq_len: int, batch: int,
              peak: dict[str, Any], pattention_impl: str | None = None) -> dict[str, Any]:
    """Measure one (model, preset, seq_len, batch[, Pattention implementation]) row. Phases fail
    independently: an OOM in one marks the row "OOM" (any other error: "failed", with the message) and the
    other phases still run."""
    device = spec.device
    row: dict[str, Any] = {
        "model": model_name, "preset": preset, "seq_len": seq_len, "batch_size": batch,
        "device": device.type if device.index is None else str(device), "device_name": device_name(device),
        "dtype": spec.dtype, "compile": spec.compile, "backend": spec.backend,
        "repeats": spec.repeats, "warmup": spec.warmup, "status": "ok", "errors": {},
        "torch": torch.__version__, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **peak,
    }
    base = registry.get_config(model_name, preset)
    overrides = {"max_seq_len": seq_len} if seq_len > base.max_seq_len else {}  # learned positions / rotary
    if pattention_impl is not None:
        overrides["pattention_impl"] = pattention_impl
    cfg = registry.get_config(model_name, preset, **overrides)
    vocab = cfg.vocab_size
    row.update(params=cfg.num_params(), non_embedding_params=cfg.num_params(non_embedding=True),
               flops_per_token=cfg.flops_per_token(seq_len),
               # the configured path (a label); None: the model has no Pattention
               pattention_impl=cfg.implementation_fields().get("pattention_impl"))
    if spec.compile:
        torch._dynamo.reset()

    def failed(phase: str, exc: BaseException) -> str:
        oom = is_oom(exc)
        row["errors"][phase] = ("OOM: " if oom else "") + _first_line(exc)
        if oom and row["status"] == "ok":
            row["status"] = "OOM"
        elif not oom:
            row["status"] = "failed"
        return "OOM" if oom else "failed"

    meter = MemoryMeter(device).start()
    row["memory_method"] = meter.method
    model = None
    try:
        with sdpa_context(spec.backend, device):
            try:
                torch.manual_seed(0)
                model = registry.build_from_config(cfg, model_name, device=device)
            except Exception as e:  # noqa: BLE001 - recorded in the row
                failed("build", e)
                return row
            dt = spec.compute_dtype
            row["attention_backends"] = {
                "train": attention_backend(model, device, dt, seq_len, seq_len, grad=True),
                "prefill": attention_backend(model, device, dt, seq_len, seq_len, mask=True),
                "decode": attention_backend(model, device, dt, 1, seq_len),
            }
            row["attention_backend"] = row["attention_backends"]["train"]
            row["scan_backend_expected"] = model.backends().get("scan")

            try:
                row.update(_train_phase(spec, model, seq_len, batch, vocab, meter))
                row["train_flops_per_s"] = row["train_tokens_per_s"] * row["flops_per_token"]
                row["mfu"] = row["train_flops_per_s"] / peak["peak_flops"]
                ran = model.backends_ran()  # what the timed steps ran ("auto" resolves per device and shape)
                if "scan" in ran:
                    row["scan_backend"] = ran["scan"]
                if ran.get("pattention"):
                    row["pattention_impl_ran"] = ran["pattention"]
            except Exception as e:  # noqa: BLE001
                failed("train", e)
            release_memory(device, collect=bool(row["errors"]))

            # inference: weights and cache in the row's dtype (bf16 on GPU; Mamba's SSM state stays fp32)
            model.eval()
            if dt != torch.float32:
                model.to(dt)
            meter.reset_peak()
            with torch.inference_mode():
                try:
                    cache = model.allocate_cache(1, seq_len)
                    row.update(cache_bytes_per_seq=cache_nbytes(cache), cache_kind=type(cache).__name__,
                               cache_len=seq_len)
                    cache = None
                except Exception as e:  # noqa: BLE001
                    failed("cache", e)
                try:
                    row.update(_prefill_phase(spec, model, seq_len, batch, vocab, meter))
                except Exception as e:  # noqa: BLE001
                    failed("prefill", e)
                release_memory(device, collect=bool(row["errors"]))
                row["decode"] = {}
                for db in spec.decode_batches:
                    try:
                        row["decode"][str(db)] = _decode_phase(spec, model, seq_len, db, vocab)
                    except Exception as e:  # noqa: BLE001
                        row["decode"][str(db)] = {"batch": db, "status": failed(f"decode_b{db}", e)}
                    release_memory(device, collect=bool(row["errors"]))
                if "scan" in model.backends_ran():
                    row["decode_scan_backend"] = model.backends_ran()["scan"]
            row["inference_peak_memory_bytes"] = meter.peak()
    finally:
        meter.stop()
        model = None
        release_memory(device, collect=device.type == "cuda" or bool(row["errors"]))
    return row


# ==========================================================================================================
# The run
# ==========================================================================================================
@dataclasses.dataclass
class BenchResult:
    rows: list[dict[str, Any]]            # this run's rows
    all_rows: list[dict[str, Any]]        # bench.json after merging with earlier runs in the same directory
    files: list[Path]
    ratios: list[dict[str, Any]]
    wall_s: float
    peak: dict[str, Any]


def _row_summary(row: dict[str, Any]) -> str:
    def k(x):
        return "-" if x is None else (f"{x / 1e3:,.1f}k" if x >= 1e4 else f"{x:,.0f}")
    dec = " ".join(f"b{b} {k(e.get('tokens_per_s'))}" for b, e in (row.get("decode") or {}).items())
    mfu = row.get("mfu")
    impl = f" [{row['pattention_impl']}]" if row.get("pattention_impl") else ""
    return (f"{row['model']}/{row['preset']}{impl} seq {row['seq_len']} batch {row['batch_size']}: "
            f"train {k(row.get('train_tokens_per_s'))} tok/s, MFU {'-' if mfu is None else f'{100 * mfu:.2f}%'}, "
            f"prefill {k(row.get('prefill_tokens_per_s'))} tok/s, decode {dec} tok/s"
            + ("" if row["status"] == "ok" else f" [{row['status']}: {'; '.join(row['errors'].values())}]"))


def _impls(spec: BenchSpec, name: str, preset: str) -> list[str | None]:
    """The Pattention implementations to measure for this cell: the asked ones when the model has Pattentions,
    else one row with its configuration as it is (None: no override)."""
    if spec.pattention_impls and "pattention_impl" in registry.get_config(name, preset).implementation_fields():
        return list(spec.pattention_impls)
    return [None]


def run_bench(spec: BenchSpec, log: Callable[[str], None] | None = print) -> BenchResult:
    """Every row of ``spec``; bench.json rewritten atomically after each row (rows of earlier runs in the same
    directory are kept unless this run re-measures them), then bench.csv, bench.md and the plot."""
    from . import bench_report
    log = log or (lambda s: None)
    t0 = time.perf_counter()
    out = Path(spec.out)
    previous = bench_report.read_rows(out)
    peak = peak_flops(spec.device, spec.dtype)
    log(f"peak FLOP/s for MFU: {peak['peak_flops'] / 1e12:.4g} TFLOP/s ({peak['peak_flops_source']})")
    meta = {"environment": environment(spec.device), "git_revision": store.git_revision(),
            "versions": store.library_versions(), **peak,
            "request": {k: (str(v) if isinstance(v, (Path, torch.device)) else v)
                        for k, v in dataclasses.asdict(spec).items()}}
    rows: list[dict[str, Any]] = []
    plan = [(name, preset, seq_len, batch, impl) for name, preset in spec.cells for impl in _impls(spec, name, preset)
            for seq_len in spec.seq_lens for batch in spec.batch_sizes]
    for name, preset, seq_len, batch, impl in plan:
        r0 = time.perf_counter()
        row = bench_row(spec, name, preset, seq_len, batch, peak, impl)
        row["wall_s"] = time.perf_counter() - r0
        rows.append(row)
        log(f"[{len(rows)}/{len(plan)}] {_row_summary(row)} ({row['wall_s']:.1f} s)")
        merged = bench_report.merge_rows(previous, rows)
        bench_report.write_json(out, meta, merged)
    if peak.get("peak_flops_measured"):
        # a timed matmul on a shared machine can catch a slow moment: measure again, keep the best, and base
        # every row of this run on it (MFU stays comparable across the rows)
        best = peak_flops(spec.device, spec.dtype, fresh=True)
        if best["peak_flops"] > peak["peak_flops"]:
            log(f"peak FLOP/s re-measured after the rows: {best['peak_flops'] / 1e12:.4g} TFLOP/s (kept: the best)")
            peak = best
        for row in rows:
            row.update(peak)
            if row.get("train_flops_per_s") is not None:
                row["mfu"] = row["train_flops_per_s"] / peak["peak_flops"]
        meta.update(peak)
    merged = bench_report.merge_rows(previous, rows)
    ratios = bench_report.matched_flops_ratios(merged)
    files = bench_report.write_outputs(out, meta, merged, ratios)
    return BenchResult(rows=rows, all_rows=merged, files=files, ratios=ratios,
                       wall_s=time.perf_counter() - t0, peak=peak)


def cli(args) -> int:
    """`harness bench` (called by harness.cli.cmd_bench with the parsed arguments)."""
    from . import bench_report
    t0 = time.perf_counter()
    spec = make_spec(model=args.model, preset=args.preset, seq_len=args.seq_len, batch_size=args.batch_size,
                     decode_batch=args.decode_batch, decode_tokens=args.decode_tokens, repeats=args.repeats,
                     warmup=args.warmup, device=args.device, dtype=args.dtype, compile=args.compile,
                     out=args.out, sweep=args.sweep, backend=args.backend,
                     pattention_impl=args.pattention_impl)
    cells = ", ".join(f"{m}/{p}" for m, p in spec.cells)
    print(f"bench on {device_name(spec.device)} ({spec.dtype}{', compiled' if spec.compile else ''}, "
          f"sdpa {spec.backend}): {cells}; seq {spec.seq_lens}, batch {spec.batch_sizes}, decode batch "
          f"{spec.decode_batches} x {spec.decode_tokens} tokens; {spec.warmup} warm-up + {spec.repeats} timed "
          f"repeats -> {spec.out}", flush=True)
    result = run_bench(spec, log=lambda s: print(s, flush=True))
    print()
    print(bench_report.markdown_table(result.rows))
    print()
    for line in bench_report.ratio_lines(bench_report.matched_flops_ratios(result.rows)):
        print(line)
    for line in bench_report.impl_ratio_lines(bench_report.impl_ratios(result.rows)):
        print(line)
    print(f"MFU peak: {result.peak['peak_flops_source']}")
    print(f"peak mem: {result.rows[0].get('memory_method') if result.rows else '-'}")
    for f in result.files:
        print(f"wrote {f}")
    print(f"{len(result.rows)} row(s) in {time.perf_counter() - t0:.1f} s")
    return 1 if any(r["status"] == "failed" for r in result.rows) else 0
