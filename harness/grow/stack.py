"""G_stack depth growth (Du et al., "Stacking Your Transformers", arXiv 2405.15319).

The small model's L blocks are stacked g times: block i of the grown model is a copy of block ``i mod L``
(6 -> 24 layers: [0..5] x 4). Embeddings, final norm and head are copied. The paper trains on with a fresh
AdamW and a fresh warmup + cosine, the data stream continuing. G_stack is NOT function-preserving: the stacked
model computes a different function (the tests measure by how much).

``gstack_identity`` is the function-preserving variant: the copies (blocks L .. gL-1) get their residual
output projections zeroed -- attention ``wo`` and the FFN down-projection (SwiGLU ``w2``, MLP ``proj``, a
Pattention FFN's value tokens; a Pattention ``wo``'s value tokens), biases included; Mamba's mixer
``out_proj`` -- so each new block adds zero to the residual stream and the grown model is the old one followed
by identity blocks (pre-norm residual blocks; exact). The zeroed projections still get gradients (their inputs
are not zero), so the copies start training at once.

Works for every model whose ``block_modules()`` lists its residual blocks: the transformer family
(tokenformer, transformer_pp, gpt2: ``model.blocks``) and Mamba / Mamba-2 (``model.backbone.layers``).
"""
from __future__ import annotations

from torch import nn

from models.base import CausalLM
from models.pattention import Pattention

from .plan import Growth, GrowthError, ParamPlan, build_target, config_diff, materialize

def depth_field(config) -> str:
    """The config field depth growth writes (``ModelConfig.depth_field``), or a one-line GrowthError."""
    field = getattr(type(config), "depth_field", None)
    if field not in getattr(config, "__dataclass_fields__", {}):
        raise GrowthError(f"G_stack: {type(config).__name__} declares no depth field (ModelConfig.depth_field)")
    return field


def check_depth_growth(old, new, what: str) -> tuple[str, int, int]:
    """(depth field, L, L') of a growth ``what`` (G_stack, block expansion) that changes the depth alone and
    grows it, or a one-line GrowthError."""
    if type(old) is not type(new):
        raise GrowthError(f"{what} keeps the architecture: {type(old).__name__} -> {type(new).__name__}")
    field = depth_field(old)
    diff = config_diff(old, new)
    other = sorted(k for k in diff if k != field)
    if other:
        raise GrowthError(f"{what} changes only the depth ({field}); the target also changes "
                          f"{', '.join(f'{k} {diff[k][0]}->{diff[k][1]}' for k in other)}")
    L, L2 = getattr(old, field), getattr(new, field)
    if L2 <= L:
        raise GrowthError(f"{what} grows depth: target {field}={L2} is not more than the source's {L}")
    return field, L, L2


def check_stack(old, new) -> int:
    _, L, L2 = check_depth_growth(old, new, "G_stack")
    if L2 % L:
        raise GrowthError(f"G_stack target depth {L2} is not a multiple of the source depth {L}")
    return L2 // L


def residual_outputs(model: CausalLM) -> list[list[str]]:
    """The model's declared residual writers per block (``CausalLM.residual_outputs``), or a GrowthError
    naming the model when it declares none."""
    try:
        return model.residual_outputs()
    except NotImplementedError:
        raise GrowthError(f"function-preserving depth growth: {type(model).__name__} does not declare "
                          f"residual_outputs()") from None


def gstack(model: nn.Module, target, *, identity: bool = False, seed: int = 0, name: str | None = None) -> Growth:
    """Stack ``model``'s blocks to ``target``'s depth: new block i = old block i mod L."""
    g = check_stack(model.config, target)
    new = build_target(target, name, seed)
    old_blocks, new_blocks = model.block_modules(), new.block_modules()
    L = len(old_blocks)
    old_prefix = {id(m): n for n, m in model.named_modules()}
    new_prefix = {id(m): n for n, m in new.named_modules()}
    olds = [old_prefix[id(b)] for b in old_blocks]
    news = [new_prefix[id(b)] for b in new_blocks]
    zeroed = set()
    if identity:
        writers = residual_outputs(new)
        for i in range(L, len(news)):
            zeroed.update(f"{news[i]}.{n}" for n in writers[i])

    def source(pname: str) -> str:
        """The old parameter (or module) name a new one copies."""
        for i, prefix in enumerate(news):
            if pname.startswith(prefix + "."):
                return olds[i % L] + pname[len(prefix):]
        return pname

    plans = {pname: ParamPlan(source(pname), zero=pname in zeroed) for pname, _ in new.named_parameters()}
    materialize(model, new, plans, seed=seed)
    old_modules = dict(model.named_modules())
    for mname, m in new.named_modules():  # a held sqrt(n) (earlier token growth) stays with its copy
        if isinstance(m, Pattention):
            m.scale_tokens = old_modules[source(mname)].scale_tokens
    info = {"construction": ("G_stack with zeroed residual output projections in the copies (new blocks are "
                             "identities at init)" if identity else "G_stack: block i = block i mod L"),
            "function_preserving": identity, "stack_factor": g, "zeroed_params": len(zeroed)}
    return Growth(new.eval(), plans, info)
