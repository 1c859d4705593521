"""The swappable parts that the attention-family models (tokenformer, transformer_pp, gpt2 and every
ablation rung between them) are built from. Each part knows its own parameter count and forward FLOPs per
token, so a model assembled from parts has exact counts without a formula of its own.

Counting convention (PaLM appendix B, and what ``torch.utils.flop_counter`` counts): a matmul of an (m, k) by a
(k, n) operand costs 2*m*k*n; elementwise work (norms, activations, rotary, softmax, bias adds) is not counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import DecodeCache
from .pattention import Pattention

PROJECTIONS = ("linear", "pattention")
FFNS = ("swiglu", "gelu_mlp", "pattention")
NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned")


# --------------------------------------------------------------------------------------------------- norms
@dataclass(frozen=True)
class NormSpec:
    kind: str = "rmsnorm"      # rmsnorm | layernorm
    affine: bool = True        # a learned scale
    bias: bool = False         # a learned shift (layernorm only)
    eps: float = 1e-5

    def __post_init__(self):
        if self.kind not in NORMS:
            raise ValueError(f"unknown norm {self.kind!r}; valid: {', '.join(NORMS)}")
        if self.bias and (self.kind != "layernorm" or not self.affine):
            raise ValueError(f"config field norm_bias / final_norm_bias: a norm bias needs norm=layernorm with an "
                             f"affine scale (got norm={self.kind}, affine={self.affine})")

    def params(self, d: int) -> int:
        return d * (int(self.affine) + int(self.bias))

    def build(self, d: int, device=None) -> nn.Module:
        if self.kind == "rmsnorm":
            return nn.RMSNorm(d, eps=self.eps, elementwise_affine=self.affine, device=device)
        return nn.LayerNorm(d, eps=self.eps, elementwise_affine=self.affine, bias=self.bias, device=device)


# ------------------------------------------------------------------------------------------------- rotary
class Rotary(nn.Module):
    """Rotary position embedding on the first ``rot_dims`` dims of each head (GPT-NeoX layout: the rotated
    part is split in two halves, not interleaved). rot_dims = head_dim for Transformer++, head_dim/4 for
    TokenFormer / Pythia. The cos/sin tables are buffers, not parameters, and are not saved."""

    def __init__(self, head_dim: int, fraction: float, max_seq_len: int, base: float = 10000.0, device=None):
        super().__init__()
        rot = int(head_dim * fraction)
        self.rot_dims = rot - rot % 2
        self.base, self.max_seq_len = base, max_seq_len
        self.register_buffer("cos", torch.empty(0, device=device), persistent=False)
        self.register_buffer("sin", torch.empty(0, device=device), persistent=False)
        self.reset_tables()

    def reset_tables(self, length: int | None = None):
        length = length or self.max_seq_len
        device = self.cos.device
        if device.type == "meta":
            self.cos = torch.empty(length, self.rot_dims, device=device)
            self.sin = torch.empty(length, self.rot_dims, device=device)
            return
        inv_freq = 1.0 / self.base ** (torch.arange(0, self.rot_dims, 2, device=device, dtype=torch.float32) / self.rot_dims)
        angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)  # (S, rot/2)
        angles = torch.cat([angles, angles], dim=-1)                                            # (S, rot)
        self.cos, self.sin = angles.cos(), angles.sin()

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x (B, H, T, hd) at positions start..start+T-1."""
        if self.rot_dims == 0:
            return x
        T = x.shape[-2]
        if start + T > self.cos.shape[0]:  # decoding past the trained context: extend, rotary extrapolates
            self.reset_tables(max(start + T, 2 * self.cos.shape[0]))
        cos = self.cos[start:start + T].to(x.dtype)
        sin = self.sin[start:start + T].to(x.dtype)
        xr, xp = x[..., :self.rot_dims], x[..., self.rot_dims:]
        x1, x2 = xr.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return torch.cat([xr * cos + rotated * sin, xp], dim=-1)


