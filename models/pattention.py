"""Pattention: input tokens attend over learned key/value *parameter* tokens (TokenFormer, arXiv 2410.23168).

    s = x @ K_P^T                    (..., n)      one score per parameter token
    w = norm(s)                      (..., n)      a GELU-based normalization instead of softmax
    y = w @ V_P                      (..., d_out)

The three normalizations of the official code (``nonlinear_norm_func``):

    l2_norm_gelu (default)  w = GELU(sqrt(n) * s / ||s||_2)
    gelu_l2_norm            w = sqrt(n) * GELU(s) / ||GELU(s)||_2
    softmax                 w = n * softmax(s)

The norms run over the n parameter tokens of each input token. The official code divides by the raw norm; we
clamp the norm at ``eps`` so that all-zero keys (zero-initialised growth tokens, a zero input) give zeros,
not NaN -- identical to the official function whenever ||s|| > eps.

``scale_tokens`` is the n inside sqrt(n) (and the factor of softmax). It defaults to the current token count;
growth that appends zero tokens keeps it at the old count, which makes growth exactly function-preserving
(with zero keys the new scores are 0, so ||s|| is unchanged, and GELU(0) = 0 kills the zero values anyway).

Implementations (``Pattention.impl``; the model config's ``pattention_impl``):

    reference   plain autograd over the formula: keeps the (..., n) scores and weights for backward
    recompute   :class:`PattentionRecompute`, a custom autograd.Function that saves x and one fp32 norm per
                row (O(T), not O(T n)) and recomputes scores and weights in backward; same values as the
                reference, gradients equal to rounding
    triton      the fused kernel of ``models.ops.pattention_triton`` (l2_norm_gelu): no T x n tensor in HBM
    auto        triton on CUDA when it imports and supports the shape, else recompute

``Pattention.last_impl`` says which one the last forward ran (harness code reads it).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NORMALIZATIONS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")
IMPLS = ("reference", "recompute", "triton", "auto")
EPS = 1e-6  # the norm clamp of pattention_weights


def pattention_weights(scores: torch.Tensor, normalization: str, scale_tokens: int, eps: float = EPS) -> torch.Tensor:
    """scores (..., n) -> weights (..., n). Half-precision scores are normalized in fp32: the l2 norm of
    thousands of bf16 squares loses most of its mantissa, and this is elementwise work next to two matmuls."""
    s = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    if normalization == "l2_norm_gelu":
        s = s * (math.sqrt(scale_tokens) / s.norm(dim=-1, keepdim=True).clamp_min(eps))
        w = F.gelu(s)
    elif normalization == "gelu_l2_norm":
        g = F.gelu(s)
        w = g * (math.sqrt(scale_tokens) / g.norm(dim=-1, keepdim=True).clamp_min(eps))
    elif normalization == "softmax":
        w = torch.softmax(s, dim=-1) * scale_tokens
    else:
        raise ValueError(f"unknown pattention normalization {normalization!r}; valid: {', '.join(NORMALIZATIONS)}")
    return w.to(scores.dtype)


# ------------------------------------------------------------------------------- memory-lean autograd path
class PattentionRecompute(torch.autograd.Function):
    """y = f(x K^T) V that saves x (..., d_in) and, for the two l2 normalizations, the fp32 row norm (..., 1):
    O(T) beside x instead of the reference's two O(T n) tensors (scores and weights; GELU's input too).

    Forward runs the reference's own ops in the reference's order, so values are bitwise the reference's.
    Backward recomputes s and w from x (one extra x K^T matmul, the flash-attention trade) and applies the
    normalization's vector-Jacobian product by hand. Half-precision inputs follow the reference's casts: the
    matmuls in the input dtype, the normalization and its backward in fp32.
    """

    @staticmethod
    def forward(ctx, x, keys, values, normalization: str, scale_tokens: int):
        # x (..., d_in), keys (n, d_in), values (n, d_out)
        s = x @ keys.t()                                                         # (..., n)
        # the matmul dtype (autocast may have picked it): backward recomputes in it, without autocast
        ctx.mm_dtype = s.dtype
        sf = s.float() if s.dtype in (torch.float16, torch.bfloat16) else s
        if normalization == "l2_norm_gelu":
            norm = sf.norm(dim=-1, keepdim=True)                                 # (..., 1) unclamped
            # in place, the reference's ops and values: s is not needed again, and one T x n buffer less
            # to fault in is measurable on CPU
            w = torch.ops.aten.gelu_(sf.mul_(math.sqrt(scale_tokens) / norm.clamp_min(EPS)))
        elif normalization == "gelu_l2_norm":
            g = F.gelu(sf)
            norm = g.norm(dim=-1, keepdim=True)                                  # (..., 1) unclamped
            w = g * (math.sqrt(scale_tokens) / norm.clamp_min(EPS))
        elif normalization == "softmax":
            norm = None  # recomputed: a softmax is one cheap pass over the recomputed scores
            w = torch.softmax(sf, dim=-1) * scale_tokens
        else:
            raise ValueError(f"unknown pattention normalization {normalization!r}; valid: {', '.join(NORMALIZATIONS)}")
        y = w.to(s.dtype) @ values                                               # (..., d_out)
        ctx.normalization, ctx.scale_tokens = normalization, scale_tokens
        ctx.save_for_backward(x, keys, values, norm)
        return y

    @staticmethod
    def backward(ctx, gy):  # gy (..., d_out)
        x, keys, values, norm = ctx.saved_tensors
        dt, normalization, n_scale = ctx.mm_dtype, ctx.normalization, ctx.scale_tokens
        xc, kc, vc = x.to(dt), keys.to(dt), values.to(dt)
        gy = gy.to(dt)
        s = xc @ kc.t()                                                          # (..., n) recomputed
        sf = s.float() if dt in (torch.float16, torch.bfloat16) else s
        gw = (gy @ vc.t()).to(sf.dtype)                                          # (..., n) dL/dw
        root = math.sqrt(n_scale)
        if normalization == "l2_norm_gelu":
            # u = c s, c = sqrt(n) / max(|s|, eps); w = gelu(u)
            c = root / norm.clamp_min(EPS)                                       # (..., 1)
            u = sf.mul_(c)                     # in place: s is a fresh recomputation, and s = u / c below
            w = F.gelu(u)
            gu = torch.ops.aten.gelu_backward.grad_input(gw, u, grad_input=gw)    # gw * GELU'(u), into gw
            # d c / d s = -c s / |s|^2 where the clamp is inactive (torch's clamp_min passes the gradient
            # at norm >= eps); a clamped row (all-zero scores: growth's zero keys, a zero x) has c constant.
            # With s = u / c: gs = c gu - c <gu, s> s / |s|^2 = c gu - p u, p = <gu, u> / (c |s|^2). Three
            # T x n buffers in all (s, gw, w), each reused in place: on CPU a fresh large buffer costs its page
            # faults, and this path must not be slower than the reference's autograd for its extra matmul
            p = torch.linalg.vecdot(gu, u).unsqueeze(-1) / (c * norm.square().clamp_min(EPS * EPS))
            gs = gu.mul_(c).addcmul_(u, torch.where(norm >= EPS, p, torch.zeros_like(p)), value=-1)
        elif normalization == "gelu_l2_norm":
            # w = c g, g = gelu(s), c = sqrt(n) / max(|g|, eps)
            c = root / norm.clamp_min(EPS)
            g = F.gelu(sf)
            w = g * c
            proj = (gw * g).sum(-1, keepdim=True) / norm.square().clamp_min(EPS * EPS)
            gg = c * (gw - torch.where(norm >= EPS, proj, torch.zeros_like(proj)) * g)
            gs = torch.ops.aten.gelu_backward(gg, sf)                              # gg * GELU'(s)
        else:
            # w = N p, p = softmax(s): ds = p * (N gw - <N gw, p>), through the kernel the reference's autograd
            # calls -- a peaked row cancels in that difference, and the same op in the same order cancels alike
            p = torch.softmax(sf, dim=-1)
            w = p * n_scale
            gs = torch._softmax_backward_data(gw * n_scale, p, -1, sf.dtype)
        gs, wd = gs.to(dt), w.to(dt)                                             # (..., n) in the matmul dtype
        gx = gs @ kc                                                             # (..., d_in)
        # parameter gradients sum over every leading dim: fold them into one of T rows
        gk = gs.reshape(-1, gs.shape[-1]).t() @ xc.reshape(-1, xc.shape[-1])      # (n, d_in)
        gv = wd.reshape(-1, wd.shape[-1]).t() @ gy.reshape(-1, gy.shape[-1])      # (n, d_out)
        return gx.to(x.dtype), gk.to(keys.dtype), gv.to(values.dtype), None, None


def _triton_ops():
    """models.ops.pattention_triton, or None when triton does not import."""
    try:
        from .ops import pattention_triton
    except ImportError:
        return None
    return pattention_triton if pattention_triton.available() else None


def resolve_impl(impl: str, x: torch.Tensor, module: "Pattention") -> str:
    """The implementation a forward on ``x`` runs: ``auto`` becomes triton only on CUDA with triton importable
    and the shape supported (its interpreter on CPU is for tests, not speed), else recompute."""
    if impl != "auto":
        return impl
    ops = _triton_ops() if x.is_cuda else None
    if ops is not None and ops.supports(x, module.key_param_tokens, module.value_param_tokens, module.normalization):
        return "triton"
    return "recompute"


class Pattention(nn.Module):
    """A token-parameter projection d_in -> d_out with ``n_tokens`` key/value parameter tokens.

    Parameter names follow the official code (``key_param_tokens``, ``value_param_tokens``); no bias, as there.
    Parameters: n * (d_in + d_out). Forward FLOPs per token: 2 * n * (d_in + d_out) (two matmuls; the
    normalization is O(n) elementwise work and not counted, as FLOP counters do not count it either).
    """

    def __init__(self, d_in: int, d_out: int, n_tokens: int, normalization: str = "l2_norm_gelu",
                 scale_tokens: int | None = None, device=None, dtype=None, impl: str = "reference"):
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown pattention normalization {normalization!r}; valid: {', '.join(NORMALIZATIONS)}")
        if impl not in IMPLS:
            raise ValueError(f"unknown pattention impl {impl!r}; valid: {', '.join(IMPLS)}")
        # a plain attribute, like scale_tokens: not in the state dict, so checkpoints do not depend on it
        self.impl = impl
        self.last_impl: str | None = None  # which implementation the last forward ran
        self.d_in, self.d_out, self.normalization = d_in, d_out, normalization
        self.key_param_tokens = nn.Parameter(torch.empty(n_tokens, d_in, device=device, dtype=dtype))     # (n, d_in)
        self.value_param_tokens = nn.Parameter(torch.empty(n_tokens, d_out, device=device, dtype=dtype))  # (n, d_out)
        self.scale_tokens = scale_tokens

    @property
    def n_tokens(self) -> int:
        return self.key_param_tokens.shape[0]

    @staticmethod
    def count_params(d_in: int, d_out: int, n_tokens: int) -> int:
        return n_tokens * (d_in + d_out)

    @staticmethod
    def count_flops(d_in: int, d_out: int, n_tokens: int) -> int:
        """Forward FLOPs per input token."""
        return 2 * n_tokens * (d_in + d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_out)
        impl = resolve_impl(self.impl, x, self)
        self.last_impl = impl
        n_scale = self.scale_tokens or self.n_tokens
        if impl == "recompute":
            return PattentionRecompute.apply(x, self.key_param_tokens, self.value_param_tokens,
                                             self.normalization, n_scale)
        if impl == "triton":
            ops = _triton_ops()
            if ops is None:
                raise RuntimeError("pattention impl 'triton' needs the triton package (pip install tokenformer-bench[triton])")
            return ops.pattention(x, self.key_param_tokens, self.value_param_tokens, self.normalization, n_scale)
        return self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_out)
        """The explicit path every other implementation is tested against."""
        scores = x @ self.key_param_tokens.t()                                  # (..., n)
        w = pattention_weights(scores, self.normalization, self.scale_tokens or self.n_tokens)
        return w @ self.value_param_tokens                                      # (..., d_out)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, n_tokens={self.n_tokens}, normalization={self.normalization}, "
                f"impl={self.impl}")


def scale_tokens_of(model: nn.Module) -> dict[str, int]:
    """{module name: held sqrt(n) token count} of every Pattention whose factor is held (after growth)."""
    return {name: m.scale_tokens for name, m in model.named_modules()
            if isinstance(m, Pattention) and m.scale_tokens is not None}


def set_scale_tokens(model: nn.Module, mapping: dict[str, int]) -> None:
    modules = dict(model.named_modules())
    for name, n in mapping.items():
        if not isinstance(modules.get(name), Pattention):
            raise ValueError(f"pattention_scale_tokens names {name!r}, which is not a Pattention of this model")
        modules[name].scale_tokens = int(n)
