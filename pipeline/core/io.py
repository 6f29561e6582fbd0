"""Atomic file output and content hashes: nothing half-written is ever left under a final name.

Temp files and folders live beside their destination (a rename across filesystems fails), carry
the writer's host and pid in their name (``.<name>.<host>-<pid>.<random>.tmp``), and get the
modes a plain write would (``mkstemp`` makes them owner-only). A killed writer's leftovers are
removed by the next run (``sweep``): this host's dead processes' at once, another host's after
a day (a job there may still be writing).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")
FOREIGN_AFTER = 86400.0  # seconds before another host's leftovers are swept


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tag() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path beside ``final``; rename it into place only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.{_tag()}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def temp_dir(beside: Path) -> Iterator[Path]:
    """A scratch folder beside ``beside`` (same filesystem), removed when the block ends."""
    beside = Path(beside)
    beside.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{beside.name}.{_tag()}.", suffix=".tmp", dir=beside.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp directory; on success it replaces ``final`` whole, on failure it vanishes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{_tag()}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        mode = 0o777 & ~_umask()
        for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            os.chmod(d, mode)
        if final.exists():
            old = final.with_name(f".{final.name}.{_tag()}.old.tmp")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _dead(host: str, pid: int, mtime: float) -> bool:
    if host == _tag().rsplit("-", 1)[0]:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return time.time() - mtime > FOREIGN_AFTER


def sweep(root: Path) -> list[Path]:
    """Remove the temp files and folders that killed writers left under ``root``; returns them."""
    removed = []
    root = Path(root)
    if not root.is_dir():
        return removed
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames) + filenames:
            m = TEMP.match(name)
            if not m:
                continue
            p = Path(dirpath) / name
            try:
                mtime = p.lstat().st_mtime
            except OSError:
                continue
            if _dead(m["host"], int(m["pid"]), mtime):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
                if name in dirnames:
                    dirnames.remove(name)
    return removed


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
