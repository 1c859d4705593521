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
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NORMALIZATIONS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")


def pattention_weights(scores: torch.Tensor, normalization: str, scale_tokens: int, eps: float = 1e-6) -> torch.Tensor:
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


class Pattention(nn.Module):
    """A token-parameter projection d_in -> d_out with ``n_tokens`` key/value parameter tokens.

    Parameter names follow the official code (``key_param_tokens``, ``value_param_tokens``); no bias, as there.
    Parameters: n * (d_in + d_out). Forward FLOPs per token: 2 * n * (d_in + d_out) (two matmuls; the
    normalization is O(n) elementwise work and not counted, as FLOP counters do not count it either).
    """

    def __init__(self, d_in: int, d_out: int, n_tokens: int, normalization: str = "l2_norm_gelu",
                 scale_tokens: int | None = None, device=None, dtype=None):
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown pattention normalization {normalization!r}; valid: {', '.join(NORMALIZATIONS)}")
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
        scores = x @ self.key_param_tokens.t()                                  # (..., n)
        w = pattention_weights(scores, self.normalization, self.scale_tokens or self.n_tokens)
        return w @ self.value_param_tokens                                      # (..., d_out)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, n_tokens={self.n_tokens}, normalization={self.normalization}"


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
