"""The prepared GPU check (scripts/gpu_check.sh): its dry run on CPU runs every step that is not GPU-only and
passes the same checks the GPU run makes (bf16 against fp32, the loss falling, FSDP2 against the unwrapped
model, bench rows, the Pattention implementations, the GPU tests collected, an eval); one step failing,
hanging or finding no budget never stops the others, and the summary is written after every step."""
import json
import subprocess
from pathlib import Path

import pytest

from harness import gpu_check

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_runs_every_cpu_step_and_passes_its_checks(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=1500)
    summary = json.loads((out / "gpu_check.json").read_text())
    steps = {e["step"]: e for e in summary["steps"]}
    bad = {n: (e["status"], e.get("reason"), e["checks"]) for n, e in steps.items()
           if e["status"] not in ("ok", "skipped")}
    assert proc.returncode == 0 and not bad, (bad, proc.stdout[-3000:])
    assert set(steps) == {n for n, *_ in gpu_check.STEPS}
    # only the GPU-only steps are skipped in the dry run
    assert {n for n, e in steps.items() if e["status"] == "skipped"} == {n for n, _, g, _ in gpu_check.STEPS if g}
    for arch in gpu_check.DRY["archs"]:
        checks = {c["name"]: c for c in steps[f"train:{arch}"]["checks"]}
        assert checks["bf16 = fp32"]["ok"] and checks["loss falls"]["ok"], checks
    assert [c["ok"] for c in steps["fsdp"]["checks"]] == [True] and steps["fsdp"]["result"]["backend"] == "gloo"
    assert len(steps["bench"]["checks"]) == 3 and (out / "bench" / "bench.json").is_file()
    impls = {c["name"] for c in steps["pattention"]["checks"]}
    assert impls == {"reference", "recompute"}
    assert steps["environment"]["result"]["torch"] and "mamba_kernels" in steps["environment"]["result"]
    md = (out / "gpu_check.md").read_text()
    assert "| train:tokenformer | ok |" in md and "dry run on CPU" in md


def test_a_failing_or_hanging_step_never_stops_the_others(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "DRY_MIN_LIMIT_S", 0)
    monkeypatch.setattr(gpu_check, "STEPS", [
        ("train:nope", 120, False, ()),            # an unknown architecture: the step fails
        ("environment", 0.5, False, ()),           # importing torch alone takes longer: killed at its limit
        ("bench", 60, False, ("no_such_module_x",)),  # a module the machine lacks: skipped, named
        ("environment", 120, False, ()),           # and the next step still runs
    ])
    summary = gpu_check.run_check(tmp_path, dry_run=True, budget_s=600, log=lambda m: None)
    got = [(e["step"], e["status"]) for e in summary["steps"]]
    assert got == [("train:nope", "failed"), ("environment", "timeout"), ("bench", "skipped"), ("environment", "ok")]
    assert "nope" in summary["steps"][0]["reason"]  # the failed check names the unknown architecture
    assert "0.5" in summary["steps"][1]["reason"] or "limit" in summary["steps"][1]["reason"]
    assert "no_such_module_x" in summary["steps"][2]["reason"]
    assert summary["counts"] == {"ok": 1, "failed": 1, "timeout": 1, "skipped": 1}
    assert json.loads((tmp_path / "gpu_check.json").read_text())["counts"] == summary["counts"]


def test_no_step_starts_without_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_START_S", 1000)
    summary = gpu_check.run_check(tmp_path, dry_run=False, budget_s=570, only=["environment"], log=lambda m: None)
    (entry,) = summary["steps"]
    assert entry["status"] == "skipped" and entry["reason"].startswith("out of budget")


@pytest.mark.parametrize("argv, needle", [(["--only", "trian"], "--only: unknown step 'trian'"),
                                          (["--budget", "0"], "--budget must be > 0")])
def test_bad_requests_one_line_exit_2(argv, needle, tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "g"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and not (tmp_path / "g").exists()
