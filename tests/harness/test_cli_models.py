import json
import subprocess
import sys

from harness.cli import main
from models import registry


def test_models_table_lists_every_preset(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in registry.names():
        for preset in registry.presets(name):
            assert any(line.split()[:2] == [name, preset] for line in out.splitlines()), (name, preset)
    assert "151.88M" in out  # tokenformer 150m


def test_models_json_matches_registry(capsys):
    assert main(["models", "--model", "gpt2", "--preset", "124m", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["params"] == 124_439_808 and rows[0]["seq_len"] == 1024


def test_unknown_model_one_line_nonzero_exit():
    proc = subprocess.run([sys.executable, "-m", "harness", "models", "--model", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0] and "tokenformer" in lines[0] and "gpt2" in lines[0]


def test_unknown_preset_one_line_nonzero_exit():
    proc = subprocess.run([sys.executable, "-m", "harness", "models", "--model", "mamba", "--preset", "7b"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "130m" in proc.stderr


def test_models_ladder_prints_the_rungs_with_meta_counts(capsys):
    from models import ladder
    assert main(["models", "--ladder", "transformer_pp", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["rung"] for r in rows] == [f"d{d}" for d in ladder.SCALES["cpu"].widths]
    for r in rows:
        m = registry.build("transformer_pp", r["preset"], device="meta", **r["overrides"])
        assert m.counted_params() == r["params"]
    assert main(["models", "--ladder", "mamba", "--scale", "gpu"]) == 0
    out = capsys.readouterr().out
    assert "d1280" in out and "spanning" in out


def test_models_ladder_unknown_one_line_exit_2():
    for args in (["--ladder", "nope"], ["--ladder", "mamba", "--scale", "tpu"]):
        proc = subprocess.run([sys.executable, "-m", "harness", "models", *args], capture_output=True, text=True)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
