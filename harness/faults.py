"""Test-only fault injection: environment variables the fault-injection tests set on a subprocess, never
a CLI option. Each names a point in the commit protocol where a kill is most dangerous.

    HARNESS_FAULT_POINT=NAME   SIGKILL this process when it reaches the point NAME:
                               after_final_checkpoint  (the final checkpoint is saved, the record is not)
                               checkpoint_renamed_old  (a save moved the old checkpoint aside, the new one
                                                        is not in place yet; the first such save is skipped
                                                        when HARNESS_FAULT_SKIP=1, to hit a later one)
    HARNESS_FAULT_NAN=STEP     make every gradient NaN at training step STEP (a divergence)
    HARNESS_FAULT_KILL=RANK:STEP   (harness.train.loop) that rank kills itself before STEP
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
