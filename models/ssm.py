"""What the Mamba-1 (:mod:`models.mamba`) and Mamba-2 (:mod:`models.mamba2`) LMs share, laid out exactly like
mamba-ssm's ``MambaLMHeadModel``: the config shape mixin, the norm, the init helpers, the block, the backbone,
the decode cache and the LM base (forward, cached step, the model contract of models.base).

Parameter names and shapes are identical to mamba-ssm (``backbone.embedding.weight``,
``backbone.layers.{i}.mixer.*``, ``backbone.layers.{i}.norm.weight``, ``backbone.norm_f.weight``,
``lm_head.weight`` tied to the embedding), so a released checkpoint's state_dict loads without renaming.
The model math follows mamba-ssm's non-fused reference semantics; the sequence mixing itself lives in the
mixers, on top of :mod:`models.ops` (pure-PyTorch chunked scans everywhere, mamba-ssm's kernels on CUDA when
installed; :mod:`models.ops.dispatch` says which ran).

    block:  residual = residual + hidden         (residual kept in fp32)
            hidden   = mixer(RMSNorm(residual))
    model:  embedding -> n_layer blocks -> RMSNorm(residual + hidden) -> tied lm_head

A family module defines its config (``SSMShape`` + ``ModelConfig``), its mixer and an ``SSMLM`` subclass
with ``mixer_cls``, ``scan_family`` (the ``arch`` of :func:`models.ops.dispatch.scan_backend`) and
``state_shapes``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.base import CausalLM, DecodeCache
from models.ops import dispatch

GPT_NEOX_VOCAB = 50277  # the released checkpoints of both families use the GPT-NeoX-20B tokenizer


def pad_to_multiple(n: int, multiple: int) -> int:
    """n rounded up to a multiple of ``multiple`` (mamba-ssm's vocabulary padding; <= 1: n itself)."""
    return n if multiple <= 1 else -(-n // multiple) * multiple


# ==========================================================================================================
# Config shape (both families' configs; each config owns its analytic counts)
# ==========================================================================================================
class SSMShape:
    """What Mamba-1 and Mamba-2 configs share: the table's n_layers / width, the inner width and the padded
    embedding (mamba-ssm's pad_vocab_size_multiple)."""

    depth_field = "n_layer"  # mamba-ssm's name
    # a Mamba block is one mixer (no MLP beside it) and mamba-ssm's fused scan saves about half a transformer
    # block's activations; counted at half, pre-flight's estimate stays below the CPU reference scan's measured
    # ~150 B per token and width too
    activation_share = 0.5

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
        return pad_to_multiple(self.vocab_size, self.pad_vocab_size_multiple)

    @property
    def embedding_rows(self) -> int:
        return self.padded_vocab_size


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


def init_dt_bias(bias: torch.Tensor, dt_min: float, dt_max: float, floor: float) -> None:
    """bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]: the initial step sizes span two decades,
    so some channels remember for ~10 tokens and others for ~1000."""
    with torch.no_grad():
        u = torch.rand(bias.shape, device=bias.device, dtype=torch.float32)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
        bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus, stable for small dt


def init_out_proj(weight: torch.Tensor, n_layer: int) -> None:
    """GPT-2 style prenorm-residual rescale, as mamba-ssm's _init_weights (n_residuals_per_layer=1):
    default Linear init divided by sqrt(n_layer), so the residual stream's variance does not grow with depth."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    with torch.no_grad():
        weight.div_(math.sqrt(n_layer))


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
class SSMLM(CausalLM):
    """The LM of either family; a subclass sets the three family-specific pieces below."""

    mixer_cls: type  # MambaMixer / Mamba2Mixer: built from the config, one per block
    scan_family: str  # "mamba" / "mamba2": which kernels its scan needs (dispatch.scan_backend's arch)

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
        self.last_backend = dispatch.last_backend()
        return self._logits(hidden, residual)

    def state_shapes(self, batch_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-layer (conv_state, ssm_state) shapes of the decode cache."""
        raise NotImplementedError

    def allocate_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> SSMCache:
        """max_len is accepted for the interface and unused: the state does not grow with the sequence."""
        p = self.backbone.embedding.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        conv_shape, ssm_shape = self.state_shapes(batch_size)
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
        self.last_backend = dispatch.last_backend()
        return self._logits(hidden, residual)

    def scan_backend(self) -> str:
        """Backend a forward on this model's device would use ("mamba_ssm" / "torch_reference")."""
        return dispatch.scan_backend(self.backbone.embedding.weight.device, arch=self.scan_family)

    def backends(self) -> dict[str, str]:
        return {"scan": self.scan_backend()}

    def backends_ran(self) -> dict[str, str | None]:
        # a compiled forward may not run the Python that sets last_backend: the ops' own record then
        return {"scan": self.last_backend or dispatch.last_backend()}


__all__ = [
    "GPT_NEOX_VOCAB", "pad_to_multiple", "SSMShape", "RMSNorm", "init_dt_bias", "init_out_proj", "Block",
    "Backbone", "SSMCache", "SSMLM",
]
