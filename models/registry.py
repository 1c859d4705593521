"""name -> architecture, and named size presets per architecture.

Adding an architecture is one module exporting an ``Architecture`` plus one line in ``_MODULES``; the
conformance tests iterate this registry, so a new entry is tested without new tests.
"""
from __future__ import annotations

import importlib
from typing import Any

import torch

from .base import Architecture, CausalLM, ModelConfig

# module, attribute: the order is the order of `harness models`
_MODULES = [
    ("tokenformer", "ARCH"),
    ("transformer_pp", "ARCH"),
    ("mamba", "ARCH"),
    ("mamba2", "MAMBA2_ARCH"),
    ("gpt2", "ARCH"),
]


class UnknownModelError(ValueError):
    """An unknown architecture or preset name; the message lists the valid names."""


def _load() -> dict[str, Architecture]:
    archs = {}
    for module, attr in _MODULES:
        arch = getattr(importlib.import_module(f"{__package__}.{module}"), attr, None)
        if arch is not None:
            archs[arch.name] = arch
    return archs


ARCHITECTURES: dict[str, Architecture] = _load()


def names() -> list[str]:
    return list(ARCHITECTURES)


def get(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; valid models: {', '.join(ARCHITECTURES)}") from None


def presets(name: str) -> list[str]:
    return list(get(name).presets)


def get_config(name: str, preset: str | None = None, **overrides: Any) -> ModelConfig:
    arch = get(name)
    preset = preset or arch.default_preset
    if preset not in arch.presets:
        raise UnknownModelError(f"unknown preset {preset!r} for model {name!r}; valid presets: {', '.join(arch.presets)}")
    fields = set(arch.config_cls.__dataclass_fields__)
    bad = sorted(set(overrides) - fields)
    if bad:
        raise UnknownModelError(f"unknown config field(s) {', '.join(bad)} for model {name!r}; valid fields: {', '.join(sorted(fields))}")
    return arch.config(preset, **overrides)


def build_from_config(config: ModelConfig, name: str | None = None, device: torch.device | str | None = None) -> CausalLM:
    """Build the model a config describes. ``device="meta"`` allocates nothing: counts of the published sizes
    are checked that way."""
    model_cls = None
    for arch in ARCHITECTURES.values():
        if isinstance(config, arch.config_cls) and (name is None or arch.name == name):
            model_cls = arch.model_cls
            break
    if model_cls is None:
        raise UnknownModelError(f"no registered architecture takes a {type(config).__name__}")
    return model_cls(config, device=device)


def build(name: str, preset: str | None = None, device: torch.device | str | None = None, **overrides: Any) -> CausalLM:
    return get(name).model_cls(get_config(name, preset, **overrides), device=device)


def table(seq_len: int | None = None) -> list[dict[str, Any]]:
    """One row per (model, preset): what `harness models` prints. Computed from configs alone."""
    rows = []
    for name, arch in ARCHITECTURES.items():
        for preset in arch.presets:
            cfg = arch.config(preset)
            S = seq_len or cfg.max_seq_len
            rows.append(dict(model=name, preset=preset, layers=cfg.n_layers, width=cfg.width,
                             params=cfg.num_params(), non_embedding=cfg.num_params(non_embedding=True),
                             seq_len=S, flops_per_token=cfg.flops_per_token(S),
                             published=arch.published.get(preset)))
    return rows
