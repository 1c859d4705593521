"""Test-only fault injection: environment variables the fault-injection tests set on a subprocess, never
a CLI option. Each names a point in the commit protocol where a kill is most dangerous.

    HARNESS_FAULT_POINT=NAME   SIGKILL this process when it reaches the point NAME:
                               after_final_checkpoint  (the final checkpoint is saved, the record is not)
                               checkpoint_renamed_old  (a save moved the old checkpoint aside, the new one
                                                        is not in place yet; the first such save is skipped
                                                        when HARNESS_FAULT_SKIP=1, to hit a later one)
    HARNESS_FAULT_NAN=STEP     make every gradient NaN at training step STEP (a divergence)
    HARNESS_FAULT_KILL=RANK:STEP   that rank of a training run SIGKILLs itself before training step STEP
                               (a dead rank must end the job with a clear error and leave the last
                               complete checkpoint usable)
"""
from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}


def point(name: str) -> None:
    if os.environ.get("HARNESS_FAULT_POINT") != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] > int(os.environ.get("HARNESS_FAULT_SKIP", "0")):
        os.kill(os.getpid(), signal.SIGKILL)


def nan_step() -> int | None:
    value = os.environ.get("HARNESS_FAULT_NAN")
    return int(value) if value else None


def kill_before_step(rank: int, step: int) -> None:
    """Called by the training loop before it trains ``step`` (1-based: the step its metrics will log)."""
    spec = os.environ.get("HARNESS_FAULT_KILL")
    if not spec:
        return
    kill_rank, kill_step = (int(v) for v in spec.split(":"))
    if rank == kill_rank and step == kill_step:
        os.kill(os.getpid(), signal.SIGKILL)


def nan_gradients(parameters, step: int) -> None:
    """Called by the training loop after the backward passes of ``step`` (1-based), before clipping."""
    at = nan_step()
    if at is not None and step == at:
        for p in parameters:
            if p.grad is not None:
                p.grad.fill_(float("nan"))
