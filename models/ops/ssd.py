"""Mamba-2 SSD (state space duality), chunked: mamba-ssm's Triton ``mamba_chunk_scan_combined`` /
``selective_state_update`` when :func:`models.ops.dispatch.kernels_for` offers them, else pure PyTorch.

Layouts follow mamba-ssm so that its kernels are drop-in:
  x: (B, L, H, P);  dt: (B, L, H);  A: (H,);  B, C: (B, L, G, N);  D: (H,);  state (B, H, P, N), fp32

  ssd_scan         dispatch: kernel or ssd_chunked_ref
  ssd_chunked_ref  the reference: the Mamba-2 paper's chunked algorithm, every contraction a torch.matmul
  ssd_chunk_size   the chunk length the reference really uses (the FLOP count needs it)
  segsum           the stable segment sums behind the intra-chunk decay mask
  ssd_state_step   one decode step of the recurrence (kernel: in place)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.ops import dispatch
from models.ops.discretize import step_size


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
    dt = step_size(dt, dt_bias, dt_softplus)
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
    k = dispatch.kernels_for(x)
    if k is not None and k.mamba_chunk_scan_combined is not None:
        dispatch.record(dispatch.MAMBA_SSM)
        out = k.mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
            dt_softplus=dt_softplus, return_final_states=return_final_states,
        )
        if return_final_states:
            y, final = out[0], out[1]
            return y, final.float()
        return out
    dispatch.record(dispatch.REFERENCE)
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
    k = dispatch.kernels_for(x)
    if k is not None and k.selective_state_update is not None:
        dispatch.record(dispatch.MAMBA_SSM)
        state = state.contiguous()  # updated in place by the kernel
        # the Triton kernel takes per-(head, channel) parameters: broadcast the per-head scalars (as mamba-ssm)
        y = k.selective_state_update(
            state, x, dt[..., None].expand(-1, -1, p), A.float()[:, None, None].expand(h, p, n), B, C,
            D[:, None].expand(h, p), z=None, dt_bias=None if dt_bias is None else dt_bias[:, None].expand(h, p),
            dt_softplus=dt_softplus,
        )
        return y, state
    dispatch.record(dispatch.REFERENCE)
    dt = step_size(dt, dt_bias, dt_softplus)
    xf = x.float()
    Bh = B.float().repeat_interleave(h // g, dim=1)  # (b, h, n)
    Ch = C.float().repeat_interleave(h // g, dim=1)
    dA = torch.exp(dt * A.float())  # (b, h)
    new_state = state.float() * dA[..., None, None] + (dt[..., None] * xf)[..., None] * Bh[:, :, None, :]
    y = (new_state * Ch[:, :, None, :]).sum(-1) + D.float()[:, None] * xf  # (b, h, p)
    return y.to(x.dtype), new_state


__all__ = ["segsum", "ssd_chunk_size", "ssd_chunked_ref", "ssd_scan", "ssd_state_step"]
