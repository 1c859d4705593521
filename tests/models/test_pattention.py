import math

import pytest
import torch

from models.pattention import NORMALIZATIONS, Pattention


def direct(x, K, V, normalization, n_scale=None):
    """The formula written out, independent of the module: s = x K^T, w = f(s), y = w V."""
    s = x @ K.T
    n = n_scale or K.shape[0]
    gelu = lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))
    if normalization == "l2_norm_gelu":
        w = gelu(math.sqrt(n) * s / torch.sqrt((s * s).sum(-1, keepdim=True)))
    elif normalization == "gelu_l2_norm":
        g = gelu(s)
        w = math.sqrt(n) * g / torch.sqrt((g * g).sum(-1, keepdim=True))
    else:
        e = torch.exp(s - s.max(-1, keepdim=True).values)
        w = n * e / e.sum(-1, keepdim=True)
    return w @ V


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_direct_formula(normalization, seed):
    g = torch.Generator().manual_seed(seed)
    d_in, d_out, n = 24, 40, 96
    p = Pattention(d_in, d_out, n, normalization).double()
    with torch.no_grad():
        p.key_param_tokens.copy_(torch.randn(n, d_in, generator=g, dtype=torch.float64))
        p.value_param_tokens.copy_(torch.randn(n, d_out, generator=g, dtype=torch.float64))
    x = torch.randn(3, 7, d_in, generator=g, dtype=torch.float64)
    torch.testing.assert_close(p(x), direct(x, p.key_param_tokens, p.value_param_tokens, normalization),
                               rtol=1e-10, atol=1e-10)


def test_normalizations_differ():
    torch.manual_seed(0)
    x = torch.randn(5, 16)
    outs = []
    for norm in NORMALIZATIONS:
        torch.manual_seed(1)
        p = Pattention(16, 8, 32, norm)
        torch.nn.init.normal_(p.key_param_tokens)
        torch.nn.init.normal_(p.value_param_tokens)
        outs.append(p(x))
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])


@pytest.mark.parametrize("normalization", ["l2_norm_gelu", "gelu_l2_norm"])
def test_zero_keys_give_no_nan(normalization):
    p = Pattention(8, 8, 16, normalization)
    torch.nn.init.zeros_(p.key_param_tokens)
    torch.nn.init.normal_(p.value_param_tokens)
    y = p(torch.randn(4, 8))
    assert torch.isfinite(y).all() and torch.equal(y, torch.zeros_like(y))


def _grow_with_zeros(p, m, hold_scale):
    n = p.n_tokens
    q = Pattention(p.d_in, p.d_out, n + m, p.normalization, scale_tokens=n if hold_scale else None)
    with torch.no_grad():
        q.key_param_tokens.zero_()
        q.value_param_tokens.zero_()
        q.key_param_tokens[:n] = p.key_param_tokens
        q.value_param_tokens[:n] = p.value_param_tokens
    return q


def test_zero_growth_preserves_function_only_with_scale_held():
    torch.manual_seed(0)
    p = Pattention(16, 16, 32)
    torch.nn.init.normal_(p.key_param_tokens, std=0.02)
    torch.nn.init.normal_(p.value_param_tokens, std=0.02)
    x = torch.randn(6, 16)
    torch.testing.assert_close(_grow_with_zeros(p, 32, hold_scale=True)(x), p(x), rtol=1e-6, atol=1e-7)
    # plain zero-init growth is NOT function-preserving: sqrt(n) became sqrt(n + m)
    assert (_grow_with_zeros(p, 32, hold_scale=False)(x) - p(x)).abs().max() > 1e-4


def test_unknown_normalization_is_rejected():
    with pytest.raises(ValueError, match="l2_norm_gelu"):
        Pattention(4, 4, 4, "relu")
