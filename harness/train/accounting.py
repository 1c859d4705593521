"""What a training run has spent at its current step: tokens, FLOPs, cumulative FLOPs over a growth chain, the
log window's mean loss and throughput, and this process's throughput. One object, so every record, checkpoint
and summary counts the same way.

    acct = Accounting(step=start_step, run_start=run_start, tokens_per_step=b * seq_len,
                      flops_per_token=model.flops_per_token(seq_len), flops_offset=flops_offset)
    acct.advance(loss)                     # one optimizer step done
    acct.counts()                          # {"step", "tokens", "flops", "cumulative_flops"}
    acct.close_window()                    # {"loss": window mean, "tokens_per_s": window throughput}; a new window
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Accounting:
    step: int                   # optimizer steps done (the chain's count: a grown run continues its base's)
    run_start: int              # the step this run started at; its tokens and FLOPs count from here
    tokens_per_step: int        # batch_size x seq_len
    flops_per_token: float      # training FLOPs per token (the registry's exact count)
    flops_offset: float = 0.0   # training FLOPs spent before run_start (the base runs of a growth chain)
    # this process: where it started and when (a resumed run's throughput is its own, not the run's)
    first_step: int = field(init=False)
    t0: float = field(init=False, default_factory=time.perf_counter)
    # the log window: the steps since the last training-loss record
    window_loss: float = field(init=False, default=0.0)
    window_steps: int = field(init=False, default=0)
    window_tokens: int = field(init=False, default=0)
    window_t0: float = field(init=False, default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.first_step = self.step

    @property
    def tokens(self) -> int:
        """Tokens this run trained on (from run_start)."""
        return (self.step - self.run_start) * self.tokens_per_step

    @property
    def flops(self) -> float:
        """Training FLOPs this run spent (from run_start)."""
        return self.tokens * self.flops_per_token

    @property
    def cumulative_flops(self) -> float:
        """Training FLOPs of the chain: flops_offset plus this run's."""
        return self.flops_offset + self.flops

    def counts(self) -> dict[str, Any]:
        """The counts every metrics record starts with."""
        return {"step": self.step, "tokens": self.tokens, "flops": self.flops,
                "cumulative_flops": self.cumulative_flops}

    def advance(self, loss: float) -> None:
        """One optimizer step done, at training loss ``loss``."""
        self.step += 1
        self.window_loss += loss
        self.window_steps += 1
        self.window_tokens += self.tokens_per_step

    def close_window(self) -> dict[str, Any]:
        """The log window's mean training loss and tokens/s; the next window starts now."""
        elapsed = time.perf_counter() - self.window_t0
        out = {"loss": self.window_loss / self.window_steps,
               "tokens_per_s": self.window_tokens / max(elapsed, 1e-9)}
        self.window_loss, self.window_steps, self.window_tokens = 0.0, 0, 0
        self.window_t0 = time.perf_counter()
        return out

    def elapsed(self) -> float:
        """Seconds since this process's first step."""
        return time.perf_counter() - self.t0

    def tokens_per_s(self) -> float:
        """This process's throughput: tokens of the steps it trained over the seconds since it started."""
        return (self.step - self.first_step) * self.tokens_per_step / max(self.elapsed(), 1e-9)
