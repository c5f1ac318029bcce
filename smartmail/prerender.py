"""A helper process that renders rows for pre-flight on a second CPU.

Why: pre-flight renders and checks every row before the first message leaves, and while it
runs the provider has nothing to do: on a machine with two or more CPUs, one of them idles.
Rendering is most of pre-flight's cost (about 28 of a row's 36 µs), so on a list of about
2,000 rows or more a forked helper renders three of every five blocks of 256 rows (from the
fourth on) and hands back what it rendered in a compact form (`marshal`: loading, checking and
rebuilding a message here costs a quarter to two thirds of rendering it, by template).

The parent still reads every row itself and makes every check that depends on row order, on
the ledger or on the files (the duplicate check, suppressions, the build check with its
attachments, previews, the cache budget), in row order, exactly as it would alone: only the
render is taken from the helper, and only for a row whose number and values are the
parent's own.

The helper must never cost time. A row it could not render (any error: the parent renders
it again and reports what it finds), a row whose columns or values differ from the parent's
(a file replaced while read), a row too long to be worth copying, a block it has not finished
soon after the parent needs it (it may be on a busy CPU: it is told to skip that block), a
helper that dies, falls behind again and again, or answers out of turn: the parent renders
those rows itself, as without a helper. The
helper sends nothing and writes nothing but its pipe; it runs none of the parent's signal
handlers, ignores Ctrl-C (the parent stops it), and leaves with `os._exit`, so nothing it
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

# Python 3.12+ warns about forking a process with threads (the ledger's writer), as their
# locks stay held in the child. The helper takes none of them: it renders, writes its pipe,
# and ends with os._exit. Only the warning os.fork raises here is silenced.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"smartmail\.prerender")

BLOCK = 256  # rows in a block: the unit of work
FORK_AT = 2  # the helper is forked when this block begins,
MIN_ROWS = 2048  # if the list holds about this many rows (it renders from block 3 on)
# A helper's block not there yet is rendered here after waiting this share of the time one of
# this process's own blocks took (it is told, and skips that block): the helper may be on a
# busy CPU. Waiting about a block is what a helper a little late on a noisy machine needs (at
# a quarter of one, such a helper was given up in most runs); what waiting can cost in all is
# bounded by GIVE_UP and MAX_MISSES such waits.
GRACE = 1.0
GIVE_UP = 3  # helper blocks in a row rendered here: the helper is stopped
MAX_MISSES = 8  # helper blocks in all rendered here: the helper is stopped
# Bytes of finished blocks the parent reads ahead of its need, beside the pipe's own 1 MB: a
# helper that cannot hand a block over stops rendering, but each MB read ahead stays in the
# parent's memory (with 8 MB a million-row dry-run peaked 34 MB higher than without a helper).
BUFFER = 1 << 20
PART = 1 << 20  # the helper writes a block in parts of about this many bytes
# A row whose values, or whose rendered text and HTML, are longer than this is left to the
# parent: copying it back costs about what rendering it does (a 58 KB newsletter made the
# helper slower than none), and it would swell both processes' memory.
ROW_LIMIT = 16 * 1024
_PIPE_SIZE = 1 << 20
_STOP_WAIT = 5.0  # seconds to wait for a killed helper to be reaped


def helper_renders(block: int) -> bool:
    """Whether the helper renders this block: three of every five from block 3 on (3, 4, 6,
    8, 9, 11, 13, ...), the parent the rest. A row of its own costs the parent a whole render
    and its checks, a row of the helper's only the checks and loading the message, so this
    share keeps both about equally busy (measured with the benchmarks' template). Block 3 is
    rendered while the parent renders block 2 itself."""
    return block > FORK_AT and (block - FORK_AT - 1) % 5 in (0, 1, 3)


def usable(source: RecipientSource) -> bool:
    """Whether a helper may run: the platform forks, a second CPU is there to run it (by
    affinity and by the cgroup's CPU quota, as a container's `--cpus` sets), and the source
    can be read again by another process as it is by this one."""
    if not hasattr(os, "fork") or not getattr(source, "reread_in_helper", False):
        return False
    if os.environ.get("SMARTMAIL_PREFLIGHT_HELPER", "").strip().lower() in ("0", "no", "off"):
        return False
    try:
        cpus: float = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota = _cgroup_cpus()
    except Exception:  # an odd /proc or /sys: no quota known
        quota = None
    if quota is not None:
        cpus = min(cpus, quota)
    # AWS Lambda shows its vCPUs but gives one CPU's time per 1,769 MB of memory.
    lambda_memory = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "")
    if lambda_memory.isdigit():
        cpus = min(cpus, int(lambda_memory) / 1769)
    return cpus >= 2


_PROC_CGROUP = "/proc/self/cgroup"
_CGROUP_ROOT = "/sys/fs/cgroup"


def _cgroup_cpus() -> float | None:
    """The CPU quota of this process's cgroup and its ancestors, in CPUs; None if none.

    cgroup v2 (`cpu.max`) and v1 (`cpu.cfs_quota_us` over `cpu.cfs_period_us`)."""
    try:
        with open(_PROC_CGROUP, encoding="utf-8", errors="surrogateescape") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    root = Path(_CGROUP_ROOT)
    found: float | None = None
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if controllers == "":
            folders = [root]
        elif "cpu" in controllers.split(","):
            folders = [root / controllers, root / "cpu"]
        else:
            continue
        for base in folders:
            here = base / path.strip("/")
            for at in (here, *here.parents):
                if at != base and base not in at.parents:
                    break
                cpus = _quota(at)
                if cpus is not None:
                    found = cpus if found is None else min(found, cpus)
    return found


def _quota(folder: Path) -> float | None:
    for quota_file, period_file in (("cpu.max", None), ("cpu.cfs_quota_us", "cpu.cfs_period_us")):
        try:
            text = (folder / quota_file).read_text(encoding="ascii").split()
            if period_file is not None:
                text.append((folder / period_file).read_text(encoding="ascii").strip())
            quota, period = text
            if quota in ("max", "-1"):
                return None
            return int(quota) / int(period)
        except (OSError, ValueError, ArithmeticError):
            continue
    return None


def rendered_rows(
    source: RecipientSource,
    template: MessageTemplate,
    *,
    allow_utf8_local: bool,
    helper: bool,
) -> Generator[tuple[Row, bool, RenderedMessage | None], None, None]:
    """`source.rows()` as (row, ragged, rendered or None): None for a row the caller must
    render itself. Without `helper` (or on a list too short to be worth a helper) every row
    is None. Close the iterator (`contextlib.closing`) so the helper is stopped at once on an
    error.
    """
    rows = source.rows()
    unpack = _Unpacker(source.name)
    running: _Helper | None = None
    items: list[Any] | None = None
    own = 0.0  # seconds the last block this process rendered itself took
    began = time.monotonic()
    width = 0  # characters in the values of the rows before the fork
    missed = 0  # helper blocks in a row rendered here instead
    misses = 0  # and in all
    try:
        for index, (row, ragged) in enumerate(rows):
            block, offset = divmod(index, BLOCK)
            if helper and block < FORK_AT:
                width += sum(map(len, row.values.values()))
            if offset == 0:
                now = time.monotonic()
                if items is None:
                    own = now - began
                began = now
                items = None
                if helper and block == FORK_AT and _worth_it(source, index, width):
                    running = _Helper.start(source, template, allow_utf8_local)
                if running is not None and helper_renders(block):
                    try:
                        items = running.take(block, GRACE * own)
                    except _Failed as exc:
                        log.debug("pre-flight's helper process stopped (%s); rendering here", exc)
                        running.stop()
                        running = None
                    else:
                        missed = 0 if items is not None else missed + 1
                        misses += items is None
                        if missed >= GIVE_UP or misses >= MAX_MISSES:
                            log.debug("pre-flight's helper process is too slow; rendering here")
                            running.stop()
                            running = None
            rendered = None
            if items is not None and offset < len(items):
                try:
                    number, values, packed = items[offset]
                    # The helper's render is taken only for the very row read here: same
                    # number, same columns holding the same values (a list replaced meanwhile,
                    # even with its columns reordered, or a template that changes `row`, falls
                    # back).
                    ours = number == row.number and values == tuple(row.values.items())
                    if packed is not None and ours and not ragged:
                        rendered = unpack(packed, row)
                except Exception:  # not what a helper sends: this process renders the row
                    rendered = None
            yield row, ragged, rendered
    finally:
        if running is not None:
            running.stop()


def _worth_it(source: RecipientSource, index: int, width: int) -> bool:
    """Whether a helper is worth forking after the first `index` rows: the list holds about
    `MIN_ROWS` rows or more (by its size and what the rows so far took), and its rows are
    not so long that they would be left to this process anyway (`ROW_LIMIT`)."""
    if width >= index * ROW_LIMIT // 8:
        return False
    count = getattr(source, "row_count", None)
    if isinstance(count, int):
        return count >= MIN_ROWS
    size = getattr(source, "size", None)
    if not isinstance(size, int):
        try:
            size = os.stat(source.spec.location).st_size
        except (OSError, AttributeError, ValueError):
            return False
    per_row = (width + index * max(1, len(source.columns))) / max(1, index)
    return size >= MIN_ROWS * per_row


class _Failed(Exception):
    """The helper cannot be used any more: the reason, for the debug log."""


class _Helper:
    """The parent's end: the helper's pid, the pipe its blocks come through, and the pipe
    that tells it which of its blocks the parent rendered itself."""

    def __init__(self, pid: int, fd: int, told: int, pidfd: int | None) -> None:
        self.pid = pid
        self.fd = fd
        self.told = told
        self.pidfd = pidfd  # Linux: signals the helper, never a process that took its pid
        self.buffer = bytearray()
        self.taken = 0  # where the first message not taken yet begins in `buffer`
        self.ended = False
        self.poll = select.poll()
        self.poll.register(fd, select.POLLIN)

    @classmethod
    def start(
        cls, source: RecipientSource, template: MessageTemplate, allow_utf8_local: bool
    ) -> _Helper | None:
        try:
            read_end, write_end = os.pipe()
        except OSError:
            return None
        try:
            told_read, told_write = os.pipe()
        except OSError:
            os.close(read_end)
            os.close(write_end)
            return None
        # Signals wait until each side is set up: the helper must never run the parent's
        # handlers (a worker's SIGTERM, an event loop's wakeup), and a Ctrl-C landing between
        # the fork and the return must not lose the helper.
        handled = [s for s in signal.valid_signals() if callable(_handler(s))]
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, *handled})
        helper: _Helper | None = None
        try:
            try:
                pid = os.fork()
            except OSError:
                for fd in (read_end, write_end, told_read, told_write):
                    os.close(fd)
                return None
            if pid == 0:  # the helper
                try:
                    os.close(read_end)
                    os.close(told_write)
                    signal.set_wakeup_fd(-1)
                    for number in handled:
                        signal.signal(number, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it
                    signal.pthread_sigmask(signal.SIG_SETMASK, held)
                    os.set_blocking(told_read, False)
                    _serve(source, template, allow_utf8_local, write_end, told_read)
                finally:
                    os._exit(0)
            os.close(write_end)
            os.close(told_read)
            pidfd = None
            with contextlib.suppress(AttributeError, OSError):
                pidfd = os.pidfd_open(pid)
            helper = cls(pid, read_end, told_write, pidfd)
            os.set_blocking(read_end, False)
            os.set_blocking(told_write, False)
            with contextlib.suppress(OSError, AttributeError, ImportError):
                import fcntl

                fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        except BaseException:
            if helper is not None:
                helper.stop()
            raise
        finally:
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a Ctrl-C held lands here
            except BaseException:
                if helper is not None:
                    helper.stop()
                raise
        return helper

    def take(self, block: int, grace: float) -> list[Any] | None:
        """The rows of `block` as the helper rendered them; None if they are not all there
        within `grace` seconds, and the helper is told to skip the block (the caller renders
        it). Raises _Failed if the helper cannot be used any more."""
        self._read(ahead=True)
        deadline = time.monotonic() + grace
        items: list[Any] = []
        while True:
            message = self._next()
            if message is not None:
                got, last, part = message
                if got < block:  # a block this process took from it: late, not needed
                    continue
                if got != block:
                    raise _Failed(f"it sent block {got} where block {block} was due")
                items += part
                if last:
                    return items
                continue
            if self.ended:
                raise _Failed("it ended early")
            left = deadline - time.monotonic()
            if left <= 0:
                # Parts of it already here are dropped with the rest as they come.
                with contextlib.suppress(OSError):
                    os.write(self.told, block.to_bytes(8, "little"))
                return None
            self.poll.poll(max(1, int(left * 1000)))
            self._read(ahead=False)

    def _read(self, *, ahead: bool) -> None:
        """Read what the helper has written: when reading ahead, up to `BUFFER` bytes not
        yet taken; else (a part is due) all there is."""
        while not self.ended and (not ahead or len(self.buffer) - self.taken < BUFFER):
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

    def _next(self) -> tuple[int, bool, list[Any]] | None:
        """The next whole message in the buffer, or None while it is incomplete."""
        buffer, start = self.buffer, self.taken
        if len(buffer) - start < 8:
            return None
        size = int.from_bytes(buffer[start : start + 8], "little")
        end = start + 8 + size
        if len(buffer) < end:
            return None
        try:
            block, last, items = marshal.loads(buffer[start + 8 : end])
        except (ValueError, EOFError, TypeError) as exc:
            raise _Failed(f"an unreadable block: {exc}") from None
        if type(block) is not int or type(items) is not list:
            raise _Failed("a block of the wrong shape")
        if end * 2 > len(buffer):  # keep the buffer short: drop what was taken
            del buffer[:end]
            self.taken = 0
        else:
            self.taken = end
        return block, bool(last), items

    def stop(self) -> None:
        """End the helper (finished or not) and reap it, waiting at most `_STOP_WAIT`."""
        for fd in (self.fd, self.told):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            else:
                os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + _STOP_WAIT
        while True:
            try:
                done, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped already (SIGCHLD ignored by the host)
                break
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.001)
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = None


def _handler(number: int) -> Any:
    try:
        return signal.getsignal(number)
    except (OSError, ValueError):
        return None


def _serve(
    source: RecipientSource,
    template: MessageTemplate,
    allow_utf8_local: bool,
    fd: int,
    told: int,
) -> None:
    """The helper's work: read every row, render the rows of its blocks (but those the
    parent said it rendered itself), write them in parts. One row at a time: it never holds
    more than a part.

    It stops by itself when most rows of a block are past `ROW_LIMIT` (the parent would
    render them anyway)."""
    import gc

    gc.freeze()  # what the parent left for the collector is never finalised here
    rows = source.rows()
    skip: set[int] = set()
    pending = b""
    for block in itertools.count():
        with contextlib.suppress(BlockingIOError):
            pending += os.read(told, 1 << 16)
        while len(pending) >= 8:
            skip.add(int.from_bytes(pending[:8], "little"))
            pending = pending[8:]
        chunk = itertools.islice(rows, BLOCK)
        if not helper_renders(block) or block in skip:
            if sum(1 for _ in chunk) < BLOCK:
                return
            continue
        items: list[tuple[int, Any, Any]] = []
        size = count = large = 0
        for row, ragged in chunk:
            count += 1
            width = sum(map(len, row.values.values()))
            too_long = width > ROW_LIMIT
            packed = None
            if not ragged and not too_long:
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
                if packed is not None and len(packed[4]) + len(packed[5] or "") > ROW_LIMIT:
                    packed, too_long = None, True
            if packed is None:
                large += too_long
                items.append((row.number, None, None))
                continue
            # The values as they are after the render: a template that changed `row`
            # makes them differ from the parent's, which then renders the row itself.
            items.append((row.number, tuple(row.values.items()), packed))
            size += width + len(packed[4]) + len(packed[5] or "") + 500
            if size >= PART:
                _write(fd, (block, False, items))
                items, size = [], 0
        if count == 0:
            return
        _write(fd, (block, True, items))
        if large * 2 > count or count < BLOCK:
            return


def _write(fd: int, message: tuple[int, bool, list[Any]]) -> None:
    data = marshal.dumps(message)
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
