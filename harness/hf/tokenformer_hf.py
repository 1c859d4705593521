"""TokenFormer as a Hugging Face ``transformers`` model: the harness's tokenformer forward, standalone.

This file imports torch and transformers only -- never ``harness`` or ``models`` -- because ``harness export``
copies it next to the weights as ``modeling_tokenformer.py``: ``AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)`` then runs it on a machine without this package and offline. With the package
installed, ``TokenFormerForCausalLM.from_pretrained(DIR)`` from here does the same without remote code.

Parameter names are the harness's own (``tok_emb``, ``blocks.{i}.attn.wq.key_param_tokens``, ``norm_f``...), so
the exported safetensors are the harness checkpoint's tensors unchanged. The math follows models/ exactly:

    block:      x = x + O(attn(rot(Q(n1 x)), rot(K(n1 x)), V(n1 x)));  x = x + FFN(n2 x)
    Pattention: y = norm(x K_P^T) V_P, norm one of l2_norm_gelu | gelu_l2_norm | softmax (sqrt(n) / n factors
                at ``scale_tokens`` when growth held them, else the token count)
    rotary:     GPT-NeoX halves layout on the first rot dims of each head (25% for the official configs)

No KV cache: generation recomputes the whole prefix each step (correct, quadratic; the harness's own
``allocate_cache``/``step`` is the fast path). Padding masks are refused rather than silently ignored.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

NORMALIZATIONS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")


class TokenFormerConfig(PretrainedConfig):
    """Field names follow the official GPT-NeoX configs (qkv_slot_num, rotary_pct, norm_activation_type...)."""

    model_type = "tokenformer_bench"

    def __init__(self, vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 qkv_slot_num=768, proj_slot_num=768, ffn_slot_num=3072, norm_activation_type="l2_norm_gelu",
                 rotary_pct=0.25, rotary_emb_base=10000.0, max_position_embeddings=2048, norm="layernorm",
                 norm_affine=False, norm_bias=False, final_norm_affine=True, final_norm_bias=True,
                 layer_norm_eps=1e-5, pattention_scale_tokens=None, tie_word_embeddings=True, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.qkv_slot_num, self.proj_slot_num, self.ffn_slot_num = qkv_slot_num, proj_slot_num, ffn_slot_num
        self.norm_activation_type = norm_activation_type
        self.rotary_pct, self.rotary_emb_base = rotary_pct, rotary_emb_base
        self.max_position_embeddings = max_position_embeddings
        self.norm, self.norm_affine, self.norm_bias = norm, norm_affine, norm_bias
        self.final_norm_affine, self.final_norm_bias = final_norm_affine, final_norm_bias
        self.layer_norm_eps = layer_norm_eps
        self.pattention_scale_tokens = dict(pattention_scale_tokens or {})  # {module name: held n}
        kwargs.setdefault("use_cache", False)  # there is no cache to use
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def _norm(cfg, affine: bool, bias: bool) -> nn.Module:
    d = cfg.hidden_size
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(d, eps=cfg.layer_norm_eps, elementwise_affine=affine)
    return nn.LayerNorm(d, eps=cfg.layer_norm_eps, elementwise_affine=affine, bias=bias)


class Pattention(nn.Module):
    def __init__(self, d_in: int, d_out: int, n: int, normalization: str, scale_tokens: int | None):
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"norm_activation_type {normalization!r} is not one of {', '.join(NORMALIZATIONS)}")
        self.key_param_tokens = nn.Parameter(torch.empty(n, d_in))     # (n, d_in)
        self.value_param_tokens = nn.Parameter(torch.empty(n, d_out))  # (n, d_out)
        self.normalization, self.scale_tokens = normalization, scale_tokens or n

    def forward(self, x):  # (..., d_in) -> (..., d_out)
        s = x @ self.key_param_tokens.t()                              # (..., n)
        s = s.float() if s.dtype in (torch.float16, torch.bfloat16) else s
        n, eps = self.scale_tokens, 1e-6  # the eps clamp: zero keys give zeros, not NaN (as models/pattention.py)
        if self.normalization == "l2_norm_gelu":
            w = F.gelu(s * (math.sqrt(n) / s.norm(dim=-1, keepdim=True).clamp_min(eps)))
        elif self.normalization == "gelu_l2_norm":
            g = F.gelu(s)
            w = g * (math.sqrt(n) / g.norm(dim=-1, keepdim=True).clamp_min(eps))
        else:
            w = torch.softmax(s, dim=-1) * n
        return w.to(x.dtype) @ self.value_param_tokens


class Attention(nn.Module):
    def __init__(self, cfg, i: int):
        super().__init__()
        d, held = cfg.hidden_size, cfg.pattention_scale_tokens
        self.n_heads = cfg.num_attention_heads

        def proj(name, n):
            return Pattention(d, d, n, cfg.norm_activation_type, held.get(f"blocks.{i}.attn.{name}"))
        self.wq, self.wk, self.wv = proj("wq", cfg.qkv_slot_num), proj("wk", cfg.qkv_slot_num), proj("wv", cfg.qkv_slot_num)
        self.wo = proj("wo", cfg.proj_slot_num)

    def forward(self, x, cos, sin):  # x (B, T, d); cos, sin (T, rot)
        B, T, d = x.shape

        def heads(t):  # (B, T, d) -> (B, H, T, hd)
            return t.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2)
        q, k, v = heads(self.wq(x)), heads(self.wk(x)), heads(self.wv(x))
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, d))


def _rotate(x, cos, sin):
    """Rotary on the first cos.shape[-1] dims, GPT-NeoX layout (two halves, not interleaved)."""
    rot = cos.shape[-1]
    if rot == 0:
        return x
    xr, xp = x[..., :rot], x[..., rot:]
    x1, x2 = xr.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([xr * cos.to(x.dtype) + rotated * sin.to(x.dtype), xp], dim=-1)


class Block(nn.Module):
    def __init__(self, cfg, i: int):
        super().__init__()
        self.norm1 = _norm(cfg, cfg.norm_affine, cfg.norm_bias)
        self.attn = Attention(cfg, i)
        self.norm2 = _norm(cfg, cfg.norm_affine, cfg.norm_bias)
        d = cfg.hidden_size
        self.ffn = Pattention(d, d, cfg.ffn_slot_num, cfg.norm_activation_type,
                              cfg.pattention_scale_tokens.get(f"blocks.{i}.ffn"))

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.ffn(self.norm2(x))


class TokenFormerForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TokenFormerConfig
    base_model_prefix = "tokenformer"
    main_input_name = "input_ids"

    def __init__(self, config: TokenFormerConfig):
        super().__init__(config)
        d, hd = config.hidden_size, config.hidden_size // config.num_attention_heads
        self.tok_emb = nn.Embedding(config.vocab_size, d)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm_f = _norm(config, config.final_norm_affine, config.final_norm_bias)
        # tied: the head is the embedding matrix itself (no second parameter, so no tying machinery)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(d, config.vocab_size, bias=False)
        rot = int(hd * config.rotary_pct)
        self.rot_dims = rot - rot % 2
        self.post_init()

    def _init_weights(self, module):  # only for weights a checkpoint lacks; from_pretrained overwrites the rest
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, Pattention):
            nn.init.normal_(module.key_param_tokens, std=std)
            nn.init.normal_(module.value_param_tokens, std=std)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)

    def get_input_embeddings(self):
        return self.tok_emb

    def set_input_embeddings(self, value):
        self.tok_emb = value

    def _tables(self, T: int, device):
        """cos, sin (T, rot) for positions 0..T-1 in fp32, as models/components.Rotary builds them."""
        rot = self.rot_dims
        inv = 1.0 / self.config.rotary_emb_base ** (torch.arange(0, rot, 2, device=device, dtype=torch.float32) / rot)
        ang = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv)
        ang = torch.cat([ang, ang], dim=-1)
        return ang.cos(), ang.sin()

    def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, return_dict=None,
                **unused):  # (B, T) -> logits (B, T, V)
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("TokenFormerForCausalLM: padded batches (attention_mask with zeros) are not supported")
        x = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        cos, sin = self._tables(x.shape[1], x.device)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        x = self.norm_f(x)
        logits = F.linear(x, self.tok_emb.weight) if self.lm_head is None else self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids}  # no cache: every step sees the whole prefix
