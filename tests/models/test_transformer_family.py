"""The attention family (tokenformer, transformer_pp, gpt2 and every component swap between them)."""
import math

import pytest
import torch
import torch.nn.functional as F

from models import registry
from models.pattention import Pattention
from models.transformer import Transformer, TransformerConfig

from .test_conformance import reference_flops


def official_tokenformer_forward(model, x):
    """TokenFormer's forward written out from the paper / official code, independent of the components:
    explicit masked softmax attention, GPT-NeoX rotary (rotate_half) on the first 25% of head dims."""
    cfg = model.config
    H, hd = cfg.n_heads, cfg.d_model // cfg.n_heads
    rot = int(hd * 0.25)
    B, S = x.shape

    def patt(p, t):
        s = t @ p.key_param_tokens.T
        n = p.key_param_tokens.shape[0]
        return F.gelu(s / s.norm(dim=-1, keepdim=True) * math.sqrt(n)) @ p.value_param_tokens

    def ln(t, eps=1e-5):
        return (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + eps)

    inv = 1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)
    ang = torch.outer(torch.arange(S).float(), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(t):  # (B, S, H, hd)
        r, p = t[..., :rot], t[..., rot:]
        r1, r2 = r[..., : rot // 2], r[..., rot // 2:]
        c, s_ = cos[None, :, None], sin[None, :, None]
        return torch.cat([r * c + torch.cat([-r2, r1], -1) * s_, p], -1)

    h = model.tok_emb.weight[x]
    mask = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)
    for blk in model.blocks:
        a = ln(h)
        q, k, v = (patt(p, a).view(B, S, H, hd) for p in (blk.attn.wq, blk.attn.wk, blk.attn.wv))
        q, k = rope(q).transpose(1, 2), rope(k).transpose(1, 2)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        o = (att @ v.transpose(1, 2)).transpose(1, 2).reshape(B, S, -1)
        h = h + patt(blk.attn.wo, o)
        h = h + patt(blk.ffn, ln(h))
    h = F.layer_norm(h, (cfg.d_model,), model.norm_f.weight, model.norm_f.bias, 1e-5)
    return h @ model.tok_emb.weight.T


def test_tokenformer_matches_written_out_official_forward():
    model = registry.build("tokenformer", "tiny").double().eval()
    x = torch.randint(0, model.config.vocab_size, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_tokenformer_forward(model, x), rtol=1e-9, atol=1e-9)


def test_tokenformer_structure_is_official():
    model = registry.build("tokenformer", "tiny")
    blk = model.blocks[0]
    for m in (blk.attn.wq, blk.attn.wk, blk.attn.wv, blk.attn.wo, blk.ffn):
        assert isinstance(m, Pattention) and m.normalization == "l2_norm_gelu"
    assert blk.norm1.weight is None and blk.norm1.bias is None          # non-affine LayerNorm
    assert model.norm_f.weight is not None and model.norm_f.bias is not None
    assert model.lm_head.weight is model.tok_emb.weight                 # tied
    assert model.rotary.rot_dims == (64 // 4) // 4                      # 25% of head dims
    assert not any(n.endswith("bias") for n, _ in model.named_parameters() if not n.startswith("norm_f"))


def test_tokenformer_init_scales():
    cfg = registry.get_config("tokenformer", "small")
    model = Transformer(cfg)
    keys = torch.cat([m.key_param_tokens.flatten() for m in model.modules() if isinstance(m, Pattention)])
    values = torch.cat([m.value_param_tokens.flatten() for m in model.modules() if isinstance(m, Pattention)])
    assert keys.std().item() == pytest.approx(0.02, rel=0.02)
    assert values.std().item() == pytest.approx(2 / (cfg.n_layers * math.sqrt(cfg.d_model)), rel=0.02)


def test_transformer_pp_and_gpt2_recipes():
    tpp = registry.build("transformer_pp", "tiny")
    assert isinstance(tpp.blocks[0].norm1, torch.nn.RMSNorm) and tpp.rotary.rot_dims == 16
    assert tpp.config.ffn_hidden == 192  # 8/3 * 64 rounded up to 64
    assert not any(n.endswith("bias") for n, _ in tpp.named_parameters())
    gpt2 = registry.build("gpt2", "tiny")
    assert gpt2.rotary is None and gpt2.pos_emb is not None
    assert gpt2.blocks[0].norm1.bias is not None and gpt2.blocks[0].attn.wq.bias is not None


def test_untied_embeddings_option():
    model = registry.build("transformer_pp", "tiny", tied_embeddings=False)
    assert model.lm_head.weight is not model.tok_emb.weight
    assert model.num_params() == model.counted_params()
    assert model.num_params() - model.num_params(non_embedding=True) == 2 * 512 * 64


# every component swap the ablation ladder walks through keeps exact counts, with no new formula
SWAPS = [
    dict(ffn="pattention", ffn_hidden=256),
    dict(ffn="gelu_mlp", ffn_hidden=256),
    dict(projection="pattention", qkv_tokens=48, proj_tokens=80, ffn="pattention", ffn_hidden=256),
    dict(projection="pattention", pattention_norm="softmax", norm="layernorm", norm_affine=False,
         final_norm_affine=True, final_norm_bias=True, rotary_fraction=0.25),
    dict(projection="linear", bias=True, positions="learned", tied_embeddings=False),
    dict(pattention_norm="gelu_l2_norm", projection="pattention", norm="layernorm", norm_bias=True),
]


@pytest.mark.parametrize("swap", SWAPS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_component_swaps_keep_counts_exact(swap):
    model = registry.build("transformer_pp", "tiny", **swap)
    assert model.num_params() == model.counted_params()
    assert model.num_params(non_embedding=True) == model.counted_params(non_embedding=True)
    x = torch.randint(0, 512, (2, 128))
    analytic = model.flops_per_token(128) * x.numel()
    assert abs(reference_flops(model, x) - analytic) / analytic < 0.02


@pytest.mark.parametrize("field,value", [("ffn", "moe"), ("projection", "lora"), ("norm", "batchnorm"),
                                         ("positions", "alibi"), ("pattention_norm", "relu")])
def test_bad_component_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TransformerConfig(**{field: value})


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="n_heads"):
        TransformerConfig(d_model=64, n_heads=5)
