"""Mamba-1 and Mamba-2 language models, laid out exactly like mamba-ssm's ``MambaLMHeadModel``.

Parameter names and shapes are identical to mamba-ssm (``backbone.embedding.weight``,
``backbone.layers.{i}.mixer.*``, ``backbone.layers.{i}.norm.weight``, ``backbone.norm_f.weight``,
``lm_head.weight`` tied to the embedding), so a released checkpoint's state_dict loads without renaming.
The model math follows mamba-ssm's non-fused reference semantics; the sequence mixing itself lives in
:mod:`models.ssm_ops` (pure-PyTorch chunked scans everywhere, mamba-ssm's kernels on CUDA when installed).

    block:  residual = residual + hidden         (residual kept in fp32)
            hidden   = mixer(RMSNorm(residual))
    model:  embedding -> n_layer blocks -> RMSNorm(residual + hidden) -> tied lm_head

Mamba-1 mixer (d = d_model, E = expand*d, N = d_state, R = dt_rank, W = d_conv):
    x, z = in_proj(h).chunk(2)                      (B, L, E) each
    x    = silu(causal depthwise conv1d(x))          (B, E, L)
    dt, B, C = x_proj(x)                             (B, L, R), (B, L, N), (B, L, N)
    dt   = softplus(dt_proj(dt))                     (B, L, E)       bias added in fp32 inside the scan
    y    = selective_scan(x, dt, A=-exp(A_log), B, C, D) * silu(z)
    out  = out_proj(y)
Mamba-2 mixer (H = E / headdim heads, G groups sharing B/C, scalar decay per head):
    z, xBC, dt = in_proj(h)                          (B, L, E), (B, L, E + 2GN), (B, L, H)
    x, B, C = silu(conv1d(xBC))                      conv over x, B and C together
    y    = SSD(x, softplus(dt + dt_bias), A=-exp(A_log), B, C, D)
    out  = out_proj(RMSNorm(y * silu(z)))            gated norm, mixer.norm.weight
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from models import ssm_ops
from models.base import Architecture, CausalLM, DecodeCache, ModelConfig


def _pad_to_multiple(n: int, multiple: int) -> int:
    return n if multiple <= 1 else -(-n // multiple) * multiple


# ==========================================================================================================
# Configs (own the analytic counts)
# ==========================================================================================================
class _SSMShape:
    """What Mamba-1 and Mamba-2 configs share: the table's n_layers / width, the inner width and the padded
    embedding (mamba-ssm's pad_vocab_size_multiple)."""

    @property
    def n_layers(self) -> int:
        return self.n_layer

    @property
    def width(self) -> int:
        return self.d_model

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        return _pad_to_multiple(self.vocab_size, self.pad_vocab_size_multiple)


@dataclasses.dataclass
class MambaConfig(_SSMShape, ModelConfig):
    """Mamba-1 (mamba-ssm ``Mamba`` mixer, ``MambaLMHeadModel`` defaults of the released checkpoints)."""

    vocab_size: int = 50277  # tokenizer vocab; the embedding is padded to pad_vocab_size_multiple
    max_seq_len: int = 2048
    d_model: int = 768
    n_layer: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0  # 0 = mamba-ssm's "auto": ceil(d_model / 16)
    pad_vocab_size_multiple: int = 8  # mamba-ssm pads 50277 -> 50280
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    initializer_range: float = 0.02  # embedding std
    scan_chunk_size: int = 64  # reference scan chunk (memory/parallelism trade-off; results do not depend on it)


    @property
    def time_step_rank(self) -> int:
        return self.dt_rank if self.dt_rank > 0 else math.ceil(self.d_model / 16)


    def layer_params(self) -> int:
        d, e, n, r, w = self.d_model, self.d_inner, self.d_state, self.time_step_rank, self.d_conv
        return (
            d * 2 * e  # in_proj (no bias)
            + e * w + e  # conv1d weight (E, 1, W) + bias
            + e * (r + 2 * n)  # x_proj (no bias)
            + r * e + e  # dt_proj weight + bias
            + e * n  # A_log
            + e  # D
            + e * d  # out_proj (no bias)
            + d  # block RMSNorm
        )

    def num_params(self, non_embedding: bool = False) -> int:
        embedding = self.padded_vocab_size * self.d_model  # lm_head is tied: counted once, here
        total = embedding + self.n_layer * self.layer_params() + self.d_model  # + norm_f
        return total - embedding if non_embedding else total

    def _layer_matmul_flops(self) -> int:
        d, e, n, r = self.d_model, self.d_inner, self.d_state, self.time_step_rank
        # 2 FLOPs per multiply-add of every weight matrix a token goes through
        return 2 * (d * 2 * e + e * (r + 2 * n) + r * e + e * d)  # in_proj, x_proj, dt_proj, out_proj

    def _layer_scan_flops(self) -> int:
        # the mamba-ssm authors' count for the selective scan (A. Gu, state-spaces/mamba issue #110): 9 * D * N
        # per token (discretise A and B, the scan's multiply-adds, contract with C). D-skip and z-gating are
        # elementwise O(D) work, left out like every other elementwise op (norms, activations).
        return 9 * self.d_inner * self.d_state

    def forward_flops_per_token(self, seq_len: int | None = None) -> float:
        """Forward FLOPs per token. Independent of seq_len: a recurrence has no attention-like term."""
        per_layer = (
            self._layer_matmul_flops()
            + 2 * self.d_inner * self.d_conv  # depthwise causal conv: W multiply-adds per channel
            + self._layer_scan_flops()
        )
        return float(self.n_layer * per_layer + 2 * self.vocab_size * self.d_model)  # + lm_head (real vocab rows)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token = 3 x forward (backward ~ 2 x forward)."""
        return 3.0 * self.forward_flops_per_token(seq_len)

    def uncounted_flops_per_token(self, seq_len: int | None = None) -> float:
        """Forward FLOPs per token that FlopCounterMode cannot see on the reference path: the scan and the
        depthwise conv, both written with elementwise ops only (the counter sees matmuls and convolutions;
        see ssm_ops._depthwise_causal for why the conv is not an F.conv1d)."""
        return float(self.n_layer * (self._layer_scan_flops() + 2 * self.d_inner * self.d_conv))


@dataclasses.dataclass
class Mamba2Config(_SSMShape, ModelConfig):
    """Mamba-2 (mamba-ssm ``Mamba2`` mixer, ``ssm_cfg={"layer": "Mamba2"}``, d_intermediate=0)."""

    vocab_size: int = 50277
    max_seq_len: int = 2048
    d_model: int = 768
    n_layer: int = 24
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    pad_vocab_size_multiple: int = 16  # the mamba2-* checkpoints pad 50277 -> 50288
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    A_init_min: float = 1.0  # A = -U(A_init_min, A_init_max) per head
    A_init_max: float = 16.0
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.d_inner % self.headdim:
            raise ValueError(f"expand*d_model={self.d_inner} is not a multiple of headdim={self.headdim}")
        if self.nheads % self.ngroups:
            raise ValueError(f"nheads={self.nheads} is not a multiple of ngroups={self.ngroups}")


    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state  # x, B, C go through the conv together

    @property
    def d_in_proj(self) -> int:
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads  # [z, x, B, C, dt]


    def layer_params(self) -> int:
        d, e, h = self.d_model, self.d_inner, self.nheads
        return (
            d * self.d_in_proj  # in_proj (no bias)
            + self.conv_dim * self.d_conv + self.conv_dim  # conv1d weight + bias
            + 3 * h  # dt_bias, A_log, D (one per head)
            + e  # gated RMSNorm weight
            + e * d  # out_proj
            + d  # block RMSNorm
        )

    def num_params(self, non_embedding: bool = False) -> int:
        embedding = self.padded_vocab_size * self.d_model
        total = embedding + self.n_layer * self.layer_params() + self.d_model
        return total - embedding if non_embedding else total

    def _ssd_flops_per_token(self, seq_len: int) -> float:
        """Matmul FLOPs per token of the chunked SSD at chunk length Q (see ssm_ops.ssd_chunked_ref):
        C.B^T scores 2*Q*G*N, scores @ x 2*Q*E, chunk states 2*E*N, state -> output 2*E*N (E = H*P; the two
        state terms vanish when the whole sequence is one chunk: no state enters it and, in a training forward,
        none leaves it). The sequence is zero-padded to whole chunks: the work is that of the padded length."""
        q = ssm_ops.ssd_chunk_size(seq_len, self.chunk_size)
        n_chunks = -(-seq_len // q)
        per_padded_token = 2 * q * self.ngroups * self.d_state + 2 * q * self.d_inner
        if n_chunks > 1:
            per_padded_token += 4 * self.d_inner * self.d_state
        return per_padded_token * n_chunks * q / seq_len

    def forward_flops_per_token(self, seq_len: int | None = None) -> float:
        seq_len = seq_len or self.max_seq_len
        per_layer = (
            2 * self.d_model * self.d_in_proj  # in_proj
            + 2 * self.d_inner * self.d_model  # out_proj
            + 2 * self.conv_dim * self.d_conv  # depthwise conv
            + self._ssd_flops_per_token(seq_len)  # grows with the chunk length, not with seq_len
        )
        return float(self.n_layer * per_layer + 2 * self.vocab_size * self.d_model)  # + lm_head (real vocab rows)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token = 3 x forward."""
        return 3.0 * self.forward_flops_per_token(seq_len)

    def uncounted_flops_per_token(self, seq_len: int | None = None) -> float:
        """Forward FLOPs per token FlopCounterMode cannot see on the reference path: only the depthwise conv
        (elementwise there, see ssm_ops._depthwise_causal). The SSD terms are explicit torch.matmul calls the
        counter sees; the SSD's elementwise work (masks, exps, the chunk-to-chunk carry) is not counted anywhere."""
        return float(self.n_layer * 2 * self.conv_dim * self.d_conv)


# ==========================================================================================================
# Layers
# ==========================================================================================================
class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and returned in the input dtype (mamba-ssm's rms_norm_ref semantics)."""

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size  # normalise groups of this many channels (Mamba-2 with ngroups > 1)
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if gate is not None:  # Mamba-2's norm_before_gate=False: normalise x * silu(z)
            x = x * F.silu(gate.float())
        shape = x.shape
        if self.group_size is not None and self.group_size != shape[-1]:
            x = x.view(*shape[:-1], -1, self.group_size)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x.view(shape) * self.weight.float()).to(dtype)


def _init_dt_bias(bias: torch.Tensor, dt_min: float, dt_max: float, floor: float) -> None:
    """bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]: the initial step sizes span two decades,
    so some channels remember for ~10 tokens and others for ~1000."""
    with torch.no_grad():
        u = torch.rand(bias.shape, device=bias.device, dtype=torch.float32)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
        bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus, stable for small dt


def _init_out_proj(weight: torch.Tensor, n_layer: int) -> None:
    """GPT-2 style prenorm-residual rescale, as mamba-ssm's _init_weights (n_residuals_per_layer=1):
    default Linear init divided by sqrt(n_layer), so the residual stream's variance does not grow with depth."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    with torch.no_grad():
        weight.div_(math.sqrt(n_layer))


class MambaMixer(nn.Module):
    """Mamba-1 selective SSM mixer; attribute names == mamba_ssm.modules.mamba_simple.Mamba."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        d, e, n, r, w = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.time_step_rank, cfg.d_conv
        self.in_proj = nn.Linear(d, 2 * e, bias=False)
        self.conv1d = nn.Conv1d(e, e, kernel_size=w, groups=e, padding=w - 1, bias=True)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, e, bias=True)
        self.A_log = nn.Parameter(torch.empty(e, n))  # A = -exp(A_log) < 0: a stable, decaying state
        self.D = nn.Parameter(torch.empty(e))  # skip connection u -> y
        # as mamba-ssm: the optimizer exempts these from weight decay (decaying A_log would slow the decay rates)
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(e, d, bias=False)

    def reset_parameters(self) -> None:
        cfg = self.cfg
        for lin in (self.in_proj, self.x_proj, self.conv1d):
            lin.reset_parameters()  # PyTorch defaults, as mamba-ssm (it only re-inits biases of Linears)
        std = cfg.time_step_rank ** -0.5  # keeps dt_proj's output variance ~1 whatever dt_rank is
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        _init_dt_bias(self.dt_proj.bias, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor)
        with torch.no_grad():
            # S4D-real: A_n = -(n+1) for every channel -> state n decays at its own rate
            a = torch.arange(1, cfg.d_state + 1, dtype=torch.float32, device=self.A_log.device)
            self.A_log.copy_(torch.log(a).expand_as(self.A_log))
            self.D.fill_(1.0)
        _init_out_proj(self.out_proj.weight, cfg.n_layer)

    # ---- pieces shared by the sequence and the step paths -------------------------------------------------
    def _ssm_inputs(self, x: torch.Tensor):
        """x (..., E) after the conv -> dt (..., E) without bias, B (..., N), C (..., N)."""
        cfg = self.cfg
        x_dbl = self.x_proj(x)  # (..., R + 2N)
        dt, B, C = torch.split(x_dbl, [cfg.time_step_rank, cfg.d_state, cfg.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C  # dt_proj bias is added in fp32 inside the scan

    def _scan(self, x, z, initial_state=None, return_last_state=False):
        """x, z (B, E, L) -> y (B, E, L) [, last state (B, E, N)]."""
        L = x.shape[-1]
        dt, B, C = self._ssm_inputs(x.transpose(1, 2))  # (B, L, E), (B, L, N), (B, L, N)
        return ssm_ops.selective_scan(
            x, dt.transpose(1, 2), -torch.exp(self.A_log.float()), B.transpose(1, 2), C.transpose(1, 2),
            self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            initial_state=initial_state, return_last_state=return_last_state,
            chunk_size=min(self.cfg.scan_chunk_size, max(L, 1)),
        )

    # ---- full sequence ------------------------------------------------------------------------------------
    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, L, d) -> (B, L, d)
        xz = self.in_proj(h).transpose(1, 2)  # (B, 2E, L): channels-first, as the conv and the scan want
        k = ssm_ops._kernels_for(h)
        if k is not None and k.mamba_inner_fn is not None:
            # fused conv + x_proj + dt_proj + scan + out_proj kernel (mamba-ssm's training fast path)
            ssm_ops._record(ssm_ops.MAMBA_SSM)
            return k.mamba_inner_fn(
                xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                self.out_proj.weight, self.out_proj.bias, -torch.exp(self.A_log.float()), None, None,
                self.D.float(), delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            )
        x, z = xz.chunk(2, dim=1)  # (B, E, L) each
        x = ssm_ops.causal_conv1d(x, self.conv1d.weight, self.conv1d.bias)  # silu included
        y = self._scan(x, z)  # (B, E, L)
        return self.out_proj(y.transpose(1, 2))

    # ---- incremental ----------------------------------------------------------------------------------------
    def step(self, h: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, fresh: bool):
        """h (B, T, d); conv_state (B, E, W) raw conv inputs; ssm_state (B, E, N) fp32; fresh: nothing consumed
        yet. T == 1 runs the recurrence once; T > 1 runs the parallel path from the cached states.
        Returns (out (B, T, d), conv_state, ssm_state)."""
        cfg = self.cfg
        T = h.shape[1]
        if T == 1:
            x, z = self.in_proj(h[:, 0]).chunk(2, dim=-1)  # (B, E) each
            x, conv_state = ssm_ops.causal_conv1d_step(x, conv_state, self.conv1d.weight, self.conv1d.bias)
            dt, B, C = self._ssm_inputs(x)
            y, ssm_state = ssm_ops.selective_state_step(
                ssm_state, x, dt, -torch.exp(self.A_log.float()), B, C, self.D.float(), z=z,
                dt_bias=self.dt_proj.bias.float(), dt_softplus=True,
            )
            return self.out_proj(y).unsqueeze(1), conv_state, ssm_state
        xz = self.in_proj(h).transpose(1, 2)  # (B, 2E, T)
        x, z = xz.chunk(2, dim=1)
        if fresh:  # kernel-friendly: plain causal conv, state = the last W raw inputs (zero-padded if T < W)
            new_conv_state = F.pad(x, (cfg.d_conv - T, 0)).to(conv_state.dtype)
            x = ssm_ops.causal_conv1d(x, self.conv1d.weight, self.conv1d.bias)
        else:  # continue from the cached context
            x, new_conv_state = ssm_ops.causal_conv1d_with_state(x, conv_state, self.conv1d.weight, self.conv1d.bias)
        y, last = self._scan(x, z, initial_state=None if fresh else ssm_state, return_last_state=True)
        return self.out_proj(y.transpose(1, 2)), new_conv_state, last


class Mamba2Mixer(nn.Module):
    """Mamba-2 SSD mixer; attribute names == mamba_ssm.modules.mamba2.Mamba2 (rmsnorm=True, D per head)."""

    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.cfg = cfg
        d, e, h, w = cfg.d_model, cfg.d_inner, cfg.nheads, cfg.d_conv
        self.in_proj = nn.Linear(d, cfg.d_in_proj, bias=False)
        c = cfg.conv_dim
        self.conv1d = nn.Conv1d(c, c, kernel_size=w, groups=c, padding=w - 1, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(h))
        self.A_log = nn.Parameter(torch.empty(h))  # one scalar decay per head: what makes SSD matmul-friendly
        self.D = nn.Parameter(torch.empty(h))
        self.dt_bias._no_weight_decay = True  # as mamba-ssm
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.norm = RMSNorm(e, eps=cfg.norm_eps, group_size=e // cfg.ngroups)
        self.out_proj = nn.Linear(e, d, bias=False)

    def reset_parameters(self) -> None:
        cfg = self.cfg
        self.in_proj.reset_parameters()
        self.conv1d.reset_parameters()
        _init_dt_bias(self.dt_bias, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor)
        with torch.no_grad():
            a = torch.empty(self.A_log.shape, dtype=torch.float32, device=self.A_log.device)
            self.A_log.copy_(torch.log(a.uniform_(cfg.A_init_min, cfg.A_init_max)))
            self.D.fill_(1.0)
        self.norm.reset_parameters()
        _init_out_proj(self.out_proj.weight, cfg.n_layer)

    def _split(self, zxbcdt: torch.Tensor):
        cfg = self.cfg
        return torch.split(zxbcdt, [cfg.d_inner, cfg.conv_dim, cfg.nheads], dim=-1)  # z, xBC, dt

    def _ssd(self, xBC, dt, initial_states=None, return_final_states=False):
        """xBC (B, L, E + 2GN) after the conv, dt (B, L, H) -> y (B, L, H, P) [, state (B, H, P, N)]."""
        cfg = self.cfg
        b, L = xBC.shape[:2]
        x, B, C = torch.split(xBC, [cfg.d_inner, cfg.ngroups * cfg.d_state, cfg.ngroups * cfg.d_state], dim=-1)
        return ssm_ops.ssd_scan(
            x.reshape(b, L, cfg.nheads, cfg.headdim), dt, -torch.exp(self.A_log.float()),
            B.reshape(b, L, cfg.ngroups, cfg.d_state), C.reshape(b, L, cfg.ngroups, cfg.d_state),
            cfg.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_softplus=True,
            initial_states=initial_states, return_final_states=return_final_states,
        )

    def _out(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = y.reshape(*z.shape)  # (..., E)
        return self.out_proj(self.norm(y, gate=z))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, L, d) -> (B, L, d)
        z, xBC, dt = self._split(self.in_proj(h))
        xBC = ssm_ops.causal_conv1d(xBC.transpose(1, 2), self.conv1d.weight, self.conv1d.bias).transpose(1, 2)
        return self._out(self._ssd(xBC, dt), z)

    def step(self, h: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, fresh: bool):
        """h (B, T, d); conv_state (B, E + 2GN, W); ssm_state (B, H, P, N) fp32. As MambaMixer.step."""
        cfg = self.cfg
        T = h.shape[1]
        if T == 1:
            z, xBC, dt = self._split(self.in_proj(h[:, 0]))  # (B, E), (B, E+2GN), (B, H)
            xBC, conv_state = ssm_ops.causal_conv1d_step(xBC, conv_state, self.conv1d.weight, self.conv1d.bias)
            x, B, C = torch.split(xBC, [cfg.d_inner, cfg.ngroups * cfg.d_state, cfg.ngroups * cfg.d_state], dim=-1)
            b = x.shape[0]
            y, ssm_state = ssm_ops.ssd_state_step(
                ssm_state, x.reshape(b, cfg.nheads, cfg.headdim), dt, -torch.exp(self.A_log.float()),
                B.reshape(b, cfg.ngroups, cfg.d_state), C.reshape(b, cfg.ngroups, cfg.d_state), self.D,
                dt_bias=self.dt_bias, dt_softplus=True,
            )
            return self._out(y, z).unsqueeze(1), conv_state, ssm_state
        z, xBC, dt = self._split(self.in_proj(h))
        xBC = xBC.transpose(1, 2)  # (B, E + 2GN, T)
        if fresh:
            new_conv_state = F.pad(xBC, (cfg.d_conv - T, 0)).to(conv_state.dtype)
            xBC = ssm_ops.causal_conv1d(xBC, self.conv1d.weight, self.conv1d.bias)
        else:
            xBC, new_conv_state = ssm_ops.causal_conv1d_with_state(
                xBC, conv_state, self.conv1d.weight, self.conv1d.bias
            )
        y, last = self._ssd(
            xBC.transpose(1, 2), dt, initial_states=None if fresh else ssm_state, return_final_states=True
        )
        return self._out(y, z), new_conv_state, last


class Block(nn.Module):
    """Add -> RMSNorm -> mixer (mamba-ssm's Block with fused_add_norm semantics, no MLP)."""

    def __init__(self, cfg, mixer_cls):
        super().__init__()
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = mixer_cls(cfg)

    def _add_norm(self, hidden, residual):
        residual = hidden if residual is None else residual + hidden
        hidden = self.norm(residual.to(self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.float()  # the residual stream accumulates n_layer updates: keep it exact
        return hidden, residual

    def forward(self, hidden, residual=None):
        hidden, residual = self._add_norm(hidden, residual)
        return self.mixer(hidden), residual

    def step(self, hidden, residual, conv_state, ssm_state, fresh):
        hidden, residual = self._add_norm(hidden, residual)
        out, conv_state, ssm_state = self.mixer.step(hidden, conv_state, ssm_state, fresh)
        return out, residual, conv_state, ssm_state


class Backbone(nn.Module):
    """mamba-ssm's MixerModel: embedding, layers, norm_f."""

    def __init__(self, cfg, mixer_cls):
        super().__init__()
        self.embedding = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, mixer_cls) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, eps=cfg.norm_eps)

    def final_norm(self, hidden, residual):
        residual = hidden if residual is None else residual + hidden
        return self.norm_f(residual.to(self.norm_f.weight.dtype))


@dataclasses.dataclass
class SSMCache(DecodeCache):
    """Constant-size decoding state: per layer the last d_conv raw conv inputs and the SSM state (fp32).
    ``nbytes()`` (DecodeCache's) counts both lists."""

    conv_states: list[torch.Tensor]  # Mamba-1 (B, E, W);  Mamba-2 (B, E + 2GN, W)
    ssm_states: list[torch.Tensor]  # Mamba-1 (B, E, N);   Mamba-2 (B, H, P, N)
    pos: int = 0  # tokens consumed so far


# ==========================================================================================================
# Language models
# ==========================================================================================================
class _SSMLM(CausalLM):
    mixer_cls: type

    def __init__(self, config, device=None):
        super().__init__()
        self.config = config
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.backbone = Backbone(config, self.mixer_cls)
            self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.backbone.embedding.weight  # tied, as every released Mamba checkpoint
        self.last_backend: str | None = None  # "mamba_ssm" / "torch_reference": what the last call ran
        self.reset_parameters()

    def reset_parameters(self) -> None:
        cfg = self.config
        nn.init.normal_(self.backbone.embedding.weight, std=cfg.initializer_range)
        for block in self.backbone.layers:
            block.norm.reset_parameters()
            block.mixer.reset_parameters()
        self.backbone.norm_f.reset_parameters()

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [self.backbone.embedding.weight]  # lm_head is the same tensor

    def block_modules(self) -> list[nn.Module]:
        return list(self.backbone.layers)

    def residual_outputs(self) -> list[list[str]]:
        # the mixer's out_proj is a block's only writer (the norm reads the stream; no MLP, d_intermediate=0)
        return [[f"mixer.out_proj.{n}" for n, _ in block.mixer.out_proj.named_parameters()]
                for block in self.backbone.layers]

    def _logits(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, T, vocab_size). The embedding's padding rows (50277 -> 50280) exist only so that
        checkpoints load; no token maps to them, so the head scores the real vocabulary only (the interface's
        V; mamba-ssm itself returns the padded logits). Slicing the weight keeps the logits contiguous."""
        return F.linear(self.backbone.final_norm(hidden, residual), self.lm_head.weight[: self.config.vocab_size])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, S) -> (B, S, V)
        hidden, residual = self.backbone.embedding(input_ids), None
        for block in self.backbone.layers:
            hidden, residual = block(hidden, residual)
        self.last_backend = ssm_ops.last_backend()
        return self._logits(hidden, residual)

    def _state_shapes(self, batch_size: int):
        raise NotImplementedError

    def allocate_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> SSMCache:
        """max_len is accepted for the interface and unused: the state does not grow with the sequence."""
        p = self.backbone.embedding.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        conv_shape, ssm_shape = self._state_shapes(batch_size)
        n = self.config.n_layer
        return SSMCache(
            conv_states=[torch.zeros(conv_shape, device=device, dtype=dtype) for _ in range(n)],
            ssm_states=[torch.zeros(ssm_shape, device=device, dtype=torch.float32) for _ in range(n)],
        )

    def step(self, input_ids: torch.Tensor, cache: SSMCache) -> torch.Tensor:  # (B, T) -> (B, T, V)
        fresh = cache.pos == 0
        hidden, residual = self.backbone.embedding(input_ids), None
        for i, block in enumerate(self.backbone.layers):
            hidden, residual, conv_state, ssm_state = block.step(
                hidden, residual, cache.conv_states[i], cache.ssm_states[i], fresh
            )
            # the cache is inference state: never let it carry an autograd graph from one call to the next
            cache.conv_states[i], cache.ssm_states[i] = conv_state.detach(), ssm_state.detach()
        cache.pos += input_ids.shape[1]
        self.last_backend = ssm_ops.last_backend()
        return self._logits(hidden, residual)

    def scan_backend(self) -> str:
        """Backend a forward on this model's device would use ("mamba_ssm" / "torch_reference")."""
        arch = "mamba2" if isinstance(self.config, Mamba2Config) else "mamba"
        return ssm_ops.scan_backend(self.backbone.embedding.weight.device, arch=arch)

    def backends(self) -> dict[str, str]:
        return {"scan": self.scan_backend()}

    def backends_ran(self) -> dict[str, str | None]:
        # a compiled forward may not run the Python that sets last_backend: the ops' own record then
        return {"scan": self.last_backend or ssm_ops.last_backend()}


class MambaLM(_SSMLM):
    """Mamba-1 LM (mamba-ssm ``MambaLMHeadModel`` with the default Mamba mixer)."""

    config: MambaConfig
    mixer_cls = MambaMixer

    def _state_shapes(self, batch_size):
        c = self.config
        return (batch_size, c.d_inner, c.d_conv), (batch_size, c.d_inner, c.d_state)


class Mamba2LM(_SSMLM):
    """Mamba-2 LM (mamba-ssm ``MambaLMHeadModel`` with ``ssm_cfg={"layer": "Mamba2"}``)."""

    config: Mamba2Config
    mixer_cls = Mamba2Mixer

    def _state_shapes(self, batch_size):
        c = self.config
        return (batch_size, c.conv_dim, c.d_conv), (batch_size, c.nheads, c.headdim, c.d_state)


# ==========================================================================================================
# Registry entries
# ==========================================================================================================
_GPT_NEOX_VOCAB = 50277  # the released checkpoints use the GPT-NeoX-20B tokenizer

ARCH = Architecture(
    name="mamba",
    config_cls=MambaConfig,
    model_cls=MambaLM,
    presets={
        "tiny": dict(d_model=64, n_layer=2, vocab_size=512, max_seq_len=128),
        "small": dict(d_model=128, n_layer=4, vocab_size=512, max_seq_len=256),
        "130m": dict(d_model=768, n_layer=24, vocab_size=_GPT_NEOX_VOCAB, max_seq_len=2048),
        "370m": dict(d_model=1024, n_layer=48, vocab_size=_GPT_NEOX_VOCAB, max_seq_len=2048),
        "790m": dict(d_model=1536, n_layer=48, vocab_size=_GPT_NEOX_VOCAB, max_seq_len=2048),
        "1.4b": dict(d_model=2048, n_layer=48, vocab_size=_GPT_NEOX_VOCAB, max_seq_len=2048),
    },
    description="Mamba-1 selective SSM LM (Gu & Dao 2023), mamba-ssm MambaLMHeadModel layout",
    # Parameter counts of the released state-spaces/mamba-* checkpoints (embedding 50280 x d, tied head).
    # The names are rounded: "1.4b" actually holds 1.372B parameters (2% under its name), hence exact counts.
    published={
        "130m": 129_135_360,
        "370m": 371_516_416,
        "790m": 793_204_224,
        "1.4b": 1_372_178_432,
    },
    published_tolerance=0.01,
)

MAMBA2_ARCH = Architecture(
    name="mamba2",
    config_cls=Mamba2Config,
    model_cls=Mamba2LM,
    presets={
        "tiny": dict(d_model=64, n_layer=2, vocab_size=512, max_seq_len=128, d_state=16, headdim=16, chunk_size=32),
        "small": dict(d_model=128, n_layer=4, vocab_size=512, max_seq_len=256, d_state=32, headdim=32, chunk_size=64),
        "130m": dict(d_model=768, n_layer=24, vocab_size=_GPT_NEOX_VOCAB, max_seq_len=2048),
        "370m": dict(d_model=1024, n_layer=48, vocab_size=_GPT_NEOX_VOCAB, max_seq_len=2048),
        "780m": dict(d_model=1536, n_layer=48, vocab_size=_GPT_NEOX_VOCAB, max_seq_len=2048),
        "1.3b": dict(d_model=2048, n_layer=48, vocab_size=_GPT_NEOX_VOCAB, max_seq_len=2048),
        "2.7b": dict(d_model=2560, n_layer=64, vocab_size=_GPT_NEOX_VOCAB, max_seq_len=2048),
    },
    description="Mamba-2 SSD LM (Dao & Gu 2024), mamba-ssm MambaLMHeadModel + Mamba2 mixer layout",
    # The state-spaces/mamba2-* model cards give only the rounded names, no exact counts; these are the
    # analytic counts of the released configs (d_state 128, headdim 64, ngroups 1, vocab 50277 padded to
    # 50288, tied head, no MLP), i.e. what those checkpoints hold if their config.json is as published.
    published={
        "130m": 128_989_632,
        "370m": 368_346_624,
        "780m": 780_161_280,
        "1.3b": 1_343_757_312,
        "2.7b": 2_702_599_680,
    },
    published_tolerance=0.01,
)

__all__ = ["MambaConfig", "MambaLM", "ARCH", "Mamba2Config", "Mamba2LM", "MAMBA2_ARCH", "SSMCache"]
