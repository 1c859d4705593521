"""Exactly function-preserving width growth for Transformer++ (RMSNorm, RoPE, SwiGLU, no biases).

Three widths grow, each by duplication, so the grown model computes the same logits (up to float rounding):

**Residual width d -> k d** (HyperCloning, arXiv 2409.12903, symmetric cloning): every residual coordinate is
cloned, the hidden state of the big model is [h, h, ..., h] (k copies). RMSNorm of [h, ..., h] is RMSNorm(h)
cloned -- the mean of squares is unchanged by duplication and eps is added to the same number, so this is
exact -- with norm weights tiled. Writers into the residual (embedding rows, attention ``wo`` rows, SwiGLU
``w2`` rows) are tiled; readers of it (``wq``, ``wk``, ``wv``, ``w1``, ``w3`` columns) are tiled and divided by
k (sum of k copies of x W/k = x W). Tied embeddings: the embedding writes [e, ..., e], and as the output head
it would read k copies -- logits k times too large -- so the final RMSNorm weight is tiled *and divided by k*
(exact, keeps the head tied). Untied: the head's columns are divided by k instead.

**Heads h -> c h, head dim hd -> r hd** (d' = c r d): new head j' is a copy of old head j' mod h
(Net2Net-style duplication of whole heads); the attention output ``wo`` columns of the c copies are divided by
c. A wider head (r > 1) must keep RoPE exact: RoPE pairs dims (s, s + hd/2) at frequency base^(-2s/hd), and
base^(-2 (r t) / (r hd)) = base^(-2 t / hd) (bitwise, in fp32), so old dim t sits at new dim r t and old dim
t + hd/2 at r t + r hd/2: same frequency, same rotation partner. The remaining dims are new: their query rows
start at zero and their key rows at the fresh init (score contribution 0 * k = 0, yet the query rows get
gradients through the keys); value rows start at the fresh init and the matching ``wo`` columns at zero.
Queries are scaled by sqrt(r) to undo SDPA's 1/sqrt(hd') (q'.k' / sqrt(r hd) = q.k / sqrt(hd)).

**SwiGLU width f -> f'** (any f' >= f; Net2Net): hidden unit i of the grown FFN copies unit i mod f -- gate
(``w1``) and up (``w3``) rows duplicated -- and the down-projection (``w2``) column of a unit with c copies is
divided by c.

Symmetry: a pure clone stays a clone under gradient descent (copies get equal gradients): trained on, it is
the small model paying the big one's FLOPs. ``noise > 0`` adds zero-sum Gaussian noise across the copies each
reader weight reads (std = noise x the std of the grown weight, so the weight's signal-to-noise ratio is
-20 log10(noise) dB): still function-preserving (the copies' activations are equal, the noise sums to zero), but
the copies' gradients now differ and they drift apart. :data:`DEFAULT_NOISE` is HyperCloning's noisy variant
(arXiv 2409.12903: noise at a signal-to-noise ratio of about 10 dB), what growth matrices and ``harness grow``
use unless told otherwise; this function's own default is the pure clone (0).

Optimizer transfer (``staged``): the gradient of every entry of the exact clone is g times its source's, with
g = 1/k for residual writers and block norm weights, 1 for residual readers (and the tied final norm),
1/(c sqrt r) for query rows, 1/c for key/value rows, 1/copies for SwiGLU gate/up rows -- so the carried moments
are exp_avg * g and exp_avg_sq * g^2 (Staged Training's /2, /4 at k = 2).
"""
from __future__ import annotations

import math

import torch

from models.transformer import Transformer, TransformerConfig

from .plan import AxisMap, Growth, GrowthError, ParamPlan, build_target, config_diff, materialize

DEFAULT_NOISE = 10 ** (-10 / 20)  # 10 dB signal-to-noise ratio (HyperCloning's noisy cloning): 0.316 x the std
WIDTH_FIELDS = ("d_model", "n_heads", "ffn_hidden")
IGNORED = ("qkv_tokens", "proj_tokens")  # resolved to d_model and unused with linear projections
REQUIRED = dict(projection="linear", ffn="swiglu", norm="rmsnorm", positions="rope", rotary_fraction=1.0,
                bias=False)


