"""A helper process that renders rows for pre-flight on a second CPU.

Why: pre-flight renders and checks every row before the first message leaves, and while it
runs the provider has nothing to do: on a machine with two or more CPUs, one of them idles.
Rendering is most of pre-flight's cost (about 28 of a row's 36 µs), so a forked helper
renders three of every five blocks of rows (after the first two, which the parent renders
while the helper starts) and hands back what it rendered in a compact form (`marshal`:
loading and rebuilding a message costs about a quarter of rendering it).

The parent still reads every row itself and makes every check that depends on row order, on
the ledger or on the files (the duplicate check, suppressions, the build check with its
attachments, previews, the cache budget), in row order, exactly as it would alone: only the
render is taken from the helper, and only for a row whose number and values are the
parent's own.

The helper only ever saves time. A row it could not render (any error: the parent renders
it again and reports what it finds), a row whose values differ from the parent's (a file
edited while read), a helper that dies, stalls or answers out of turn: the parent renders
those rows itself, as without a helper. The helper sends nothing and writes nothing but its
pipe; it ignores Ctrl-C (the parent stops it) and leaves with `os._exit`, so nothing it
inherited (the ledger's SQLite connections, the terminal, buffered output, temporary files)
is closed, flushed or removed by it.
"""

from __future__ import annotations

import contextlib
import itertools
import marshal
import os
import select
import signal
import time
import warnings
from collections.abc import Generator
from pathlib import Path
from typing import Any

from . import logs
from .addresses import Mailbox
from .sources import RecipientSource, Row
from .templates import Attachment, HeaderValue, MessageTemplate, RenderedMessage

log = logs.getLogger("smartmail")

BLOCK = 256  # rows in a block: the unit handed over
WAIT = 10.0  # seconds the parent waits at least for one block before rendering the rest itself
# Bytes of finished blocks the parent reads ahead of its need, beside the pipe's own 1 MB: a
# helper that cannot hand a block over stops rendering, but each MB read ahead stays in the
# parent's memory (with 8 MB a million-row dry-run peaked 34 MB higher than without a helper).
BUFFER = 1 << 20
_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = 1031  # Linux's fcntl; elsewhere the pipe keeps its default size


def helper_renders(block: int) -> bool:
    """Whether the helper renders this block: three of every five from block 2 on (2, 4, 6,
    7, 9, 11, 12, ...), the parent the rest. A row of its own costs the parent a whole render
    and its checks, a row of the helper's only the checks and loading the message, so this
    share keeps both about equally busy (measured with the benchmarks' template)."""
    return block >= 2 and block % 5 not in (0, 3)


def usable(source: RecipientSource) -> bool:
    """Whether a helper may run: the platform forks, a second CPU is there to run it, and
    the source can be read again by another process as it is by this one."""
    if not hasattr(os, "fork") or not getattr(source, "reread_in_helper", False):
        return False
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return cpus >= 2


def rendered_rows(
    source: RecipientSource,
    template: MessageTemplate,
    *,
    allow_utf8_local: bool,
    helper: bool,
) -> Generator[tuple[Row, bool, RenderedMessage | None], None, None]:
    """`source.rows()` as (row, ragged, rendered or None): None for a row the caller must
    render itself. Without `helper` (or with fewer than two blocks of rows) every row is
    None. Close the iterator (`contextlib.closing`) so the helper is stopped early on an error.
    """
    rows = source.rows()
    unpack = _Unpacker(source.name)
    running: _Helper | None = None
    items: list[Any] | None = None
    slowest = 0.0  # seconds: the longest a block this process rendered itself took
    began = time.monotonic()
    try:
        for index, (row, ragged) in enumerate(rows):
            block, offset = divmod(index, BLOCK)
            if offset == 0:
                now = time.monotonic()
                if items is None:
                    slowest = max(slowest, now - began)
                began = now
                items = None
                if helper and block == 1:
                    running = _Helper.start(source, template, allow_utf8_local)
                if running is not None and helper_renders(block):
                    try:
                        # A heavy template takes long for the helper too: wait for it as long
                        # as a few blocks take here, and never less than WAIT.
                        items = running.take(block, max(WAIT, 4 * slowest))
                    except _Failed as exc:
                        log.debug("pre-flight's helper process stopped (%s); rendering here", exc)
                        running.stop()
                        running = None
            rendered = None
            if items is not None and offset < len(items):
                number, values, packed = items[offset]
                ours = number == row.number and values == tuple(row.values.values())
                if packed is not None and ours and not ragged:
                    rendered = unpack(packed, row)
            yield row, ragged, rendered
    finally:
        if running is not None:
            running.stop()


class _Failed(Exception):
    """The helper cannot be used any more: the reason, for the debug log."""


