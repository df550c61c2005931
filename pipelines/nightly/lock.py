"""The single-run lock of the nightly job.

``fcntl.flock`` on a lock file in the state directory: the kernel drops the lock when its
holder exits for any reason, ``kill -9`` and a crash included, so a dead run never leaves the
job stuck. The holder writes its pid, host and start time into the file; a second run that
finds the lock taken reports who holds it and for how long, and flags a holder older than
``max_age_hours`` as probably hung (a live process keeps its lock: kill it to release it).
A lock file left behind by a dead run is *stale*: the next run takes it over and logs who
left it.

This module imports only the standard library, so that a scheduler's probe stays cheap.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["LockBusyError", "LockInfo", "RunLock", "pid_alive"]

logger = logging.getLogger(__name__)


class LockBusyError(RuntimeError):
    """Another run holds the lock."""


@dataclass(frozen=True)
class LockInfo:
    """What a lock holder wrote into the lock file."""

    pid: int
    host: str
    started_at: float  # seconds since the epoch
    purpose: str = ""

    @property
    def age_s(self) -> float:
        return max(0.0, time.time() - self.started_at)

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at))
        what = f" ({self.purpose})" if self.purpose else ""
        minutes = self.age_s / 60
        return f"pid {self.pid} on {self.host}{what}, started {started} ({minutes:.1f} min ago)"

    @classmethod
    def read(cls, path: Path) -> LockInfo | None:
        """The holder info in ``path``, or None when missing or unreadable."""
        try:
            data = json.loads(path.read_text())
            return cls(
                pid=int(data["pid"]),
                host=str(data["host"]),
                started_at=float(data["started_at"]),
                purpose=str(data.get("purpose", "")),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive, non-blocking lock held for the duration of a ``with`` block.

    Args:
        path: The lock file (created when missing; never deleted, so that no second file can
            appear beside a locked one).
        max_age_hours: A holder older than this is reported as probably hung.
        purpose: A word stored for diagnostics (e.g. ``retrain 2024-05-01``).

    Raises:
        LockBusyError: on entry, when another run holds the lock (the message names it).
    """

    def __init__(self, path: Path, *, max_age_hours: float = 12.0, purpose: str = "") -> None:
        self.path = Path(path)
        self.max_age_hours = max_age_hours
        self.purpose = purpose
        self._fd: int | None = None
        self.stale: LockInfo | None = None  # a dead holder's info that this lock replaced

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`LockBusyError`."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockBusyError(self._busy_message()) from None
        except BaseException:
            os.close(fd)
            raise
        previous = LockInfo.read(self.path)
        if previous is not None:
            # The file names a holder but nobody holds the lock: that run died.
            self.stale = previous
            logger.warning(
                "taking over a stale lock left by %s (%s)",
                previous.describe(),
                "process gone"
                if previous.host != socket.gethostname() or not pid_alive(previous.pid)
                else "process alive but no longer holding the lock",
            )
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": time.time(),
            "purpose": self.purpose,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Clear the holder info and drop the lock (idempotent)."""
        import fcntl

        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # an empty file means "released cleanly"
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _busy_message(self) -> str:
        info = LockInfo.read(self.path)
        if info is None:
            return f"another run holds the lock {self.path} (no holder info yet)"
        message = f"another run holds the lock {self.path}: {info.describe()}"
        if info.age_s > self.max_age_hours * 3600:
            message += (
                f"; it has run for more than {self.max_age_hours:g} h and is probably hung: "
                f"check pid {info.pid} on {info.host} and kill it to release the lock"
            )
        return message

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:  # pragma: no cover - safety net
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)  # type: ignore[arg-type]
            except OSError:
                pass

    def describe(self) -> dict[str, Any]:
        """Lock facts for the run summary."""
        return {
            "path": str(self.path),
            "stale_lock_replaced": None if self.stale is None else self.stale.describe(),
        }
