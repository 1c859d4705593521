"""Where a training run starts: from scratch, from its own checkpoint (a resume: weights, optimizer, schedule
position and every RNG come back, so the run continues exactly), or from another run's checkpoint
(``init_from``: e.g. a grown one, whose data stream, step and spent FLOPs it continues)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, TrainConfig, identity_dict
from . import distributed
from .checkpoint import load_checkpoint, read_state, recover
from .distributed import DistInfo

# what a resume must not change: every field that changes the trained weights (not how often it logs,
# checkpoints, or evaluates, where it runs, or how a global batch is split into micro-batches and ranks: a
# checkpoint resumes on any world size)
RESUME_FIELDS = ("model", "preset", "model_overrides", "data", "seq_len", "batch_size", "budget", "optim",
                 "schedule", "seed", "precision")


@dataclass
class StartState:
    """What the checkpoint a run starts from (if any) gives it."""
    start_step: int = 0         # the step training continues from
    # batches are a pure function of (seed, data_offset + step): a run started from a grown checkpoint
    # continues the data stream where its base stopped
    data_offset: int = 0
    flops_offset: float = 0.0   # training FLOPs spent before step 0 of this run (the base runs of a growth chain)
    lineage: list = field(default_factory=list)  # the growth steps behind the starting weights
    # the step this run started at (non-zero when a grown checkpoint continues its base's schedule); this
    # run's tokens and FLOPs count from there
    run_start: int = 0
    wall_before: float = 0.0    # training seconds of this run before this process (a resume)
    resumed_state: dict[str, Any] = field(default_factory=dict)  # the own checkpoint's state (a resume)
    init_dir: Path | None = None  # the checkpoint it starts from: its own (a resume) or init_from
    own: bool = False           # init_dir is this run's own checkpoint

    @property
    def from_other_run(self) -> bool:
        """Started from another run's checkpoint (init_from), not resumed from its own."""
        return self.init_dir is not None and not self.own


def start_state(cfg: TrainConfig, resume: bool, ckpt_dir: Path, metrics_path: Path, model, optimizer,
                info: DistInfo) -> StartState:
    """Load the checkpoint the run starts from into ``model`` (and ``optimizer`` when it holds optimizer
    state) and say where that leaves the run: its own checkpoint when ``resume`` and one exists (the config
    must train the same), else ``cfg.init_from`` if set, else nothing. Rank 0 trims the metrics log to the
    resumed step, or deletes a stale one; every rank waits for that."""
    start = StartState()
    if resume and info.is_main:
        recover(ckpt_dir)  # an interrupted save: put the newest complete checkpoint back in place
    distributed.barrier(info)
    if resume and ckpt_dir.exists():
        start.init_dir = ckpt_dir
        check_resume_config(read_state(ckpt_dir).get("config") or {}, cfg, ckpt_dir)
    elif cfg.init_from:
        start.init_dir = Path(cfg.init_from)
    if start.init_dir is not None:
        start.own = start.init_dir == ckpt_dir
        state = load_checkpoint(start.init_dir, model, optimizer if has_optimizer_state(start.init_dir) else None,
                                distributed=info.enabled, is_main=info.is_main, restore_rng=start.own)
        start.start_step = state["step"]
        start.data_offset = state.get("data_position", start.start_step) - start.start_step
        start.lineage = state.get("growth", [])
        if start.own:  # resuming this run
            start.wall_before, start.flops_offset = state.get("wall_time", 0.0), state.get("flops_offset", 0.0)
            start.run_start = state.get("run_start", 0)
            start.resumed_state = state
            if info.is_main:
                truncate_metrics(metrics_path, start.start_step)
        else:  # a new run from another run's (e.g. grown) checkpoint: its compute counts as spent before
            start.flops_offset = state.get("flops_offset", 0.0) + state.get("flops_spent", 0.0)
            start.run_start = start.start_step
            if info.is_main and metrics_path.exists():
                metrics_path.unlink()
    elif info.is_main and metrics_path.exists():
        metrics_path.unlink()
    distributed.barrier(info)
    return start


def has_optimizer_state(path: Path) -> bool:
    """A grown checkpoint with a fresh optimizer holds no optimizer state: the new AdamW starts empty."""
    state = read_state(path)
    return bool(state.get("optimizer", {}).get("state"))


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after the checkpoint we resume from (they will be logged again)."""
    if not path.exists():
        return
    kept, lines = [], path.read_text().splitlines()
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a kill mid-write: it is logged again from the checkpoint
    if len(kept) != len(lines):
        from ..store import write_text_atomic
        write_text_atomic(path, "".join(l + "\n" for l in kept))  # a kill here leaves the old log whole


def check_resume_config(saved: dict[str, Any], cfg: TrainConfig, where: Path) -> None:
    """Refuse to continue a checkpoint under a config that trains differently (one line naming the field)."""
    now, saved = identity_dict(cfg), identity_dict(saved)
    for name in RESUME_FIELDS:
        old, new = saved.get(name), json.loads(json.dumps(now.get(name), default=str))
        if name == "data" and isinstance(old, dict) and isinstance(new, dict):
            old, new = ({k: v for k, v in d.items() if k != "cache_dir"} for d in (old, new))  # where, not what
        if name in saved and old != new:
            raise ConfigError(f"{where}: holds a run with a different {name} ({old!r}, now {new!r}); resume it "
                              f"with its own config, or start over (harness train --restart, harness run "
                              f"--force), or use another --out")
