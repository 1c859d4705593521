"""The bench request: defaults, validation of what was asked (models, presets, shapes, device, dtype, SDPA
backend, Pattention implementations) into a :class:`BenchSpec`, and the device it runs on (resolved by
harness.runtime) with the memory a model may use there."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from models import registry
from models.pattention import IMPLS as PATTENTION_IMPLS

from .. import runtime
from ..model_config import resolve_model_config

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


class BenchError(ValueError):
    """A bad bench request (unknown model / preset / backend / dtype, a preset too large for the device)."""


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


def cell_impls(spec: BenchSpec, name: str, preset: str) -> list[str | None]:
    """The Pattention implementations to measure for this cell: the asked ones when the model has Pattentions,
    else one row with its configuration as it is (None: no override)."""
    if spec.pattention_impls and "pattention_impl" in registry.get_config(name, preset).implementation_fields():
        return list(spec.pattention_impls)
    return [None]


# ==========================================================================================================
# The device (its name and the environment a record describes: harness.runtime)
# ==========================================================================================================
def resolve_device(spec: str | None) -> torch.device:
    """harness.runtime's resolution, restricted to cpu and cuda; a device it refuses raises BenchError with the
    bench's own one-line message."""
    try:
        return runtime.resolve_device(spec, types=("cpu", "cuda"))
    except runtime.DeviceError as e:
        raise BenchError({"unknown": f"unknown device {e.spec!r}; use auto, cpu, cuda or cuda:N",
                          "no_cuda": f"device {e.spec!r} asked for but CUDA is not available",
                          "unsupported": f"device {e.spec!r}: the bench runs on cpu or cuda"}[e.kind]) from None


def device_memory_bytes(device: torch.device) -> tuple[int, str]:
    """Memory a model may use on ``device``: the GPU's total memory, or the RAM available now on CPU."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(props.total_memory), f"{props.name} memory"
    from ..preflight import mem_available_bytes
    free = mem_available_bytes()
    if free is not None:
        return free, "available RAM"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"


# ==========================================================================================================
# Validation
# ==========================================================================================================
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


def _check_cpu_rows(cells, seq_lens, batch_sizes, dtype: str, memory: tuple[int, str]) -> None:
    """Refuse a (model, preset, seq_len, batch) whose estimated training-step memory (harness.preflight, a low
    estimate) exceeds the memory available."""
    from ..preflight import memory_message, training_memory_bytes
    for name, p in cells:
        for seq in seq_lens:
            cfg, _ = resolve_model_config(name, p, seq_len=seq)
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
