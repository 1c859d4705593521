"""Fused Pattention for ``l2_norm_gelu`` in Triton: y = GELU(sqrt(N) * s / ||s||) V with s = x K^T, forward and
backward, flash-attention style -- score tiles live in registers / shared memory, no (M, N) tensor reaches HBM.

Shapes: x (M, D), K (N, D), V (N, E), y (M, E); M = all leading dims of x flattened, N parameter tokens.

Forward, two kernels:
    _norm_kernel   r = ||x K^T|| per row, a first pass over score tiles (M,) fp32. A pass over tiles rather
                   than x (K^T K) x^T with the D x D Gram matrix: the Gram form cancels catastrophically
                   when ||s|| << ||x|| ||K|| (growth's zero keys, near-orthogonal x), the tile pass is as exact
                   as the reference's norm
    _fwd_kernel    per (row block, E block): loop over N tiles, s tile -> GELU(s c) -> dot with the V tile
Saved for backward: x, K, V and r -- O(M) beside the inputs.

Backward, with c = sqrt(N) / max(r, eps), u = c s, gw = gy V^T, gu = gw GELU'(u) and the row scalar
a = <gu, s>: gs = c (gu - [r >= eps] a s / r^2) (torch's clamp_min passes the gradient at r >= eps; a clamped,
all-zero row has c constant). Four kernels, each recomputing the s and gw tiles it needs:
    _rowdot_kernel a (M,) fp32
    _dx_kernel     gx = gs K          per (row block, D block)
    _dk_kernel     gK = gs^T x        per (N block, D block), looping over all rows
    _dv_kernel     gV = w^T gy        per (N block, E block), looping over all rows
Every tl.dot accumulates in fp32 (IEEE, not tf32, for fp32 inputs: see _dot); tiles are cast to the input dtype before a
dot as the reference casts w and gs. GELU is the exact erf form, as the official code.

Numerics against the reference: fp32 equal to rounding (summation order, ~1e-6 relative); bf16 / fp16 not
bitwise the reference's (which rounds s and gw to the half dtype between its matmuls and its fp32
normalization; the kernel keeps them fp32 on chip) but of the same order of error against float64 (measured in
the interpreter: within 2-3x the reference's own bf16 error, ~1e-2 relative per row at most).
Not tuned: block sizes are fixed defaults and the D / E blocking recomputes score tiles once per block.
Tested on CPU with the interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

EPS = 1e-6  # the reference's norm clamp (models.pattention.EPS)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def available() -> bool:
    return True  # importing this module imported triton


def supports(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, normalization: str) -> bool:
    """Shapes and dtypes the kernels handle (any sizes: tiles are masked). The device is the caller's choice."""
    return (normalization == "l2_norm_gelu" and x.dtype in DTYPES and keys.dtype in DTYPES and values.dtype in DTYPES
            and keys.dim() == 2 and values.dim() == 2 and x.shape[-1] == keys.shape[1] and keys.shape[0] == values.shape[0]
            and x.device == keys.device == values.device)


@triton.jit
def _gelu(u):
    return 0.5 * u * (1.0 + tl.erf(u * 0.7071067811865476))


@triton.jit
def _gelu_grad(u):  # Phi(u) + u phi(u)
    return 0.5 * (1.0 + tl.erf(u * 0.7071067811865476)) + u * tl.exp(-0.5 * u * u) * 0.3989422804014327


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b in fp32. PREC 0: native (bf16 / fp16 tensor cores); 1: IEEE fp32 (fp32 inputs: no tf32);
    2: half inputs upcast to fp32 first -- the same exact products and fp32 sums as 0, for the interpreter,
    whose dot on bf16 tiles is wrong (numpy sees raw 16-bit words)."""
    if PREC == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif PREC == 1:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _tile_dot_t(a_ptr, b_ptr, offs_m, offs_n, M, N, K, stride_a, stride_b,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """a[offs_m, :] @ b[offs_n, :]^T over the shared last dim K, in chunks of BK: (BM, BN) fp32.
    s = x K^T (K = D) and gw = gy V^T (K = E) are both this."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        at = tl.load(a_ptr + offs_m[:, None] * stride_a + offs_k[None, :],
                     mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)           # (BM, BK)
        bt = tl.load(b_ptr + offs_n[:, None] * stride_b + offs_k[None, :],
                     mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)           # (BN, BK)
        acc = _dot(at, tl.trans(bt), acc, PREC)
    return acc


