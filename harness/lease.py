"""Cell leases: how several `harness run` processes (on one machine or on several sharing a filesystem)
work one matrix without training any cell twice.

A runner claims a cell by creating ``<cell>/lease.json`` with O_CREAT | O_EXCL (atomic on local filesystems
and NFSv3+), holding who it is (holder id, host, pid) and a heartbeat that a background thread refreshes
a quarter of the TTL. Another runner finding the file skips the cell while the lease is live and takes it
over when it is dead: its heartbeat has not changed for a TTL by the *observer's own* clock (so clocks of
different hosts never need to agree), or -- for a holder training in its own process -- its holder is a
process of this host that no longer exists. A holder whose lease was taken over (it was presumed dead, e.g.
paused for longer than the TTL) learns it at its next heartbeat and stops before its next checkpoint. A takeover is itself serialised by an O_EXCL ``lease.takeover`` file, so two runners that both
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


class LeaseLost(RuntimeError):
    """This runner's lease was taken over by another runner: it must stop writing into the cell."""


_observed: dict[str, tuple[Any, float]] = {}  # lease identity -> (heartbeat value, when this process first saw it)


def alive(lease: dict[str, Any] | None) -> bool:
    if lease is None:
        return False
    if lease.get("pid_rule", True) and lease.get("host") == socket.gethostname() and lease.get("pid"):
        try:
            os.kill(int(lease["pid"]), 0)
        except ProcessLookupError:
            return False  # its process is gone: dead now, not after the TTL
        except PermissionError:
            pass  # a live process of another user
    key = f"{lease.get('holder')}@{lease.get('host')}"
    beat = lease.get("heartbeat")
    seen = _observed.get(key)
    now = time.monotonic()
    if seen is None or seen[0] != beat:
        _observed[key] = (beat, now)
        return True
    return now - seen[1] < ttl_s()


class Lease:
    """A held lease; ``release()`` stops the heartbeat and deletes the file."""

    def __init__(self, directory: Path, info: dict[str, Any]):
        self.path = Path(directory) / LEASE
        self.info = info
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease:{directory.name}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(ttl_s() / 4):
            try:
                current = read(self.path.parent)
                if not current or current.get("holder") != self.info["holder"]:
                    self.lost = True  # taken over (we were presumed dead): never write over the new holder
                    return
                store.write_json_atomic(self.path, {**self.info, "heartbeat": time.time()})
            except OSError:
                continue  # a transient filesystem error: try again at the next beat

    def check(self) -> None:
        """Raise LeaseLost when another runner has taken the cell over."""
        if self.lost:
            raise LeaseLost(f"{self.path}: taken over by another runner; this one stops")

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


def claim(directory: str | Path, pid_rule: bool = True) -> Lease | None:
    """The cell's lease, or None while another runner holds a live one. ``pid_rule=False`` for a holder whose
    training runs in child processes (torchrun), which may outlive it: only the heartbeat then says it died."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = {**_me(), "pid_rule": pid_rule}
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
        current = read(directory)
        if alive(current):  # re-check under the takeover lock
            return None
        if current is not None:
            # a dead holder's lease. One read as missing is never deleted: the holder may just have released it
            # (then the create below succeeds), or an NFS client's cached "no such file" may hide a live one
            # (then the create fails and this runner tries again at its next poll)
            (directory / LEASE).unlink(missing_ok=True)
        return Lease(directory, info) if _create(directory, info) else None
    finally:
        lock.unlink(missing_ok=True)
