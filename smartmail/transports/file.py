"""file://DIR: each message written as one .eml file, for demos, previews and archiving.

Names sort in row order (`000000002-ann@example.org-1a2b3c4d.eml`) and are written to a
temporary name first, then renamed, so a reader never sees half a message.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from urllib.parse import SplitResult

from ..errors import ConfigError, TransientError
from ..message import OutgoingMessage
from .base import TransportOptions, register

_UNSAFE = re.compile(r"[^A-Za-z0-9@._+-]")


class FileTransport:
    """Writes messages into a folder, created if missing."""

    allow_utf8_local = True

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.url = f"file://{directory}"
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"{directory}: cannot create the outbox folder ({exc.strerror})"
            ) from None

    def open_session(self) -> FileSession:
        return FileSession(self.directory)

    def default_rate(self) -> float | None:
        return None

    def close(self) -> None:
        return None


class FileSession:
    """Stateless apart from the folder; one per worker for symmetry with other transports."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def send(self, message: OutgoingMessage) -> str:
        digest = hashlib.sha1(message.message_id.encode()).hexdigest()[:8]
        safe = _UNSAFE.sub("_", message.recipient)[:80]
        name = f"{message.row.number:09d}-{safe}-{digest}.eml"
        final = self.directory / name
        tmp = self.directory / f".{name}.tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(message.data)
            os.replace(tmp, final)
        except OSError as exc:
            raise TransientError(f"cannot write {final}: {exc.strerror}") from None
        return message.message_id

    def close(self) -> None:
        return None


def _factory(url: SplitResult, options: TransportOptions) -> FileTransport:
    path = (url.netloc + url.path) or "outbox"
    return FileTransport(Path(path))


register("file", _factory)
