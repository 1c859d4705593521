"""The GPT-2 recipe the TokenFormer paper compared against (Radford et al. 2019): learned absolute positions
(1024), LayerNorm with weight and bias, GELU (tanh approximation, GPT-2's gelu_new) MLP 4x, biases on every
linear layer, tied embeddings, vocab 50257. Parameter names differ from HF's GPT-2 but shapes and counts match
(c_attn is split into wq/wk/wv)."""
from .base import Architecture
from .transformer import Transformer, TransformerConfig

GPT2 = dict(
    projection="linear", ffn="gelu_mlp", gelu_approximate="tanh", norm="layernorm", norm_affine=True,
    norm_bias=True, positions="learned", bias=True, tied_embeddings=True, value_init="scaled",
)


def _preset(n_layers, d, heads):
    return dict(GPT2, n_layers=n_layers, d_model=d, n_heads=heads, ffn_hidden=4 * d, vocab_size=50257, max_seq_len=1024)


PRESETS = {
    "tiny": dict(GPT2, n_layers=2, d_model=64, n_heads=4, ffn_hidden=256, vocab_size=512, max_seq_len=128),
    "small": dict(GPT2, n_layers=4, d_model=128, n_heads=4, ffn_hidden=512, vocab_size=512, max_seq_len=256),
    "124m": _preset(12, 768, 12),
    "350m": _preset(24, 1024, 16),
    "774m": _preset(36, 1280, 20),
    "1.5b": _preset(48, 1600, 25),
}

# the released checkpoints' parameter counts (HF gpt2, gpt2-medium, gpt2-large, gpt2-xl)
PUBLISHED = {"124m": 124_439_808, "350m": 354_823_168, "774m": 774_030_080, "1.5b": 1_557_611_200}

ARCH = Architecture(
    name="gpt2", config_cls=TransformerConfig, model_cls=Transformer, presets=PRESETS,
    description="GPT-2 recipe: learned positions, LayerNorm+bias, GELU MLP 4x, biases",
    published=PUBLISHED, published_tolerance=0.01,
)
