"""Mamba-1 selective scan: mamba-ssm's ``selective_scan_fn`` / ``selective_state_update`` (CUDA / Triton) when
:func:`models.ops.dispatch.kernels_for` offers them, else a pure-PyTorch chunked parallel scan.

Layouts follow mamba-ssm so that its kernels are drop-in:
  u, delta, z: (B, D, L);  A: (D, N);  B, C: (B, N, L);  D, delta_bias: (D,);  state (B, D, N), fp32

  selective_scan        dispatch: kernel (no initial state) or selective_scan_ref
  selective_scan_ref    the reference: chunks, an in-place odd/even scan inside each, a hand-written backward
  selective_state_step  one decode step of the recurrence (kernel: in place)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.ops import dispatch
from models.ops.discretize import step_size

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
    delta = step_size(delta, None if delta_bias is None else delta_bias[:, None], delta_softplus)
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
    k = dispatch.kernels_for(u)
    if k is not None and k.selective_scan_fn is not None and initial_state is None:
        dispatch.record(dispatch.MAMBA_SSM)
        out = k.selective_scan_fn(
            u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
            return_last_state=return_last_state,
        )
        if return_last_state:
            y, last = out
            return y, last.float()
        return out
    dispatch.record(dispatch.REFERENCE)
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
    k = dispatch.kernels_for(x)
    if k is not None and k.selective_state_update is not None:
        dispatch.record(dispatch.MAMBA_SSM)
        state = state.contiguous()  # the kernel updates it in place (a scan's last state may be a strided view)
        y = k.selective_state_update(state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
        return y, state
    dispatch.record(dispatch.REFERENCE)
    dt = step_size(dt, dt_bias, dt_softplus)
    xf = x.float()
    dA = torch.exp(dt[..., None] * A.float())  # (B, D, N)
    new_state = state.float() * dA + (dt * xf)[..., None] * B.float()[:, None, :]
    y = (new_state * C.float()[:, None, :]).sum(-1)  # (B, D)
    if D is not None:
        y = y + D.float() * xf
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype), new_state


__all__ = ["selective_scan_ref", "selective_scan", "selective_state_step"]
