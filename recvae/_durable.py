"""Writes that survive a crash of the machine, not only of the process.

A temp file renamed over its target is atomic for the process: a reader sees the old or the
new file. After a power loss it is not enough: the rename can reach the disk before the
file's data does, leaving a complete-looking name over an empty or partial file. Flushing the
data (``fsync``) before the rename, and the directory after it, closes that window. This is
what the bundle, the training checkpoint and the nightly job's records use.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir", "fsync_file", "fsync_tree", "replace"]


def _fsync(path: str | os.PathLike[str], flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a written file's data and metadata to the disk."""
    # Windows' _commit refuses a read-only descriptor.
    _fsync(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (names created, renamed or removed in it) to the disk.

    A no-op on Windows, where a directory cannot be opened for this (and NTFS journals renames).
    """
    if os.name != "nt":
        _fsync(path, os.O_RDONLY)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """Flush every file under ``root``, then each directory, deepest first."""
    dirs: list[Path] = []
    for current, _, files in os.walk(root):
        dirs.append(Path(current))
        for name in files:
            fsync_file(Path(current) / name)
    for directory in reversed(dirs):
        fsync_dir(directory)


def replace(tmp: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Rename a fully written temp file over ``target`` so that a crash leaves one of the two.

    The temp file's data is flushed first, the parent directory after the rename.
    """
    fsync_file(tmp)
    os.replace(tmp, target)
    fsync_dir(Path(target).parent)
