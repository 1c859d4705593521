"""The machinery every growth operator shares.

An operator does not write tensors by hand: it returns a *plan* per parameter of the grown model that says
where each entry comes from. The same plan then produces the weights (with the weight factors) and, when the
optimizer state is carried over, the Adam moments (copied, or scaled by how the gradient of that entry scales:
Staged Training's transfer). So weights and optimizer state can never disagree about which entry went where.

A plan is one :class:`AxisMap` per tensor dimension (``None``: unchanged along that dimension). Along an axis,
new index ``i`` takes old index ``src[i]`` (``-1``: a new entry with no source, filled per ``fill`` with the
grown model's own fresh init or with zeros), multiplied by ``weight[i]``; ``grad[i]`` is the factor by which the
gradient of that entry relates to the old one's when the grown model is an exact clone (what staged Adam
scaling uses: exp_avg * g, exp_avg_sq * g^2); ``group[i]`` marks entries that read *copies* of one activation,
across which zero-sum symmetry-breaking noise may be added without changing the function.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

INITS = ("random", "zero", "preserving")
OPTIMIZERS = ("fresh", "carry", "staged")
SCHEDULES = ("restart", "continue")
METHODS = ("tokens", "gstack", "gstack_identity", "expand", "width")


class GrowthError(ValueError):
    """A growth that cannot be done (incompatible target, bad option); the message is one line naming why."""


@dataclass
class AxisMap:
    src: torch.Tensor                      # (new_len,) long: old index, -1 = new entry
    weight: torch.Tensor | None = None     # (new_len,) factor on the weight
    grad: torch.Tensor | None = None       # (new_len,) factor of the gradient (staged Adam transfer)
    group: torch.Tensor | None = None      # (new_len,) long: entries reading copies of one activation

    @staticmethod
    def extend(n_old: int, n_new: int) -> "AxisMap":
        """The first n_old entries are the old ones, the rest are new."""
        src = torch.arange(n_new)
        src[n_old:] = -1
        return AxisMap(src)

    @property
    def free(self) -> torch.Tensor:
        return self.src < 0


@dataclass
class ParamPlan:
    src: str | None                        # old parameter name (None: a brand-new parameter, keeps its init)
    axes: tuple = ()                       # AxisMap or None per dimension (missing trailing dims: unchanged)
    fill: str = "init"                     # entries with no source: "init" (the grown model's fresh init) | "zero"
    zero: bool = False                     # the whole tensor starts at zero, with fresh optimizer state


@dataclass
class Growth:
    """What an operator returns: the grown model (eval mode), the plan per parameter name, and facts about the
    construction (its name, whether it is exactly function-preserving, notes)."""

    model: nn.Module
    plans: dict[str, ParamPlan]
    info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run with torch's global RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_target(config, name: str | None, seed: int) -> nn.Module:
    from models import registry
    with seeded(seed):
        return registry.build_from_config(config, name)


def config_diff(old, new, ignore: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """{field: (old, new)} of the config fields that differ."""
    a, b = dataclasses.asdict(old), dataclasses.asdict(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in ignore and a.get(k) != b.get(k)}


def _bcast(v: torch.Tensor, dim: int, ndim: int, like: torch.Tensor) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return v.to(device=like.device, dtype=like.dtype).view(shape)


def gather(old: torch.Tensor, axes: tuple, factor: str | None = None, power: int = 1) -> torch.Tensor:
    """Map an old tensor (a weight or an Adam moment) through the axis maps; ``factor`` is ``"weight"``,
    ``"grad"`` or None, raised to ``power``. Free entries come out as garbage: mask them (:func:`free_mask`)."""
    t = old
    for dim, ax in enumerate(axes):
        if ax is None:
            continue
        t = t.index_select(dim, ax.src.clamp_min(0).to(t.device))
        f = getattr(ax, factor) if factor else None
        if f is not None:
            t = t * _bcast(f, dim, t.ndim, t) ** power
    return t


def free_mask(axes: tuple, shape: torch.Size) -> torch.Tensor | None:
    """Boolean mask of the entries with no source (any axis index -1), or None when there are none."""
    mask = None
    for dim, ax in enumerate(axes):
        if ax is None or not bool(ax.free.any()):
            continue
        m = ax.free.view([-1 if d == dim else 1 for d in range(len(shape))]).expand(shape)
        mask = m if mask is None else mask | m
    return mask


def zero_sum_noise(shape: torch.Size, axes: tuple, std: float, generator: torch.Generator) -> torch.Tensor | None:
    """Gaussian noise that sums to zero within every group of copy-reading entries (per axis with groups), so
    adding it to a weight that reads k copies of one activation leaves the output unchanged."""
    noise = None
    for dim, ax in enumerate(axes):
        if ax is None or ax.group is None:
            continue
        eps = torch.randn(shape, generator=generator) * std
        group = ax.group
        n_groups = int(group.max()) + 1
        gshape = list(shape)
        gshape[dim] = n_groups
        sums = torch.zeros(gshape).index_add_(dim, group, eps)
        counts = torch.zeros(n_groups).index_add_(0, group, torch.ones(len(group)))
        eps = eps - (sums / _bcast(counts, dim, len(shape), sums)).index_select(dim, group)
        noise = eps if noise is None else noise + eps
    return noise


# ------------------------------------------------------------------------------------------ materialize
@torch.no_grad()
def materialize(old: nn.Module, new: nn.Module, plans: dict[str, ParamPlan], noise: float = 0.0,
                seed: int = 0) -> None:
    """Write every parameter of ``new`` from ``old`` through its plan (``new`` holds its fresh init already)."""
    old_params = dict(old.named_parameters())
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in new.named_parameters():
        plan = plans[name]
        if plan.zero:
            p.zero_()
            continue
        if plan.src is None:
            continue
        w = old_params[plan.src].detach().to(p.dtype)
        value = gather(w, plan.axes, "weight")
        if tuple(value.shape) != tuple(p.shape):
            raise GrowthError(f"internal: plan for {name} gives shape {tuple(value.shape)}, expected {tuple(p.shape)}")
        if noise > 0:
            # relative to the grown weight itself (a reader cloned k ways holds W / k): a fixed signal-to-noise ratio
            eps = zero_sum_noise(p.shape, plan.axes, noise * float(value.float().std()), gen)
            if eps is not None:
                value = value + eps.to(value.dtype)
        mask = free_mask(plan.axes, p.shape)
        if mask is not None:
            fill = p.detach() if plan.fill == "init" else torch.zeros_like(p)
            value = torch.where(mask, fill, value)
        p.copy_(value)


# ------------------------------------------------------------------------------------------ optimizer
SQUARED = ("exp_avg_sq", "max_exp_avg_sq")


def fresh_entry(p: torch.Tensor) -> dict[str, torch.Tensor]:
    """What torch's AdamW creates for a parameter on its first step (before updating it)."""
    return {"step": torch.tensor(0.0, dtype=torch.float32), "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def transfer_optimizer_state(new: nn.Module, plans: dict[str, ParamPlan], old_state: dict[str, dict[str, Any]],
                             mode: str) -> dict[str, dict[str, Any]]:
    """Adam state of the grown model, keyed by parameter name, from the old state keyed the same way.

    ``fresh``: {} (a new AdamW). ``carry``: every entry that has a source keeps its source's moments and step;
    new entries (and parameters zeroed at growth) get zeros, new parameters a fresh state. ``staged``: as carry,
    with the moments scaled by the entry's gradient factor g (exp_avg * g, exp_avg_sq * g^2): for an exact clone
    this is the state Adam would hold had the grown model seen the same gradient stream (Staged Training,
    arXiv 2203.06211: /2 and /4 for entries split in two)."""
    if mode not in OPTIMIZERS:
        raise GrowthError(f"optimizer={mode!r} is not one of {', '.join(OPTIMIZERS)}")
    if mode == "fresh":
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name, p in new.named_parameters():
        plan = plans[name]
        src = old_state.get(plan.src) if plan.src is not None else None
        if plan.zero or src is None:
            out[name] = fresh_entry(p.detach())
            continue
        mask = free_mask(plan.axes, p.shape)
        entry: dict[str, Any] = {}
        for key, value in src.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                power = 2 if key in SQUARED else 1
                moved = gather(value.to(p.dtype), plan.axes, "grad" if mode == "staged" else None, power)
                if mask is not None:
                    moved = moved.masked_fill(mask, 0.0)
                entry[key] = moved.clone(memory_format=torch.contiguous_format)  # never shared between copies
            elif isinstance(value, torch.Tensor):
                entry[key] = value.detach().clone()
            else:
                entry[key] = value
        out[name] = entry
    return out


# ------------------------------------------------------------------------------------------ measurement
@torch.no_grad()
def growth_gap(old_model: nn.Module, new_model: nn.Module, batch: torch.Tensor) -> dict[str, float]:
    """How much growth changed the function on a fixed batch of token ids (B, S): relative change of the
    logits ||new - old|| / ||old|| (fp32) and the next-token loss before and after."""
    modes = old_model.training, new_model.training
    old_model.eval(), new_model.eval()
    try:
        a = old_model(batch).float()
        b = new_model(batch).float()
    finally:
        old_model.train(modes[0]), new_model.train(modes[1])
    target = batch[:, 1:].reshape(-1)

    def loss(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target).item()

    rel = ((b - a).norm() / a.norm().clamp_min(1e-30)).item()
    return {"rel_logit_change": rel, "max_abs_logit_change": (b - a).abs().max().item(),
            "loss_before": loss(a), "loss_after": loss(b)}


def random_batch(vocab_size: int, seq_len: int, batch_size: int = 2, seed: int = 1234) -> torch.Tensor:
    """A fixed batch of random token ids (the CLI's measurement batch)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)