@triton.jit
def _grad_tile(s, gw, r, a, root, eps):
    """(gs, w) of one tile from the scores s, dL/dw gw (BM, BN) and the row norm r, row scalar a (BM,)."""
    c = root / tl.maximum(r, eps)                                                            # (BM,)
    u = s * c[:, None]
    w = _gelu(u)
    gu = gw * _gelu_grad(u)
    coef = tl.where(r >= eps, a / tl.maximum(r * r, eps * eps), 0.0)                          # (BM,)
    gs = c[:, None] * (gu - coef[:, None] * s)
    return gs, w


@triton.jit
def _norm_kernel(x_ptr, k_ptr, r_ptr, M, N, D, stride_xm, stride_kn,
                 BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    sq = tl.zeros((BM,), dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        s = _tile_dot_t(x_ptr, k_ptr, offs_m, offs_n, M, N, D, stride_xm, stride_kn, BM, BN, BD, PREC)
        sq += tl.sum(s * s, axis=1)  # padded columns / rows are zero scores: they add nothing
    tl.store(r_ptr + offs_m, tl.sqrt(sq), mask=offs_m < M)


@triton.jit
def _fwd_kernel(x_ptr, k_ptr, v_ptr, r_ptr, y_ptr, M, N, D, E, stride_xm, stride_kn, stride_vn, stride_ym, root, eps,
                BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, PREC: tl.constexpr):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_e = tl.program_id(1) * BE + tl.arange(0, BE)
    r = tl.load(r_ptr + offs_m, mask=offs_m < M, other=1.0)
    c = root / tl.maximum(r, eps)                                                            # (BM,)
    acc = tl.zeros((BM, BE), dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        s = _tile_dot_t(x_ptr, k_ptr, offs_m, offs_n, M, N, D, stride_xm, stride_kn, BM, BN, BD, PREC)
        w = _gelu(s * c[:, None])                                                           # (BM, BN); GELU(0) = 0 pads
        vt = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_e[None, :],
                     mask=(offs_n[:, None] < N) & (offs_e[None, :] < E), other=0.0)          # (BN, BE)
        acc = _dot(w.to(vt.dtype), vt, acc, PREC)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_e[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_e[None, :] < E))


@triton.jit
def _rowdot_kernel(x_ptr, k_ptr, v_ptr, gy_ptr, r_ptr, a_ptr, M, N, D, E, stride_xm, stride_kn, stride_vn, stride_gm,
                   root, eps, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, PREC: tl.constexpr):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    r = tl.load(r_ptr + offs_m, mask=offs_m < M, other=1.0)
    c = root / tl.maximum(r, eps)
    a = tl.zeros((BM,), dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        s = _tile_dot_t(x_ptr, k_ptr, offs_m, offs_n, M, N, D, stride_xm, stride_kn, BM, BN, BD, PREC)
        gw = _tile_dot_t(gy_ptr, v_ptr, offs_m, offs_n, M, N, E, stride_gm, stride_vn, BM, BN, BE, PREC)
        gu = gw * _gelu_grad(s * c[:, None])
        a += tl.sum(gu * s, axis=1)
    tl.store(a_ptr + offs_m, a, mask=offs_m < M)


@triton.jit
def _dx_kernel(x_ptr, k_ptr, v_ptr, gy_ptr, r_ptr, a_ptr, gx_ptr, M, N, D, E,
               stride_xm, stride_kn, stride_vn, stride_gm, stride_gxm, root, eps,
               BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, PREC: tl.constexpr):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    r = tl.load(r_ptr + offs_m, mask=offs_m < M, other=1.0)
    a = tl.load(a_ptr + offs_m, mask=offs_m < M, other=0.0)
    acc = tl.zeros((BM, BD), dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        s = _tile_dot_t(x_ptr, k_ptr, offs_m, offs_n, M, N, D, stride_xm, stride_kn, BM, BN, BD, PREC)
        gw = _tile_dot_t(gy_ptr, v_ptr, offs_m, offs_n, M, N, E, stride_gm, stride_vn, BM, BN, BE, PREC)
        gs, w = _grad_tile(s, gw, r, a, root, eps)
        kt = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :],
                     mask=(offs_n[:, None] < N) & (offs_d[None, :] < D), other=0.0)          # (BN, BD)
        acc = _dot(gs.to(kt.dtype), kt, acc, PREC)
    tl.store(gx_ptr + offs_m[:, None] * stride_gxm + offs_d[None, :], acc.to(gx_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_d[None, :] < D))


@triton.jit
def _dk_kernel(x_ptr, k_ptr, v_ptr, gy_ptr, r_ptr, a_ptr, gk_ptr, M, N, D, E,
               stride_xm, stride_kn, stride_vn, stride_gm, stride_gkn, root, eps,
               BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, PREC: tl.constexpr):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    acc = tl.zeros((BN, BD), dtype=tl.float32)
    for m0 in range(0, M, BM):
        offs_m = m0 + tl.arange(0, BM)
        r = tl.load(r_ptr + offs_m, mask=offs_m < M, other=1.0)
        a = tl.load(a_ptr + offs_m, mask=offs_m < M, other=0.0)
        s = _tile_dot_t(x_ptr, k_ptr, offs_m, offs_n, M, N, D, stride_xm, stride_kn, BM, BN, BD, PREC)
        gw = _tile_dot_t(gy_ptr, v_ptr, offs_m, offs_n, M, N, E, stride_gm, stride_vn, BM, BN, BE, PREC)
        gs, w = _grad_tile(s, gw, r, a, root, eps)                                          # padded rows: gw = 0
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_d[None, :],
                     mask=(offs_m[:, None] < M) & (offs_d[None, :] < D), other=0.0)          # (BM, BD)
        acc = _dot(tl.trans(gs.to(xt.dtype)), xt, acc, PREC)
    tl.store(gk_ptr + offs_n[:, None] * stride_gkn + offs_d[None, :], acc, mask=(offs_n[:, None] < N) & (offs_d[None, :] < D))