# -------------------------------------------------------------------------------------------- projections
@dataclass(frozen=True)
class ProjSpec:
    """A token-parameter projection d_in -> d_out: ``linear`` (a weight matrix, optional bias) or
    ``pattention`` with ``tokens`` key/value parameter tokens and its normalization."""

    kind: str = "linear"
    tokens: int = 0
    normalization: str = "l2_norm_gelu"
    bias: bool = False

    def __post_init__(self):
        if self.kind not in PROJECTIONS:
            raise ValueError(f"unknown projection {self.kind!r}; valid: {', '.join(PROJECTIONS)}")
        if self.kind == "pattention" and self.tokens <= 0:
            raise ValueError("a pattention projection needs tokens > 0")

    def params(self, d_in: int, d_out: int) -> int:
        if self.kind == "pattention":
            return Pattention.count_params(d_in, d_out, self.tokens)
        return d_in * d_out + (d_out if self.bias else 0)

    def flops(self, d_in: int, d_out: int) -> int:
        if self.kind == "pattention":
            return Pattention.count_flops(d_in, d_out, self.tokens)
        return 2 * d_in * d_out

    def build(self, d_in: int, d_out: int, device=None) -> nn.Module:
        if self.kind == "pattention":
            return Pattention(d_in, d_out, self.tokens, self.normalization, device=device)
        return nn.Linear(d_in, d_out, bias=self.bias, device=device)


# ---------------------------------------------------------------------------------------------------- FFN
@dataclass(frozen=True)
class FFNSpec:
    """swiglu: W2 (silu(x W1) * x W3), hidden h.  gelu_mlp: W2 gelu(x W1), hidden h.
    pattention: one Pattention d -> d with h parameter tokens -- i.e. f(x K^T) V, an MLP of hidden width h
    whose activation is the pattention normalization (the ablation issue compares exactly that)."""

    kind: str = "swiglu"
    hidden: int = 0
    bias: bool = False
    gelu_approximate: str = "none"   # "tanh" is GPT-2's gelu_new
    normalization: str = "l2_norm_gelu"

    def __post_init__(self):
        if self.kind not in FFNS:
            raise ValueError(f"unknown ffn {self.kind!r}; valid: {', '.join(FFNS)}")
        if self.hidden <= 0:
            raise ValueError("ffn hidden width / token count must be > 0")

    def params(self, d: int) -> int:
        h = self.hidden
        if self.kind == "pattention":
            return Pattention.count_params(d, d, h)
        if self.kind == "swiglu":
            return 3 * d * h + (2 * h + d if self.bias else 0)
        return 2 * d * h + (h + d if self.bias else 0)

    def flops(self, d: int) -> int:
        n_mats = {"swiglu": 3, "gelu_mlp": 2, "pattention": 2}[self.kind]
        return 2 * n_mats * d * self.hidden

    @property
    def output_name(self) -> str:
        """The built FFN's submodule that writes into the residual stream ("": the FFN itself)."""
        return {"pattention": "", "swiglu": "w2", "gelu_mlp": "proj"}[self.kind]

    def build(self, d: int, device=None) -> nn.Module:
        if self.kind == "pattention":
            return Pattention(d, d, self.hidden, self.normalization, device=device)
        if self.kind == "swiglu":
            return SwiGLU(d, self.hidden, self.bias, device)
        return GeluMLP(d, self.hidden, self.bias, self.gelu_approximate, device)


class SwiGLU(nn.Module):
    def __init__(self, d: int, h: int, bias: bool, device=None):
        super().__init__()
        self.w1 = nn.Linear(d, h, bias=bias, device=device)  # gate
        self.w3 = nn.Linear(d, h, bias=bias, device=device)  # up
        self.w2 = nn.Linear(h, d, bias=bias, device=device)  # down (an output projection: scaled init)

    def forward(self, x):  # (B, T, d) -> (B, T, d)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nn.Module):
    def __init__(self, d: int, h: int, bias: bool, approximate: str, device=None):
        super().__init__()
        self.fc = nn.Linear(d, h, bias=bias, device=device)
        self.proj = nn.Linear(h, d, bias=bias, device=device)  # output projection: scaled init
        self.approximate = approximate

    def forward(self, x):  # (B, T, d) -> (B, T, d)
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))


