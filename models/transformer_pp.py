"""Transformer++ as the Mamba paper defines it (after LLaMA): RMSNorm, rotary on all head dims, SwiGLU MLP with
hidden width 8/3 d rounded up to a multiple of 64, no biases; tied embeddings by default (``tied_embeddings``
is a preset option).

Two families of presets:
* the GPT-3 / Mamba ladder: 125m (12/768), 350m (24/1024), 760m (24/1536), 1.3b (24/2048);
* presets matched to each TokenFormer preset by parameter count. A TokenFormer layer holds 16 d^2; a
  Transformer++ layer with 8/3 d SwiGLU holds 4 d^2 + 8 d^2 = 12 d^2, so the matched preset keeps width and
  heads and takes 4/3 of the depth (rounded): tf150m 16 layers, tf450m 32, tf900m 42, tf1.5b 53.
"""
from .base import Architecture
from .transformer import Transformer, TransformerConfig

TRANSFORMER_PP = dict(
    projection="linear", ffn="swiglu", norm="rmsnorm", norm_affine=True, norm_bias=False,
    positions="rope", rotary_fraction=1.0, bias=False, tied_embeddings=True,
)


def _preset(n_layers, d, heads, **kw):
    return dict(TRANSFORMER_PP, n_layers=n_layers, d_model=d, n_heads=heads, vocab_size=50304, max_seq_len=2048, **kw)


PRESETS = {
    "tiny": dict(TRANSFORMER_PP, n_layers=2, d_model=64, n_heads=4, vocab_size=512, max_seq_len=128),
    "small": dict(TRANSFORMER_PP, n_layers=4, d_model=128, n_heads=4, vocab_size=512, max_seq_len=256),
    "125m": _preset(12, 768, 12),
    "350m": _preset(24, 1024, 16),
    "760m": _preset(24, 1536, 16),
    "1.3b": _preset(24, 2048, 32),
    "tf150m": _preset(16, 768, 12),
    "tf450m": _preset(32, 1024, 16),
    "tf900m": _preset(42, 1280, 16),
    "tf1.5b": _preset(53, 1536, 16),
}

# GPT-3 (Brown et al. 2020, arXiv 2005.14165) Table 2.1, n_params of the same (n_layers, d_model): 125M, 350M,
# 760M, 1.3B. A GPT-3 layer (4d MLP) and a Transformer++ layer (8/3 d SwiGLU) both hold ~12 d^2, so the counts
# agree within the names' rounding and the vocabulary (50257 there, 50304 here): 3%. The tf* presets have no
# published count of their own; tests/models/test_registry.py checks that each is within 3% of its TokenFormer.
PUBLISHED = {"125m": 125e6, "350m": 350e6, "760m": 760e6, "1.3b": 1.3e9}
MATCHED = {"tf150m": "150m", "tf450m": "450m", "tf900m": "900m", "tf1.5b": "1.5b"}  # preset -> tokenformer preset

ARCH = Architecture(
    name="transformer_pp", config_cls=TransformerConfig, model_cls=Transformer, presets=PRESETS,
    description="Transformer++: RMSNorm, full RoPE, SwiGLU (8/3 d), no biases",
    published=PUBLISHED, published_tolerance=0.03,
)
