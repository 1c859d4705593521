"""The results store: one JSON record per matrix cell, written atomically. The only code that reads or
writes records.

    <root>/<matrix>/<cell_id>/record.json     resolved config, revision, hardware, versions, counts, losses
    <root>/<matrix>/<cell_id>/metrics.jsonl   the training log
    <root>/<matrix>/<cell_id>/checkpoint/     the latest checkpoint (resume point)
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

RECORD = "record.json"
# a fresh clone trains into this git-ignored directory; the committed results under results/runs are regenerated
# with an explicit --out results/runs
DEFAULT_ROOT = Path("runs")


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over the target: readers see the
    old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True, default=str))


def replace_dir(staging: Path, dst: Path) -> None:
    """Put a fully written ``staging`` directory in place of ``dst`` (any old one removed first): a reader
    sees the old directory, none, or the new one, never a half-written one."""
    import shutil
    if dst.exists():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, dst)


def update_json_locked(path: Path, update) -> Any:
    """Read-modify-write of a JSON file shared by several runners of one matrix (``harness run --only``):
    ``update(old) -> new`` runs under an exclusive lock on ``<path>.lock``, so one runner's keys never clobber
    another's. Returns the new object."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            old = json.loads(path.read_text()) if path.is_file() else {}
            new = update(old)
            write_json_atomic(path, new)
            return new
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cell_dir(root: Path, matrix: str, cell_id: str) -> Path:
    return Path(root) / matrix / cell_id


class RecordError(ValueError):
    """A record.json that is not a JSON object; the message names the file."""


def read_record(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / RECORD
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RecordError(f"{path}: unreadable record ({type(e).__name__}: {e}); delete it to rebuild it from "
                          f"the cell's checkpoint, or retrain the cell with --force") from None
    if not isinstance(rec, dict):
        raise RecordError(f"{path}: not a JSON object")
    return rec


def write_record(directory: Path, record: dict[str, Any]) -> None:
    write_json_atomic(Path(directory) / RECORD, record)


def iter_records(root: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every record under ``root`` (a store root, a matrix directory or a cell directory)."""
    root = Path(root)
    for path in sorted(root.rglob(RECORD)):
        if "checkpoint" in path.parts:
            continue
        yield path.parent, json.loads(path.read_text())


def git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if rev.returncode:
        return None
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def library_versions() -> dict[str, str]:
    from importlib import metadata
    out = {}
    for name in ("torch", "numpy", "safetensors", "tokenizers", "pandas", "seaborn", "lm_eval", "mamba_ssm",
                 "causal_conv1d", "flash_attn"):
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return out
