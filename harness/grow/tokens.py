"""Tokenformer's progressive scaling: append parameter tokens to every Pattention (arXiv 2410.23168, sec. 3.5).

Each Pattention (Q, K, V, attention output, FFN) grows from n to its target count (``qkv_tokens``,
``proj_tokens``, ``ffn_hidden``); the old key/value tokens are copied to the front, the m new ones are
initialised per ``init``:

* ``random``: as at init in the official code -- keys N(0, init_std), values N(0, 2 / (L sqrt(d))) (the grown
  model's own init). The sqrt(n) factor of the normalization follows the new count (official behaviour).
* ``zero``: new *key* tokens zero, as the paper does ("initializing new key parameters to zero, similar to
  LoRA"): a zero key scores 0 for every input, and GELU(0) = 0, so the new tokens add nothing. Their value
  tokens keep the official random init -- with both zero, the new tokens receive exactly zero gradient (the
  score, its GELU and the value all vanish together) and never train; ``zero_values=True`` gives that literal
  all-zero variant anyway. The sqrt(n) factor still becomes sqrt(n + m), so this is NOT function-preserving:
  with l2_norm_gelu every old weight GELU(sqrt(n) s / ||s||) turns into GELU(sqrt(n + m) s / ||s||).
* ``preserving``: ``zero`` with the factor held at the old count (``Pattention.scale_tokens = n``): exactly
  function-preserving for ``l2_norm_gelu`` and ``gelu_l2_norm`` (zero scores leave ||s|| and ||GELU(s)||
  unchanged and weigh 0). Not possible for ``softmax`` (exp(0) = 1 enters the denominator): refused.

The held count is an attribute, not a parameter: checkpoints carry it as ``state.json["pattention_scale_tokens"]``
({module name: n}); ``harness.train.checkpoint.load_checkpoint`` re-applies it and the loop saves it again.
"""
from __future__ import annotations

from models.pattention import Pattention
from models.transformer import Transformer, TransformerConfig

from .plan import INITS, AxisMap, Growth, GrowthError, ParamPlan, build_target, config_diff, materialize

TOKEN_FIELDS = {"qkv_tokens": "projection", "proj_tokens": "projection", "ffn_hidden": "ffn"}


def check_tokens(old: TransformerConfig, new: TransformerConfig, init: str) -> dict:
    if not isinstance(old, TransformerConfig) or not isinstance(new, TransformerConfig):
        raise GrowthError("token growth needs a Tokenformer-style transformer (models/transformer.py) with "
                          f"pattention projections or FFN, not {type(old).__name__}")
    if init not in INITS:
        raise GrowthError(f"init={init!r} is not one of {', '.join(INITS)}")
    diff = config_diff(old, new)
    other = sorted(k for k in diff if k not in TOKEN_FIELDS)
    if other:
        raise GrowthError(f"token growth changes only qkv_tokens, proj_tokens and ffn_hidden; the target also "
                          f"changes {', '.join(f'{k} {diff[k][0]}->{diff[k][1]}' for k in other)}")
    grown = {}
    for k, (a, b) in diff.items():
        kind = getattr(old, TOKEN_FIELDS[k])
        if kind != "pattention":
            raise GrowthError(f"token growth of {k} needs {TOKEN_FIELDS[k]}=pattention (this model has {kind})")
        if b < a:
            raise GrowthError(f"token growth cannot shrink {k} ({a} -> {b})")
        grown[k] = (a, b)
    if not grown:
        raise GrowthError("token growth: the target has the same token counts (qkv_tokens, proj_tokens, ffn_hidden)")
    if init == "preserving" and old.pattention_norm == "softmax":
        raise GrowthError("init=preserving is exact only for pattention_norm l2_norm_gelu or gelu_l2_norm "
                          "(softmax gives zero-score tokens weight exp(0)); use zero or random")
    return grown


def grow_tokens(model: Transformer, target: TransformerConfig, *, init: str = "random", seed: int = 0,
                zero_values: bool = False, name: str | None = None) -> Growth:
    """Append parameter tokens to every Pattention whose count grows from ``model.config`` to ``target``."""
    grown = check_tokens(model.config, target, init)
    new = build_target(target, name, seed)
    old_modules = dict(model.named_modules())
    old_params = dict(model.named_parameters())
    plans: dict[str, ParamPlan] = {}
    for pname, p in new.named_parameters():
        old_p = old_params[pname]
        if old_p.shape == p.shape:
            plans[pname] = ParamPlan(pname)
            continue
        leaf = pname.rsplit(".", 1)[-1]
        fill = "init"
        if init in ("zero", "preserving") and (leaf == "key_param_tokens" or zero_values):
            fill = "zero"
        plans[pname] = ParamPlan(pname, (AxisMap.extend(old_p.shape[0], p.shape[0]), None), fill=fill)
    materialize(model, new, plans, seed=seed)
    held = {}
    for mname, m in new.named_modules():
        if not isinstance(m, Pattention):
            continue
        o = old_modules[mname]
        if m.n_tokens == o.n_tokens:
            m.scale_tokens = o.scale_tokens
        elif init == "preserving":
            m.scale_tokens = o.scale_tokens or o.n_tokens
            held[mname] = m.scale_tokens
        else:
            m.scale_tokens = None  # sqrt of the current count, as the official code
    exact = init == "preserving"
    info = {"construction": f"tokenformer parameter-token growth, init={init}"
                            + (" (new keys zero, values random)" if init != "random" and not zero_values else "")
                            + (" (new keys and values zero)" if zero_values and init != "random" else ""),
            "function_preserving": exact, "grown": {k: list(v) for k, v in grown.items()},
            "held_scale_tokens": len(held)}
    return Growth(new.eval(), plans, info)


