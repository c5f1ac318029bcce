"""One run per campaign at a time: an OS file lock beside the state database.

`fcntl.flock` on `<db>.locks/<campaign>.lock`: the kernel drops the lock when the process
ends, however it ends (SIGKILL included), so a crash never leaves a stale lock behind and no
one has to delete a file by hand. A second run of the same campaign (an overlapping cron line)
fails at once with `LockedError` (exit code 3) and sends nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
from pathlib import Path

from .errors import ConfigError, LockedError


def lock_path(db_path: str | os.PathLike[str], campaign: str) -> Path:
    """The lock file of a campaign: a readable slug plus a hash, so any campaign name is safe."""
    db = Path(db_path)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", campaign)[:60].strip("._") or "campaign"
    digest = hashlib.sha256(campaign.encode()).hexdigest()[:8]
    return db.parent / f"{db.name}.locks" / f"{slug}-{digest}.lock"


class CampaignLock:
    """Held from `acquire()` until `release()` or the end of the process."""

    def __init__(self, db_path: str | os.PathLike[str], campaign: str) -> None:
        self.campaign = campaign
        self.path = lock_path(db_path, campaign)
        self._fd: int | None = None
        self._owner = 0  # the pid that took the lock

    def acquire(self) -> None:
        """Take the lock or raise LockedError naming the process that holds it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot create the campaign lock ({exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f" (pid {holder})" if holder else ""
            raise LockedError(
                f"campaign {self.campaign!r} is being sent by another smartmail run{who}; "
                "this run sent nothing"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        self._owner = os.getpid()

    def held_elsewhere(self) -> bool:
        """True when another process holds the lock now (a run is in progress)."""
        if self._fd is not None or not self.path.exists():
            return False
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def release(self) -> None:
        """Unlock, in the process that locked. A forked child (multiprocessing forks on
        Linux) shares the lock with its parent: its copy is only closed, since unlocking
        would free the parent's campaign for a second run while the parent still sends."""
        if self._fd is not None:
            if self._owner == os.getpid():
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> CampaignLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
