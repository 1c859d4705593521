"""One decoder-only transformer assembled from swappable components.

tokenformer, transformer_pp and gpt2 are not three model files but three settings of this config (see their
modules); every ablation rung between them is a fourth, fifth ... setting. Counts come from the components,
so a swapped model's ``num_params`` and ``flops_per_token`` stay exact with no new formula.

Block (pre-norm, sequential residual, as GPT-2, Pythia/TokenFormer and LLaMA):
    x = x + O(attn(rotary(Q(n1(x))), rotary(K(n1(x))), V(n1(x))))
    x = x + FFN(n2(x))
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .base import CausalLM, ModelConfig
from .components import (FFNS, NORMS, POSITIONS, PROJECTIONS, FFNSpec, KVCache, NormSpec, ProjSpec, Rotary,
                         CausalSelfAttention, attention_flops, init_normal_, scaled_std, writer_params)
from .pattention import IMPLS as PATTENTION_IMPLS, NORMALIZATIONS, Pattention


def _round_up(x: float, multiple: int) -> int:
    return int(multiple * math.ceil(x / multiple))


@dataclass
class TransformerConfig(ModelConfig):
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    # Q/K/V/O token-parameter projections
    projection: str = "linear"          # linear | pattention
    qkv_tokens: int = 0                 # pattention tokens of each of Q, K, V (0: d_model)
    proj_tokens: int = 0                # pattention tokens of the attention output (0: d_model)
    pattention_norm: str = "l2_norm_gelu"
    # how every Pattention computes (models/pattention.py): reference | recompute | triton | auto. Numerics
    # only, never shapes: counts and checkpoints are the same for all; configs saved before the field load
    # as reference, the path they ran
    pattention_impl: str = "reference"
    # FFN
    ffn: str = "swiglu"                 # swiglu | gelu_mlp | pattention
    ffn_hidden: int = 0                 # hidden width, or pattention tokens (0: 8/3 d rounded up to 64 for
                                        # swiglu, 4 d otherwise)
    gelu_approximate: str = "none"      # gelu_mlp only: "tanh" is GPT-2's gelu_new
    # norms: the block norms, and the final norm (None: same as the block norms)
    norm: str = "rmsnorm"               # rmsnorm | layernorm
    norm_affine: bool = True
    norm_bias: bool = False
    final_norm_affine: bool | None = None
    final_norm_bias: bool | None = None
    norm_eps: float = 1e-5
    # positions
    positions: str = "rope"             # rope | learned
    rotary_fraction: float = 1.0        # share of each head's dims that rotary rotates
    rope_base: float = 10000.0
    # the rest
    bias: bool = False                  # biases of linear projections and MLPs
    tied_embeddings: bool = True
    init_std: float = 0.02
    value_init: str = "wang"            # pattention value tokens: wang = 2/(L sqrt(d)) | scaled = std/sqrt(2L)
    extra: dict = field(default_factory=dict)  # free-form labels (e.g. which paper preset this is)

    def __post_init__(self):
        def check(name, value, valid):
            if value not in valid:
                raise ValueError(f"config field {name}={value!r} is not one of: {', '.join(map(str, valid))}")
        check("projection", self.projection, PROJECTIONS)
        check("ffn", self.ffn, FFNS)
        check("norm", self.norm, NORMS)
        check("positions", self.positions, POSITIONS)
        check("pattention_norm", self.pattention_norm, NORMALIZATIONS)
        check("pattention_impl", self.pattention_impl, PATTENTION_IMPLS)
        check("value_init", self.value_init, ("wang", "scaled"))
        check("gelu_approximate", self.gelu_approximate, ("none", "tanh"))
        for name in ("n_layers", "d_model", "n_heads", "vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config field {name} must be > 0, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"config field d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if not 0.0 <= self.rotary_fraction <= 1.0:
            raise ValueError(f"config field rotary_fraction must be in [0, 1], got {self.rotary_fraction}")
        # resolve defaults so the config states every shape explicitly
        self.qkv_tokens = self.qkv_tokens or self.d_model
        self.proj_tokens = self.proj_tokens or self.d_model
        if not self.ffn_hidden:
            self.ffn_hidden = _round_up(8 * self.d_model / 3, 64) if self.ffn == "swiglu" else 4 * self.d_model
        if self.final_norm_affine is None:
            self.final_norm_affine = self.norm_affine
        if self.final_norm_bias is None:
            self.final_norm_bias = self.norm_bias
        self.block_norm_spec  # validates the norm combination now, not at build time
        self.final_norm_spec

    # ---- component descriptions: the single source of the model and of its counts -------------------------
    @property
    def width(self) -> int:
        return self.d_model

    @property
    def position_table(self) -> bool:
        return self.positions == "learned"

    @property
    def block_norm_spec(self) -> NormSpec:
        return NormSpec(self.norm, self.norm_affine, self.norm_bias, self.norm_eps)

    @property
    def final_norm_spec(self) -> NormSpec:
        return NormSpec(self.norm, self.final_norm_affine, self.final_norm_bias, self.norm_eps)

    @property
    def uses_pattention(self) -> bool:
        """Whether any projection or the FFN is a Pattention (so that ``pattention_impl`` matters)."""
        return self.projection == "pattention" or self.ffn == "pattention"

    def _proj(self, tokens: int) -> ProjSpec:
        return ProjSpec(self.projection, tokens if self.projection == "pattention" else 0, self.pattention_norm, self.bias)

    @property
    def qkv_spec(self) -> ProjSpec:
        return self._proj(self.qkv_tokens)

    @property
    def out_spec(self) -> ProjSpec:
        return self._proj(self.proj_tokens)

    @property
    def ffn_spec(self) -> FFNSpec:
        return FFNSpec(self.ffn, self.ffn_hidden, self.bias, self.gelu_approximate, self.pattention_norm)

    # ---- counts --------------------------------------------------------------------------------------------
    def layer_params(self) -> int:
        d = self.d_model
        return (2 * self.block_norm_spec.params(d) + 3 * self.qkv_spec.params(d, d) + self.out_spec.params(d, d)
                + self.ffn_spec.params(d))

    def embedding_params(self) -> int:
        """Token embedding, learned positions and an untied output head: what 'non-embedding' leaves out."""
        V, d = self.vocab_size, self.d_model
        return V * d + (self.max_seq_len * d if self.positions == "learned" else 0) + (0 if self.tied_embeddings else V * d)

    def num_params(self, non_embedding: bool = False) -> int:
        body = self.n_layers * self.layer_params() + self.final_norm_spec.params(self.d_model)
        return body if non_embedding else body + self.embedding_params()

    def forward_flops_per_token(self, seq_len: int | None = None) -> int:
        """Per layer: Q, K, V and O projections (2 * weights each: linear 2 d^2, pattention 2 n (d+d)), the FFN
        (swiglu 6 d h, gelu_mlp 4 d h, pattention 4 d n) and token-token attention 4 S d at context S. Plus the
        output head 2 V d. Embedding lookups, norms, rotary, activations and biases are elementwise: not counted."""
        S, d = seq_len or self.max_seq_len, self.d_model
        per_layer = (3 * self.qkv_spec.flops(d, d) + self.out_spec.flops(d, d) + self.ffn_spec.flops(d)
                     + attention_flops(d, S))
        return self.n_layers * per_layer + 2 * self.vocab_size * d

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token = forward + backward (2 x forward: input and weight gradients) = 3 x forward."""
        return 3.0 * self.forward_flops_per_token(seq_len)

    def implementation_fields(self) -> dict:
        return {"pattention_impl": self.pattention_impl} if self.uses_pattention else {}


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, device=None):
        super().__init__()
        d = cfg.d_model
        self.norm1 = cfg.block_norm_spec.build(d, device)
        self.attn = CausalSelfAttention(d, cfg.n_heads, cfg.qkv_spec, cfg.out_spec, device)
        self.norm2 = cfg.block_norm_spec.build(d, device)
        self.ffn = cfg.ffn_spec.build(d, device)
        self.ffn_output = cfg.ffn_spec.output_name

    def forward(self, x, rotary=None, cache=None, layer=0):  # (B, T, d) -> (B, T, d)
        x = x + self.attn(self.norm1(x), rotary, cache, layer)
        return x + self.ffn(self.norm2(x))

    def residual_outputs(self) -> list[str]:
        """The attention output projection and the FFN's down projection (the whole FFN when it is one
        Pattention): the two writers into the residual stream."""
        ffn_out = f"ffn.{self.ffn_output}" if self.ffn_output else "ffn"
        return writer_params("attn.wo", self.attn.wo) + writer_params(ffn_out, self.get_submodule(ffn_out))


