"""Model growth: start a bigger model from a trained smaller one.

Operators (each returns a :class:`Growth`: the grown model, a plan per parameter, facts about the construction):

* ``tokens`` -- Tokenformer parameter-token growth (:mod:`.tokens`): every Pattention gets its target count of
  key/value tokens, old ones first; new ones ``random`` (official init), ``zero`` (zero keys; sqrt(n) becomes
  sqrt(n+m): not function-preserving) or ``preserving`` (zero keys, sqrt(n) held at the old n: exact).
* ``gstack`` -- G_stack depth stacking (:mod:`.stack`, arXiv 2405.15319): block i = block i mod L; not
  function-preserving. ``gstack_identity``: the copies' residual output projections zeroed: exact.
  Transformer family and Mamba / Mamba-2.
* ``expand`` -- LLaMA Pro block expansion (:mod:`.expand`, arXiv 2401.02415): L blocks in P = L' - L groups,
  each followed by a copy of its last block with zeroed residual output projections: exact. L % P == 0;
  the same families as G_stack.
* ``width`` -- function-preserving width growth of transformer_pp (:mod:`.width`): HyperCloning residual
  cloning d -> k d, Net2Net head duplication / RoPE-exact head widening, Net2Net SwiGLU unit duplication.
* ``scratch`` is not an operator: train the target preset from scratch.

Optimizer state: ``fresh`` (a new AdamW, the papers' choice), ``carry`` (entries with a source keep its Adam
moments and step, new entries zeros) or ``staged`` (width only: moments scaled by each entry's gradient factor,
Staged Training, arXiv 2203.06211). Schedule: ``restart`` (step 0: fresh warmup + cosine) or ``continue``.
The data stream always continues (data_position is kept).

:func:`grow_checkpoint` does all of it on checkpoint directories (what ``harness grow`` and growth matrices
call); :func:`growth_gap` measures the change of function on a fixed batch.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from models.pattention import scale_tokens_of, set_scale_tokens

from .checkpoint import grow_checkpoint, grow_model, read_optimizer_state, summary_line, target_config
from .expand import expand_blocks
from .plan import (INITS, METHODS, OPTIMIZERS, SCHEDULES, AxisMap, Growth, GrowthError, ParamPlan, growth_gap,
                   random_batch, transfer_optimizer_state)
from .stack import gstack
from .tokens import grow_tokens
from .width import grow_width


def apply_scale_tokens(model: nn.Module, mapping: dict[str, Any] | None) -> nn.Module:
    """Hold the sqrt(n) factor of the named Pattentions at the given counts: ``mapping`` is
    {module name: n} or a checkpoint state dict holding it under "pattention_scale_tokens".
    (``harness.train.checkpoint.load_checkpoint`` already does this for every checkpoint it loads.)"""
    if mapping and "pattention_scale_tokens" in mapping:
        mapping = mapping["pattention_scale_tokens"]
    set_scale_tokens(model, dict(mapping or {}))
    return model


__all__ = ["INITS", "METHODS", "OPTIMIZERS", "SCHEDULES", "AxisMap", "Growth", "GrowthError", "ParamPlan",
           "apply_scale_tokens", "expand_blocks", "grow_checkpoint", "grow_model", "grow_tokens", "grow_width",
           "growth_gap", "gstack", "random_batch", "read_optimizer_state", "scale_tokens_of", "summary_line",
           "target_config", "transfer_optimizer_state"]
