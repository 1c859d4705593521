"""Causal depthwise conv1d (the short conv in front of both Mamba mixers' scans): kernel path + reference.

Layout (nn.Conv1d's, as causal-conv1d's kernels): x (B, C, L) channels-first; weight (C, 1, W); bias (C,);
conv state (B, C, W), the last W *raw* (pre-conv) inputs seen. The kernel path (causal-conv1d, CUDA only) is
chosen by :func:`models.ops.dispatch.kernels_for`; the reference path is :func:`_depthwise_causal`, written
elementwise rather than as an F.conv1d so that FlopCounterMode neither sees nor miscounts it (its docstring
says why; the models add its FLOPs by hand in ``uncounted_flops_per_token``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.ops import dispatch


def _depthwise_causal(x_ext: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Valid depthwise conv as W shifted multiply-adds. x_ext (B, C, W-1+L), weight (C, 1, W) -> (B, C, L).

    Why not F.conv1d: torch's FlopCounterMode ignores ``groups`` in the convolution *backward* formula and
    counts a depthwise conv's weight gradient C times over (for d_inner=128 that alone would exceed all the
    matmuls), so a conv op would wreck the FLOP conformance check. Written elementwise, the conv is invisible
    to the counter and its 2*C*W FLOPs per token are added by hand (``uncounted_flops_per_token``). With
    W = 4 it is also as fast as a grouped conv on CPU.
    """
    width = weight.shape[-1]
    length = x_ext.shape[-1] - (width - 1)
    w = weight.squeeze(1).to(x_ext.dtype)  # (C, W)
    y = x_ext[..., 0:length] * w[:, 0:1]
    for k in range(1, width):
        y = y + x_ext[..., k:k + length] * w[:, k:k + 1]
    return y if bias is None else y + bias.to(y.dtype)[:, None]


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool = True) -> torch.Tensor:
    """Causal depthwise conv over the last axis. x (B, C, L), weight (C, 1, W) (nn.Conv1d layout) -> (B, C, L).

    Equals nn.Conv1d(padding=W-1)(x)[..., :L] (mamba-ssm's reference): output t sees inputs t-W+1 .. t.
    """
    k = dispatch.kernels_for(x)
    if k is not None and k.causal_conv1d_fn is not None:
        return k.causal_conv1d_fn(x, weight.squeeze(1), bias, activation="silu" if silu else None)
    y = _depthwise_causal(F.pad(x, (weight.shape[-1] - 1, 0)), weight, bias)
    return F.silu(y) if silu else y


def causal_conv1d_with_state(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv continuing from a cache. x (B, C, T), conv_state (B, C, W): the last W raw inputs seen so far.

    Returns (y (B, C, T), new conv_state (B, C, W)). The state holds *pre-conv* inputs, as mamba-ssm's does, so
    the last W-1 of it are exactly the left context the next T outputs need.
    """
    width = weight.shape[-1]
    x_ext = torch.cat([conv_state[..., 1:].to(x.dtype), x], dim=-1)  # (B, C, W-1+T)
    y = _depthwise_causal(x_ext, weight, bias)  # exactly T outputs
    return (F.silu(y) if silu else y), x_ext[..., -width:].to(conv_state.dtype)


def causal_conv1d_step(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step. x (B, C), conv_state (B, C, W) -> (y (B, C), new conv_state).

    Kernel path updates ``conv_state`` in place (and returns it); the reference returns a new tensor.
    """
    k = dispatch.kernels_for(x)
    if k is not None and k.causal_conv1d_update is not None and x.dtype == conv_state.dtype:
        conv_state = conv_state.contiguous()  # updated in place by the kernel (a no-op when already contiguous)
        y = k.causal_conv1d_update(x, conv_state, weight.squeeze(1), bias, "silu" if silu else None)
        return y, conv_state
    state = torch.cat([conv_state[..., 1:], x.unsqueeze(-1).to(conv_state.dtype)], dim=-1)  # shift left, append
    y = (state * weight.squeeze(1)).sum(-1).to(x.dtype)  # (B, C)
    if bias is not None:
        y = y + bias
    return (F.silu(y) if silu else y), state


__all__ = ["causal_conv1d", "causal_conv1d_with_state", "causal_conv1d_step"]
