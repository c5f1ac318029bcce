"""A per-user cache of compiled templates: a run after the first skips Jinja's lexer and compiler.

Compiling a message template (the header block, the text and HTML bodies) and building Jinja's
lexer is most of what a short dry run does after its imports. The compiled code depends only on
the template's text, the Jinja and Python versions and how smartmail sets Jinja up, so it is
kept, marshalled, in $XDG_CACHE_HOME/smartmail (~/.cache/smartmail), one file per template
text, keyed by a SHA-256 of all of these. Editing a template changes its key: it is compiled
again, and the old entry ages out (at most `MAX_ENTRIES` are kept).

Marshalled code is code: loading an entry someone else could write would run their code. So
an entry is read only from a folder that is this user's own and writable by no one else (made
0700), from a regular file owned by this user and writable by no one else, both opened without
following a symbolic link (as Jinja's `FileSystemBytecodeCache` checks its default folder).
Anything else, or an entry that does not unmarshal to what is expected, is a miss. A cache
that cannot be read or written is a miss too, never an error: the template is compiled as if
there were no cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import marshal
import os
import stat
import sys
from pathlib import Path
from types import CodeType
from typing import Any

FOLDER_MODE = 0o700
MAX_ENTRIES = 64
_SUFFIX = ".jinja"
# Open a folder (or refuse a symbolic link) where the platform allows it; 0 elsewhere.
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO in place of an entry must not hang a run


def default_folder() -> Path | None:
    """$XDG_CACHE_HOME/smartmail, else ~/.cache/smartmail; None where a user cannot be told
    apart (no `os.getuid`) or there is no home folder."""
    if not hasattr(os, "getuid") or not _NOFOLLOW:
        return None
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec: a relative path is to be ignored
        try:
            base = os.path.join(Path.home(), ".cache")
        except (RuntimeError, KeyError):
            return None
    return Path(base) / "smartmail"


def _private(st: os.stat_result) -> bool:
    """Owned by this user, and writable by no one else."""
    return st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


class CodeCache:
    """Compiled template code in `folder`, as a mapping of names to code objects and strings."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @staticmethod
    def key(*parts: str) -> str:
        """A file name for everything the cached value depends on: the parts, and the Python
        and Jinja versions (marshal's format and Jinja's generated code change with them)."""
        import jinja2

        digest = hashlib.sha256()
        for part in (sys.version, jinja2.__version__, *parts):
            data = part.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "big"))
            digest.update(data)
        return digest.hexdigest() + _SUFFIX

    def _open_folder(self) -> int | None:
        """A descriptor of the folder when it is safe to read and write entries there."""
        try:
            fd = os.open(self.folder, os.O_RDONLY | _DIRECTORY | _NOFOLLOW)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            return None
        if not stat.S_ISDIR(st.st_mode) or not _private(st):
            os.close(fd)
            return None
        return fd

    def get(self, key: str) -> dict[str, Any] | None:
        """The entry stored under `key`, or None (not there, not safe, or not readable)."""
        folder = self._open_folder()
        if folder is None:
            return None
        try:
            fd = os.open(key, os.O_RDONLY | _NOFOLLOW | _NONBLOCK, dir_fd=folder)
        except OSError:
            return None
        finally:
            os.close(folder)
        try:
            with os.fdopen(fd, "rb") as fh:
                st = os.fstat(fh.fileno())
                if not stat.S_ISREG(st.st_mode) or not _private(st):
                    return None
                value = marshal.loads(fh.read())
        except (OSError, ValueError, EOFError, TypeError):
            return None
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, (CodeType, str, tuple, type(None)))
            for k, v in value.items()
        ):
            return None
        return value

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Store `value` under `key`, atomically; quietly nothing when that cannot be done."""
        try:
            data = marshal.dumps(value)
            os.makedirs(self.folder.parent, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.folder, FOLDER_MODE)
        except (OSError, ValueError):
            return
        folder = self._open_folder()
        if folder is None:
            return
        temp = f".{key}.{os.getpid()}.tmp"
        try:
            fd = os.open(
                temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600, dir_fd=folder
            )
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(temp, key, src_dir_fd=folder, dst_dir_fd=folder)
            except OSError:
                os.unlink(temp, dir_fd=folder)
                raise
            self._prune(folder)
        except OSError:
            pass
        finally:
            os.close(folder)

    def _prune(self, folder: int) -> None:
        """Keep the `MAX_ENTRIES` newest entries (an edited template leaves its old one)."""
        with os.scandir(folder) as found:
            entries = [e for e in found if e.name.endswith(_SUFFIX)]
        if len(entries) <= MAX_ENTRIES:
            return
        entries.sort(key=lambda e: e.stat(follow_symlinks=False).st_mtime, reverse=True)
        for entry in entries[MAX_ENTRIES:]:
            with contextlib.suppress(OSError):
                os.unlink(entry.name, dir_fd=folder)


def default_cache() -> CodeCache | None:
    """The user's cache, or None where there is none to be had."""
    folder = default_folder()
    return CodeCache(folder) if folder is not None else None
