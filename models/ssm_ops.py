"""Selective-scan (Mamba-1) and SSD (Mamba-2) ops: a pure-PyTorch reference path plus lazy kernel dispatch.

Two implementations of every op live behind one function each:

* the **reference path** -- plain PyTorch, runs anywhere (CPU, CUDA without kernels, the ``meta`` device).
  It is *parallel over the sequence* (chunks with a log-depth scan inside, never a Python loop over every
  position) so it is usable for training small models on CPU, and its state is always fp32.
* the **kernel path** -- mamba-ssm's CUDA / Triton kernels and causal-conv1d, used on CUDA tensors when they
  import. They are imported lazily *inside* the CUDA branch: on CPU this module never touches ``mamba_ssm``
  (which is never a dependency of this project, only an optional accelerator).

``scan_backend(device)`` says which path a call on ``device`` would take; ``last_backend()`` says which one
the most recent call took ("mamba_ssm" or "torch_reference"), so the bench can report it.
``use_reference()`` forces the reference path (used by the kernel-vs-reference parity tests).

Layouts follow mamba-ssm so that its kernels are drop-in:
  Mamba-1 scan:  u, delta, z: (B, D, L);  A: (D, N);  B, C: (B, N, L);  D, delta_bias: (D,);  state (B, D, N)
  Mamba-2 SSD:   x: (B, L, H, P);  dt: (B, L, H);  A: (H,);  B, C: (B, L, G, N);  D: (H,);  state (B, H, P, N)
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

REFERENCE = "torch_reference"
MAMBA_SSM = "mamba_ssm"

# ----------------------------------------------------------------------------------------------------------
# Backend bookkeeping
# ----------------------------------------------------------------------------------------------------------
_state = threading.local()
_last_backend: str | None = None


def _forced_reference() -> bool:
    return getattr(_state, "force_reference", False)


@contextlib.contextmanager
def use_reference(enabled: bool = True):
    """Force the reference path even on CUDA with kernels installed (thread-local, nestable)."""
    previous = _forced_reference()
    _state.force_reference = enabled
    try:
        yield
    finally:
        _state.force_reference = previous


def _record(backend: str) -> str:
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


def _kernels_for(t: torch.Tensor) -> Kernels | None:
    """The kernels if ``t`` lives on CUDA, the reference is not forced and something imported; else None."""
    if t.device.type != "cuda" or _forced_reference():
        return None
    return kernels()


def scan_backend(device: torch.device | str | None = None, arch: str = "mamba") -> str:
    """Which backend a forward on ``device`` would use for the scan ("mamba_ssm" or "torch_reference")."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda" or _forced_reference():
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


