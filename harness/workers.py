"""Many workers on one matrix: `harness run MATRIX --worker`, `harness status MATRIX` and the submitit launchers.

A worker is the cooperative runner of harness.matrix, nothing more: it trains the next cell no other runner
holds a live lease on (harness.lease), waits for the held cells of its stage (sweep points before the cells
that take their rate, a growth base before what grows from it, a frontier budget before the next one), takes
over a cell whose holder died (after the lease TTL; at once for a dead process of this host) and resumes it
from its checkpoint, and exits when every cell is settled. Any number of workers on any number of hosts
sharing the results store finish a matrix with every cell trained once. Workers write no report (N of them
would write it N times): `harness report ROOT/NAME` writes it at any time from what is done.

Launchers start N workers through submitit (an optional extra, imported only here): ``slurm`` as one job
array (each task one worker, itself a torchrun of G ranks when G > 1), ``local`` on this machine through
submitit's LocalExecutor, each worker pinned to its own GPUs or, without GPUs, to a share of the CPU cores.
"""
from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

from . import lease, store
from .config import ConfigError

PIP_HINT = "pip install 'tokenformer-bench[submitit]'"
LAUNCHERS = ("local", "slurm")


def run_worker(matrix, root: Path, nproc: int = 1, only: list[str] | None = None, log=print) -> int:
    """Work the matrix with whatever other workers share ``root`` until nothing is left; 1 when a cell failed."""
    from .matrix import run_matrix
    import torch
    me = f"{socket.gethostname()}:{os.getpid()}"
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    log(f"worker {me}: matrix {matrix.name} -> {root}/{matrix.name}; {torch.get_num_threads()} torch thread(s)"
        + (f", CUDA_VISIBLE_DEVICES={devices}" if devices else ""))
    records = run_matrix(matrix, root, nproc=nproc, only=only, log=log)
    bad = [r for r in records if r.get("status") in ("failed", "diverged")]
    log(f"worker {me}: nothing left ({len(records)} cell(s) settled, {len(bad)} failed); "
        f"report: harness report {root}/{matrix.name}")
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------- status

