"""Data parallelism for the one training loop: DDP, or FSDP2 (`fully_shard` per block), under torchrun.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and the rendezvous); without them everything here is a no-op and
the loop runs as a plain single process. Backend: nccl on CUDA, gloo on CPU. Each rank reads rows
rank::world_size of the same global batch, so the global batch is what the config says whatever the world
size; rank 0 alone writes logs, checkpoints and records.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

PARALLEL_MODES = ("auto", "ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_spec: str) -> tuple[DistInfo, str]:
    """Join the process group torchrun describes (if any). Returns the info and the device spec to use:
    on CUDA each rank takes cuda:LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device_spec
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_spec in ("auto", "cuda") or device_spec.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local)
        device_spec = f"cuda:{local}"
    if not dist.is_initialized():
        # a killed peer must end the job promptly rather than hang in a collective for the default 30 min
        timeout = datetime.timedelta(seconds=int(os.environ.get("HARNESS_DIST_TIMEOUT", "600")))
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    return DistInfo(rank, world, local), device_spec


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def resolve_mode(mode: str, info: DistInfo) -> str:
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel: {mode!r} is not one of {', '.join(PARALLEL_MODES)}")
    if not info.enabled:
        return "none"
    return "ddp" if mode == "auto" else mode


def wrap(model: nn.Module, mode: str, device: torch.device, amp_dtype: torch.dtype | None) -> nn.Module:
    """DDP: the module replicated, gradients all-reduced. FSDP2: each block sharded on its own (its parameters
    gathered just for its forward/backward), then the root (embeddings, final norm, tied head). On CUDA,
    FSDP2's mixed-precision policy computes in bf16 and reduces gradients in fp32."""
    if mode == "none":
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    kwargs = {}
    if amp_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
    for block in model.block_modules():
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module) else model


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
