"""The one interface every registry entry implements.

A model is built from a config dataclass. The config owns the analytic counts (parameters, FLOPs) the way
torchtitan's model args do, so the counts are known before any weight is allocated (and on the ``meta``
device, never allocated at all); the module only delegates to it. Every part of the harness -- the training
loop, the lm-eval adapter, the bench, growth -- talks to models through :class:`CausalLM` alone.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn


@dataclasses.dataclass
class ModelConfig:
    """Base of every architecture's config. Subclasses add their own fields (``n_layers`` and ``width``
    among them, as fields or properties: the model table prints them) and implement the counts."""

    vocab_size: int = 50304
    max_seq_len: int = 2048  # the preset's context length: FLOPs in the table are quoted at it

    # --- analytic counts, documented next to each architecture -------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        raise NotImplementedError

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward), at ``seq_len`` (default: max_seq_len)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class CausalLM(nn.Module):
    """forward(input_ids) -> logits, counts, an incremental-decoding API and weight init inside the model.

    Decoding: ``cache = model.allocate_cache(batch, max_len)`` then ``model.step(tokens, cache)`` any number of
    times; ``tokens`` is ``(B, T)`` with T >= 1 (T > 1 is a prefill), the returned logits are ``(B, T, V)`` and
    the cache advances by T. ``cache.pos`` is the number of tokens already consumed.
    """

    config: ModelConfig

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, S) -> (B, S, V)
        raise NotImplementedError

    def num_params(self, non_embedding: bool = False) -> int:
        return self.config.num_params(non_embedding)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return self.config.flops_per_token(seq_len)

    def allocate_cache(self, batch_size: int, max_len: int, device=None, dtype=None):
        raise NotImplementedError

    def step(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """(Re)initialise every weight with the architecture's own scheme. Called by __init__."""
        raise NotImplementedError

    def counted_params(self, non_embedding: bool = False) -> int:
        """Parameters actually held by the module (tied weights once): what num_params must equal."""
        seen, total = set(), 0
        skip = {id(p) for p in self.embedding_parameters()} if non_embedding else set()
        for p in self.parameters():
            if id(p) in seen or id(p) in skip:
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Parameters that 'non-embedding' counts leave out: token (and position) embeddings, untied head."""
        raise NotImplementedError

    def block_modules(self) -> list[nn.Module]:
        """The repeated residual blocks, in order: the units FSDP shards (and growth stacks) one by one."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One registry entry: how to build the model and which named sizes exist.

    ``presets`` maps a preset name to the config fields it sets; ``published`` maps a preset name to the
    parameter count its paper / model card publishes, which the tests check (on the meta device).
    """

    name: str
    config_cls: type
    model_cls: type
    presets: dict[str, dict[str, Any]]
    description: str = ""
    published: dict[str, float] = dataclasses.field(default_factory=dict)
    published_tolerance: float = 0.01  # relative
    default_preset: str = "tiny"

    def config(self, preset: str, **overrides: Any) -> ModelConfig:
        return self.config_cls(**{**self.presets[preset], **overrides})