def _checkpoint_step(directory: Path) -> int | None:
    from .train.checkpoint import complete_step  # the newest complete save, also one an interrupted save left aside
    steps = [complete_step(directory / name) for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old")]
    return max((s for s in steps if s is not None), default=None)


def _lease_dead(held: dict[str, Any], now: float) -> bool:
    """One look, so no heartbeat can be watched moving (harness.lease does that): a process of this host that
    is gone, or a heartbeat older than the TTL by this host's clock (needs synced clocks across hosts)."""
    if held.get("pid_rule", True) and held.get("host") == socket.gethostname() and held.get("pid"):
        try:
            os.kill(int(held["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    beat = held.get("heartbeat")
    return not isinstance(beat, (int, float)) or now - beat > lease.ttl_s()


def cell_states(matrix, root: Path) -> list[dict[str, Any]]:
    """Every cell of the matrix (and every other cell directory of its store: extended sweep points, frontier
    rungs planned at run time) as {cell, state, ...}; state is done | running | stale (a lease whose holder
    looks dead: the next worker takes it over) | failed | waiting (partial: a checkpoint to resume from).
    Reads only."""
    base = Path(root) / matrix.name
    ids = [c.cell_id for c in matrix.cells]
    if base.is_dir():
        ids += sorted(p.name for p in base.iterdir() if p.name not in ids and p.is_dir()
                      and any((p / f).exists() for f in (store.RECORD, lease.LEASE, "checkpoint")))
    now, rows = time.time(), []
    for cell_id in ids:
        directory = base / cell_id
        try:
            rec = store.read_record(directory) or {}
        except store.RecordError:
            rec = {"status": "unreadable"}
        held = lease.read(directory)
        step = _checkpoint_step(directory)
        row: dict[str, Any] = {"cell": cell_id, "step": step}
        status = rec.get("status")
        if status == "complete":
            row.update(state="done", val_loss=rec.get("val_loss"))
        elif held is not None:
            beat = held.get("heartbeat")
            row.update(state="stale" if _lease_dead(held, now) else "running", holder=held.get("holder"),
                       host=held.get("host"), pid=held.get("pid"),
                       heartbeat_age_s=round(now - beat, 1) if isinstance(beat, (int, float)) else None)
        elif status in ("failed", "diverged", "unreadable"):
            row.update(state="failed", status=status, error=rec.get("error"))
        else:
            row.update(state="waiting", partial=step is not None)
        rows.append(row)
    return rows


def print_status(matrix, root: Path, as_json: bool = False) -> int:
    rows = cell_states(matrix, root)
    totals = {s: sum(r["state"] == s for r in rows) for s in ("done", "running", "stale", "waiting", "failed")}
    if as_json:
        print(json.dumps({"matrix": matrix.name, "root": str(root), "cells": rows, "totals": totals}, indent=1))
        return 0
    width = max([len(r["cell"]) for r in rows] + [4])
    for r in rows:
        extra = ""
        if r["state"] in ("running", "stale"):
            extra = (f"holder {str(r['holder'])[:8]} on {r['host']} pid {r['pid']}, step {r['step']}, heartbeat "
                     f"{r['heartbeat_age_s']}s ago")
        elif r["state"] == "done":
            extra = f"val loss {r['val_loss']:.4f}" if isinstance(r.get("val_loss"), (int, float)) else ""
        elif r["state"] == "failed":
            extra = f"{r['status']}: {r.get('error') or ''}"[:100]
        elif r["partial"]:
            extra = f"partial, resumes from step {r['step']}"
        print(f"{r['cell'].ljust(width)}  {r['state']:<8} {extra}".rstrip())
    print(f"{matrix.name}: {len(rows)} cell(s): " + ", ".join(f"{n} {s}" for s, n in totals.items()))
    return 0


# -------------------------------------------------------------------------------------------- launchers

def _submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError(f"--launcher: needs submitit ({PIP_HINT})") from None
    return submitit


LAUNCH_FLAGS = (("workers", "--workers"), ("gpus_per_worker", "--gpus-per-worker"), ("partition", "--partition"),
                ("time", "--time"), ("account", "--account"), ("dry_run", "--dry-run"), ("logs", "--logs"))


def check_run_args(args) -> None:
    """`harness run` without --launcher: the launch flags mean nothing, and a worker never forces."""
    if args.launcher:
        return
    for attr, flag in LAUNCH_FLAGS:
        if getattr(args, attr) not in (None, False):
            raise ConfigError(f"{flag}: only with --launcher local|slurm")
    if args.worker and args.force:
        raise ConfigError("--force: every worker would retrain every cell; delete the cells to retrain instead")


def check_launch_args(args) -> None:
    """One line naming the flag for a launch that cannot be right (exit 2), before anything is submitted."""
    if args.launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher: {args.launcher!r} is not one of {', '.join(LAUNCHERS)}")
    if args.worker:
        raise ConfigError("--launcher: starts workers; give --worker only to a worker itself")
    if args.force:
        raise ConfigError("--force: every worker would retrain every cell; delete the cells to retrain instead")
    if args.workers is None or args.workers < 1:
        raise ConfigError(f"--workers: a number of workers >= 1 is required with --launcher, got {args.workers}")
    if args.gpus_per_worker is not None and args.gpus_per_worker < 0:
        raise ConfigError(f"--gpus-per-worker: must be >= 0, got {args.gpus_per_worker}")
    if args.time is not None and args.time <= 0:
        raise ConfigError(f"--time: minutes, must be > 0, got {args.time}")
    if args.launcher == "slurm" and args.time is None:
        # submitit's default limit is 5 minutes: a silent default would kill every worker mid-cell
        raise ConfigError("--time: required with --launcher slurm (each worker's limit in minutes)")
    if args.nproc != 1:
        raise ConfigError("--nproc: with --launcher each worker's torchrun ranks are --gpus-per-worker")
    if args.launcher == "local":
        for flag, value in (("--partition", args.partition), ("--account", args.account)):
            if value is not None:
                raise ConfigError(f"{flag}: only with --launcher slurm")


def worker_command(matrix, args, root: Path, gpus: int) -> list[str]:
    """What each job runs: this Python's `harness run MATRIX --worker`, with the matrix and the store as
    absolute paths (a job may start in another directory, on another host)."""
    from .matrix import shipped_matrices
    # a shipped name: the copy installed where the job runs
    spec = args.matrix if args.matrix in shipped_matrices() else str(Path(matrix.source).resolve())
    cmd = [sys.executable, "-m", "harness", "run", spec, "--worker", "--out", str(Path(root).resolve())]
    for item in args.set or []:
        cmd += ["--set", item]
    for item in args.only or []:
        cmd += ["--only", item]
    if gpus > 1:
        cmd += ["--nproc", str(gpus)]  # the worker trains each cell as a torchrun job of G ranks
    return cmd


def _local_gpus() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA: a CPU machine
        return 0


def local_plan(n: int, gpus_per_worker: int | None, gpus_here: int, cores: int) -> list[dict[str, str]]:
    """Each local worker's pinning: its own GPUs (CUDA_VISIBLE_DEVICES) when there are GPUs, else its share
    of the CPU cores (thread counts), so N workers never fight over one device or oversubscribe the cores."""
    if gpus_here:
        g = 1 if gpus_per_worker is None else gpus_per_worker
        if g < 1:
            raise ConfigError("--gpus-per-worker: this machine has GPUs; give each worker at least 1")
        if n * g > gpus_here:
            raise ConfigError(f"--gpus-per-worker: {n} workers x {g} GPU(s) exceed the {gpus_here} GPU(s) here")
        return [{"CUDA_VISIBLE_DEVICES": ",".join(str(i * g + k) for k in range(g))} for i in range(n)]
    if gpus_per_worker:
        raise ConfigError(f"--gpus-per-worker: {gpus_per_worker} GPU(s) asked, this machine has none")
    share = str(max(1, cores // n))
    # CUDA_VISIBLE_DEVICES empty: a CPU worker never grabs a device; the thread variables set torch's pools
    return [{"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": share, "MKL_NUM_THREADS": share} for _ in range(n)]


def slurm_parameters(matrix, args) -> dict[str, Any]:
    """submitit SlurmExecutor parameters of the array: one task per worker, all its GPUs on one node (a
    worker's torchrun is single-node), at most N tasks at once."""
    g = args.gpus_per_worker or 0
    params: dict[str, Any] = {"job_name": f"harness-{matrix.name}", "nodes": 1, "ntasks_per_node": 1,
                              "array_parallelism": args.workers, "stderr_to_stdout": True}
    if g:
        params["gpus_per_node"] = g
    for key, value in (("partition", args.partition), ("account", args.account), ("time", args.time)):
        if value is not None:
            params[key] = value
    return params


def _folder(matrix, root: Path, args) -> Path:
    return Path(args.logs) if args.logs else Path(root).resolve() / matrix.name / "submitit"


def sbatch_text(folder: Path, params: dict[str, Any], workers: int) -> str:
    """The sbatch file submitit writes for the array (its own template, so --dry-run shows what it submits)."""
    from submitit.slurm.slurm import _make_sbatch_string
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, map_count=workers, **params)


def launch(matrix, args, root: Path) -> int:
    """`harness run MATRIX --launcher local|slurm --workers N`: submit (or with --dry-run, show) the workers."""
    check_launch_args(args)
    submitit = _submitit()
    from submitit.helpers import CommandFunction
    folder, n = _folder(matrix, root, args), args.workers
    if args.launcher == "slurm":
        params = slurm_parameters(matrix, args)
        cmd = worker_command(matrix, args, root, args.gpus_per_worker or 0)
        envs = [{} for _ in range(n)]  # SLURM pins each task to its own GPUs (gpus_per_node)
    else:
        gpus = _local_gpus()
        envs = local_plan(n, args.gpus_per_worker, gpus, os.cpu_count() or 1)
        g = (1 if args.gpus_per_worker is None else args.gpus_per_worker) if gpus else 0
        cmd = worker_command(matrix, args, root, g)
        params = {"timeout_min": args.time or 7 * 24 * 60}  # local jobs: submitit's own default is 5 minutes
    if args.dry_run:
        print(f"{args.launcher} launcher, {n} worker(s), submitit folder {folder}")
        print(f"executor parameters: {json.dumps(params, sort_keys=True)}")
        print(f"worker command: {shlex.join(cmd)}")
        for i, env in enumerate(envs):
            if env:
                print(f"  worker {i}: " + " ".join(f"{k}={v}" for k, v in env.items()))
        if args.launcher == "slurm":
            print(sbatch_text(folder, params, n))
        print("dry run: nothing submitted")
        return 0
    executor = submitit.SlurmExecutor(folder) if args.launcher == "slurm" else submitit.LocalExecutor(folder)
    executor.update_parameters(**params)
    # slurm: the task's own environment (SLURM_*, the GPUs it was given), never a copy of this host's
    functions = [CommandFunction(cmd, cwd=os.getcwd(), env={**os.environ, **env} if env else None) for env in envs]
    if args.launcher == "slurm":
        with executor.batch():  # one job array
            jobs = [executor.submit(f) for f in functions]
        print(f"submitted {n} worker(s) as SLURM job array {jobs[0].job_id.split('_')[0]}; logs in {folder}; "
              f"progress: harness status {args.matrix or matrix.name} --out {root}")
        return 0
    jobs = [executor.submit(f) for f in functions]
    print(f"started {n} local worker(s) (submitit jobs {', '.join(j.job_id for j in jobs)}); logs in {folder}")
    failed = 0
    for job in jobs:
        try:
            job.result()
        except Exception as e:  # noqa: BLE001 - a worker that exited non-zero (a failed cell): report it
            failed += 1
            print(f"worker job {job.job_id} failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e}")
    from .report import write_report
    print(f"report: {write_report(Path(root) / matrix.name)}")
    return 1 if failed else 0
