"""Pattention implementations (issue 19) against the reference path: values and gradients of x, key tokens and
value tokens; memory (no T x n tensor saved by the recompute path); per-model selection and old configs.

The triton kernel runs on CPU tensors in Triton's interpreter; its tests skip only when triton is missing.
"""
import importlib.util
import math
import os

import pytest
import torch

from models import registry
from models.pattention import IMPLS, NORMALIZATIONS, Pattention, PattentionRecompute
from models.transformer import TransformerConfig

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    if not torch.cuda.is_available():
        # triton.jit picks the interpreter when the kernels are decorated (at import), and triton's lazily
        # imported parts check the same variable later: it has to stay set for the session. Without CUDA
        # nothing else here runs triton (inductor's CPU backend is C++).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from models.ops import pattention_triton
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install .[triton])")

FP32_RTOL = 1e-5   # relative to the largest |reference| entry of each row (see rel_err)
BF16_RTOL = 2e-2


def rel_err(a, b):
    """max over rows of max|a - b| / max|b| in that row: row-wise, because rows differ by orders of magnitude
    (a zero input row's x gradient carries the clamped norm's 1/eps) and one row must not hide another's error.
    Rows of (near) zero reference fall back to 1e-6 of the tensor's largest entry."""
    a, b = a.double().reshape(-1, a.shape[-1]), b.double().reshape(-1, b.shape[-1])
    scale = b.abs().amax(-1).clamp_min(1e-6 * b.abs().max().item()).clamp_min(1e-30)
    return ((a - b).abs().amax(-1) / scale).max().item()


def hand_l2_norm_gelu(x, K, V, n_scale, eps=1e-6):
    """l2_norm_gelu written out from the paper, independent of models.pattention: exact-erf GELU of
    sqrt(n) s / max(||s||, eps), s = x K^T, times V."""
    s = x @ K.T
    u = math.sqrt(n_scale) * s / torch.sqrt((s * s).sum(-1, keepdim=True)).clamp_min(eps)
    return (0.5 * u * (1 + torch.erf(u / math.sqrt(2)))) @ V