@triton.jit
def _dv_kernel(x_ptr, k_ptr, gy_ptr, r_ptr, gv_ptr, M, N, D, E, stride_xm, stride_kn, stride_gm, stride_gvn, root, eps,
               BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, PREC: tl.constexpr):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_e = tl.program_id(1) * BE + tl.arange(0, BE)
    acc = tl.zeros((BN, BE), dtype=tl.float32)
    for m0 in range(0, M, BM):
        offs_m = m0 + tl.arange(0, BM)
        r = tl.load(r_ptr + offs_m, mask=offs_m < M, other=1.0)
        c = root / tl.maximum(r, eps)
        s = _tile_dot_t(x_ptr, k_ptr, offs_m, offs_n, M, N, D, stride_xm, stride_kn, BM, BN, BD, PREC)
        w = _gelu(s * c[:, None])
        gyt = tl.load(gy_ptr + offs_m[:, None] * stride_gm + offs_e[None, :],
                      mask=(offs_m[:, None] < M) & (offs_e[None, :] < E), other=0.0)         # (BM, BE)
        acc = _dot(tl.trans(w.to(gyt.dtype)), gyt, acc, PREC)
    tl.store(gv_ptr + offs_n[:, None] * stride_gvn + offs_e[None, :], acc, mask=(offs_n[:, None] < N) & (offs_e[None, :] < E))


# triton.jit decides at decoration (this module's import) whether kernels run in the interpreter
# (TRITON_INTERPRET=1): ask the kernel, not the environment, which may have changed since
INTERPRETED = type(_norm_kernel).__name__ == "InterpretedFunction"


