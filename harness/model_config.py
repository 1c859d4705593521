"""A run's model config: the registry preset with the run's overrides, its vocabulary and its context. One
function, used by the training loop, preflight (and through it the matrix), the bench and the GPU check, so
what is checked, counted and benchmarked is what trains."""
from __future__ import annotations

import math
from typing import Any, Mapping

from models import registry

VOCAB_MULTIPLE = 64  # a tokenizer's vocabulary is padded up to a multiple of this (matmul-friendly shapes)


def padded_vocab(tokenizer_vocab: int) -> int:
    """``tokenizer_vocab`` rounded up to a multiple of :data:`VOCAB_MULTIPLE`."""
    return VOCAB_MULTIPLE * math.ceil(tokenizer_vocab / VOCAB_MULTIPLE)


def resolve_model_config(model: str, preset: str, *, seq_len: int | None = None,
                         tokenizer_vocab: int | None = None, overrides: Mapping[str, Any] | None = None):
    """``(config, seq_len)``: ``registry.get_config(model, preset, **overrides)`` where

    - the vocabulary follows ``tokenizer_vocab`` (padded up to a multiple of 64) when one is given and
      ``overrides`` does not set ``vocab_size``; without one the preset's (or the override's) stays;
    - ``seq_len`` defaults to the config's ``max_seq_len``, and ``max_seq_len`` is raised to ``seq_len`` when
      the preset (or ``overrides["max_seq_len"]``) is shorter, so every model -- learned positions
      included -- is built for the context it runs at.

    Raises what the registry raises (``registry.UnknownModelError``; ValueError / TypeError for a rejected
    field value)."""
    overrides = dict(overrides or {})
    if tokenizer_vocab is not None:
        overrides.setdefault("vocab_size", padded_vocab(tokenizer_vocab))
    base = registry.get_config(model, preset)
    seq_len = seq_len or base.max_seq_len
    if seq_len > overrides.get("max_seq_len", base.max_seq_len):
        overrides["max_seq_len"] = seq_len
    return registry.get_config(model, preset, **overrides), seq_len
