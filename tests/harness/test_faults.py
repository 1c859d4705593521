"""Fault injection, for real: subprocesses killed (SIGKILL) at the points of the commit protocol where a kill
does most harm, divergences, torn and garbage files, and two runners on one store. Each test compares the
outcome with an uninterrupted run of the same config (bitwise equal on CPU), not with a stored number."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness import lease

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}
    for k in ("HARNESS_FAULT_POINT", "HARNESS_FAULT_SKIP", "HARNESS_FAULT_NAN", "HARNESS_FAULT_KILL",
              "HARNESS_LEASE_TTL"):
        if k not in extra:
            env.pop(k, None)
    return env


def _harness(*args, cwd, **env):
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, capture_output=True, text=True,
                          env=_env(**env), timeout=600)


def _matrix(tmp_path, corpus, seeds=(0,), name="faults", steps=6, **defaults):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name,
        "defaults": {"seq_len": 32, "batch_size": 4, "budget": {"steps": steps}, "eval_every": 3, "eval_batches": 2,
                     "log_every": 1, "checkpoint_every": 2, "progress": False,
                     "data": {"source": str(corpus), "tokenizer": "byte", "cache_dir": str(tmp_path / "cache"),
                              "val_fraction": 0.2}, **defaults},
        "models": [{"model": "transformer_pp", "preset": "tiny"}],
        "seeds": list(seeds)}))
    return path


def _record(store, name, cell="transformer_pp-tiny-steps6-seed0"):
    return json.loads((store / name / cell / "record.json").read_text())


@pytest.fixture(scope="module")
def clean(tmp_path_factory, corpus):
    """The uninterrupted run every faulty one must end equal to (one per module: every test compares with
    the same config)."""
    tmp_path = tmp_path_factory.mktemp("clean")
    path = _matrix(tmp_path, corpus)
    out = tmp_path / "clean"
    proc = _harness("run", str(path), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return _record(out, "faults")


def test_kill_after_the_final_checkpoint_before_the_record(tmp_path, corpus, clean):
    path, out = _matrix(tmp_path, corpus), tmp_path / "store"
    proc = _harness("run", str(path), "--out", str(out), cwd=tmp_path, HARNESS_FAULT_POINT="after_final_checkpoint")
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "faults" / "transformer_pp-tiny-steps6-seed0" / "record.json").exists()
    proc = _harness("run", str(path), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rec = _record(out, "faults")
    # complete *with* its measurements, rebuilt from the final checkpoint: equal to the clean run's
    assert rec["status"] == "complete" and rec["val_loss"] == clean["val_loss"]
    assert rec["val_tokens"] == clean["val_tokens"] and rec["final_train_loss"] == clean["final_train_loss"]
    assert rec["steps"] == clean["steps"] and rec["tokens"] == clean["tokens"] and rec["flops"] == clean["flops"]
    # the run's own throughput and memory, kept in the final checkpoint, not the rebuilding process's
    assert rec["tokens_per_s"] > 0 and rec["peak_memory_bytes"] > 0


def test_kill_between_the_two_renames_of_a_checkpoint_save(tmp_path, corpus, clean):
    path, out = _matrix(tmp_path, corpus), tmp_path / "store"
    # the save at step 4 has moved step 2's checkpoint aside and not yet put step 4's in place
    proc = _harness("run", str(path), "--out", str(out), cwd=tmp_path, HARNESS_FAULT_POINT="checkpoint_renamed_old")
    assert proc.returncode == -signal.SIGKILL
    cell = out / "faults" / "transformer_pp-tiny-steps6-seed0"
    assert not (cell / "checkpoint").exists() and (cell / "checkpoint.tmp").is_dir()
    proc = _harness("run", str(path), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rec = _record(out, "faults")
    assert rec["resumed_from_step"] == 4  # the newer complete checkpoint (in .tmp), not step 0 nor step 2
    assert rec["val_loss"] == clean["val_loss"]
    assert not (cell / "checkpoint.tmp").exists() and not (cell / "checkpoint.old").exists()


def test_train_twice_keeps_the_measurements(tmp_path, corpus):
    args = ["train", "--model", "transformer_pp", "--preset", "tiny", "--steps", "4", "--seq-len", "32",
            "--batch-size", "4", "--set", f"data.source={corpus}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
            "--set", "data.val_fraction=0.2", "--set", "progress=false", "--set", "eval_batches=2",
            "--out", str(tmp_path / "run")]
    first = _harness(*args, cwd=tmp_path)
    second = _harness(*args, cwd=tmp_path)
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert b["val_loss"] is not None and a["val_loss"] == b["val_loss"]


def test_resume_under_a_different_config_is_refused(tmp_path, corpus):
    base = ["train", "--model", "transformer_pp", "--preset", "tiny", "--seq-len", "32", "--batch-size", "4",
            "--set", f"data.source={corpus}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
            "--set", "data.val_fraction=0.2", "--set", "progress=false", "--out", str(tmp_path / "run")]
    assert _harness(*base, "--steps", "4", cwd=tmp_path).returncode == 0
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    for change in (["--steps", "4", "--lr", "0.01"], ["--steps", "4", "--seed", "3"], ["--steps", "8"]):
        proc = _harness(*base, *change, cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "--restart" in lines[0], proc.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_a_divergence_stops_before_any_checkpoint_of_it_and_the_matrix_goes_on(tmp_path, corpus):
    path, out = _matrix(tmp_path, corpus, seeds=(0, 1)), tmp_path / "store"
    proc = _harness("run", str(path), "--out", str(out), cwd=tmp_path, HARNESS_FAULT_NAN="5")
    assert proc.returncode == 1  # a cell did not complete
    for seed in (0, 1):  # both cells ran (the first one's divergence did not stop the matrix)
        cell = out / "faults" / f"transformer_pp-tiny-steps6-seed{seed}"
        rec = json.loads((cell / "record.json").read_text())
        assert rec["status"] == "diverged" and rec["diverged_at_step"] == 5
        state = json.loads((cell / "checkpoint" / "state.json").read_text())
        assert state["step"] == 4  # the last checkpoint predates the NaN step
    text = (out / "faults" / "report.md").read_text()
    assert "diverged" in text


def test_a_corrupt_record_is_named_and_a_torn_metrics_line_is_survived(tmp_path, corpus, clean):
    path, out = _matrix(tmp_path, corpus), tmp_path / "store"
    assert _harness("run", str(path), "--out", str(out), cwd=tmp_path).returncode == 0
    cell = out / "faults" / "transformer_pp-tiny-steps6-seed0"
    # garbage record with its checkpoint present: rebuilt from the checkpoint
    (cell / "record.json").write_text('{"status": "compl')
    proc = _harness("run", str(path), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _record(out, "faults")["val_loss"] == clean["val_loss"]
    # garbage record and no checkpoint (e.g. committed results): one line naming the file, exit 2
    import shutil
    shutil.rmtree(cell / "checkpoint")
    (cell / "record.json").write_text("not json")
    proc = _harness("run", str(path), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert str(cell / "record.json") in proc.stderr
    proc = _harness("report", str(out / "faults"), cwd=tmp_path)
    assert proc.returncode == 2 and "record.json" in proc.stderr


def test_torn_last_metrics_line_on_resume(tmp_path, corpus, clean):
    path, out = _matrix(tmp_path, corpus), tmp_path / "store"
    proc = _harness("run", str(path), "--out", str(out), cwd=tmp_path, HARNESS_FAULT_POINT="after_final_checkpoint")
    assert proc.returncode == -signal.SIGKILL
    cell = out / "faults" / "transformer_pp-tiny-steps6-seed0"
    with open(cell / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a line torn by the kill
    assert _harness("run", str(path), "--out", str(out), cwd=tmp_path).returncode == 0
    lines = (cell / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(l)["step"] <= 6 for l in lines)


def test_two_runners_on_one_matrix_train_every_cell_once(tmp_path, corpus):
    path, out = _matrix(tmp_path, corpus, seeds=(0, 1, 2, 3)), tmp_path / "store"
    cmd = [sys.executable, "-m", "harness", "run", str(path), "--out", str(out)]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env()) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    trained = [line for o, _ in outs for line in o.splitlines() if line.endswith(": training")]
    assert len(trained) == 4 and len(set(trained)) == 4  # every cell once, by one runner or the other
    for seed in range(4):
        rec = _record(out, "faults", f"transformer_pp-tiny-steps6-seed{seed}")
        assert rec["status"] == "complete" and rec["val_loss"] is not None
        assert not (out / "faults" / f"transformer_pp-tiny-steps6-seed{seed}" / lease.LEASE).exists()


def test_a_dead_runners_lease_is_taken_over_and_a_live_one_waited_for(tmp_path, corpus):
    path, out = _matrix(tmp_path, corpus), tmp_path / "store"
    cell = out / "faults" / "transformer_pp-tiny-steps6-seed0"
    cell.mkdir(parents=True)
    # a holder that no longer exists on this host: dead at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (cell / lease.LEASE).write_text(json.dumps({"holder": "x", "host": os.uname().nodename, "pid": dead.pid,
                                                "heartbeat": time.time()}))
    proc = _harness("run", str(path), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0 and _record(out, "faults")["status"] == "complete", proc.stderr
    # a live lease of another host: the runner waits while its heartbeat moves, and takes the cell over once
    # the heartbeat has stood still for a TTL of the runner's own clock (hosts' clocks need not agree)
    other = tmp_path / "store2"
    cell = other / "faults" / "transformer_pp-tiny-steps6-seed0"
    cell.mkdir(parents=True)
    path_lease = cell / lease.LEASE
    path_lease.write_text(json.dumps({"holder": "y", "host": "elsewhere", "pid": 1, "heartbeat": -1e9}))
    runner = subprocess.Popen([sys.executable, "-m", "harness", "run", str(path), "--out", str(other)],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(HARNESS_LEASE_TTL="6", PYTHONUNBUFFERED="1"))  # its lines as they come
    seen = []
    for line in runner.stdout:  # beat (an absurd clock: only the change counts) until the runner waits
        seen.append(line)
        if "held by other runners" in line:
            break
    assert any("held by other runners" in l for l in seen), seen
    t_wait = time.time()
    for beat in range(3):
        path_lease.write_text(json.dumps({"holder": "y", "host": "elsewhere", "pid": 1, "heartbeat": -1e9 + beat}))
        time.sleep(3)
    assert runner.poll() is None  # still waiting while the heartbeat moves
    out, err = runner.communicate(timeout=600)
    assert runner.returncode == 0, err
    assert time.time() - t_wait >= 9 + 6 - 1  # the beats, then a TTL of stillness
    assert _record(other, "faults")["status"] == "complete"


def test_non_finite_checkpoint_is_refused_on_load(tmp_path, corpus):
    import torch
    from safetensors.torch import load_file, save_file
    from harness.train.checkpoint import CheckpointError, load_model_from_checkpoint
    args = ["train", "--model", "transformer_pp", "--preset", "tiny", "--steps", "2", "--seq-len", "32",
            "--batch-size", "4", "--set", f"data.source={corpus}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
            "--set", "data.val_fraction=0.2", "--set", "progress=false", "--out", str(tmp_path / "run")]
    assert _harness(*args, cwd=tmp_path).returncode == 0
    file = tmp_path / "run" / "checkpoint" / "model.safetensors"
    from safetensors import safe_open
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(file))
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(file), metadata=meta)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_model_from_checkpoint(tmp_path / "run")
    proc = _harness("eval", str(tmp_path / "run"), "--tasks", "piqa", "--limit", "2", cwd=tmp_path)
    assert proc.returncode == 2 and "non-finite" in proc.stderr
