"""Training progress: tqdm's bar on a terminal; in a log (stderr not a TTY: nohup, SLURM, CI) one plain line
every ``every`` seconds instead of thousands of carriage-return redraws.

    bar = progress(total_steps, start_step, "tokenformer/tiny")   # same calls either way
    bar.update(1); bar.set_postfix(loss="2.31", tok_s="5400", refresh=False); bar.close()
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, TextIO

EVERY_S = float(os.environ.get("HARNESS_PROGRESS_EVERY", 30))  # seconds between two log lines


class LineProgress:
    """The subset of tqdm's interface the loop uses, printing ``desc: step n/total (p%), r steps/s, eta, postfix``
    at most once per ``every`` seconds, and once at close."""

    def __init__(self, total: int, initial: int, desc: str, every: float = EVERY_S, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.n, self.desc, self.every = total, initial, desc, every
        self.stream, self.clock = stream or sys.stderr, clock
        self.t0 = self.last = clock()
        self.n0, self.postfix, self.printed = initial, "", initial

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self.last >= self.every:
            self._line()

    def set_postfix(self, refresh: bool = True, **kw) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def close(self) -> None:
        if self.n > self.printed:  # the last step, unless a line just said it
            self._line()

    def _line(self) -> None:
        now = self.clock()
        rate = (self.n - self.n0) / max(now - self.t0, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        eta_s = f"{eta / 60:.1f} min" if eta != float("inf") else "-"
        self.stream.write(f"{self.desc}: step {self.n}/{self.total} ({self.n / max(self.total, 1):.0%}), "
                          f"{rate:.2f} steps/s, eta {eta_s}" + (f", {self.postfix}" if self.postfix else "") + "\n")
        self.stream.flush()
        self.last, self.printed = now, self.n


def progress(total: int, initial: int, desc: str, stream: TextIO | None = None):
    stream = stream or sys.stderr
    if stream.isatty():
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=False,
                    file=stream)
    return LineProgress(total, initial, desc, stream=stream)
