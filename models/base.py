"""The one interface every registry entry implements.

A model is built from a config dataclass. The config owns the analytic counts (parameters, FLOPs) the way
torchtitan's model args do, so the counts are known before any weight is allocated (and on the ``meta``
device, never allocated at all); the module only delegates to it. Every part of the harness -- the training
loop, the lm-eval adapter, the bench, growth -- talks to models through :class:`CausalLM` alone.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn


@dataclasses.dataclass
class ModelConfig:
    """Base of every architecture's config: everything the harness reads from a config is declared here.

    A subclass must provide ``n_layers``, ``width``, ``num_params`` and ``flops_per_token`` (a field or a
    property for the first two: the model table prints them, growth checks them); the rest has a default that
    is right for a model built from matmuls only. tests/models/test_conformance.py checks every registry entry.
    """

    vocab_size: int = 50304
    max_seq_len: int = 2048  # the preset's context length: FLOPs in the table are quoted at it

    # --- shape ------------------------------------------------------------------------------------------
    # the config field that sets n_layers: depth growth (G_stack, block expansion) writes it
    depth_field: ClassVar[str] = "n_layers"
    # one block's saved activations relative to a transformer block's: pre-flight's training-memory estimate
    activation_share: ClassVar[float] = 1.0

    # (a subclass's dataclass field of the same name, with its default, replaces these properties)
    @property
    def n_layers(self) -> int:
        """Residual blocks: ``len(model.block_modules())``."""
        raise NotImplementedError(f"{type(self).__name__} must define n_layers")

    @property
    def width(self) -> int:
        """The residual stream's width (d_model)."""
        raise NotImplementedError(f"{type(self).__name__} must define width")

    @property
    def embedding_rows(self) -> int:
        """Rows of the token embedding and output head: the vocabulary, or a padded one."""
        return self.vocab_size

    @property
    def position_table(self) -> bool:
        """Whether the model holds learned positions for max_seq_len tokens (a checkpoint's context cannot then
        grow); False for rotary or recurrent models."""
        return False

    # --- analytic counts, documented next to each architecture -------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        raise NotImplementedError

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward), at ``seq_len`` (default: max_seq_len)."""
        raise NotImplementedError

    def uncounted_flops_per_token(self, seq_len: int | None = None) -> float:
        """Forward FLOPs per token that torch's FlopCounterMode cannot see on the reference path (work written
        as elementwise ops, e.g. a scan); the conformance test adds them to the counter's total before comparing
        with ``flops_per_token``. 0 for a model made of matmuls."""
        return 0.0

    # --- how it computes -------------------------------------------------------------------------------------
    def implementation_fields(self) -> dict[str, Any]:
        """Config fields that choose how the model computes (a kernel), never its shapes, parameters or FLOPs,
        with their values: the bench measures one row per value it is asked for (``pattention_impl``)."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class DecodeCache:
    """What ``CausalLM.allocate_cache`` returns: ``pos`` (tokens consumed so far, advanced by ``step``) and
    ``nbytes()`` (the memory it holds, which the bench reports per sequence). The default ``nbytes`` sums every
    tensor held in an attribute, directly or in a list/tuple; a cache holding tensors elsewhere overrides it."""

    pos: int = 0

    def nbytes(self) -> int:
        total = 0
        for v in vars(self).values():
            for t in (v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


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

    def allocate_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> DecodeCache:
        raise NotImplementedError

    def step(self, input_ids: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
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

    def residual_outputs(self) -> list[list[str]]:
        """For each block of ``block_modules()``, the names (relative to the block) of the parameters that write
        the block's output into the residual stream: zeroing them makes a pre-norm block the identity. Init
        scales them by depth; function-preserving depth growth (G_stack identity, LLaMA Pro) zeroes them."""
        raise NotImplementedError

    def residual_output_parameters(self) -> list[nn.Parameter]:
        return [block.get_parameter(name) for block, names in zip(self.block_modules(), self.residual_outputs())
                for name in names]

    # --- which kernels run: recorded by the bench and the GPU check ------------------------------------------
    def backends(self) -> dict[str, str]:
        """Per kernel family with more than one implementation, the one a forward on this model's device would
        take now, e.g. ``{"scan": "mamba_ssm"}``; {} for a model of plain torch ops."""
        return {}

    def backends_ran(self) -> dict[str, str | None]:
        """The same families, as the last forward / step actually ran them (None: not run yet)."""
        return {}


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
