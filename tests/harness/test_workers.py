"""Many workers on one matrix, for real: `harness run --worker` subprocesses racing on one store (a sweep and a
growth stage, so dependencies matter), a killed worker replaced, a dead holder's lease outlived, `harness
status` on a store in every state, and the submitit launchers (local for real; slurm through submitit with a
stand-in sbatch, and --dry-run)."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness import lease
from harness.cli import main

ROOT = Path(__file__).resolve().parents[2]
CELLS = [f"sweep-base-steps2-lr{lr}-seed7" for lr in ("0.001", "0.002", "0.004", "0.008", "0.016")] + \
    ["base-steps2-seed0", "grown-steps2-seed0"]


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HARNESS_POLL_S": "0.3",
           "PYTHONUNBUFFERED": "1", **extra}
    for k in ("HARNESS_FAULT_POINT", "HARNESS_FAULT_SKIP", "HARNESS_FAULT_NAN", "HARNESS_FAULT_KILL",
              "HARNESS_LEASE_TTL"):
        if k not in extra:
            env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, corpus):
    """A 5-point LR sweep of a base, its main cell, and a grown stage that takes the base's rate and grows
    from its checkpoint: 7 cells of 2 steps. The bounds are the grid's ends, so the sweep never extends."""
    tmp = tmp_path_factory.mktemp("tiny")
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny",
        "defaults": {"model": "tokenformer", "preset": "tiny", "seq_len": 32, "batch_size": 4,
                     "budget": {"steps": 2}, "eval_every": 2, "eval_batches": 1, "log_every": 1,
                     "checkpoint_every": 1, "progress": False,
                     "data": {"source": str(corpus), "tokenizer": "byte", "cache_dir": str(tmp / "cache"),
                              "val_fraction": 0.2}},
        "seeds": [0],
        "lr_sweep": {"values": [0.001, 0.002, 0.004, 0.008, 0.016], "bounds": [0.001, 0.016], "seeds": [7]},
        "models": [{"label": "base", "model": "tokenformer"},
                   {"label": "grown", "model": "tokenformer", "lr_from": "base",
                    "model_overrides": {"qkv_tokens": 96, "proj_tokens": 96, "ffn_hidden": 384},
                    "grow_from": {"from": "base", "method": "tokens", "init": "random"}}]}))
    return path


def _workers(path, out, n, **env):
    cmd = [sys.executable, "-m", "harness", "run", str(path), "--worker", "--out", str(out)]
    procs = [subprocess.Popen(cmd, cwd=path.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(**env)) for _ in range(n)]
    return procs, [p.communicate(timeout=600) for p in procs]


def _losses(out):
    return {c: json.loads((out / "tiny" / c / "record.json").read_text())["val_loss"] for c in CELLS}


def _trained(stdouts, verb="training"):
    return [line.split("] ")[1].rsplit(":", 1)[0] for o in stdouts for line in o.splitlines()
            if line.endswith(f": {verb}")]


@pytest.fixture(scope="module")
def single(tiny):
    out = tiny.parent / "single"
    procs, outs = _workers(tiny, out, 1)
    assert procs[0].returncode == 0, outs[0][1]
    assert sorted(_trained([outs[0][0]])) == sorted(CELLS) and "nothing left" in outs[0][0]
    return _losses(out)


@pytest.mark.parametrize("n", [2, 3])
def test_n_workers_train_every_cell_once_with_the_records_of_one(tiny, single, n):
    out = tiny.parent / f"workers{n}"
    procs, outs = _workers(tiny, out, n)
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    trained = _trained([o for o, _ in outs])
    # every cell trained by exactly one worker, none resumed or retrained, and the work was shared
    assert sorted(trained) == sorted(CELLS) and not _trained([o for o, _ in outs], "resuming")
    assert sum(bool(_trained([o])) for o, _ in outs) >= 2
    assert _losses(out) == single  # bitwise the records of one worker (CPU, one thread)
    for cell in CELLS:
        steps = [json.loads(l)["step"] for l in (out / "tiny" / cell / "metrics.jsonl").read_text().splitlines()
                 if "loss" in l]
        assert steps == sorted(set(steps)), steps  # one training's curve, not two interleaved
        assert not (out / "tiny" / cell / lease.LEASE).exists()
    assert not (out / "tiny" / "report.md").exists()  # workers leave the report to `harness report`


def test_a_killed_worker_is_replaced_and_its_cell_resumes(tiny, single):
    out = tiny.parent / "killed"
    procs, _ = _workers(tiny, out, 1, HARNESS_FAULT_POINT="after_final_checkpoint")
    assert procs[0].returncode == -signal.SIGKILL  # killed after its first cell's final checkpoint, no record
    first = out / "tiny" / CELLS[0]
    assert (first / lease.LEASE).exists() and not (first / "record.json").exists()
    procs, outs = _workers(tiny, out, 2)
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    assert _trained([o for o, _ in outs], "resuming") == [CELLS[0]]  # its holder's process is gone: at once
    assert sorted(_trained([o for o, _ in outs])) == sorted(CELLS[1:])
    assert json.loads((first / "record.json").read_text())["resumed_from_step"] == 2
    assert _losses(out) == single


