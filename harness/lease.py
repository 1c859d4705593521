"""Cell leases: how several `harness run` processes (on one machine or on several sharing a filesystem)
work one matrix without training any cell twice.

A runner claims a cell by creating ``<cell>/lease.json`` with O_CREAT | O_EXCL (atomic on local filesystems
and NFSv3+), holding who it is (holder id, host, pid) and a heartbeat that a background thread refreshes
every ``HEARTBEAT_S``. Another runner finding the file skips the cell while the lease is live and takes it
over when it is dead: its heartbeat is older than ``TTL_S``, or its holder is a process of this host that no
longer exists. A takeover is itself serialised by an O_EXCL ``lease.takeover`` file, so two runners that both
see a dead lease cannot both win. The lease is released (deleted) after the cell's record is written.

``HARNESS_LEASE_TTL`` (seconds) overrides the TTL (the heartbeat follows at a quarter of it): for tests.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from . import store

LEASE = "lease.json"
TAKEOVER = "lease.takeover"


def ttl_s() -> float:
    return float(os.environ.get("HARNESS_LEASE_TTL", "120"))


def _me() -> dict[str, Any]:
    return {"holder": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}


def read(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / LEASE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # torn (a holder killed mid-write): judge it by the file's age alone
        try:
            return {"heartbeat": path.stat().st_mtime, "host": None, "pid": None, "torn": True}
        except FileNotFoundError:
            return None


def alive(lease: dict[str, Any] | None) -> bool:
    if lease is None:
        return False
    if lease.get("host") == socket.gethostname() and lease.get("pid"):
        try:
            os.kill(int(lease["pid"]), 0)
        except ProcessLookupError:
            return False  # its process is gone: dead now, not after the TTL
        except PermissionError:
            pass  # a live process of another user
    return time.time() - float(lease.get("heartbeat", 0)) < ttl_s()


class Lease:
    """A held lease; ``release()`` stops the heartbeat and deletes the file."""

    def __init__(self, directory: Path, info: dict[str, Any]):
        self.path = Path(directory) / LEASE
        self.info = info
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease:{directory.name}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(ttl_s() / 4):
            current = read(self.path.parent)
            if not current or current.get("holder") != self.info["holder"]:
                return  # taken over (we were presumed dead): never write over the new holder
            store.write_json_atomic(self.path, {**self.info, "heartbeat": time.time()})

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        current = read(self.path.parent)
        if current and current.get("holder") == self.info["holder"]:
            self.path.unlink(missing_ok=True)


def _create(directory: Path, info: dict[str, Any]) -> bool:
    try:
        fd = os.open(directory / LEASE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({**info, "heartbeat": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def claim(directory: str | Path) -> Lease | None:
    """The cell's lease, or None while another runner holds a live one."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = _me()
    if _create(directory, info):
        return Lease(directory, info)
    if alive(read(directory)):
        return None
    # dead: take over, one runner at a time
    lock = directory / TAKEOVER
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            if time.time() - lock.stat().st_mtime > ttl_s():
                lock.unlink(missing_ok=True)  # a taker that died mid-takeover
        except FileNotFoundError:
            pass
        return None
    os.close(fd)
    try:
        if alive(read(directory)):  # re-check under the takeover lock
            return None
        (directory / LEASE).unlink(missing_ok=True)
        return Lease(directory, info) if _create(directory, info) else None
    finally:
        lock.unlink(missing_ok=True)
