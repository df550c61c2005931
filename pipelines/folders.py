"""Whether a folder that a command will write in can take its files, checked before any work.

One rule for every command's output (``train``/``experiment``/``tune`` run folders, the nightly
state directory and ``--summary``), so each names the same problem the same way.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

__all__ = ["writable_folder_problem"]


def writable_folder_problem(folder: Path) -> str | None:
    """Why ``folder`` is not (and cannot be created as) a folder that takes new files, or None.

    Probes the nearest existing folder, with a file when ``folder`` exists and with a folder
    otherwise (the command creates the missing ones): permission bits say nothing about a
    read-only mount, a full disk or a file system such as ``/proc`` that takes no new entries,
    and root passes every permission check. The probe is removed at once.

    Args:
        folder: The folder the command will write in (it may not exist yet).

    Returns:
        None when it can, else what is wrong, naming the place: the first missing folder that
        cannot be created and the existing one it would go in, the existing folder that is not
        writable, or the file (or broken symbolic link) in the way.
    """
    existing, missing = folder, None
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing, missing = existing.parent, existing
    if existing.is_symlink() and not existing.exists():
        return f"{existing} is a broken symbolic link, not a folder"
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        if missing is None:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".recvae-probe-"):
                pass
        else:
            os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".recvae-probe-"))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if missing is None:
            return f"{existing} is not writable ({reason})"
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            problem = f"{existing} is not writable"
        else:
            problem = f"it cannot be created in {existing}"
        return f"the folder {missing} does not exist, and {problem} ({reason})"
    return None