def check_width(old: TransformerConfig, new: TransformerConfig) -> dict:
    if not isinstance(old, TransformerConfig) or not isinstance(new, TransformerConfig):
        raise GrowthError(f"width growth is implemented for transformer_pp only, not {type(old).__name__}")
    bad = [f"{k}={getattr(old, k)!r}" for k, v in REQUIRED.items() if getattr(old, k) != v]
    if bad:
        raise GrowthError(f"width growth is implemented for transformer_pp (linear projections, SwiGLU, RMSNorm, "
                          f"full RoPE, no biases); this model has {', '.join(bad)}")
    diff = config_diff(old, new, ignore=IGNORED)
    other = sorted(k for k in diff if k not in WIDTH_FIELDS)
    if other:
        raise GrowthError(f"width growth changes only d_model, n_heads and ffn_hidden; the target also changes "
                          f"{', '.join(f'{k} {diff[k][0]}->{diff[k][1]}' for k in other)}")
    d, h, f = old.d_model, old.n_heads, old.ffn_hidden
    d2, h2, f2 = new.d_model, new.n_heads, new.ffn_hidden
    hd, hd2 = d // h, d2 // h2
    if d2 < d or h2 < h or f2 < f:
        raise GrowthError(f"width growth cannot shrink (d_model {d}->{d2}, n_heads {h}->{h2}, ffn_hidden {f}->{f2})")
    if (d2, h2, f2) == (d, h, f):
        raise GrowthError("width growth: the target has the same d_model, n_heads and ffn_hidden")
    if d2 % d:
        raise GrowthError(f"width growth clones the residual stream: d_model {d2} must be a multiple of {d}")
    if h2 % h or hd2 % hd:
        raise GrowthError(f"width growth duplicates heads: n_heads {h}->{h2} and head dim {hd}->{hd2} must each "
                          f"grow by an integer factor")
    if hd % 2:
        raise GrowthError(f"width growth needs an even head dim for RoPE (got {hd})")
    if old.tied_embeddings and not old.final_norm_affine:
        raise GrowthError("width growth with tied embeddings needs an affine final norm (its weight absorbs the "
                          "1/k of the cloned head); untie the embeddings or keep final_norm_affine")
    return dict(k=d2 // d, c=h2 // h, r=hd2 // hd, d=d, h=h, hd=hd, f=f, d2=d2, h2=h2, hd2=hd2, f2=f2)


def _full(n: int, v: float) -> torch.Tensor:
    return torch.full((n,), float(v))


def width_plans(old: TransformerConfig, new: TransformerConfig, names) -> dict[str, ParamPlan]:
    s = check_width(old, new)
    k, c, r, d, h, hd, f, d2, h2, hd2, f2 = (s[x] for x in ("k", "c", "r", "d", "h", "hd", "f", "d2", "h2", "hd2", "f2"))
    res = torch.arange(d2) % d
    r_in = AxisMap(res, weight=_full(d2, 1 / k), grad=_full(d2, 1.0), group=res.clone())
    r_out = AxisMap(res, weight=_full(d2, 1.0), grad=_full(d2, 1 / k))
    # head dims: new head j2 copies old head j2 mod h; old dim u of a head sits at new dim e(u)
    src = torch.full((h2, hd2), -1, dtype=torch.long)
    half, half2 = hd // 2, hd2 // 2
    for u in range(hd):
        e = r * u if u < half else r * (u - half) + half2
        src[:, e] = (torch.arange(h2) % h) * hd + u
    src = src.reshape(-1)
    mapped = src >= 0
    q = AxisMap(src, weight=_full(d2, math.sqrt(r)), grad=_full(d2, 1 / (c * math.sqrt(r))))
    kv = AxisMap(src, weight=_full(d2, 1.0), grad=_full(d2, 1 / c))
    o_group = torch.where(mapped, src, d + torch.arange(d2))  # free columns: groups of one (no noise)
    o = AxisMap(src, weight=_full(d2, 1 / c), grad=_full(d2, 1.0), group=o_group)
    units = torch.arange(f2) % f
    copies = torch.bincount(units, minlength=f).float()[units]
    f_rows = AxisMap(units, weight=_full(f2, 1.0), grad=1 / copies)
    f_cols = AxisMap(units, weight=1 / copies, grad=_full(f2, 1.0), group=units.clone())
    final = (AxisMap(res, weight=_full(d2, 1 / k), grad=_full(d2, 1.0)) if old.tied_embeddings else r_out)
    by_suffix = {
        "norm1.weight": ((r_out,), "init"), "norm2.weight": ((r_out,), "init"),
        "attn.wq.weight": ((q, r_in), "zero"), "attn.wk.weight": ((kv, r_in), "init"),
        "attn.wv.weight": ((kv, r_in), "init"), "attn.wo.weight": ((r_out, o), "zero"),
        "ffn.w1.weight": ((f_rows, r_in), "init"), "ffn.w3.weight": ((f_rows, r_in), "init"),
        "ffn.w2.weight": ((r_out, f_cols), "init"),
    }
    top = {"tok_emb.weight": ((None, r_out), "init"), "norm_f.weight": ((final,), "init"),
           "lm_head.weight": ((None, r_in), "init")}
    plans = {}
    for name in names:
        if name in top:
            axes, fill = top[name]
        else:
            suffix = name.split(".", 2)[-1] if name.startswith("blocks.") else None
            if suffix not in by_suffix:
                raise GrowthError(f"width growth: no rule for parameter {name}")
            axes, fill = by_suffix[suffix]
        plans[name] = ParamPlan(name, axes, fill=fill)
    return plans


def grow_width(model: Transformer, target: TransformerConfig, *, seed: int = 0, noise: float = 0.0,
               name: str | None = None) -> Growth:
    """Grow d_model / n_heads / ffn_hidden of a transformer_pp model, preserving its function exactly."""
    shape = check_width(model.config, target)
    if noise < 0:
        raise GrowthError(f"noise must be >= 0, got {noise}")
    new = build_target(target, name, seed)
    plans = width_plans(model.config, target, [n for n, _ in new.named_parameters()])
    materialize(model, new, plans, noise=noise, seed=seed)
    info = {"construction": ("HyperCloning symmetric residual cloning d->k d (norm weights tiled, readers / k, "
                             + ("tied head: final norm weight / k" if model.config.tied_embeddings else "untied head / k")
                             + "), Net2Net head duplication (wo / copies, RoPE-exact head widening), Net2Net "
                             "SwiGLU unit duplication (w2 columns / copies)"),
            "function_preserving": True, "noise": noise,
            **{key: shape[key] for key in ("k", "c", "r")},
            "d_model": [shape["d"], shape["d2"]], "n_heads": [shape["h"], shape["h2"]],
            "ffn_hidden": [shape["f"], shape["f2"]]}
    return Growth(new.eval(), plans, info)
