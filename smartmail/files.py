"""Input and output files, checked before the first message is sent.

Nothing may be sent when a report, a failed-rows export, an outbox or an input cannot be
written or read: found after sending began, it would leave a half-sent campaign and a
traceback. These checks turn each into one line naming the file, for exit code 2.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import ConfigError


@contextlib.contextmanager
def readable(name: str | None = None) -> Iterator[None]:
    """Turn an input file that cannot be read (a folder, no permission, an I/O error) into a
    one-line error naming it, instead of a traceback. Only used before anything is sent."""
    try:
        yield
    except OSError as exc:
        where = exc.filename if exc.filename is not None else name or "an input file"
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ConfigError(f"{where}: cannot read ({reason}); nothing was sent") from None


def check_writable(
    path: str | os.PathLike[str], what: str, inputs: Iterable[str | None] = ()
) -> None:
    """Refuse an output file that could not be written, before anything is sent.

    An existing file is opened for appending (its content untouched); a new one is created
    and removed again. Works as root too, where permission bits do not stop writes. An
    output that is one of `inputs` (the list, the template, the ledger) is refused: writing
    it would destroy what the run reads.
    """
    p = Path(path)
    for other in inputs:
        if other and _same_file(p, other):
            raise ConfigError(
                f"{what} {p}: is {other}, which this run reads; give another file; nothing was sent"
            )
    try:
        if p.exists():
            if p.is_dir():
                raise ConfigError(f"{what} {p}: is a folder; give a file name; nothing was sent")
            with open(p, "ab"):
                pass
            return
        # Through a symbolic link to a file not made yet, the file it names (as the output
        # will be written): the link's own name exists, and O_EXCL refuses it.
        target = os.path.realpath(p)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
        os.unlink(target)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{what} {p}: cannot write ({reason}); nothing was sent") from None


def check_writable_dir(directory: Path, what: str) -> None:
    """Refuse a folder we could not write a file into, before anything is sent."""
    probe = directory / f".smartmail-write-test-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"{what} {directory}: cannot write ({reason}); nothing was sent"
        ) from None


def _same_file(a: Path, b: str) -> bool:
    # By name too: a link to the ledger the run is about to create is that ledger.
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist (yet): not the same file
        return False
