"""Several jobs on one run directory: which units a job may train (``--shard I/N``, ``--units``),
and the lock that keeps two jobs from training the same unit.

A unit is claimed with ``<unit>/.lock``, created with ``O_CREAT | O_EXCL`` (atomic on local and
NFSv3+ filesystems) and holding ``host``, ``pid`` and the claim time. While it trains, a
heartbeat thread touches the lock. A lock is stale, and taken over, when its holder is a dead
process on this host, or when its heartbeat is older than ``STALE_AFTER`` seconds (a job on
another machine that died); otherwise the unit is left to its holder, with a line naming it.
"""
from __future__ import annotations

import fnmatch
import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipeline.core.errors import TaskfoldError

STALE_AFTER = 300.0  # seconds without a heartbeat from a job on another host
HEARTBEAT = 20.0


class JobError(TaskfoldError, ValueError):
    """A job selection that cannot work (a shard out of range); names the option."""


@dataclass(frozen=True)
class Selection:
    """The units this job trains: every ``shard_count``-th unit from ``shard``, those whose key
    (``label/task``, ``label/task/pass2``, ``label/joint``) matches a pattern, or all of them."""

    shard: int = 0
    shard_count: int = 1
    patterns: tuple[str, ...] = ()

    @classmethod
    def parse(cls, shard: str | None, units: list[str] | None) -> "Selection":
        i, n = 0, 1
        if shard:
            try:
                i, n = (int(v) for v in shard.split("/"))
            except ValueError:
                raise JobError(f"--shard {shard!r}: expected I/N with integers, e.g. 0/4") from None
            if n < 1 or not 0 <= i < n:
                raise JobError(f"--shard {shard!r}: needs 0 <= I < N (shards are numbered from 0)")
        return cls(i, n, tuple(units or ()))

    @property
    def everything(self) -> bool:
        return self.shard_count == 1 and not self.patterns

    def wants(self, position: int, key: str) -> bool:
        if self.patterns and not any(fnmatch.fnmatchcase(key, p) for p in self.patterns):
            return False
        return position % self.shard_count == self.shard


def _holder(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale(lock: Path, now: float | None = None) -> bool:
    holder = _holder(lock)
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return not _alive(holder["pid"])
    try:
        age = (now or time.time()) - lock.stat().st_mtime
    except OSError:
        return True  # gone already
    return age > STALE_AFTER


def describe(lock: Path) -> str:
    h = _holder(lock)
    return f"{h.get('host', '?')}:{h.get('pid', '?')} since {time.strftime('%H:%M:%S', time.localtime(h.get('time', 0)))}"


@contextmanager
def claim(unit: Path, log=print) -> Iterator[bool]:
    """Hold ``unit``'s lock for the block; yields False (and holds nothing) if a live job has it."""
    unit.mkdir(parents=True, exist_ok=True)
    lock = unit / ".lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            if not stale(lock):
                yield False
                return
            log(f"  {unit}: taking over a stale lock of {describe(lock)}")
            lock.unlink(missing_ok=True)
    else:
        yield False
        return
    with os.fdopen(fd, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}, f)
    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT):
            try:
                os.utime(lock)
            except OSError:
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield True
    finally:
        stop.set()
        thread.join()
        lock.unlink(missing_ok=True)
