"""Atomic file writes, the one implementation every writer in the project uses.

A write goes to a temporary file in the target's folder, is fsynced, then renamed (replace) or hard-linked
(create-exclusive) onto the final name, and the folder is fsynced: a reader sees the old file or the whole new
one, never a part, and an interrupted write leaves no temporary file behind.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


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


def write_temp(folder: Path, name: str, data: bytes) -> Path:
    """`data` in a fsynced temporary file in `folder`, named after `name`; removed again on failure."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` atomically (creating its folder if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = write_temp(path.parent, path.name, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def create_exclusive(path: str | os.PathLike, data: bytes) -> bool:
    """Create `path` holding `data`, complete or not at all, and only if the name is free.

    The fsynced temporary file is hard-linked to the final name: link(2) fails with EEXIST when the name is
    taken, so nothing is ever overwritten. Returns False when the name was taken.
    """
    path = Path(path)
    tmp = write_temp(path.parent, path.name, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True
