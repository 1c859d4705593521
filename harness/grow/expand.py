"""LLaMA Pro block expansion (Wu et al., "LLaMA Pro: Progressive LLaMA with Block Expansion", arXiv 2401.02415).

The source's L blocks are split into P groups of L/P consecutive blocks; after each group one new block is
inserted, a copy of the group's last block with its residual output projections zeroed (the rule of
``gstack_identity``: attention ``wo`` and the FFN down-projection, a Pattention's value tokens, biases included;
Mamba's ``out_proj``). Each new block adds zero to the residual stream, so the grown model is exactly the old
one (pre-norm residual blocks). Target depth L' = L + P; L must be a multiple of P. 4 -> 6 layers (P = 2):
[0, 1, 1', 2, 3, 3'].

The paper freezes the old blocks and tunes only the new ones (post-pre-training); in pre-training growth every
block trains. The zeroed projections get gradients (their inputs are not zero), so the new blocks train at once.
Same model families as G_stack: those whose ``block_modules()`` lists their residual blocks.
"""
from __future__ import annotations

from torch import nn

from models.pattention import Pattention

from .plan import Growth, GrowthError, ParamPlan, build_target, materialize
from .stack import check_depth_growth, residual_outputs


def check_expand(old, new) -> tuple[str, int, int]:
    """(depth field, L, P) of an expansion ``old`` -> ``new``, or a one-line GrowthError."""
    field, L, L2 = check_depth_growth(old, new, "block expansion")
    P = L2 - L
    if L % P:
        raise GrowthError(f"block expansion inserts P = {L2} - {L} = {P} blocks, one after each of P equal groups: "
                          f"source {field}={L} is not divisible by {P} (choose target {field} = {L} + a divisor "
                          f"of {L})")
    return field, L, P


def expansion_layout(L: int, P: int) -> tuple[list[int], list[int]]:
    """(source block of each grown block, positions of the new blocks) for L blocks in P groups."""
    per = L // P
    src, new = [], []
    for g in range(P):
        src.extend(range(g * per, (g + 1) * per))
        new.append(len(src))
        src.append((g + 1) * per - 1)  # the copy of the group's last block
    return src, new


def expand_blocks(model: nn.Module, target, *, seed: int = 0, name: str | None = None) -> Growth:
    """Expand ``model`` to ``target``'s depth: a zero-output copy of each group's last block after the group."""
    field, L, P = check_expand(model.config, target)
    new = build_target(target, name, seed)
    src_of, inserted = expansion_layout(L, P)
    old_prefix = {id(m): n for n, m in model.named_modules()}
    new_prefix = {id(m): n for n, m in new.named_modules()}
    olds = [old_prefix[id(b)] for b in model.block_modules()]
    new_blocks = new.block_modules()
    news = [new_prefix[id(b)] for b in new_blocks]
    writers = residual_outputs(new)
    zeroed = {f"{news[i]}.{n}" for i in inserted for n in writers[i]}

    def source(pname: str) -> str:
        """The old parameter (or module) name a new one copies."""
        for i, prefix in enumerate(news):
            if pname.startswith(prefix + "."):
                return olds[src_of[i]] + pname[len(prefix):]
        return pname

    # zero=True: the projections start at 0 and (optimizer=carry) with fresh Adam state, like gstack_identity
    plans = {pname: ParamPlan(source(pname), zero=pname in zeroed) for pname, _ in new.named_parameters()}
    materialize(model, new, plans, seed=seed)
    old_modules = dict(model.named_modules())
    for mname, m in new.named_modules():  # a held sqrt(n) (earlier token growth) stays with its copy
        if isinstance(m, Pattention):
            m.scale_tokens = old_modules[source(mname)].scale_tokens
    info = {"construction": (f"LLaMA Pro block expansion: {P} groups of {L // P} blocks, each followed by a copy "
                             f"of its last block with zeroed residual output projections (identity at init)"),
            "function_preserving": True, "groups": P, "new_blocks": inserted, "block_sources": src_of,
            "zeroed_params": len(zeroed)}
    return Growth(new.eval(), plans, info)
