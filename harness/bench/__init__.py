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

Layout (each module imports only the others' public names):

    spec.py     the request: defaults, validation into a BenchSpec (BenchError), the device and its memory
    timing.py   repeats and their statistics, peak FLOP/s for MFU (datasheet table or a timed matmul), SDPA
                backend selection and probing
    memory.py   MemoryMeter (CUDA allocator peak / sampled CPU RSS), release_memory, is_oom, bytes saved for
                backward, cache bytes
    phases.py   the timed steps, the train / prefill / decode phases, bench_row (one row)
    run.py      run_bench (every row, merged into bench.json, then the files), BenchResult, the CLI command

Shared with the rest of the harness: harness.runtime (device resolution, autocast, peak memory, device name,
environment) and harness.model_config (registry preset -> the config a row builds).

The names below are re-exported for callers (``from harness import bench; bench.run_bench(...)``). To replace
one in a test, patch the module that looks it up: ``harness.bench.phases.train_step``, not ``bench.train_step``.
"""
from __future__ import annotations

from ..runtime import autocast, device_name, environment  # shared with the training loop
from .memory import MemoryMeter, is_oom, release_memory, rss_bytes, saved_activation_bytes
from .phases import (bench_row, decode_phase, decode_step, make_loss_fn, prefill_phase, prefill_step, train_phase,
                     train_step)
from .run import BenchResult, cli, run_bench
from .spec import (BACKENDS, BYTES_PER_PARAM_TRAINING, CPU_DEFAULTS, CPU_SWEEP, DEFAULT_MODELS, DEFAULT_PRESETS,
                   DEFAULT_ROOT, DTYPES, GPU_DEFAULTS, GPU_SWEEP, BenchError, BenchSpec, cell_impls,
                   device_memory_bytes, make_spec, resolve_device)
from .timing import (GPU_PEAK_BF16_TFLOPS, SDPA_NAMES, attention_backend, measure_matmul_flops, peak_flops,
                     sdpa_context, sdpa_order, synchronize, throughput, time_repeats)

_SDPA_NAMES = SDPA_NAMES  # the name tests/gpu/test_fast_paths.py reads

__all__ = [
    "autocast",
    "MemoryMeter", "is_oom", "release_memory", "rss_bytes", "saved_activation_bytes",
    "bench_row", "decode_phase", "decode_step", "make_loss_fn", "prefill_phase", "prefill_step", "train_phase",
    "train_step",
    "BenchResult", "cli", "run_bench",
    "BACKENDS", "BYTES_PER_PARAM_TRAINING", "CPU_DEFAULTS", "CPU_SWEEP", "DEFAULT_MODELS", "DEFAULT_PRESETS",
    "DEFAULT_ROOT", "DTYPES", "GPU_DEFAULTS", "GPU_SWEEP", "BenchError", "BenchSpec", "cell_impls",
    "device_memory_bytes", "device_name", "environment", "make_spec", "resolve_device",
    "GPU_PEAK_BF16_TFLOPS", "SDPA_NAMES", "attention_backend", "measure_matmul_flops", "peak_flops",
    "sdpa_context", "sdpa_order", "synchronize", "throughput", "time_repeats",
]
