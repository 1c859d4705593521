"""Mamba-1 language model (Gu & Dao 2023), laid out exactly like mamba-ssm's ``MambaLMHeadModel`` with its
default ``Mamba`` mixer (what the LMs share -- block, backbone, norm, cache, the LM base -- is in
:mod:`models.ssm`; Mamba-2 is :mod:`models.mamba2`). The ops are :mod:`models.ops.causal_conv` and
:mod:`models.ops.selective_scan`, which run mamba-ssm's kernels on CUDA when installed.

Mamba-1 mixer (d = d_model, E = expand*d, N = d_state, R = dt_rank, W = d_conv):
    x, z = in_proj(h).chunk(2)                      (B, L, E) each
    x    = silu(causal depthwise conv1d(x))          (B, E, L)
    dt, B, C = x_proj(x)                             (B, L, R), (B, L, N), (B, L, N)
    dt   = softplus(dt_proj(dt))                     (B, L, E)       bias added in fp32 inside the scan
    y    = selective_scan(x, dt, A=-exp(A_log), B, C, D) * silu(z)
    out  = out_proj(y)
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.base import Architecture, ModelConfig
from models.ops import dispatch
from models.ops.causal_conv import causal_conv1d, causal_conv1d_step, causal_conv1d_with_state
from models.ops.selective_scan import selective_scan, selective_state_step
from models.ssm import GPT_NEOX_VOCAB, SSMCache, SSMLM, SSMShape, init_dt_bias, init_out_proj


# ==========================================================================================================
# Config (owns the analytic counts)
# ==========================================================================================================
@dataclasses.dataclass
class MambaConfig(SSMShape, ModelConfig):
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
        see models.ops.causal_conv for why the conv is not an F.conv1d)."""
        return float(self.n_layer * (self._layer_scan_flops() + 2 * self.d_inner * self.d_conv))


# ==========================================================================================================
# Layer
# ==========================================================================================================
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
        init_dt_bias(self.dt_proj.bias, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor)
        with torch.no_grad():
            # S4D-real: A_n = -(n+1) for every channel -> state n decays at its own rate
            a = torch.arange(1, cfg.d_state + 1, dtype=torch.float32, device=self.A_log.device)
            self.A_log.copy_(torch.log(a).expand_as(self.A_log))
            self.D.fill_(1.0)
        init_out_proj(self.out_proj.weight, cfg.n_layer)

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
        return selective_scan(
            x, dt.transpose(1, 2), -torch.exp(self.A_log.float()), B.transpose(1, 2), C.transpose(1, 2),
            self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            initial_state=initial_state, return_last_state=return_last_state,
            chunk_size=min(self.cfg.scan_chunk_size, max(L, 1)),
        )

    # ---- full sequence ------------------------------------------------------------------------------------
    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, L, d) -> (B, L, d)
        xz = self.in_proj(h).transpose(1, 2)  # (B, 2E, L): channels-first, as the conv and the scan want
        k = dispatch.kernels_for(h)
        if k is not None and k.mamba_inner_fn is not None:
            # fused conv + x_proj + dt_proj + scan + out_proj kernel (mamba-ssm's training fast path)
            dispatch.record(dispatch.MAMBA_SSM)
            return k.mamba_inner_fn(
                xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                self.out_proj.weight, self.out_proj.bias, -torch.exp(self.A_log.float()), None, None,
                self.D.float(), delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            )
        x, z = xz.chunk(2, dim=1)  # (B, E, L) each
        x = causal_conv1d(x, self.conv1d.weight, self.conv1d.bias)  # silu included
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
            x, conv_state = causal_conv1d_step(x, conv_state, self.conv1d.weight, self.conv1d.bias)
            dt, B, C = self._ssm_inputs(x)
            y, ssm_state = selective_state_step(
                ssm_state, x, dt, -torch.exp(self.A_log.float()), B, C, self.D.float(), z=z,
                dt_bias=self.dt_proj.bias.float(), dt_softplus=True,
            )
            return self.out_proj(y).unsqueeze(1), conv_state, ssm_state
        xz = self.in_proj(h).transpose(1, 2)  # (B, 2E, T)
        x, z = xz.chunk(2, dim=1)
        if fresh:  # kernel-friendly: plain causal conv, state = the last W raw inputs (zero-padded if T < W)
            new_conv_state = F.pad(x, (cfg.d_conv - T, 0)).to(conv_state.dtype)
            x = causal_conv1d(x, self.conv1d.weight, self.conv1d.bias)
        else:  # continue from the cached context
            x, new_conv_state = causal_conv1d_with_state(x, conv_state, self.conv1d.weight, self.conv1d.bias)
        y, last = self._scan(x, z, initial_state=None if fresh else ssm_state, return_last_state=True)
        return self.out_proj(y.transpose(1, 2)), new_conv_state, last


# ==========================================================================================================
# Language model
# ==========================================================================================================
class MambaLM(SSMLM):
    """Mamba-1 LM (mamba-ssm ``MambaLMHeadModel`` with the default Mamba mixer)."""

    config: MambaConfig
    mixer_cls = MambaMixer
    scan_family = "mamba"

    def state_shapes(self, batch_size):
        c = self.config
        return (batch_size, c.d_inner, c.d_conv), (batch_size, c.d_inner, c.d_state)


# ==========================================================================================================
# Registry entry
# ==========================================================================================================
ARCH = Architecture(
    name="mamba",
    config_cls=MambaConfig,
    model_cls=MambaLM,
    presets={
        "tiny": dict(d_model=64, n_layer=2, vocab_size=512, max_seq_len=128),
        "small": dict(d_model=128, n_layer=4, vocab_size=512, max_seq_len=256),
        "130m": dict(d_model=768, n_layer=24, vocab_size=GPT_NEOX_VOCAB, max_seq_len=2048),
        "370m": dict(d_model=1024, n_layer=48, vocab_size=GPT_NEOX_VOCAB, max_seq_len=2048),
        "790m": dict(d_model=1536, n_layer=48, vocab_size=GPT_NEOX_VOCAB, max_seq_len=2048),
        "1.4b": dict(d_model=2048, n_layer=48, vocab_size=GPT_NEOX_VOCAB, max_seq_len=2048),
    },
    description="Mamba-1 selective SSM LM (Gu & Dao 2023), mamba-ssm MambaLMHeadModel layout",
    # Parameter counts of the released state-spaces/mamba-* checkpoints (embedding 50280 x d, tied head), as
    # their fp32 pytorch_model.bin sizes on the hub give them (bytes / 4, less the pickle's few hundred bytes:
    # tests/models/test_published_counts.py::test_mamba1_release_file_size_is_reproduced). The names are
    # rounded: "1.4b" actually holds 1.372B parameters (2% under its name), hence exact counts.
    published={
        "130m": 129_135_360,
        "370m": 371_516_416,
        "790m": 793_204_224,
        "1.4b": 1_372_178_432,
    },
    published_tolerance=0.01,
)

# SSMCache is re-exported: the decode cache type of MambaLM.allocate_cache
__all__ = ["MambaConfig", "MambaMixer", "MambaLM", "ARCH", "SSMCache"]
