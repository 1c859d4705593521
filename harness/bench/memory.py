"""Memory: the peak of a phase (CUDA allocator statistics, or the CPU resident set sampled by a thread), freeing
memory between phases, telling an out-of-memory error apart, and the bytes autograd saves for backward (a
decoding cache's bytes are its own: models.base.DecodeCache.nbytes)."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import threading

import torch

from models.pattention import Pattention

from .. import runtime
from ..runtime import autocast  # the training loop's own: bench measures what the loop runs


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def rss_bytes() -> int | None:
    """This process's resident set now (/proc/self/statm); None without /proc."""
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
        if device.type != "cuda" and rss_bytes() is None:
            self.method = "ru_maxrss growth (no /proc: a lower bound)"

    def start(self) -> "MemoryMeter":
        release_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        rss = rss_bytes()
        if rss is None:
            self.baseline = runtime.peak_memory_bytes(self.device)  # ru_maxrss
        else:
            self.baseline = self._peak = rss
        return self

    @contextlib.contextmanager
    def sampling(self):
        """Sample the RSS in a thread for the duration (CPU); nothing to do on CUDA."""
        if self.device.type == "cuda" or rss_bytes() is None:
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
        rss = rss_bytes()
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
            self._peak = rss_bytes() or self._peak

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(runtime.peak_memory_bytes(self.device))  # max_memory_allocated
        if rss_bytes() is None:
            return max(0, runtime.peak_memory_bytes(self.device) - self.baseline)  # ru_maxrss
        self._observe()
        return max(0, self._peak - self.baseline)

    def stop(self) -> None:
        self._stop.set()


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