# ---------------------------------------------------------------------------------------------- attention
def writer_params(prefix: str, module: nn.Module) -> list[str]:
    """Names of the parameters through which ``module`` (named ``prefix``) writes its output: all of a Linear's,
    a Pattention's value tokens (zero values give a zero output whatever the keys)."""
    if isinstance(module, Pattention):
        return [f"{prefix}.value_param_tokens"]
    return [f"{prefix}.{n}" for n, _ in module.named_parameters()]


class KVCache(DecodeCache):
    """Per-layer key/value buffers for incremental decoding. k, v: (B, H, max_len, hd)."""

    def __init__(self, n_layers: int, batch: int, n_heads: int, head_dim: int, max_len: int, device, dtype):
        shape = (batch, n_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.pos = 0  # nbytes(): DecodeCache's, over k and v


class CausalSelfAttention(nn.Module):
    """Ordinary causal multi-head attention between tokens; only the Q/K/V/O projections are swappable.
    Attention itself goes through scaled_dot_product_attention, which picks flash / cuDNN / efficient
    kernels on GPU and a fused CPU kernel otherwise."""

    def __init__(self, d: int, n_heads: int, qkv: ProjSpec, out: ProjSpec, device=None):
        super().__init__()
        if d % n_heads:
            raise ValueError(f"d_model {d} is not divisible by n_heads {n_heads}")
        self.n_heads, self.head_dim = n_heads, d // n_heads
        self.wq = qkv.build(d, d, device)
        self.wk = qkv.build(d, d, device)
        self.wv = qkv.build(d, d, device)
        self.wo = out.build(d, d, device)

    def _heads(self, x):  # (B, T, d) -> (B, H, T, hd)
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, rotary: Rotary | None = None, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        """x (B, T, d). ``rotary`` is shared by all layers (owned by the model); ``cache`` makes this a
        decoding step at positions cache.pos .. cache.pos+T-1 (the model advances cache.pos)."""
        B, T, d = x.shape
        q, k, v = self._heads(self.wq(x)), self._heads(self.wk(x)), self._heads(self.wv(x))
        start = cache.pos if cache is not None else 0
        if rotary is not None:
            q, k = rotary(q, start), rotary(k, start)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            end = start + T
            if end > cache.max_len:
                raise ValueError(f"KV cache of {cache.max_len} positions is full (need {end})")
            cache.k[layer][:, :, start:end] = k.to(cache.k[layer].dtype)
            cache.v[layer][:, :, start:end] = v.to(cache.v[layer].dtype)
            k_all = cache.k[layer][:, :, :end].to(q.dtype)
            v_all = cache.v[layer][:, :, :end].to(q.dtype)
            if T == 1:  # one new query sees every cached key: no mask
                y = F.scaled_dot_product_attention(q, k_all, v_all)
            else:       # a prefill chunk: query i sits at position start+i and sees keys <= start+i
                mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
                y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, d))


def attention_flops(d_attn: int, seq_len: int) -> int:
    """Forward FLOPs per token of token-token attention at context ``seq_len``: QK^T and AV, each
    2 * seq_len * d_attn. Counted over the full S x S matrix as PaLM's MFU and FLOP counters do (a causal
    kernel skips about half; the convention keeps MFU comparable across papers)."""
    return 4 * seq_len * d_attn


def init_normal_(t: torch.Tensor, std: float):
    if t.device.type != "meta":
        nn.init.normal_(t, mean=0.0, std=std)


def scaled_std(base: float, n_layers: int) -> float:
    """GPT-2 / nanoGPT scaled init of residual-output projections: std / sqrt(2 L)."""
    return base / math.sqrt(2 * n_layers)