def make(normalization="l2_norm_gelu", d_in=16, d_out=24, n=40, zero_keys="none", held=False, dtype=torch.float32,
         seed=0, impl="reference"):
    """A Pattention with N(0, 1) tokens; zero_keys "some" zeroes the last quarter of the keys (growth's new
    tokens), "all" every key (all-zero score rows: the eps clamp); held: scale_tokens at 3/4 of n."""
    g = torch.Generator().manual_seed(seed)
    p = Pattention(d_in, d_out, n, normalization, scale_tokens=(3 * n) // 4 if held else None, impl=impl)
    with torch.no_grad():
        p.key_param_tokens.copy_(torch.randn(n, d_in, generator=g))
        p.value_param_tokens.copy_(torch.randn(n, d_out, generator=g))
        if zero_keys == "some":
            p.key_param_tokens[(3 * n) // 4:] = 0
        elif zero_keys == "all":
            p.key_param_tokens.zero_()
    return p.to(dtype)


def inputs(shape, d_in, d_out, dtype, seed=1, zero_row=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, d_in, generator=g)
    if zero_row:
        x.view(-1, d_in)[0] = 0  # one all-zero input row: its scores are 0 whatever the keys
    gy = torch.randn(*shape, d_out, generator=g)
    return x.to(dtype), gy.to(dtype)


def value_and_grads(p, impl, x, gy):
    p.impl = impl
    x = x.clone().requires_grad_()
    y = p(x)
    assert p.last_impl == impl
    gx, gk, gv = torch.autograd.grad(y, [x, p.key_param_tokens, p.value_param_tokens], gy)
    return {"y": y, "x": gx, "keys": gk, "values": gv}


# ------------------------------------------------------------------------------------------- recompute path
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("held", [False, True], ids=["scale_n", "scale_held"])
@pytest.mark.parametrize("zero_keys", ["none", "some", "all"])
def test_recompute_matches_reference(normalization, dtype, held, zero_keys):
    p = make(normalization, zero_keys=zero_keys, held=held, dtype=dtype)
    x, gy = inputs((3, 50), p.d_in, p.d_out, dtype)
    ref = value_and_grads(p, "reference", x, gy)
    new = value_and_grads(p, "recompute", x, gy)
    tol = FP32_RTOL if dtype == torch.float32 else BF16_RTOL
    for name in ref:
        assert new[name].dtype == ref[name].dtype and new[name].shape == ref[name].shape
        assert torch.isfinite(new[name]).all(), name
        assert rel_err(new[name], ref[name]) <= tol, (name, rel_err(new[name], ref[name]))
    # the forward runs the reference's own ops: bitwise equal values
    assert torch.equal(new["y"], ref["y"])


@pytest.mark.parametrize("normalization", ["l2_norm_gelu", "gelu_l2_norm"])
def test_recompute_all_zero_keys_gives_zeros_and_reference_gradients(normalization):
    """Growth's zero keys everywhere: ||s|| = 0 < eps, the norm is clamped, y = 0, and the key gradient is the
    clamped branch's (c constant), as the reference's autograd gives it."""
    p = make(normalization, zero_keys="all")
    x, gy = inputs((2, 30), p.d_in, p.d_out, torch.float32)
    ref, new = value_and_grads(p, "reference", x, gy), value_and_grads(p, "recompute", x, gy)
    assert torch.equal(new["y"], torch.zeros_like(new["y"]))
    for name in ref:
        torch.testing.assert_close(new[name], ref[name], rtol=1e-5, atol=1e-6)
    if normalization == "l2_norm_gelu":
        assert new["keys"].abs().max() > 0  # the gradient that lets zero keys learn at all


def test_recompute_matches_hand_formula_fp64():
    """Values and gradients of the recompute path against the formula written out above (float64 autograd)."""
    p = make("l2_norm_gelu", zero_keys="some", held=True, dtype=torch.float64)
    # no zero row here: the written-out sqrt has an infinite derivative at ||s|| = 0 (the clamp's branch is
    # tested against the reference above)
    x, gy = inputs((4, 20), p.d_in, p.d_out, torch.float64, zero_row=False)
    new = value_and_grads(p, "recompute", x, gy)
    xx = x.clone().requires_grad_()
    K = p.key_param_tokens.detach().clone().requires_grad_()
    V = p.value_param_tokens.detach().clone().requires_grad_()
    y = hand_l2_norm_gelu(xx, K, V, p.scale_tokens)
    gx, gk, gv = torch.autograd.grad(y, [xx, K, V], gy)
    for name, want in [("y", y), ("x", gx), ("keys", gk), ("values", gv)]:
        torch.testing.assert_close(new[name], want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_recompute_saves_no_T_by_n_tensor(normalization):
    """What autograd keeps between forward and backward: the reference keeps (T, n) scores / weights, the
    recompute path nothing of numel >= T n (x, the tokens and a (T, 1) norm)."""
    T, n, d = 2 * 60, 48, 16  # T > d_in, d_out so that no legitimately saved tensor reaches T n
    p = make(normalization, d_in=d, d_out=d, n=n)
    x = torch.randn(2, 60, d, requires_grad=True)

    def saved_numels(impl):
        p.impl = impl
        numels = []

        def pack(t):
            numels.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            p(x).sum().backward()
        return numels

    assert max(saved_numels("reference")) >= T * n  # the hook sees what the issue is about
    numels = saved_numels("recompute")
    assert numels and max(numels) < T * n, numels


def test_recompute_runs_under_autocast_like_the_reference():
    """bf16 autocast (CPU here, CUDA in training): the matmuls run in bf16 in forward and recomputed backward."""
    p = make("l2_norm_gelu")
    x, gy = inputs((2, 30), p.d_in, p.d_out, torch.float32)
    out = {}
    for impl in ("reference", "recompute"):
        p.impl = impl
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = p(xx)
        grads = torch.autograd.grad(y, [xx, p.key_param_tokens, p.value_param_tokens], gy.to(y.dtype))
        out[impl] = (y, *grads)
    for a, b in zip(out["recompute"], out["reference"]):
        assert a.dtype == b.dtype and rel_err(a, b) <= BF16_RTOL


def test_auto_is_recompute_on_cpu_and_impl_is_validated():
    p = make(impl="auto")
    p(torch.randn(3, p.d_in))
    assert p.last_impl == "recompute"
    with pytest.raises(ValueError, match="recompute"):
        Pattention(4, 4, 4, impl="fused")
    assert PattentionRecompute is not None and set(IMPLS) == {"reference", "recompute", "triton", "auto"}


def test_explicit_triton_without_triton_says_so(monkeypatch):
    import models.pattention as mp
    monkeypatch.setattr(mp, "_triton_ops", lambda: None)
    p = make(impl="triton")
    with pytest.raises(RuntimeError, match="triton"):
        p(torch.randn(3, p.d_in))
    p.impl = "auto"
    p(torch.randn(3, p.d_in))
    assert p.last_impl == "recompute"


# --------------------------------------------------------------------------------------------- model level
def _loss_and_grads(impl, seed=0):
    torch.manual_seed(seed)
    model = registry.build("tokenformer", "tiny", pattention_impl=impl)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, model.config.vocab_size, (2, 33), generator=g)
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    impls = {m.last_impl for m in model.modules() if isinstance(m, Pattention)}
    return model, loss, {n: p.grad for n, p in model.named_parameters()}, impls


def test_tiny_tokenformer_recompute_same_loss_and_grads():
    ref_model, ref_loss, ref_grads, ref_impls = _loss_and_grads("reference")
    model, loss, grads, impls = _loss_and_grads("recompute")
    assert ref_impls == {"reference"} and impls == {"recompute"}
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) <= FP32_RTOL, name
    # numerics only: the same parameters, counts and state dict keys
    assert model.config.num_params() == ref_model.config.num_params()
    assert model.config.flops_per_token() == ref_model.config.flops_per_token()
    assert model.state_dict().keys() == ref_model.state_dict().keys()


def test_model_config_reports_impl_and_old_dicts_still_build():
    cfg = registry.get_config("tokenformer", "tiny", pattention_impl="recompute")
    d = cfg.to_dict()
    assert d["pattention_impl"] == "recompute"  # records store model_config: the path lands there
    old = registry.get_config("tokenformer", "tiny").to_dict()
    del old["pattention_impl"]  # a checkpoint's state.json written before the field
    rebuilt = TransformerConfig(**old)  # as harness.train.checkpoint.load_model_from_checkpoint does
    assert rebuilt.pattention_impl == "reference"
    model = registry.build_from_config(rebuilt, "tokenformer")
    assert {m.impl for m in model.modules() if isinstance(m, Pattention)} == {"reference"}
    with pytest.raises(ValueError, match="pattention_impl"):
        registry.get_config("tokenformer", "tiny", pattention_impl="fast")
    base = registry.get_config("tokenformer", "150m")
    for impl in IMPLS:  # parameter and FLOP counts do not depend on the implementation
        c = registry.get_config("tokenformer", "150m", pattention_impl=impl)
        assert (c.num_params(), c.flops_per_token(), c.num_params(non_embedding=True)) == \
            (base.num_params(), base.flops_per_token(), base.num_params(non_embedding=True))


# -------------------------------------------------------------------------------------------- triton kernel
TRITON_SHAPES = [
    # (leading dims, d_in, d_out, n, blocks (BM, BN, BD, BE))
    ((2, 25), 24, 20, 40, (16, 16, 16, 16)),    # n, d_in, d_out, M = 50 none a multiple of 16
    ((37,), 16, 16, 64, (16, 32, 16, 16)),      # exact multiples of the token block
    ((3, 11), 32, 48, 100, (16, 64, 32, 32)),   # n = 100 over a block of 64
    ((1, 5), 8, 8, 13, (16, 16, 16, 16)),       # fewer rows and tokens than one block
]


@needs_triton
@pytest.mark.parametrize("shape,d_in,d_out,n,blocks", TRITON_SHAPES)
@pytest.mark.parametrize("zero_keys,held", [("none", False), ("some", True)], ids=["plain", "growth"])
def test_triton_matches_reference_fp32(shape, d_in, d_out, n, blocks, zero_keys, held):
    p = make("l2_norm_gelu", d_in=d_in, d_out=d_out, n=n, zero_keys=zero_keys, held=held)
    x, gy = inputs(shape, d_in, d_out, torch.float32)
    ref = value_and_grads(p, "reference", x, gy)
    xx = x.clone().requires_grad_()
    y = pattention_triton.pattention(xx, p.key_param_tokens, p.value_param_tokens, "l2_norm_gelu",
                                     p.scale_tokens or n, blocks=blocks)
    got = dict(zip(["x", "keys", "values"], torch.autograd.grad(y, [xx, p.key_param_tokens, p.value_param_tokens], gy)))
    got["y"] = y
    for name in ref:
        assert got[name].shape == ref[name].shape and got[name].dtype == ref[name].dtype
        assert rel_err(got[name], ref[name]) <= FP32_RTOL, (name, rel_err(got[name], ref[name]))
    # and the formula written out, independently of the module
    torch.testing.assert_close(y, hand_l2_norm_gelu(x, p.key_param_tokens.detach(), p.value_param_tokens.detach(),
                                                    p.scale_tokens or n), rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("shape,d_in,d_out,n,blocks", TRITON_SHAPES[:2])
def test_triton_matches_reference_bf16(shape, d_in, d_out, n, blocks):
    """bf16: both against float64 truth; the kernel keeps s and gw in fp32 where the reference rounds them to
    bf16, so it must be no further from the truth than a small multiple of the reference's own error."""
    p = make("l2_norm_gelu", d_in=d_in, d_out=d_out, n=n, zero_keys="some", held=True, dtype=torch.bfloat16)
    x, gy = inputs(shape, d_in, d_out, torch.bfloat16)
    ref = value_and_grads(p, "reference", x, gy)
    q = make("l2_norm_gelu", d_in=d_in, d_out=d_out, n=n, held=True, dtype=torch.float64)
    with torch.no_grad():  # the same (bf16-rounded) tokens, in float64
        q.key_param_tokens.copy_(p.key_param_tokens)
        q.value_param_tokens.copy_(p.value_param_tokens)
    truth = value_and_grads(q, "reference", x.double(), gy.double())
    p.impl = "triton"
    xx = x.clone().requires_grad_()
    y = pattention_triton.pattention(xx, p.key_param_tokens, p.value_param_tokens, "l2_norm_gelu", p.scale_tokens,
                                     blocks=blocks)
    got = dict(zip(["x", "keys", "values"], torch.autograd.grad(y, [xx, p.key_param_tokens, p.value_param_tokens], gy)))
    got["y"] = y
    for name in ref:
        assert got[name].dtype == torch.bfloat16
        err, ref_err = rel_err(got[name], truth[name]), rel_err(ref[name], truth[name])
        assert err <= BF16_RTOL and err <= 2 * ref_err + 4e-3, (name, err, ref_err)


@needs_triton
def test_triton_dispatch_and_unsupported():
    p = make("l2_norm_gelu", impl="triton")
    x, gy = inputs((2, 9), p.d_in, p.d_out, torch.float32)
    ref = value_and_grads(p, "reference", x, gy)
    got = value_and_grads(p, "triton", x, gy)  # the module path, default blocks; asserts last_impl == "triton"
    for name in ref:
        assert rel_err(got[name], ref[name]) <= FP32_RTOL, name
    # auto never picks the interpreter on CPU tensors
    p.impl = "auto"
    p(x)
    assert p.last_impl == "recompute"
    with pytest.raises(ValueError, match="l2_norm_gelu"):
        pattention_triton.pattention(x, p.key_param_tokens, p.value_param_tokens, "softmax", p.n_tokens)