class _Helper:
    """The parent's end: the helper's pid and the pipe its blocks come through."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self.fd = fd
        self.buffer = bytearray()
        self.taken = 0  # where the first message not taken yet begins in `buffer`
        self.ended = False

    @classmethod
    def start(
        cls, source: RecipientSource, template: MessageTemplate, allow_utf8_local: bool
    ) -> _Helper | None:
        try:
            read_end, write_end = os.pipe()
        except OSError:
            return None
        with warnings.catch_warnings():
            # Python 3.12+ warns about forking a process with threads (the ledger's writer),
            # as their locks stay held in the child. The helper takes none of them: it only
            # renders, and ends with os._exit.
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                pid = os.fork()
            except OSError:
                os.close(read_end)
                os.close(write_end)
                return None
        if pid == 0:  # the helper
            try:
                os.close(read_end)
                _serve(source, template, allow_utf8_local, write_end)
            finally:
                os._exit(0)
        os.close(write_end)
        os.set_blocking(read_end, False)
        with contextlib.suppress(OSError, AttributeError):
            import fcntl

            fcntl.fcntl(read_end, _F_SETPIPE_SZ, _PIPE_SIZE)
        return cls(pid, read_end)

    def take(self, block: int, patience: float) -> list[Any]:
        """The rows of `block` as the helper rendered them, waiting up to `patience` seconds;
        raises _Failed if it cannot."""
        self._read_ahead()
        deadline = time.monotonic() + patience
        while True:
            message = self._next()
            if message is not None:
                got, items = message
                if got == block:
                    return items
                raise _Failed(f"it sent block {got} where block {block} was due")
            if self.ended:
                raise _Failed("it ended early")
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Failed(f"no block in {patience:.1f} s")
            select.select([self.fd], [], [], left)
            self._read_ahead()

    def _read_ahead(self) -> None:
        """Read what the helper has written, up to `BUFFER` bytes not yet taken."""
        while not self.ended and len(self.buffer) - self.taken < BUFFER:
            try:
                data = os.read(self.fd, _PIPE_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                raise _Failed(f"reading its pipe: {exc}") from None
            if not data:
                self.ended = True
                return
            self.buffer += data

    def _next(self) -> tuple[int, list[Any]] | None:
        """The next whole message in the buffer, or None while it is incomplete."""
        buffer, start = self.buffer, self.taken
        if len(buffer) - start < 8:
            return None
        size = int.from_bytes(buffer[start : start + 8], "little")
        end = start + 8 + size
        if len(buffer) < end:
            return None
        try:
            block, items = marshal.loads(buffer[start + 8 : end])
        except (ValueError, EOFError, TypeError) as exc:
            raise _Failed(f"an unreadable block: {exc}") from None
        if end * 2 > len(buffer):  # keep the buffer short: drop what was taken
            del buffer[:end]
            self.taken = 0
        else:
            self.taken = end
        return block, items

    def stop(self) -> None:
        """End the helper (finished or not) and reap it."""
        with contextlib.suppress(OSError):
            os.close(self.fd)
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.waitpid(self.pid, 0)


def _serve(
    source: RecipientSource, template: MessageTemplate, allow_utf8_local: bool, fd: int
) -> None:
    """The helper's work: read every row, render the rows of its blocks, write each block."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rows = source.rows()
    for block in itertools.count():
        chunk = list(itertools.islice(rows, BLOCK))
        if not chunk:
            return
        if not helper_renders(block):
            continue
        items = []
        for row, ragged in chunk:
            packed = None
            if not ragged:
                try:
                    packed = _pack(
                        template.render(
                            row,
                            source.to_column,
                            source_name=source.name,
                            allow_utf8_local=allow_utf8_local,
                        )
                    )
                except Exception:  # the parent renders it again and reports what it finds
                    packed = None
            items.append((row.number, tuple(row.values.values()), packed))
        data = marshal.dumps((block, items))
        view = memoryview(len(data).to_bytes(8, "little") + data)
        while view:
            view = view[os.write(fd, view) :]


def _pack(rendered: RenderedMessage) -> tuple[Any, ...]:
    """A rendered message as plain tuples, lists and strings (what marshal takes), without
    its row (the parent has it) and before any attachment is read (`_Unpacker` rebuilds it)."""
    return (
        rendered.recipient,
        rendered.sender,
        [
            (name, value) if type(value) is str else (name, tuple(map(tuple, value)))
            for name, value in rendered.headers
        ],
        list(rendered.envelope_to),
        rendered.text,
        rendered.html,
        [(str(file.path), file.name, file.given) for file in rendered.attachments],
        rendered.head,
        rendered.empty_subject,
    )


class _Unpacker:
    """Rebuilds the messages `_pack` took apart, with the parent's own rows.

    A header the template fixes (From, Reply-To, a constant Subject) is the same object in
    every message a render makes; loaded from the helper it would be a new copy per row. A
    value equal to the previous message's is taken from it instead, so the messages kept for
    the send pass take no more memory than rendered ones (about 8 MB more at 20,000 rows
    without this)."""

    def __init__(self, source_name: str) -> None:
        self.source_name = source_name
        self.values: dict[str, tuple[Any, HeaderValue]] = {}  # header: (packed, rebuilt)
        self.head: list[str] = []
        self.sender = ""

    def __call__(self, packed: tuple[Any, ...], row: Row) -> RenderedMessage:
        recipient, sender, headers, envelope, text, html, files, head, empty_subject = packed
        values = self.values
        header_list: list[tuple[str, HeaderValue]] = []
        for name, value in headers:
            if type(value) is not str:
                last = values.get(name)
                if last is not None and last[0] == value:
                    value = last[1]
                else:
                    built = tuple([Mailbox(*box) for box in value])
                    values[name] = (value, built)
                    value = built
            header_list.append((name, value))
        if head is not None:
            previous = self.head
            if len(previous) == len(head):
                head = [old if old == new else new for old, new in zip(previous, head, strict=True)]
            self.head = head
        if sender == self.sender:
            sender = self.sender
        self.sender = sender
        return RenderedMessage(
            row=row,
            recipient=recipient,
            sender=sender,
            headers=header_list,
            envelope_to=envelope,
            text=text,
            html=html,
            attachments=[Attachment(Path(path), name, given) for path, name, given in files],
            source=self.source_name,
            head=head,
            empty_subject=empty_subject,
        )