def test_a_worker_outlives_a_dead_holder_of_another_host(tiny, single):
    """A lease whose heartbeat stands still (its host died): the worker waits one TTL, then takes the cell
    over; it never blocks forever."""
    out = tiny.parent / "foreign"
    cell = out / "tiny" / "base-steps2-seed0"
    cell.mkdir(parents=True)
    (cell / lease.LEASE).write_text(json.dumps({"holder": "z", "host": "gone-host", "pid": 1, "heartbeat": 0}))
    t0 = time.time()
    procs, outs = _workers(tiny, out, 1, HARNESS_LEASE_TTL="3")
    assert procs[0].returncode == 0, outs[0][1]
    assert time.time() - t0 >= 3  # it did wait for the TTL
    assert sorted(_trained([outs[0][0]])) == sorted(CELLS)
    assert _losses(out) == single


def _write_checkpoint(directory, step):
    from harness.train.checkpoint import FILES
    ck = directory / "checkpoint"
    ck.mkdir(parents=True)
    for f in FILES:
        (ck / f).write_text(json.dumps({"step": step}) if f == "state.json" else "")


def test_status_shows_done_running_stale_failed_and_waiting(tmp_path, corpus, capsys):
    path = tmp_path / "st.yaml"
    path.write_text(yaml.safe_dump({"name": "st", "seeds": [0, 1, 2, 3, 4, 5],
                                    "defaults": {"budget": {"steps": 2}, "data": {"source": str(corpus)}},
                                    "models": [{"model": "transformer_pp", "preset": "tiny"}]}))
    base = tmp_path / "store" / "st"
    cells = [f"transformer_pp-tiny-steps2-seed{s}" for s in range(6)]
    for c in cells:
        (base / c).mkdir(parents=True)
    (base / cells[0] / "record.json").write_text(json.dumps({"status": "complete", "val_loss": 3.25}))
    # a live holder (this very process), written the way lease.claim writes it, with a checkpoint at step 3
    assert lease._create(base / cells[1], {"holder": "abc123", "host": os.uname().nodename, "pid": os.getpid()})
    _write_checkpoint(base / cells[1], 3)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (base / cells[2] / lease.LEASE).write_text(json.dumps({"holder": "d", "host": os.uname().nodename,
                                                           "pid": dead.pid, "heartbeat": time.time()}))
    (base / cells[3] / "record.json").write_text(json.dumps({"status": "failed", "error": "RuntimeError: boom"}))
    _write_checkpoint(base / cells[4], 1)  # partial, no holder: the next worker resumes it
    before = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    assert main(["status", str(path), "--out", str(tmp_path / "store")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == [cells[0], "done", "val", "loss"]
    assert lines[1].split()[1] == "running" and "abc123" in lines[1] and "step 3" in lines[1] \
        and os.uname().nodename in lines[1] and "heartbeat" in lines[1]
    assert lines[2].split()[1] == "stale"
    assert lines[3].split()[1] == "failed" and "boom" in lines[3]
    assert lines[4].split()[1] == "waiting" and "step 1" in lines[4]
    assert lines[5].split() == [cells[5], "waiting"]
    assert lines[6] == "st: 6 cell(s): 1 done, 1 running, 1 stale, 2 waiting, 1 failed"
    assert main(["status", str(path), "--out", str(tmp_path / "store"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows["totals"] == {"done": 1, "running": 1, "stale": 1, "waiting": 2, "failed": 1}
    running = rows["cells"][1]
    assert running["holder"] == "abc123" and running["step"] == 3 and 0 <= running["heartbeat_age_s"] < 60
    assert sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before  # read-only


@pytest.mark.parametrize("argv, flag", [
    (["--launcher", "local", "--workers", "0"], "--workers"),
    (["--launcher", "local"], "--workers"),
    (["--launcher", "pbs", "--workers", "2"], "--launcher"),
    (["--launcher", "local", "--workers", "2", "--partition", "gpu"], "--partition"),
    (["--launcher", "slurm", "--workers", "2", "--time", "0"], "--time"),
    (["--launcher", "slurm", "--workers", "2"], "--time"),
    (["--launcher", "slurm", "--workers", "2", "--force"], "--force"),
    (["--workers", "2"], "--workers"),
    (["--worker", "--force"], "--force"),
])
def test_bad_launch_flags_fail_in_one_line_naming_the_flag(tiny, capsys, argv, flag):
    pytest.importorskip("submitit")
    assert main(["run", str(tiny), "--out", str(tiny.parent / "never"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0], err
    assert not (tiny.parent / "never").exists()


def test_launcher_without_submitit_says_how_to_install_it(tiny, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    assert main(["run", str(tiny), "--launcher", "local", "--workers", "2", "--out", str(tiny.parent / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'tokenformer-bench[submitit]'" in err[0]


def test_slurm_dry_run_shows_the_array_and_submits_nothing(tiny, capsys):
    pytest.importorskip("submitit")
    out = tiny.parent / "dry"
    assert main(["run", str(tiny), "--out", str(out), "--launcher", "slurm", "--workers", "3",
                 "--gpus-per-worker", "2", "--partition", "gpu", "--time", "90", "--account", "proj",
                 "--dry-run"]) == 0
    text = capsys.readouterr().out
    for line in ("#SBATCH --array=0-2%3", "#SBATCH --gpus-per-node=2", "#SBATCH --partition=gpu",
                 "#SBATCH --time=90", "#SBATCH --account=proj", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1"):
        assert line in text
    assert f"run {tiny} --worker --out {out.resolve()} --nproc 2" in text and "nothing submitted" in text
    assert not out.exists()


def test_slurm_launcher_submits_one_array_of_worker_commands(tiny, tmp_path, monkeypatch, capsys):
    """Through submitit itself, with stand-ins for srun and sbatch: one sbatch of a 3-task array, each task's
    pickled function the worker command."""
    pytest.importorskip("submitit")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_ / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {tmp_path}/sbatch.sh\necho Submitted batch job 4242\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    out = tmp_path / "store"
    assert main(["run", str(tiny), "--out", str(out), "--launcher", "slurm", "--workers", "3",
                 "--partition", "cpu", "--time", "30"]) == 0
    assert "SLURM job array 4242" in capsys.readouterr().out
    sbatch = (tmp_path / "sbatch.sh").read_text()
    assert "#SBATCH --array=0-2%3" in sbatch and "#SBATCH --partition=cpu" in sbatch and "--time=30" in sbatch
    folder = out / "tiny" / "submitit"
    pickles = sorted(folder.glob("4242_*_submitted.pkl"))
    assert len(pickles) == 3
    for p in pickles:
        job = pickle.loads(p.read_bytes())
        assert job.function.command == [sys.executable, "-m", "harness", "run", str(tiny), "--worker", "--out",
                                        str(out.resolve())]
        assert job.function.env is None  # the task's environment (its GPUs), not the submitting host's


def test_local_launcher_runs_two_pinned_workers(tiny, single, capsys):
    pytest.importorskip("submitit")
    out = tiny.parent / "local"
    assert main(["run", str(tiny), "--out", str(out), "--launcher", "local", "--workers", "2", "--dry-run"]) == 0
    share = max(1, (os.cpu_count() or 1) // 2)
    assert capsys.readouterr().out.count(f"OMP_NUM_THREADS={share}") == 2
    proc = subprocess.run([sys.executable, "-m", "harness", "run", str(tiny), "--out", str(out), "--launcher",
                           "local", "--workers", "2"], cwd=tiny.parent, capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _losses(out) == single and (out / "tiny" / "report.md").exists()
    logs = [p.read_text() for p in (out / "tiny" / "submitit").glob("*_log.out")]
    assert len(logs) == 2 and sorted(_trained(logs)) == sorted(CELLS)
    assert all(f"{share} torch thread(s)" in log for log in logs)  # each pinned to its share of the cores


def test_local_plan_pins_gpus_or_shares_the_cores():
    from harness.config import ConfigError
    from harness.workers import local_plan
    assert [e["CUDA_VISIBLE_DEVICES"] for e in local_plan(4, None, 8, 16)] == ["0", "1", "2", "3"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in local_plan(2, 4, 8, 16)] == ["0,1,2,3", "4,5,6,7"]
    cpu = local_plan(3, None, 0, 16)
    assert all(e["OMP_NUM_THREADS"] == "5" and e["CUDA_VISIBLE_DEVICES"] == "" for e in cpu)
    assert local_plan(4, None, 0, 2)[0]["OMP_NUM_THREADS"] == "1"  # never zero threads
    for n, g, gpus in ((3, 4, 8), (2, 1, 0), (2, 0, 8)):
        with pytest.raises(ConfigError, match="--gpus-per-worker"):
            local_plan(n, g, gpus, 16)


def test_a_lease_read_as_missing_is_never_deleted(tmp_path, monkeypatch):
    """An NFS client's cached "no such file" can make a live holder's lease read as missing while its O_EXCL
    create still fails: the claimer must not delete that lease (it would train the cell twice), only retry."""
    from harness import lease
    held = lease.claim(tmp_path, pid_rule=False)
    assert held is not None
    try:
        before = (tmp_path / lease.LEASE).read_text()
        monkeypatch.setattr(lease, "read", lambda directory: None)  # the stale negative lookup
        assert lease.claim(tmp_path, pid_rule=False) is None
        assert (tmp_path / lease.LEASE).read_text() == before  # the holder's lease is untouched
    finally:
        monkeypatch.undo()
        held.release()
    again = lease.claim(tmp_path, pid_rule=False)  # released: the next claim takes it
    assert again is not None
    again.release()