def _precision(dt: torch.dtype) -> int:
    """The PREC of _dot for inputs of dtype dt."""
    if dt == torch.float32:
        return 1
    return 2 if INTERPRETED else 0


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The reference's matmul dtype: autocast's where it is on (the kernels do not autocast), else x's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class PattentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keys, values, scale_tokens: int, blocks: tuple[int, int, int, int]):
        dt = _compute_dtype(x)
        shape = x.shape
        D, N, E = x.shape[-1], keys.shape[0], values.shape[1]
        x2 = x.reshape(-1, D).to(dt).contiguous()                                # (M, D)
        k, v = keys.to(dt).contiguous(), values.to(dt).contiguous()               # (N, D), (N, E)
        M = x2.shape[0]
        BM, BN, BD, BE = blocks
        prec = _precision(dt)
        root = math.sqrt(scale_tokens)
        r = torch.empty(M, device=x.device, dtype=torch.float32)                  # (M,) unclamped row norm
        y = torch.empty(M, E, device=x.device, dtype=dt)                          # (M, E)
        _norm_kernel[(triton.cdiv(M, BM),)](x2, k, r, M, N, D, x2.stride(0), k.stride(0), BM, BN, BD, prec)
        _fwd_kernel[(triton.cdiv(M, BM), triton.cdiv(E, BE))](
            x2, k, v, r, y, M, N, D, E, x2.stride(0), k.stride(0), v.stride(0), y.stride(0), root, EPS,
            BM, BN, BD, BE, prec)
        ctx.save_for_backward(x2, k, v, r)
        ctx.meta = (shape, x.dtype, keys.dtype, values.dtype, root, blocks, prec)
        return y.reshape(*shape[:-1], E)

    @staticmethod
    def backward(ctx, gy):
        x2, k, v, r = ctx.saved_tensors
        shape, x_dtype, k_dtype, v_dtype, root, (BM, BN, BD, BE), prec = ctx.meta
        M, D = x2.shape
        N, E = v.shape
        gy2 = gy.reshape(M, E).to(x2.dtype).contiguous()                         # (M, E)
        a = torch.empty(M, device=x2.device, dtype=torch.float32)                 # (M,) <gu, s>
        gx = torch.empty(M, D, device=x2.device, dtype=x2.dtype)
        gk = torch.empty(N, D, device=x2.device, dtype=torch.float32)             # fp32: summed over all M rows
        gv = torch.empty(N, E, device=x2.device, dtype=torch.float32)
        common = (M, N, D, E, x2.stride(0), k.stride(0), v.stride(0), gy2.stride(0))
        _rowdot_kernel[(triton.cdiv(M, BM),)](x2, k, v, gy2, r, a, *common, root, EPS, BM, BN, BD, BE, prec)
        _dx_kernel[(triton.cdiv(M, BM), triton.cdiv(D, BD))](
            x2, k, v, gy2, r, a, gx, *common, gx.stride(0), root, EPS, BM, BN, BD, BE, prec)
        _dk_kernel[(triton.cdiv(N, BN), triton.cdiv(D, BD))](
            x2, k, v, gy2, r, a, gk, *common, gk.stride(0), root, EPS, BM, BN, BD, BE, prec)
        _dv_kernel[(triton.cdiv(N, BN), triton.cdiv(E, BE))](
            x2, k, gy2, r, gv, M, N, D, E, x2.stride(0), k.stride(0), gy2.stride(0), gv.stride(0), root, EPS,
            BM, BN, BD, BE, prec)
        return gx.reshape(shape).to(x_dtype), gk.to(k_dtype), gv.to(v_dtype), None, None


DEFAULT_BLOCKS = (64, 64, 64, 64)  # (BM, BN, BD, BE); untuned


def pattention(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, normalization: str, scale_tokens: int,
               blocks: tuple[int, int, int, int] = DEFAULT_BLOCKS) -> torch.Tensor:
    """x (..., D), keys (N, D), values (N, E) -> (..., E). l2_norm_gelu only."""
    if not supports(x, keys, values, normalization):
        raise ValueError(f"the triton pattention kernel supports l2_norm_gelu in {DTYPES} only, "
                         f"got {normalization} {x.dtype} on {x.device}")
    return PattentionTriton.apply(x, keys, values, int(scale_tokens), tuple(blocks))
