"""Recipients: a CSV file on local disk or in S3, streamed row by row.

Rows are never all held in memory: a source can be iterated more than once (pre-flight,
then the send), and each pass streams the file again. A send reads its rows from a
`Snapshot`: a private copy taken once, before pre-flight, so the send pass reads exactly the
bytes pre-flight judged (an edit while the confirmation prompt waits changes nothing) and an
S3 object is downloaded once instead of being read twice over the hours a campaign runs.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import itertools
import os
import re
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

from .errors import ConfigError, Location, SourceError
from .records import Record

DELIMITERS = (",", ";", "\t")
_UNDECODABLE = re.compile("[\udc80-\udcff]")
DEFAULT_TO_COLUMN = "email"

# A field limit well above any real cell, but low enough that a runaway quote cannot eat memory.
csv.field_size_limit(1 << 20)


class Row(NamedTuple):
    """One data row. `number` is the spreadsheet row number: the header is row 1.

    (A NamedTuple, not a frozen dataclass: as immutable, and cheaper to create, both the
    class at start-up and each row.)"""

    number: int
    values: dict[str, str]


@dataclass(repr=False, eq=False)
class SourceSpec(Record):
    """Where the recipients are and how to read them."""

    location: str
    encoding: str = "utf-8-sig"
    delimiter: str | None = None
    to_column: str = DEFAULT_TO_COLUMN

    @property
    def is_s3(self) -> bool:
        return self.location.startswith("s3://")


def parse_s3_url(url: str) -> tuple[str, str]:
    """Split s3://bucket/key into its parts, with a clear error for anything else."""
    rest = url[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise ConfigError(f"{url}: an S3 location must look like s3://bucket/key")
    return bucket, key


class RecipientSource:
    """A re-iterable stream of validated-shape rows from one CSV file.

    Shape problems (no header, duplicate headers, missing recipient column, undecodable
    bytes) raise `SourceError`; a ragged row is yielded with `ragged=True` information kept in
    `last_ragged` so the caller's policy decides whether it aborts or skips.
    """

    def __init__(self, spec: SourceSpec, s3_client: Any = None) -> None:
        self.spec = spec
        self.name = spec.location
        self._s3 = s3_client
        self._etag: str | None = None
        self.columns: list[str] = []
        self.to_column: str = spec.to_column
        if spec.is_s3:
            parse_s3_url(spec.location)
        elif not Path(spec.location).is_file():
            raise SourceError(spec.location, "no such file")
        try:
            "x".encode(spec.encoding)
        except LookupError:
            raise ConfigError(f"unknown encoding {spec.encoding!r}") from None
        if spec.delimiter is not None and len(spec.delimiter) != 1:
            raise ConfigError("--delimiter must be one character (use $'\\t' for a tab)")

    def __enter__(self) -> RecipientSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release what the source holds (a snapshot's private copy); nothing for a plain one."""

    @property
    def reread_in_helper(self) -> bool:
        """Whether another process may read these rows as this one does (pre-flight's
        helper, `smartmail.prerender`): a regular local file, yes; S3, which would be
        fetched again, a pipe, or a subclass reading who knows what, no."""
        if type(self) is not RecipientSource or self.spec.is_s3:
            return False
        return os.path.isfile(self.spec.location)  # not a pipe, which a second reader drains

    def snapshot(self) -> RecipientSource:
        """A private copy of the rows, read once now; pre-flight and the send pass read it.

        Use it as a context manager (or call `close()`): the copy is removed at the end.
        """
        return Snapshot(self)

    def _open_binary(self) -> IO[bytes]:
        if not self.spec.is_s3:
            try:
                return open(self.spec.location, "rb")
            except OSError as exc:
                raise SourceError(self.name, f"cannot read: {exc.strerror or exc}") from None
        bucket, key = parse_s3_url(self.spec.location)
        client = self._s3_client()
        kwargs: dict[str, str] = {"Bucket": bucket, "Key": key}
        if self._etag:
            kwargs["IfMatch"] = self._etag
        try:
            response = client.get_object(**kwargs)
        except Exception as exc:
            raise SourceError(self.name, f"cannot read from S3: {_aws_message(exc)}") from None
        self._etag = response.get("ETag")
        body: IO[bytes] = response["Body"]
        return body

    def _s3_client(self) -> Any:
        if self._s3 is None:
            from . import aws

            self._s3 = aws.client("s3")
        return self._s3

    def rows(self) -> Iterator[tuple[Row, bool]]:
        """Yield (row, ragged) for every non-blank data row, streaming from the start."""
        raw = self._open_binary()
        try:
            text = io.TextIOWrapper(raw, encoding=self.spec.encoding, newline="")
            yield from self._parse(text)
        finally:
            raw.close()

    def _parse(self, text: io.TextIOWrapper) -> Iterator[tuple[Row, bool]]:
        number = 1
        try:
            first = text.readline()
            if not first.strip():
                raise SourceError(
                    Location(self.name, 1), "no header row; the first line must name the columns"
                )
            delimiter = self.spec.delimiter or sniff_delimiter(first)
            reader = csv.reader(itertools.chain([first], text), delimiter=delimiter, strict=True)
            header = [h.strip() for h in next(reader)]
            self._check_header(header)
            width = len(header)
            for values in reader:
                number += 1
                if not values or (len(values) == 1 and not values[0].strip()):
                    continue
                ragged = len(values) != width
                if ragged:
                    values = (
                        (values + [""] * width)[:width] if len(values) < width else values[:width]
                    )
                yield Row(number, dict(zip(header, values, strict=True))), ragged
        except UnicodeDecodeError as exc:
            raise SourceError(
                self._locate_undecodable() or Location(self.name, number + 1),
                f"bytes that are not valid {self.spec.encoding} ({exc.reason})",
                "give the file's encoding with --encoding, e.g. --encoding cp1252",
            ) from None
        except csv.Error as exc:
            raise SourceError(Location(self.name, number + 1), f"malformed CSV: {exc}") from None

    def _locate_undecodable(self) -> Location | None:
        """The row and column of the first byte that does not decode (on the error path only).

        The strict pass decodes 8 KB ahead of the CSV reader, so its row number can be
        hundreds of rows early. This pass reads again with undecodable bytes kept as lone
        surrogates, which a strict decode never yields, and finds the cell holding one.
        """
        try:
            raw = self._open_binary()
        except SourceError:
            return None
        try:
            text = io.TextIOWrapper(
                raw, encoding=self.spec.encoding, errors="surrogateescape", newline=""
            )
            first = text.readline()
            if _UNDECODABLE.search(first):
                return Location(self.name, 1)
            delimiter = self.spec.delimiter or sniff_delimiter(first)
            reader = csv.reader(itertools.chain([first], text), delimiter=delimiter, strict=True)
            header = [h.strip() for h in next(reader)]
            number = 1
            for values in reader:
                number += 1
                for index, value in enumerate(values):
                    if _UNDECODABLE.search(value):
                        column = header[index] if index < len(header) else None
                        return Location(self.name, number, column)
        except (csv.Error, OSError, UnicodeError, StopIteration):
            return None
        finally:
            raw.close()
        return None

    def _check_header(self, header: list[str]) -> None:
        seen: set[str] = set()
        for name in header:
            if not name:
                raise SourceError(
                    Location(self.name, 1), "a column has an empty name in the header"
                )
            if name.lower() in seen:
                raise SourceError(Location(self.name, 1, name), "this column name appears twice")
            seen.add(name.lower())
        matches = [h for h in header if h.lower() == self.spec.to_column.lower()]
        if not matches:
            raise SourceError(
                Location(self.name, 1, self.spec.to_column),
                "no recipient column with this name",
                f"columns are {', '.join(header)}; choose one with --to-column",
            )
        self.to_column = matches[0]
        self.columns = header


_CHUNK = 1 << 20
_SNAPSHOT_PREFIX = "smartmail-snapshot-"
_SNAPSHOT_FILE = "recipients.csv"
_STALE_AFTER = 60.0  # seconds: never a copy still being made


class Snapshot(RecipientSource):
    """The recipients as they were when the run began: a private copy read by every pass.

    The copy lives in a directory only this user can enter (mode 0700; the file 0600) under
    the system temporary folder (`TMPDIR` moves it), and is removed by `close()`, by leaving
    the `with` block, or at the latest when the process exits. A copy left by a process that
    was killed (SIGKILL, power cut) is removed by the next snapshot: the live process holds a
    lock on its copy, which the kernel drops when it dies. Errors and reports still name the
    original location, with the original row numbers. `sha256` and `size` identify the bytes
    that were judged and sent.
    """

    def __init__(self, original: RecipientSource) -> None:
        self.spec = original.spec
        self.name = original.name
        self._s3 = None
        self._etag = None
        self.columns = list(original.columns)
        self.to_column = original.to_column
        _remove_stale(tempfile.gettempdir())
        try:
            directory = tempfile.mkdtemp(prefix=_SNAPSHOT_PREFIX)
        except OSError as exc:
            raise SourceError(
                self.name,
                f"cannot make a private copy: {exc}",
                "set TMPDIR to a writable folder with room for a copy of the list",
            ) from None
        self._cleanup = weakref.finalize(self, shutil.rmtree, directory, ignore_errors=True)
        self.path = Path(directory) / _SNAPSHOT_FILE
        self._unlock: weakref.finalize[Any, Any] | None = None
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            # Held until close (a second descriptor: closing the writer keeps the lock).
            lock_fd = os.open(self.path, os.O_RDONLY)
            self._unlock = weakref.finalize(self, os.close, lock_fd)
            fcntl.flock(lock_fd, fcntl.LOCK_SH)
            with os.fdopen(fd, "wb") as out:
                raw = original._open_binary()
                try:
                    self.sha256, self.size = self._copy(raw, out)
                finally:
                    raw.close()
        except SourceError:
            self.close()
            raise
        except OSError as exc:
            self.close()
            raise SourceError(
                self.name,
                f"cannot make a private copy in {directory}: {exc.strerror or exc}",
                "set TMPDIR to a folder with room for a copy of the list",
            ) from None
        except BaseException:
            self.close()
            raise

    def _copy(self, raw: IO[bytes], out: IO[bytes]) -> tuple[str, int]:
        """Stream `raw` into `out` once, hashing on the way; a failed read is a SourceError."""
        digest = hashlib.sha256()
        size = 0
        while True:
            try:
                chunk = raw.read(_CHUNK)
            except Exception as exc:  # botocore's streaming errors are not OSErrors
                why = _aws_message(exc) if self.spec.is_s3 else str(exc)
                raise SourceError(self.name, f"cannot read (failed part-way: {why})") from None
            if not chunk:
                return digest.hexdigest(), size
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)

    def snapshot(self) -> RecipientSource:
        return self

    def close(self) -> None:
        """Remove the private copy. Safe to call twice."""
        self._cleanup()
        if self._unlock is not None:
            self._unlock()

    @property
    def reread_in_helper(self) -> bool:
        """The private copy is a local file, whatever the original was."""
        return True

    def _open_binary(self) -> IO[bytes]:
        if not self._cleanup.alive:
            raise SourceError(self.name, "the private copy of this list was already closed")
        return open(self.path, "rb")


def _remove_stale(parent: str) -> None:
    """Remove this user's private copies whose process is gone (nobody holds their lock).

    A copy younger than a minute is left alone, so one being made right now is never taken.
    """
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        if not entry.name.startswith(_SNAPSHOT_PREFIX):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not entry.is_dir(follow_symlinks=False) or info.st_uid != os.getuid():
                continue
            if now - info.st_mtime < _STALE_AFTER:
                continue
            fd = os.open(os.path.join(entry.path, _SNAPSHOT_FILE), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # a live run's copy
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(entry.path)
        os.close(fd)


def sniff_delimiter(header_line: str) -> str:
    """Pick the delimiter that splits the header line into the most fields (comma on a tie)."""
    counts = {d: header_line.count(d) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","


def _aws_message(exc: Exception) -> str:
    """A one-line reason from a botocore error, without request ids or credentials."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {})
        code = err.get("Code", "")
        msg = err.get("Message", "")
        return f"{code} {msg}".strip() or type(exc).__name__
    return str(exc) or type(exc).__name__


def describe(spec: SourceSpec) -> str:
    """A stable identity for the source, for campaign ids and reports."""
    if spec.is_s3:
        return spec.location
    return os.path.abspath(spec.location)


@dataclass(repr=False, eq=False)
class RowProblem(Record):
    """A problem found in one row, reported with its location."""

    row: int
    column: str | None
    message: str
    file: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{Location(self.file, self.row, self.column)}: {self.message}"