# ----------------------------------------------------------------------------------------------------------
# Causal depthwise conv1d
# ----------------------------------------------------------------------------------------------------------
def _depthwise_causal(x_ext: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Valid depthwise conv as W shifted multiply-adds. x_ext (B, C, W-1+L), weight (C, 1, W) -> (B, C, L).

    Why not F.conv1d: torch's FlopCounterMode ignores ``groups`` in the convolution *backward* formula and
    counts a depthwise conv's weight gradient C times over (for d_inner=128 that alone would exceed all the
    matmuls), so a conv op would wreck the FLOP conformance check. Written elementwise, the conv is invisible
    to the counter and its 2*C*W FLOPs per token are added by hand (``uncounted_flops_per_token``). With
    W = 4 it is also as fast as a grouped conv on CPU.
    """
    width = weight.shape[-1]
    length = x_ext.shape[-1] - (width - 1)
    w = weight.squeeze(1).to(x_ext.dtype)  # (C, W)
    y = x_ext[..., 0:length] * w[:, 0:1]
    for k in range(1, width):
        y = y + x_ext[..., k:k + length] * w[:, k:k + 1]
    return y if bias is None else y + bias.to(y.dtype)[:, None]


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool = True) -> torch.Tensor:
    """Causal depthwise conv over the last axis. x (B, C, L), weight (C, 1, W) (nn.Conv1d layout) -> (B, C, L).

    Equals nn.Conv1d(padding=W-1)(x)[..., :L] (mamba-ssm's reference): output t sees inputs t-W+1 .. t.
    """
    k = _kernels_for(x)
    if k is not None and k.causal_conv1d_fn is not None:
        return k.causal_conv1d_fn(x, weight.squeeze(1), bias, activation="silu" if silu else None)
    y = _depthwise_causal(F.pad(x, (weight.shape[-1] - 1, 0)), weight, bias)
    return F.silu(y) if silu else y


def causal_conv1d_with_state(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv continuing from a cache. x (B, C, T), conv_state (B, C, W): the last W raw inputs seen so far.

    Returns (y (B, C, T), new conv_state (B, C, W)). The state holds *pre-conv* inputs, as mamba-ssm's does, so
    the last W-1 of it are exactly the left context the next T outputs need.
    """
    width = weight.shape[-1]
    x_ext = torch.cat([conv_state[..., 1:].to(x.dtype), x], dim=-1)  # (B, C, W-1+T)
    y = _depthwise_causal(x_ext, weight, bias)  # exactly T outputs
    return (F.silu(y) if silu else y), x_ext[..., -width:].to(conv_state.dtype)


def causal_conv1d_step(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step. x (B, C), conv_state (B, C, W) -> (y (B, C), new conv_state).

    Kernel path updates ``conv_state`` in place (and returns it); the reference returns a new tensor.
    """
    k = _kernels_for(x)
    if k is not None and k.causal_conv1d_update is not None and x.dtype == conv_state.dtype:
        conv_state = conv_state.contiguous()  # updated in place by the kernel (a no-op when already contiguous)
        y = k.causal_conv1d_update(x, conv_state, weight.squeeze(1), bias, "silu" if silu else None)
        return y, conv_state
    state = torch.cat([conv_state[..., 1:], x.unsqueeze(-1).to(conv_state.dtype)], dim=-1)  # shift left, append
    y = (state * weight.squeeze(1)).sum(-1).to(x.dtype)  # (B, C)
    if bias is not None:
        y = y + bias
    return (F.silu(y) if silu else y), state


# ----------------------------------------------------------------------------------------------------------
# Mamba-1 selective scan
# ----------------------------------------------------------------------------------------------------------
# Why the reference scan looks the way it does (CPU training speed). The recurrence lives on (L, B, D, N)
# tensors -- d_state times the size of the layer's activations -- so on CPU every elementwise pass over them
# costs about as much as the layer's matmuls, and the number of passes is the cost:
#  * an in-place odd/even scan (``_scan_`` / ``_rscan_``): O(1) passes per element where Hillis-Steele doubling
#    makes O(log chunk), and no padded / shifted copies;
#  * time-major chunks, (Lc, B, D, N): the scan's strided views along time then select whole contiguous
#    (B, D, N) slabs, which stream like contiguous tensors (with time next to N, a view of every 2^k-th step
#    is a gather of 64-byte rows, several times slower per element);
#  * a custom autograd.Function (``_SelectiveScanFn``) with a hand-written backward instead of autograd through
#    the scan (which kept ~2 log2(chunk) chunk-sized tensors per chunk, so the chunks were checkpointed: a
#    second forward plus autograd's backward over the doubling). The forward keeps only the state entering
#    each chunk; the backward recomputes one chunk's states at a time and runs the adjoint recurrence on it;
#  * the (B, D) plane cut into tiles whose chunk buffers stay in L2 (see _TILE_ELEMS), and a few such scratch
#    buffers allocated once per call and reused by every chunk and tile.
# It all stays elementwise (products and sums, never a matmul / einsum), so FlopCounterMode sees none of it and
# MambaConfig.uncounted_flops_per_token adds the scan's FLOPs by hand.


def _scan_(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor | None = None) -> None:
    """In place along dim 0: b_t <- h_t of h_t = a_t * h_{t-1} + b_t, with h_0 = b_0. a, b (n, ...).

    Fold an initial state into b_0 first (b_0 += a_0 * h_init): a_0 is never read. Without ``scratch`` a is
    clobbered at odd positions >= 3; with it (>= n // 2 leading slots of a's shape) a is left intact.

    Odd/even reduction (Brent-Kung style): fold each pair (2j, 2j+1) into its odd position -- a recurrence of
    the same form, half as long, over the odd positions, solved recursively on strided views -- then finish
    each even position from the odd one before it. ~3 elementwise ops on n/2 + n/4 + ... positions: O(n) work
    where Hillis-Steele doubling does O(n log n); log2(n) levels, never a loop over positions. No op writes a
    position it reads (odd vs even slots), so the in-place updates are safe. Only products of decays and sums,
    no division, no exp of a cumulative sum: as stable as the sequential recurrence.
    """
    n = b.shape[0]
    if n < 2:
        return
    k = n // 2
    odd_b = b[1:2 * k:2]  # positions 1, 3, ..., 2k-1
    # pair (2j, 2j+1) composed: h_{2j+1} = (a_{2j+1} a_{2j}) h_{2j-1} + (a_{2j+1} b_{2j} + b_{2j+1})
    odd_b.addcmul_(a[1:2 * k:2], b[0:2 * k:2])
    if k > 1:
        if scratch is None:
            odd_a = a[1:2 * k:2]
            odd_a[1:].mul_(a[2:2 * k - 1:2])
        else:  # the same products, written to scratch (its slot 0, the pair j = 0's decay, is never read)
            odd_a = scratch[:k]
            torch.mul(a[3:2 * k:2], a[2:2 * k - 1:2], out=odd_a[1:])
        _scan_(odd_a, odd_b)  # odd positions now hold their final h
    if n > 2:
        b[2::2].addcmul_(a[2::2], b[1:n - 1:2])  # h_{2j} = a_{2j} h_{2j-1} + b_{2j}


def _rscan_(m: torch.Tensor, g: torch.Tensor) -> None:
    """In place along dim 0, backward in time: g_t <- G_t = m_t * G_{t+1} + g_t, with G_{n-1} = g_{n-1}.

    m (n-1, ...), g (n, ...): m_t carries G_{t+1} back to t (for the scan's adjoint, m_t = a_{t+1}). The mirror
    image of ``_scan_``, pairs (t, t+1) taken from the end; m is clobbered.
    """
    n = g.shape[0]
    if n < 2:
        return
    k = n // 2
    s = n - 2 * k  # 1 when n is odd: position 0 is left unpaired
    lo_g = g[s:n - 1:2]  # positions s, s+2, ..., n-2: each pair's first
    lo_g.addcmul_(m[s:n - 1:2], g[s + 1::2])  # G_t = (m_t g_{t+1} + g_t) + (m_t m_{t+1}) G_{t+2}
    if k > 1:
        m_lo = m[s:n - 3:2]
        m_lo.mul_(m[s + 1:n - 2:2])  # the pair's carry from G_{t+2} (the last pair has none)
        _rscan_(m_lo, lo_g)  # pairs' first positions now hold their final G
    if n > 2:
        g[s + 1:n - 2:2].addcmul_(m[s + 1:n - 2:2], g[s + 2:n - 1:2])  # the pairs' second positions
    if s:
        g[0].addcmul_(m[0], g[1])


def _chunk_states_(a, h, delta, du, A, Bt, h0, scratch=None) -> None:
    """a <- exp(delta A), h <- the chunk's states (a is clobbered unless ``scratch`` is given, see ``_scan_``).

    a, h (Lc, B, D, N) buffers; delta, du (Lc, B, D); A (D, N); Bt (Lc, B, N); h0 (B, D, N) the entering state.
    """
    torch.mul(delta[..., None], A, out=a)
    a.exp_()  # discretised A (zero-order hold)
    torch.mul(du[..., None], Bt[:, :, None], out=h)  # Euler-discretised B times u
    h[0].addcmul_(a[0], h0)  # fold the entering state into the first step
    _scan_(a, h, scratch)


def _scan_chunk(delta, du, A, B, C, h0):
    """One chunk. delta, du (B, D, Lc); A (D, N); B, C (B, N, Lc); h0 (B, D, N) -> y (B, D, Lc), h_last (B, D, N).

    Not differentiable (``_SelectiveScanFn`` is the differentiable path).
    """
    length = delta.shape[-1]
    a = delta.new_empty(length, *h0.shape)  # (Lc, B, D, N)
    h = torch.empty_like(a)
    with torch.no_grad():
        _chunk_states_(a, h, delta.permute(2, 0, 1), du.permute(2, 0, 1), A, B.permute(2, 0, 1), h0)
        # y_t = <h_t, C_t>: an elementwise product + sum on purpose (not a matmul) -- the scan's FLOPs are then
        # all invisible to FlopCounterMode and added back by hand (MambaConfig.uncounted_flops_per_token)
        y = torch.mul(h, C.permute(2, 0, 1)[:, :, None], out=a).sum(-1)  # (Lc, B, D)
    return y.permute(1, 2, 0), h[-1].clone()


# Tile size of the scan's scratch buffers, in elements of one (chunk, tile, N) buffer. The scan is bound by
# memory traffic, so its buffers should stay in the per-core L2 cache (2 MiB on the CI machines): the
# (B, D) plane is cut into tiles of whole batch rows (or of channels of one row, for a wide D) whose chunk
# buffers hold about this many elements, and each tile is scanned on its own (the recurrence never mixes
# tiles). 2^18 fp32 = 1 MiB: with two threads each core streams half of each of the backward's 3 buffers.
# Measured on the tiny / small presets: 2^17..2^18 run 15-30% faster than untiled; smaller tiles pay Python /
# dispatch overhead per op instead (every tile is ~100 small ops).
_TILE_ELEMS = 1 << 18


def _tiles(batch: int, dim: int, per_channel: int, device: torch.device) -> list[tuple[slice, slice]]:
    """(batch rows, channels) tiles of the (B, D) plane, each about _TILE_ELEMS / per_channel channels.

    CPU only: elsewhere (CUDA without kernels, meta) one tile, the whole plane -- a GPU has no use for
    L2-sized pieces and would pay a kernel launch per op per tile.
    """
    if device.type != "cpu":
        return [(slice(0, batch), slice(0, dim))]
    channels = max(1, _TILE_ELEMS // max(1, per_channel))
    if channels < dim:  # a row is too big: tiles of channels within a row
        return [(slice(b, b + 1), slice(d, min(d + channels, dim)))
                for b in range(batch) for d in range(0, dim, channels)]
    rows = channels // dim
    return [(slice(b, min(b + rows, batch)), slice(0, dim)) for b in range(0, batch, rows)]


def _buffers(like: torch.Tensor, count: int, chunk: int, tiles, n: int) -> list[torch.Tensor]:
    """``count`` flat scratch buffers, each big enough for the largest (chunk, tile, N) of ``tiles``."""
    numel = max((chunk * (bs.stop - bs.start) * (ds.stop - ds.start) * n for bs, ds in tiles), default=0)
    return [like.new_empty(numel) for _ in range(count)]


def _view(buf: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A contiguous tensor of ``shape`` at the start of a flat scratch buffer."""
    return buf[:math.prod(shape)].view(shape)


def _scan_forward(delta, du, A, Bt, Ct, h0, chunk_size, starts=None):
    """The whole scan, time-major, chunk by chunk and tile by tile. delta, du (L, B, D); A (D, N); Bt, Ct
    (L, B, N) (any strides: each chunk's slice is copied contiguous, ~1/N of the chunk's work); h0 (B, D, N).

    Returns y (L, B, D), h_last (B, D, N). ``starts`` (n_chunks, B, D, N), when given, receives the state
    entering each chunk (all the backward needs to recompute any chunk on its own).
    """
    seqlen = delta.shape[0]
    batch, dim, n = h0.shape
    y = delta.new_empty(seqlen, batch, dim)
    h = h0.clone()  # (B, D, N) the carry, updated tile by tile (tiles are disjoint)
    tiles = _tiles(batch, dim, min(chunk_size, seqlen) * n, delta.device)
    a_buf, h_buf = _buffers(delta, 2, min(chunk_size, seqlen), tiles, n)
    for c, s in enumerate(range(0, seqlen, chunk_size)):
        e = min(s + chunk_size, seqlen)
        if starts is not None:
            starts[c] = h
        delta_c, du_c, Bt_c, Ct_c = (t[s:e].contiguous() for t in (delta, du, Bt, Ct))
        for bs, ds in tiles:
            h_t = h[bs, ds]  # (b, d, N)
            shape = (e - s, *h_t.shape)  # (Lc, b, d, N)
            a, hs = _view(a_buf, shape), _view(h_buf, shape)
            _chunk_states_(a, hs, delta_c[:, bs, ds], du_c[:, bs, ds], A[ds], Bt_c[:, bs], h_t)
            h_t.copy_(hs[-1])
            # y_t = <h_t, C_t>: an elementwise product + sum on purpose (not a matmul) -- the scan's FLOPs are
            # then all invisible to FlopCounterMode and added back by hand (MambaConfig.uncounted_flops_per_token)
            torch.sum(torch.mul(hs, Ct_c[:, bs, None], out=a), -1, out=y[s:e, bs, ds])
    return y, h


def _sum_into(x: torch.Tensor, dim: int, out: torch.Tensor, overwrite: bool) -> None:
    """out = x.sum(dim) when a tile covers every channel, else out += (other tiles add their channels)."""
    if overwrite:
        torch.sum(x, dim, out=out)
    else:
        out += x.sum(dim)


class _SelectiveScanFn(torch.autograd.Function):
    """h_t = exp(delta_t A) h_{t-1} + du_t B_t, y_t = <h_t, C_t>, time-major, with a hand-written backward.

    Inputs delta, du (L, B, D); A (D, N); Bt, Ct (L, B, N) -- time-major views of the caller's (B, D, L) and
    (B, N, L) tensors, saved as they are (no copies: autograd holds them anyway); h0 (B, D, N); chunk_size.
    Outputs y (L, B, D) and h_last (B, D, N). Besides the inputs only the state entering each chunk is saved,
    (n_chunks, B, D, N) -- nothing of size (L, B, D, N); the backward materialises one chunk of one tile at a
    time, 3 x (chunk, tile, N).

    Backward, chunk by chunk from the last (a_t = exp(delta_t A); h_{-1} the state entering the chunk):
        g_t  = dL/dh_t = dy_t C_t + a_{t+1} g_{t+1}     the adjoint recurrence: the scan run backward in time;
                                                          at the chunk's last step a_{t+1} g_{t+1} is the carry
                                                          from the next chunk (dL/dh_last for the last one)
        dC_t = sum_d dy_t h_t        d(du)_t = sum_n g_t B_t        dB_t = sum_d g_t du_t
        w_t  = g_t a_t h_{t-1} = dL/d(delta_t A):   d(delta)_t = sum_n w_t A      dA = sum_{t,b} w_t delta_t
        dh0  = a_0 g_0 of the first chunk.
    """

    @staticmethod
    def forward(ctx, delta, du, A, Bt, Ct, h0, chunk_size):
        A = A.contiguous()
        n_chunks = -(-delta.shape[0] // chunk_size)
        starts = delta.new_empty(n_chunks, *h0.shape)  # state entering each chunk
        y, h_last = _scan_forward(delta, du, A, Bt, Ct, h0, chunk_size, starts=starts)
        ctx.save_for_backward(delta, du, A, Bt, Ct, starts)
        ctx.chunk_size = chunk_size
        return y, h_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dh_last):
        delta, du, A, Bt, Ct, starts = ctx.saved_tensors
        chunk_size, seqlen = ctx.chunk_size, delta.shape[0]
        batch, dim, n = starts.shape[1:]
        d_delta, d_du = delta.new_empty(delta.shape), du.new_empty(du.shape)  # (L, B, D), contiguous
        dBt, dCt = Bt.new_empty(Bt.shape), Ct.new_empty(Ct.shape)  # (L, B, N)
        dA = torch.zeros_like(A)
        g_carry = dh_last.clone()  # (B, D, N) dL/dh at the end of the chunk being processed, from what follows
        tiles = _tiles(batch, dim, min(chunk_size, seqlen) * n, delta.device)
        whole_rows = all(ds.stop - ds.start == dim for _, ds in tiles)  # else dB, dC sum over several tiles
        if not whole_rows:
            dBt.zero_()
            dCt.zero_()
        bufs = _buffers(delta, 3, min(chunk_size, seqlen), tiles, n)
        for c in reversed(range(starts.shape[0])):
            s, e = c * chunk_size, min((c + 1) * chunk_size, seqlen)
            delta_c, du_c, dy_c, Bt_c, Ct_c = (t[s:e].contiguous() for t in (delta, du, dy, Bt, Ct))
            for bs, ds in tiles:
                h_in = starts[c, bs, ds]  # (b, d, N)
                shape = (e - s, *h_in.shape)  # (Lc, b, d, N)
                a, h, w = (_view(buf, shape) for buf in bufs)
                delta_t, du_t, dy_t = delta_c[:, bs, ds, None], du_c[:, bs, ds, None], dy_c[:, bs, ds, None]
                Bt_t, Ct_t, A_t = Bt_c[:, bs, None], Ct_c[:, bs, None], A[ds]  # (Lc, b, 1, N), (d, N)
                # recompute the chunk: a = exp(delta A) (kept intact, the scan works in w), h = its states
                _chunk_states_(a, h, delta_t[..., 0], du_t[..., 0], A_t, Bt_t[:, :, 0], h_in, scratch=w)
                # w_t = a_t h_{t-1}, the decayed previous state (while h still holds the states)
                torch.mul(a[1:], h[:-1], out=w[1:])
                torch.mul(a[0], h_in, out=w[0])
                _sum_into(h.mul_(dy_t), 2, dCt[s:e, bs], whole_rows)  # dC_t = sum_d dy_t h_t
                # the adjoint recurrence in h's buffer: g_t = dy_t C_t (+ the carry at the last step) + a_{t+1} g_{t+1}
                g = torch.mul(dy_t, Ct_t, out=h)
                g_t = g_carry[bs, ds]
                g[-1].add_(g_t)
                _rscan_(a[1:], g)  # clobbers a_1.. (a_0 is still needed, for the carry)
                torch.mul(a[0], g[0], out=g_t)  # dL/dh entering this chunk = dL/dh_last of the chunk before
                torch.sum(torch.mul(g, Bt_t, out=a), -1, out=d_du[s:e, bs, ds])  # d(du)_t = sum_n g_t B_t
                _sum_into(torch.mul(g, du_t, out=a), 2, dBt[s:e, bs], whole_rows)  # dB_t = sum_d g_t du_t
                w.mul_(g)  # dL/d(delta_t A)
                torch.sum(torch.mul(w, A_t, out=a), -1, out=d_delta[s:e, bs, ds])
                dA[ds] += torch.mul(w, delta_t, out=a).sum((0, 1))
        return d_delta, d_du, dA, dBt, dCt, (g_carry if ctx.needs_input_grad[5] else None), None


def _step_size(dt: torch.Tensor, bias: torch.Tensor | None, softplus: bool) -> torch.Tensor:
    """The discretisation step in fp32: dt (+ bias, already shaped to broadcast), through softplus when asked.
    One definition for every scan and decode path, reference and kernel-free alike."""
    dt = dt.float()
    if bias is not None:
        dt = dt + bias.float()
    return F.softplus(dt) if softplus else dt


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_last_state: bool = False,
    chunk_size: int = 64,
):
    """Chunked parallel selective scan (same contract as mamba-ssm's ``selective_scan_fn``, plus ``initial_state``).

    u, delta, z: (B, D, L); A: (D, N); B, C: (B, N, L) (input-dependent, one group); D, delta_bias: (D,).
        h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        h: (B, D, N), fp32
        y_t = <h_t, C_t> + D * u_t;  y *= silu(z)
    The sequence is cut into chunks of ``chunk_size``: inside a chunk the recurrence is a log-depth scan,
    across chunks the last state is carried. Only (chunk, B, D, N) is ever materialised, never (L, B, D, N);
    under autograd what is kept for backward is the inputs and the state entering each chunk (L/chunk, B, D, N).
    Returns y (B, D, L) in u's dtype [, last state (B, D, N) fp32].
    """
    dtype_in = u.dtype
    u, B, C = u.float(), B.float(), C.float()
    A = A.float()
    delta = _step_size(delta, None if delta_bias is None else delta_bias[:, None], delta_softplus)
    batch, dim, seqlen = u.shape
    h = (
        initial_state.float()
        if initial_state is not None
        else u.new_zeros(batch, dim, A.shape[-1])
    )  # (B, D, N)
    du = delta * u  # (B, D, L)
    # time-major for the scan (see above): (L, B, D) and (L, B, N) views, copied contiguous a chunk at a time
    scan_in = (delta.permute(2, 0, 1), du.permute(2, 0, 1), A, B.permute(2, 0, 1), C.permute(2, 0, 1), h)
    chunk_size = max(1, min(chunk_size, seqlen))
    if torch.is_grad_enabled() and any(t.requires_grad for t in scan_in):
        y, h = _SelectiveScanFn.apply(*scan_in, chunk_size)
    else:
        y, h = _scan_forward(*scan_in, chunk_size)
    y = y.permute(1, 2, 0)  # (B, D, L)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
    return_last_state=False, chunk_size: int = 64,
):
    """Dispatch: mamba-ssm's CUDA kernel when usable (it has no initial-state input), else the reference."""
    k = _kernels_for(u)
    if k is not None and k.selective_scan_fn is not None and initial_state is None:
        _record(MAMBA_SSM)
        out = k.selective_scan_fn(
            u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
            return_last_state=return_last_state,
        )
        if return_last_state:
            y, last = out
            return y, last.float()
        return out
    _record(REFERENCE)
    return selective_scan_ref(
        u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        initial_state=initial_state, return_last_state=return_last_state, chunk_size=chunk_size,
    )


def selective_state_step(
    state: torch.Tensor, x, dt, A, B, C, D, z=None, dt_bias=None, dt_softplus: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of the Mamba-1 recurrence. state (B, D, N) fp32; x, dt, z: (B, D); B, C: (B, N).

    Returns (y (B, D) in x's dtype, new state). The kernel updates ``state`` in place.
    """
    k = _kernels_for(x)
    if k is not None and k.selective_state_update is not None:
        _record(MAMBA_SSM)
        state = state.contiguous()  # the kernel updates it in place (a scan's last state may be a strided view)
        y = k.selective_state_update(state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
        return y, state
    _record(REFERENCE)
    dt = _step_size(dt, dt_bias, dt_softplus)
    xf = x.float()
    dA = torch.exp(dt[..., None] * A.float())  # (B, D, N)
    new_state = state.float() * dA + (dt * xf)[..., None] * B.float()[:, None, :]
    y = (new_state * C.float()[:, None, :]).sum(-1)  # (B, D)
    if D is not None:
        y = y + D.float() * xf
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype), new_state


# ----------------------------------------------------------------------------------------------------------
# Mamba-2 SSD (state space duality), chunked
# ----------------------------------------------------------------------------------------------------------
def segsum(a: torch.Tensor) -> torch.Tensor:
    """a (..., Q) -> (..., Q, Q) with out[i, j] = a[j+1] + ... + a[i] for i >= j and -inf above the diagonal.

    Built as a masked cumsum rather than cumsum(a)[i] - cumsum(a)[j]: the difference of two large negative
    prefix sums loses precision, the masked cumsum only ever adds the terms inside the segment.
    """
    q = a.shape[-1]
    ones = torch.ones(q, q, dtype=torch.bool, device=a.device)
    terms = a.unsqueeze(-1).expand(*a.shape, q)  # [k, j] = a[k]
    terms = terms.masked_fill(~torch.tril(ones, diagonal=-1), 0.0)  # keep k > j
    out = terms.cumsum(dim=-2)  # [i, j] = sum_{j < k <= i} a[k]
    return out.masked_fill(~torch.tril(ones), float("-inf"))


def ssd_chunk_size(seqlen: int, chunk_size: int) -> int:
    """The chunk length the reference actually uses: the whole sequence when it is shorter than a chunk."""
    return max(1, min(chunk_size, seqlen))


def ssd_chunked_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
):
    """Chunked SSD (the algorithm of the Mamba-2 paper's listing 1), same contract as mamba-ssm's
    ``mamba_chunk_scan_combined``. x (b, l, h, p); dt (b, l, h); A (h,); B, C (b, l, g, n); D (h,);
    initial_states (b, h, p, n). Returns y (b, l, h, p) in x's dtype [, final state (b, h, p, n) fp32].

    Recurrence being computed (per head, scalar decay):  S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T,
    y_t = S_t C_t + D x_t. Per chunk of Q tokens it splits into
      1. intra-chunk ("diagonal block", quadratic like attention):  Y_diag = (C B^T o L) (dt x)
      2. chunk states (what each chunk adds to the state):           S_c = (B o decay_to_end)^T (dt x)
      3. inter-chunk recurrence (Python loop over chunks, L/Q steps, elementwise)
      4. state -> output:                                            Y_off = (C S_{c-1}) o decay_from_start
    Every contraction is an explicit ``torch.matmul`` so FlopCounterMode sees exactly the FLOPs that
    Mamba2Config.flops_per_token counts for them.
    The tail is zero-padded to a whole chunk: padded steps have dt = 0 (decay 1, input 0), so they leave the
    state unchanged and the final state stays exact.
    """
    dtype_in = x.dtype
    b, seqlen, h, p = x.shape
    g, n = B.shape[-2], B.shape[-1]
    hg = h // g  # heads per group (B and C are shared by a group's heads)
    x, B, C = x.float(), B.float(), C.float()
    dt = _step_size(dt, dt_bias, dt_softplus)
    q = ssd_chunk_size(seqlen, chunk_size)
    nc = -(-seqlen // q)  # number of chunks
    pad = nc * q - seqlen
    xd = x * dt[..., None]  # (b, l, h, p)  dt-discretised input
    Ad = dt * A.float()  # (b, l, h)      log of the per-step decay (<= 0)
    if pad:
        xd, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xd, B, C))
        Ad = F.pad(Ad, (0, 0, 0, pad))

    # chunked, heads split into (group, head-in-group):  X (b, c, g, hg, q, p);  B, C (b, c, g, 1, q, n)
    X = xd.view(b, nc, q, g, hg, p).permute(0, 1, 3, 4, 2, 5)
    Bc = B.view(b, nc, q, g, n).permute(0, 1, 3, 2, 4).unsqueeze(3)
    Cc = C.view(b, nc, q, g, n).permute(0, 1, 3, 2, 4).unsqueeze(3)
    Ac = Ad.view(b, nc, q, g, hg).permute(0, 1, 3, 4, 2)  # (b, c, g, hg, q)
    A_cum = Ac.cumsum(-1)  # (b, c, g, hg, q)

    # 1. intra-chunk: scores C_i . B_j per group (shared by its heads), masked by the decay from j to i
    CB = torch.matmul(Cc, Bc.transpose(-1, -2))  # (b, c, g, 1, q, q)
    Lmask = torch.exp(segsum(Ac))  # (b, c, g, hg, q, q); exp(-inf) = 0 above the diagonal
    Y = torch.matmul(CB * Lmask, X)  # (b, c, g, hg, q, p)

    if initial_states is not None:  # (b, h, p, n) -> (b, g, hg, n, p)
        carry = initial_states.float().view(b, g, hg, p, n).transpose(-1, -2)
    else:
        carry = x.new_zeros(b, g, hg, n, p)
    if nc > 1 or return_final_states:
        # 2. each chunk's own contribution to the state at its end
        decay_to_end = torch.exp(A_cum[..., -1:] - A_cum)  # (b, c, g, hg, q)
        states = torch.matmul((Bc * decay_to_end[..., None]).transpose(-1, -2), X)  # (b, c, g, hg, n, p)
        # 3. carry states across chunks: S_end(c) = exp(sum A over c) * S_end(c-1) + states[c]
        chunk_decay = torch.exp(A_cum[..., -1])  # (b, c, g, hg)
        prev = []  # state entering each chunk
        for c in range(nc):
            prev.append(carry)
            carry = chunk_decay[:, c, ..., None, None] * carry + states[:, c]
        prev_states = torch.stack(prev, dim=1)  # (b, c, g, hg, n, p)
    else:  # one chunk and no final state wanted (training forward): steps 2-3 are dead work, skipped
        prev_states = carry[:, None]

    # 4. the entering state's contribution to every position of the chunk (nothing enters a lone first chunk)
    if nc > 1 or initial_states is not None:
        Y = Y + torch.matmul(Cc, prev_states) * torch.exp(A_cum)[..., None]  # (b, c, g, hg, q, p)

    y = Y.permute(0, 1, 4, 2, 3, 5).reshape(b, nc * q, h, p)[:, :seqlen]  # (b, l, h, p)
    if D is not None:
        y = y + x * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype_in)
    if return_final_states:
        final = carry.transpose(-1, -2).reshape(b, h, p, n)  # (b, h, p, n)
        return y, final
    return y


def ssd_scan(
    x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False, initial_states=None,
    return_final_states=False,
):
    """Dispatch: mamba-ssm's Triton ``mamba_chunk_scan_combined`` on CUDA when usable, else the reference."""
    k = _kernels_for(x)
    if k is not None and k.mamba_chunk_scan_combined is not None:
        _record(MAMBA_SSM)
        out = k.mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
            dt_softplus=dt_softplus, return_final_states=return_final_states,
        )
        if return_final_states:
            y, final = out[0], out[1]
            return y, final.float()
        return out
    _record(REFERENCE)
    return ssd_chunked_ref(
        x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
        initial_states=initial_states, return_final_states=return_final_states,
    )


def ssd_state_step(
    state: torch.Tensor, x, dt, A, B, C, D, dt_bias=None, dt_softplus: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of the Mamba-2 recurrence. state (b, h, p, n) fp32; x (b, h, p); dt (b, h);
    A, D, dt_bias (h,); B, C (b, g, n). Returns (y (b, h, p) in x's dtype, new state); kernel: in place."""
    h, p, n = state.shape[1], state.shape[2], state.shape[3]
    g = B.shape[1]
    k = _kernels_for(x)
    if k is not None and k.selective_state_update is not None:
        _record(MAMBA_SSM)
        state = state.contiguous()  # updated in place by the kernel
        # the Triton kernel takes per-(head, channel) parameters: broadcast the per-head scalars (as mamba-ssm)
        y = k.selective_state_update(
            state, x, dt[..., None].expand(-1, -1, p), A.float()[:, None, None].expand(h, p, n), B, C,
            D[:, None].expand(h, p), z=None, dt_bias=None if dt_bias is None else dt_bias[:, None].expand(h, p),
            dt_softplus=dt_softplus,
        )
        return y, state
    _record(REFERENCE)
    dt = _step_size(dt, dt_bias, dt_softplus)
    xf = x.float()
    Bh = B.float().repeat_interleave(h // g, dim=1)  # (b, h, n)
    Ch = C.float().repeat_interleave(h // g, dim=1)
    dA = torch.exp(dt * A.float())  # (b, h)
    new_state = state.float() * dA[..., None, None] + (dt[..., None] * xf)[..., None] * Bh[:, :, None, :]
    y = (new_state * Ch[:, :, None, :]).sum(-1) + D.float()[:, None] * xf  # (b, h, p)
    return y.to(x.dtype), new_state


__all__ = [
    "REFERENCE", "MAMBA_SSM", "use_reference", "last_backend", "scan_backend", "kernel_status", "kernels",
    "causal_conv1d", "causal_conv1d_with_state", "causal_conv1d_step",
    "selective_scan_ref", "selective_scan", "selective_state_step",
    "segsum", "ssd_chunk_size", "ssd_chunked_ref", "ssd_scan", "ssd_state_step",
]
