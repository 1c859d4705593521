"""The SSM discretisation step shared by the Mamba-1 scan (``selective_scan``) and the Mamba-2 SSD (``ssd``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def step_size(dt: torch.Tensor, bias: torch.Tensor | None, softplus: bool) -> torch.Tensor:
    """The discretisation step in fp32: dt (+ bias, already shaped to broadcast), through softplus when asked.
    One definition for every scan and decode path, reference and kernel-free alike."""
    dt = dt.float()
    if bias is not None:
        dt = dt + bias.float()
    return F.softplus(dt) if softplus else dt


__all__ = ["step_size"]