class Transformer(CausalLM):
    def __init__(self, config: TransformerConfig, device=None):
        super().__init__()
        self.config = cfg = config
        V, d = cfg.vocab_size, cfg.d_model
        self.tok_emb = nn.Embedding(V, d, device=device)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, d, device=device) if cfg.positions == "learned" else None
        self.rotary = (Rotary(d // cfg.n_heads, cfg.rotary_fraction, cfg.max_seq_len, cfg.rope_base, device)
                       if cfg.positions == "rope" else None)
        self.blocks = nn.ModuleList(Block(cfg, device) for _ in range(cfg.n_layers))
        self.norm_f = cfg.final_norm_spec.build(d, device)
        self.lm_head = nn.Linear(d, V, bias=False, device=device)
        if cfg.tied_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # set here rather than through ProjSpec / FFNSpec: the implementation is no part of the shapes they describe
        for m in self.modules():
            if isinstance(m, Pattention):
                m.impl = cfg.pattention_impl
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2/nanoGPT style N(0, std) with residual-output projections at std/sqrt(2L); Pattention as the
        official TokenFormer code: keys N(0, std), values N(0, 2/(L sqrt(d))) (GPT-NeoX's wang_init)."""
        cfg = self.config
        std, out_std = cfg.init_std, scaled_std(cfg.init_std, cfg.n_layers)
        value_std = 2.0 / (cfg.n_layers * math.sqrt(cfg.d_model)) if cfg.value_init == "wang" else out_std
        residual_writers = {id(p) for p in self.residual_output_parameters()}
        for m in self.modules():
            if isinstance(m, nn.Linear):
                init_normal_(m.weight, out_std if id(m.weight) in residual_writers else std)
                if m.bias is not None and m.bias.device.type != "meta":
                    nn.init.zeros_(m.bias)
            elif isinstance(m, Pattention):
                init_normal_(m.key_param_tokens, std)
                init_normal_(m.value_param_tokens, value_std)
            elif isinstance(m, nn.Embedding):
                init_normal_(m.weight, std)
            elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and m.weight is not None and m.weight.device.type != "meta":
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def embedding_parameters(self) -> list[nn.Parameter]:
        params = [self.tok_emb.weight]
        if self.pos_emb is not None:
            params.append(self.pos_emb.weight)
        if not self.config.tied_embeddings:
            params.append(self.lm_head.weight)
        return params

    def block_modules(self) -> list[nn.Module]:
        return list(self.blocks)

    def residual_outputs(self) -> list[list[str]]:
        return [blk.residual_outputs() for blk in self.blocks]

    def backends(self) -> dict[str, str]:
        return {"pattention": self.config.pattention_impl} if self.config.uses_pattention else {}

    def backends_ran(self) -> dict[str, str | None]:
        """``auto`` resolves per device and shape: the implementations the last call ran, comma-joined."""
        if not self.config.uses_pattention:
            return {}
        ran = sorted({m.last_impl for m in self.modules() if isinstance(m, Pattention) and m.last_impl})
        return {"pattention": ",".join(ran) or None}

    def _run(self, input_ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        B, T = input_ids.shape
        start = cache.pos if cache is not None else 0
        x = self.tok_emb(input_ids)                                            # (B, T, d)
        if self.pos_emb is not None:
            if start + T > self.config.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds the learned positions "
                                 f"(max_seq_len={self.config.max_seq_len})")
            x = x + self.pos_emb(torch.arange(start, start + T, device=input_ids.device))
        for i, blk in enumerate(self.blocks):
            x = blk(x, self.rotary, cache, i)
        return self.lm_head(self.norm_f(x))                                     # (B, T, V)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._run(input_ids, None)

    def allocate_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        p = self.tok_emb.weight
        cfg = self.config
        return KVCache(cfg.n_layers, batch_size, cfg.n_heads, cfg.d_model // cfg.n_heads, max_len,
                       device or p.device, dtype or p.dtype)

    def step(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        logits = self._run(input_ids, cache)
        cache.pos += input_ids.shape[1]
        return logits
