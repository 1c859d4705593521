"""AdamW parameter groups and learning-rate schedules."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimConfig, ScheduleConfig

PATTENTION_TOKENS = ("key_param_tokens", "value_param_tokens")


def no_decay_names(model: nn.Module, cfg: OptimConfig) -> set[str]:
    """Names of the parameters exempt from weight decay: norms and biases (< 2 dims), parameters a model marks
    ``_no_weight_decay`` (Mamba's A_log, D), and Pattention tokens if cfg.decay_pattention_tokens is false.
    Decided on the unwrapped model: FSDP2 replaces parameters and drops such attributes."""
    names = set()
    for name, p in model.named_parameters():
        exempt = p.ndim < 2 or getattr(p, "_no_weight_decay", False)
        if name.rsplit(".", 1)[-1] in PATTENTION_TOKENS and not cfg.decay_pattention_tokens:
            exempt = True
        if exempt:
            names.add(name)
    return names


def param_groups(model: nn.Module, cfg: OptimConfig, exempt: set[str] | None = None) -> list[dict]:
    """Decay every matrix (>= 2 dims); never the parameters :func:`no_decay_names` lists."""
    exempt = no_decay_names(model, cfg) if exempt is None else exempt
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if name in exempt else decay).append(p)
    return [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device,
                    exempt: set[str] | None = None) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg, exempt), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=device.type == "cuda")


def warmup_steps(total_steps: int, cfg: ScheduleConfig) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    return min(total_steps, max(1, round(cfg.warmup_fraction * total_steps)))


def lr_at(step: int, total_steps: int, peak: float, cfg: ScheduleConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    warm = warmup_steps(total_steps, cfg)
    floor = peak * cfg.min_lr_ratio
    if step < warm:
        return peak * (step + 1) / warm
    if cfg.kind == "constant":
        return peak
    if cfg.kind == "wsd":
        decay_start = total_steps - max(1, round(cfg.decay_fraction * total_steps))
        if step < max(decay_start, warm):
            return peak
        frac = (step - max(decay_start, warm) + 1) / max(1, total_steps - max(decay_start, warm))
        return peak + (floor - peak) * min(1.0, frac)
    # cosine from peak (at the end of warmup) to floor (at the last step)
    frac = (step - warm) / max(1, total_steps - warm - 1)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, frac)))
