"""Launching the loop under torchrun from `harness train --nproc N` and `harness run MATRIX --nproc N`.

For several nodes, call torchrun yourself (README): `torchrun --nnodes 2 --nproc_per_node 8
--rdzv_backend c10d --rdzv_endpoint HOST:29500 -m harness train ...`.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from .checkpoint import CheckpointError, read_state

SUMMARY_FILE = "summary.json"


class RankFailure(RuntimeError):
    """A rank died or failed; the message says so in one line and names the last complete checkpoint."""


def torchrun_command(nproc: int, harness_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "harness", *harness_args]


def last_checkpoint_note(out_dir: Path) -> str:
    ckpt = Path(out_dir) / "checkpoint"
    try:
        return f"last complete checkpoint: {ckpt} (step {read_state(ckpt)['step']})"
    except CheckpointError:
        return "no complete checkpoint yet"


def train_distributed(cfg: TrainConfig, out_dir: str | Path, nproc: int, resume: bool = True,
                      log_path: Path | None = None) -> dict[str, Any]:
    """Run one training config on ``nproc`` local ranks; returns rank 0's summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out_dir / "launch_config.json"
    cfg_path.write_text(json.dumps(asdict(cfg), indent=1))
    summary_path = out_dir / SUMMARY_FILE
    summary_path.unlink(missing_ok=True)
    args = ["train", "--config", str(cfg_path), "--out", str(out_dir), "--summary", str(summary_path)]
    if not resume:
        args.append("--restart")
    log = open(log_path, "w") if log_path else None
    try:
        proc = subprocess.run(torchrun_command(nproc, args), stdout=log, stderr=subprocess.STDOUT if log else None)
    finally:
        if log:
            log.close()
    if proc.returncode != 0 or not summary_path.is_file():
        where = f" (log: {log_path})" if log_path else ""
        raise RankFailure(f"distributed training failed on a rank (torchrun exit code {proc.returncode}){where}; "
                          f"{last_checkpoint_note(out_dir)}")
    return json.loads(summary_path.read_text())
