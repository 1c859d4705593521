"""Size ladders: each rung's counts are the meta-device build's, the family rules hold, the span is >= 30x."""
import math

import pytest

from models import ladder, registry


@pytest.mark.parametrize("scale", sorted(ladder.SCALES))
@pytest.mark.parametrize("model", ladder.names())
def test_rung_counts_equal_the_meta_build(model, scale):
    rungs = ladder.ladder(model, scale)
    for r in rungs:
        m = registry.build(model, r.preset, device="meta", **r.overrides)
        assert m.counted_params() == r.params, r.name
        assert m.counted_params(non_embedding=True) == r.non_embedding, r.name
        assert m.flops_per_token(ladder.get_scale(scale).seq_len) == r.flops_per_token
    # at least 30x in non-embedding parameters, strictly increasing
    assert rungs[-1].non_embedding / rungs[0].non_embedding >= 30
    assert all(a.non_embedding < b.non_embedding for a, b in zip(rungs, rungs[1:]))


@pytest.mark.parametrize("scale", sorted(ladder.SCALES))
def test_family_rules(scale):
    sc = ladder.get_scale(scale)
    for d in sc.widths:
        L = max(1, round(d / sc.aspect))
        tf = registry.get_config("tokenformer", sc.base["tokenformer"], **ladder.shape("tokenformer", d, sc))
        # official presets: qkv = proj = d parameter tokens, ffn = 4 d (150m: 768 / 768 / 3072)
        assert (tf.qkv_tokens, tf.proj_tokens, tf.ffn_hidden, tf.n_layers) == (d, d, 4 * d, L)
        tpp = registry.get_config("transformer_pp", sc.base["transformer_pp"],
                                  **ladder.shape("transformer_pp", d, sc))
        assert tpp.ffn_hidden == 64 * math.ceil(8 * d / 3 / 64)       # SwiGLU 8/3 d, to a multiple of 64
        assert tpp.d_model // tpp.n_heads == min(d, sc.head_dim)             # head dim fixed (one head below)
        g = registry.get_config("gpt2", sc.base["gpt2"], **ladder.shape("gpt2", d, sc))
        assert g.ffn_hidden == 4 * d
        for name in ("mamba", "mamba2"):
            m = registry.get_config(name, sc.base[name], **ladder.shape(name, d, sc))
            assert m.expand == 2 and m.n_layer == 2 * L and m.d_state == sc.ssm[name]["d_state"]
        assert tf.vocab_size == tpp.vocab_size == g.vocab_size == sc.vocab_size


def test_gpu_ladder_spans_20m_to_400m_total():
    for model in ("tokenformer", "transformer_pp", "mamba"):
        rungs = ladder.ladder(model, "gpu")
        assert rungs[0].params < 25e6 and rungs[-1].params > 400e6


def test_unknown_ladder_names_the_valid_ones():
    with pytest.raises(registry.UnknownModelError, match="tokenformer"):
        ladder.ladder("nope")
    with pytest.raises(registry.UnknownModelError, match="cpu, gpu"):
        ladder.ladder("tokenformer", "tpu")
