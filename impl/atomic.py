"""Atomic file writes, the one implementation every writer in the project uses.

A write goes to a temporary file in the target's folder, is fsynced, then renamed (replace) or hard-linked
(create-exclusive) onto the final name, and the folder is fsynced: a reader sees the old file or the whole new
one, never a part, and a write that fails leaves no temporary file behind.

A writer that is killed (SIGKILL, power loss) cannot remove its temporary file. Every temporary file is named
`.<name>.<random>.lora-verify.tmp` (git-ignored) and is held under an exclusive flock(2) by its writer until it
is renamed or removed; the next write into the same folder removes every such file whose lock it can take (its
writer is gone), so stale temporaries never accumulate. `file_lock` serialises read-modify-write updates of a
shared file (fetch's lock.json) between processes.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows: no cleaning, no cross-process lock
    fcntl = None

TEMP_SUFFIX = ".lora-verify.tmp"
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]+" + re.escape(TEMP_SUFFIX) + "$")


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (the rename or link) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of writers that died in `folder` (those whose flock is free); return them."""
    removed: list[Path] = []
    if fcntl is None:
        return removed
    try:
        names = [e.name for e in os.scandir(folder) if _TEMP_NAME.match(e.name)]
    except OSError:
        return removed
    for name in names:
        path = Path(folder) / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # a live writer holds it
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)  # closing drops the lock
    return removed


@contextlib.contextmanager
def _locked_temp(folder: Path, name: str, data: bytes) -> Iterator[Path]:
    """A fsynced temporary file holding `data`, locked until the block ends; removed if it is still there."""
    clean_stale_temps(folder)
    while True:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=TEMP_SUFFIX)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink == 0:  # a cleaner took it between mkstemp and flock: take another
                os.close(fd)
                continue
        break
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` atomically (creating its folder if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked_temp(path.parent, path.name, data) as tmp:
        os.replace(tmp, path)
    fsync_dir(path.parent)


def create_exclusive(path: str | os.PathLike, data: bytes) -> bool:
    """Create `path` holding `data`, complete or not at all, and only if the name is free.

    The fsynced temporary file is hard-linked to the final name: link(2) fails with EEXIST when the name is
    taken, so nothing is ever overwritten. Returns False when the name was taken.
    """
    path = Path(path)
    with _locked_temp(path.parent, path.name, data) as tmp:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    fsync_dir(path.parent)
    return True


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if needed) for the block: one process at a time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
