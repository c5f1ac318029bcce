"""The send ledger: one record per (campaign, recipient address), so a re-run never double-sends.

A `Ledger` is the engine's `Journal`. Before the first attempt of a message it commits
`sending` (durably: `synchronous=FULL`); after the outcome it commits `sent`, `failed`,
`skipped`, or puts an unsent row back to `pending`. A row still `sending` when a new run takes
the campaign lock was in flight when an earlier process died, or its provider's answer was lost
after the whole message was handed over (an `in-doubt` outcome leaves it `sending` on purpose):
the message may or may not have left. It is *in doubt* and, by default, not sent again (at
most once); `smartmail retry CAMPAIGN --in-doubt` sends those on purpose.

Every write goes on one queue and is committed in one transaction with whatever else is
queued (group commit), so many rows share one fsync. The send pass marks rows before it
queues them, `workers // 2` at a time in one commit made on its own thread (`mark`), and
never has more than twice `workers` rows marked and unfinished; outcomes are queued without
waiting and go with the next commit, so the marks that reuse a finished row's place commit its
outcome too. A worker then finds its row durable already: `sending()` returns at once. A crash
therefore leaves at most two rows per worker in doubt (in flight, or marked and queued).
A caller that uses `sending()` without `mark` may instead have each worker mark the row it
will send next (`ahead`) while it sends the current one; the writer thread commits those marks
in the background: the same bound.
`close()` commits the rest. Reads (`skip_reason`) use a connection per calling thread.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from . import state
from .errors import SmartmailError
from .lock import CampaignLock
from .message import OutgoingMessage
from .records import Record
from .sources import Row
from .suppression import SuppressionList
from .suppression import key as suppression_key

if TYPE_CHECKING:
    import queue
    from concurrent.futures import Future

    from .report import Outcome

Resend = Literal["failed", "in-doubt"] | None
NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
BATCH = 500
WRITER_CHECK = 5.0  # seconds between checks that the writer is alive while waiting
LINGER = 0.005  # the most the writer waits for more statements when nobody waits yet
IDLE_FLUSH = 0.2  # seconds: outcomes not followed by a `sending` are committed within this
CLOSE_WAIT = 35.0  # seconds a flush waits for a closing writer: its busy timeout, and some

_SENDING = f"""
INSERT INTO deliveries (campaign, recipient, row_number, row_json, status, attempts, message_id,
                        updated_at)
VALUES (?, ?, ?, ?, 'sending', 1, ?, {NOW})
ON CONFLICT (campaign, recipient) DO UPDATE SET
    status = 'sending', attempts = attempts + 1, message_id = excluded.message_id,
    row_number = excluded.row_number, row_json = excluded.row_json, updated_at = {NOW}
"""
_SENT = f"""
INSERT INTO deliveries (campaign, recipient, row_number, row_json, status, attempts, provider_id,
                        sent_at, updated_at)
VALUES (?, ?, ?, ?, 'sent', 1, ?, {NOW}, {NOW})
ON CONFLICT (campaign, recipient) DO UPDATE SET
    status = 'sent', provider_id = excluded.provider_id, last_error = NULL,
    sent_at = {NOW}, updated_at = {NOW}
"""
# A failure never overwrites a row that was sent.
_FAILED = f"""
INSERT INTO deliveries (campaign, recipient, row_number, row_json, status, last_error, updated_at)
VALUES (?, ?, ?, ?, 'failed', ?, {NOW})
ON CONFLICT (campaign, recipient) DO UPDATE SET
    status = 'failed', last_error = excluded.last_error, updated_at = {NOW}
WHERE deliveries.status != 'sent'
"""
# A skip (suppressed, invalid, already sent...) only touches rows that hold nothing of value.
_SKIPPED = f"""
INSERT INTO deliveries (campaign, recipient, row_number, row_json, status, last_error, updated_at)
VALUES (?, ?, ?, ?, 'skipped', ?, {NOW})
ON CONFLICT (campaign, recipient) DO UPDATE SET
    status = 'skipped', last_error = excluded.last_error, row_number = excluded.row_number,
    row_json = excluded.row_json, updated_at = {NOW}
WHERE deliveries.status IN ('pending', 'skipped')
"""
# The outcome of a row this run marked `sending`: the row exists and holds its values already,
# so only the status changes (no second copy of the row's JSON). The provider id is kept only
# when it is the provider's own (SES's message id, which its feedback names): the Message-ID
# an SMTP server gives nothing else for is in `message_id` already, and as a provider id it
# would only grow the row and the feedback index, page writes every commit pays for.
_SENT_MINE = f"""
UPDATE deliveries SET status = 'sent', provider_id = NULLIF(?, message_id), last_error = NULL,
    sent_at = {NOW}, updated_at = {NOW}
WHERE campaign = ? AND recipient = ?
"""
_FAILED_MINE = f"""
UPDATE deliveries SET status = 'failed', last_error = ?, updated_at = {NOW}
WHERE campaign = ? AND recipient = ? AND status != 'sent'
"""
_BACK_TO_PENDING = f"""
UPDATE deliveries SET status = 'pending', last_error = ?, updated_at = {NOW}
WHERE campaign = ? AND recipient = ? AND status = 'sending'
"""
# A `retry` of failed rows that did not get to one: failed again, with its own error kept.
_BACK_TO_FAILED = f"""
UPDATE deliveries SET status = 'failed', updated_at = {NOW}
WHERE campaign = ? AND recipient = ? AND status = 'sending'
"""
# A lost answer after the whole message was handed over: the row stays `sending` (in doubt, as
# a crash leaves it), with the reason kept for `status` and `retry --in-doubt`.
_IN_DOUBT = f"""
UPDATE deliveries SET last_error = ?, updated_at = {NOW}
WHERE campaign = ? AND recipient = ? AND status = 'sending'
"""
_PENDING = """
INSERT INTO deliveries (campaign, recipient, row_number, row_json, status, last_error)
VALUES (?, ?, ?, ?, 'pending', ?)
ON CONFLICT (campaign, recipient) DO NOTHING
"""
_CAMPAIGN = f"""
INSERT INTO campaigns (id, source, template_hash, transport, settings, last_run)
VALUES (?, ?, ?, ?, ?, {NOW})
ON CONFLICT (id) DO UPDATE SET
    source = excluded.source, template_hash = excluded.template_hash,
    transport = excluded.transport, settings = excluded.settings,
    updated_at = {NOW}, last_run = {NOW}
"""
_ENSURE = "INSERT INTO campaigns (id, source) VALUES (?, '') ON CONFLICT (id) DO NOTHING"
_TOUCH = f"UPDATE campaigns SET last_run = {NOW}, updated_at = {NOW} WHERE id = ?"


class LedgerError(SmartmailError):
    """The state database could not record an outcome; the run stops rather than guess."""


_READ_BATCH = 500  # addresses per IN (...) query, well under SQLite's parameter limit


def _failure(path: Path, what: str, exc: BaseException) -> LedgerError:
    """The error for a write that failed with `exc`.

    A database's own error (sqlite3.Error, or an OSError from beneath it: a full disk, a
    read-only file) is shown as it is: the user can act on it. Anything else is a bug in
    smartmail, not a database problem, and says so with its type (and keeps it as the cause,
    for the traceback --debug shows) rather than pass for a disk the user would go and check.
    """
    if isinstance(exc, sqlite3.Error | OSError):
        return LedgerError(f"{path}: {what} ({exc})")
    error = LedgerError(f"{path}: {what} (internal error: {type(exc).__name__}: {exc})")
    error.__cause__ = exc
    return error


class StateFileGone(OSError):
    """The state file (or its WAL) was removed or replaced while a run wrote to it: a row
    marked now would be recorded in a file nobody reads any more. Refuses new marks only."""


class StateFileGoneError(LedgerError):
    """The run's end when its state file was removed or replaced: where its records went."""


def _gone(path: Path, writer: _Writer) -> StateFileGoneError:
    """What to do once the run's state file was removed or replaced: its records are in the
    copy the writer saved, and a re-run without them sends those rows again."""
    head = f"{path}: the state file was {writer.gone}, so the run stopped"
    if writer.saved is None:
        return StateFileGoneError(
            f"{head}; what it recorded could not be saved ({writer.unsaved}): a re-run sends "
            "the rows it sent again (the summary counts them)"
        )
    return StateFileGoneError(
        f"{head}; what it recorded is saved in {writer.saved}: re-run with --state "
        f"{writer.saved} (or move it to {path} once no run uses that path, if none has made a "
        "new file there); without it a re-run sends the rows this run sent again"
    )


def _identity(path: Path) -> tuple[int, int, int] | None:
    """The file `path` names now (device, inode) and its permission bits."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino, found.st_mode & 0o777


def recipient_key(address: str) -> str:
    """The ledger's key for an address: the suppression list's, which SES feedback uses too."""
    return suppression_key(address)


def in_doubt_reason(campaign: str) -> str:
    return f"in doubt (smartmail retry {campaign} --in-doubt sends it again)"


@dataclass(repr=False, eq=False)
class CampaignRecord(Record):
    """What the campaigns row keeps so `retry` can send again the same way. Never a secret."""

    id: str
    source: str
    template_hash: str = ""
    transport: str = ""
    settings: dict[str, Any] = field(default_factory=dict)


class _Op:
    """One statement for the writer; `done` (a locked lock) is released once it is committed."""

    __slots__ = ("done", "error", "finished", "key", "params", "sql")

    def __init__(
        self,
        sql: str | None,
        params: tuple[Any, ...],
        done: threading.Lock | None,
        key: str | None = None,
    ) -> None:
        self.sql = sql
        self.params = params
        self.done = done
        self.key = key  # the delivery it writes: statements on distinct keys commute
        self.error: BaseException | None = None
        self.finished = False  # committed (or failed) and its waiter released: never again


def _apply(conn: sqlite3.Connection, batch: list[_Op]) -> None:
    """Run a batch's statements. When each touches a different delivery (the usual case),
    the marks go as one multi-row INSERT and the `sent` outcomes as one UPDATE: the writer
    then hands the GIL back and forth a few times a batch rather than twice a statement."""
    todo = [op for op in batch if op.sql is not None]
    keys = {op.key for op in todo}
    marks = [op.params for op in todo if op.sql is _SENDING]
    sent = [op.params for op in todo if op.sql is _SENT_MINE]
    if None in keys or len(keys) != len(todo) or len(marks) + len(sent) < 2:
        for op in todo:
            conn.execute(op.sql or "", op.params)
        return
    if marks:
        conn.execute(_sending_many(len(marks)), [p for params in marks for p in params])
    if sent:
        # _SENT_MINE's parameters are (provider id, campaign, key); one campaign per writer.
        values = [v for _pid, _c, key in sent for v in (key, _pid)]
        conn.execute(_sent_many(len(sent)), [*values, sent[0][1]])
    for op in todo:
        if op.sql is not _SENDING and op.sql is not _SENT_MINE:
            conn.execute(op.sql or "", op.params)


@functools.lru_cache(maxsize=64)
def _sending_many(n: int) -> str:
    head, _, tail = _SENDING.partition("VALUES (?, ?, ?, ?, 'sending', 1, ?, " + NOW + ")")
    assert tail, "the mark statement changed shape"
    row = f"(?, ?, ?, ?, 'sending', 1, ?, {NOW})"
    return head + "VALUES " + ", ".join([row] * n) + tail


@functools.lru_cache(maxsize=64)
def _sent_many(n: int) -> str:
    return f"""
UPDATE deliveries SET status = 'sent', provider_id = NULLIF(v.column2, deliveries.message_id),
    last_error = NULL, sent_at = {NOW}, updated_at = {NOW}
FROM (VALUES {", ".join(["(?, ?)"] * n)}) AS v
WHERE deliveries.campaign = ? AND deliveries.recipient = v.column1
"""


class _Writer(threading.Thread):
    """The one thread that writes: commits everything queued so far in one transaction.

    Statements go on `ops`, a deque, in the order they were made. A caller that is waiting
    for its statement rings `doorbell` with True: the writer commits at once. A worker's next
    `sending` mark made ahead rings with False: the writer then lingers up to `LINGER` seconds
    so that several workers' statements share one transaction and one fsync, unless a waiter
    rings first. An outcome does not ring; it goes with the next commit. Each ring serves one
    commit of all that is queued; whatever is queued is committed within `IDLE_FLUSH` seconds
    in any case.
    A waiter holds a plain lock that the writer releases after the commit (no Future, no
    Condition), so a mark already committed costs its worker no hand-off at all.
    """

    def __init__(self, path: Path) -> None:
        import queue  # a send's, as the Future; a dry run reads and never writes
        from concurrent.futures import Future

        super().__init__(name="smartmail-ledger", daemon=True)
        self.path = path
        self.ops: collections.deque[_Op] = collections.deque()
        self.doorbell: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.ready: Future[None] = Future()
        self.stopping = False
        self.commits = 0
        self.statements = 0
        # Moving averages, in seconds: how long a worker takes from one `sending()` to its
        # next (a mark made ahead is needed about that long after it is queued), and how long
        # a commit takes. They set how long a batch may linger: see `linger()`.
        self.cycle = LINGER * 4
        self.commit_time = 0.0
        # Held while a transaction is open on `conn`: the writer thread's, or that of a
        # thread committing its own marks (`commit_now`), never both.
        self.commit_lock = threading.Lock()
        self.conn: sqlite3.Connection | None = None
        self.identity: tuple[int, int, int] | None = None  # the file this run writes to
        self.wal: tuple[int, int, int] | None = None  # and its WAL, once it has one
        self.gone: str | None = None  # what happened to them, once it did
        self.saved: str | None = None  # and where this run's records were saved then
        self.unsaved: str | None = None  # or why they could not be
        self.pid = os.getpid()  # a forked child has no such thread: see Ledger.close
        # Set when the thread ends. `join()` cannot tell: on Python 3.11 a join cut short by
        # a KeyboardInterrupt marks the thread stopped while it still runs.
        self.finished = threading.Event()

    def linger(self) -> float:
        """How long to wait for more statements before committing a batch nobody waits for.

        Longer shares an fsync among more statements; too long and the worker that marked a
        row ahead reaches it before the mark is durable and has to wait. So: three quarters of
        a worker's cycle, less the time the commit itself takes, within [0, LINGER]. At 2,400
        messages a second over 8 workers that is about 2 ms; against a slow provider, LINGER.
        (Measured: half a cycle made 35 % more commits for the same throughput, a whole cycle
        made workers wait.)
        """
        return min(LINGER, max(0.0, self.cycle * 0.75 - self.commit_time))

    def run(self) -> None:
        try:
            self._serve()
        finally:
            self.finished.set()

    def _serve(self) -> None:
        import queue

        try:
            conn = state.connect(self.path, shared=True)
            conn.execute("PRAGMA synchronous=FULL")
            self.identity = _identity(self.path)
            # Its -wal too, from now (opening the file made it): one removed while the prompt
            # waits, before the first commit, counts as much as one removed later.
            self.wal = _identity(Path(f"{self.path}-wal"))
        except BaseException as exc:
            self.ready.set_exception(exc)
            return
        self.conn = conn
        self.ready.set_result(None)
        ring = self.doorbell
        try:
            while True:
                try:
                    urgent = ring.get(timeout=IDLE_FLUSH)
                except queue.Empty:
                    urgent = True
                if not urgent:
                    deadline = time.monotonic() + self.linger()
                    with contextlib.suppress(queue.Empty):
                        while not urgent:
                            urgent = ring.get(timeout=max(0.0, deadline - time.monotonic()))
                with contextlib.suppress(queue.Empty):
                    while True:  # this commit serves every ring so far
                        ring.get_nowait()
                stop = self.stopping  # read before draining: nothing is queued after a stop
                # One commit a wake: what is queued during it waits for the next ring (a
                # waiter has rung already) rather than taking a commit of its own.
                if self.ops:  # an idle wake with nothing queued opens no transaction
                    self._commit_batch(conn)
                while self.ops and (stop or len(self.ops) >= BATCH):
                    self._commit_batch(conn)
                if stop:
                    return
        finally:
            with self.commit_lock:
                self.conn = None
                if self.gone is not None:
                    try:
                        self.saved = self._save(conn)
                    except StateFileGone as exc:
                        self.unsaved = str(exc)
                conn.close()

    def _commit_batch(self, conn: sqlite3.Connection) -> None:
        with self.commit_lock:
            self._commit(conn, self._take(BATCH))

    def _take(self, most: int) -> list[_Op]:
        ops, batch = self.ops, list[_Op]()
        with contextlib.suppress(IndexError):
            while len(batch) < most:
                batch.append(ops.popleft())
        return batch

    def commit_now(self, extra: list[_Op], then: Callable[[], None] | None = None) -> None:
        """Commit what is queued and then `extra` on the calling thread, now; then `then()`,
        still under the commit lock (what waits for the lock sees its effect too).

        For a caller that needs its statements durable before it goes on (the send pass
        marking rows): committing itself spares it a hand-off to the writer thread and back.
        Interrupted (Ctrl-C in a library caller: the send pass runs on the caller's thread),
        it leaves no transaction open and puts back at the head of the queue what it took
        from others and did not finish, so the writer commits it: no outcome is lost. (One
        that landed just before the interrupt is applied again: every statement but a mark's
        attempt count is idempotent.) The caller's own `extra` is dropped: it was stopped.
        """
        with self.commit_lock:
            conn = self.conn
            if conn is None:
                raise LedgerError(f"{self.path}: the ledger is closed")
            taken: list[_Op] = []
            ops = self.ops
            try:
                while ops:
                    # Kept before it leaves the queue: a signal's exception lands as a call
                    # returns, and one popped and not kept yet would be lost (its waiter too).
                    taken.append(ops[0])
                    ops.popleft()
                batch = taken + extra
                for start in range(0, len(batch), BATCH):
                    self._commit(conn, batch[start : start + BATCH])
                if then is not None:
                    then()
            except BaseException:
                back = [op for op in taken if not op.finished]
                if back and ops and ops[0] is back[-1]:
                    back.pop()  # kept, and still on the queue: interrupted in between
                ops.extendleft(reversed(back))
                raise

    def _commit(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        if self.gone is None and self._file_gone():
            self._secure(conn)
        if self.gone is not None:
            # No new row goes out: its mark would be recorded where nobody looks. Outcomes of
            # rows in flight, and rows put back, still go into the file this run holds open,
            # which is saved again when the run ends (`_save`).
            refused = [op for op in batch if op.sql is _SENDING]
            batch = [op for op in batch if op.sql is not _SENDING]
            for op in refused:
                op.error = StateFileGone(f"the state file was {self.gone}; the run stops")
                op.finished = True
                if op.done is not None:
                    op.done.release()
        try:
            began = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            _apply(conn, batch)
            conn.execute("COMMIT")
            self.commit_time += (time.perf_counter() - began - self.commit_time) / 8
            self.commits += 1
            self.statements += len(batch)
        except Exception as exc:
            # A database error, or a bug (`_failure` tells them apart when it is reported):
            # either way nothing of the batch is committed, every waiter is released, and
            # close() still unlocks the campaign.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self.error = exc
            for op in batch:
                op.error = exc
        except BaseException:
            # Only a signal's exception, on the thread of a `commit_now`: the connection is
            # shared with the writer thread, so no transaction may stay open on it.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        for op in batch:
            op.finished = True
            if op.done is not None:
                op.done.release()

    def _file_gone(self) -> bool:
        """Whether the state file, or its WAL, is no longer the one this run opened (removed,
        moved, or replaced: a cleanup job, a restore). Two stats a commit."""
        if self.identity is None:
            return False
        now = _identity(self.path)
        if now is None or now[:2] != self.identity[:2]:
            self.gone = "removed or replaced during the run"
            return True
        wal = _identity(Path(f"{self.path}-wal"))
        if self.wal is None:
            self.wal = wal  # none when the writer opened the file: the first commit made it
        elif wal is None or wal[:2] != self.wal[:2]:
            self.gone = "changed during the run (its -wal file was removed or replaced)"
            return True
        return False

    def _drop_leftovers(self) -> None:
        """The -wal and -shm of the removed file, left at the path when only the file went: a
        copy moved back there would otherwise be read through that stale WAL. Only when they
        are still this run's own (another run may have made a new file and WAL there)."""
        wal = Path(f"{self.path}-wal")
        found = _identity(wal)
        if self.path.exists() or self.wal is None or found is None or found[:2] != self.wal[:2]:
            return
        for leftover in (wal, Path(f"{self.path}-shm")):
            with contextlib.suppress(OSError):
                leftover.unlink()

    def _secure(self, conn: sqlite3.Connection) -> None:
        """At once when the file is found gone, as a SIGKILL may come before the run's end:
        what is in the WAL this run holds goes into the file (all of it, when only the -wal
        was removed and the file is still at the path), and a copy is saved (`_save`)."""
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        try:
            self.saved = self._save(conn)
        except StateFileGone as exc:
            self.unsaved = str(exc)

    def _save(self, conn: sqlite3.Connection) -> str:
        """Copy what this run's connection still sees (the file it opened, with every commit
        of this run) to a new file beside it, else in the temporary folder, or over the copy
        saved before; where it went."""
        import tempfile

        assert self.identity is not None
        name = f"{self.path.name}.recovered-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        problems: list[str] = []
        again = [Path(self.saved)] if self.saved is not None else []
        folders = (self.path.parent, Path(tempfile.gettempdir()))
        for target in again or [folder / name for folder in folders]:
            try:
                if not again:
                    # Made new, with the state file's own permissions: the same addresses.
                    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                    os.chmod(target, self.identity[2])
                copy = sqlite3.connect(target, isolation_level=None)
                try:
                    conn.backup(copy)
                    copy.execute("PRAGMA journal_mode=DELETE")  # one file, no -wal beside it
                finally:
                    copy.close()
                self._drop_leftovers()
                return str(target)
            except (sqlite3.Error, OSError) as exc:
                problems.append(f"{target}: {exc}")
        raise StateFileGone("; ".join(problems))

    def queue(self, op: _Op, *, urgent: bool) -> None:
        """Queue a statement; ring when someone waits for it, for a mark made ahead (the
        writer lingers for more), or when a batch is full. An outcome does not ring: it goes
        with the next commit, which a mark soon needs (or within `IDLE_FLUSH`), so it costs
        no commit of its own."""
        self.ops.append(op)
        if urgent or op.sql is _SENDING or len(self.ops) >= BATCH:
            self.doorbell.put(urgent)

    def stop(self) -> None:
        self.stopping = True
        self.doorbell.put(True)

    def finish(self) -> KeyboardInterrupt | SystemExit | None:
        """Stop and wait until everything queued is committed and the thread has ended.

        A KeyboardInterrupt meanwhile, or the SystemExit a host's SIGTERM handler raises
        (`sys.exit(143)`), is returned rather than raised, for the caller to raise once done:
        see `Ledger.close`."""
        interrupted: KeyboardInterrupt | SystemExit | None = None
        while True:
            try:
                self.stop()
                self.finished.wait()
                return interrupted
            except (KeyboardInterrupt, SystemExit) as exc:
                interrupted = exc


class Ledger:
    """The ledger of one campaign in a state database; implements the engine's `Journal`.

    `acquire()` takes the campaign lock (LockedError if another run has it) and notes the rows
    left in doubt; without it the ledger only reads (what dry-run needs). Only `acquire`
    brings a state file of an older schema up to date (its writer's connection): reads leave
    it as it is, so a dry run does not make the file one an older smartmail refuses.
    `resend` lets a `retry` send rows that a normal run skips: the failed ones, or the
    in-doubt ones.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        campaign: str,
        *,
        resend: Resend = None,
    ) -> None:
        self.path = Path(path) if path is not None else state.default_state_path()
        self.campaign = campaign
        self.resend: Resend = resend
        self.lock = CampaignLock(self.path, campaign)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._guard = threading.Lock()
        # Marked by this run and not finished: the key and the row it was marked for. A
        # later row with the same address (a duplicate, skipped) is not that row.
        self._in_flight: dict[str, int] = {}
        self._marked_ahead: set[str] = set()  # marked, but sending() not called yet
        self._premarked: set[str] = set()  # the same, marked by `mark()`
        self._writer: _Writer | None = None
        self._closing: _Writer | None = None  # the writer close() is stopping
        self._writes = False  # acquired: the file is made, or upgraded, to be written
        # Unlocked (dry-run): rows `sending` under a live run are in flight, not in doubt.
        live = self.lock.held_elsewhere()
        self.in_doubt: frozenset[str] = frozenset() if live else self._sending_rows()
        self._fresh = self._is_fresh()

    # --- lifecycle -------------------------------------------------------------------------

    def acquire(self) -> None:
        """Lock the campaign for this process; rows still `sending` now are in doubt."""
        self.lock.acquire()
        # Connections opened before only read: one may hold an empty state in memory for a
        # file that was blank then. From here the file is this run's ledger.
        self._writes = True
        self._forget_reads()
        self.in_doubt = self._sending_rows()
        self._fresh = self._is_fresh()
        writer = _Writer(self.path)
        writer.start()
        try:
            writer.ready.result()
        except Exception:
            self.lock.release()
            raise
        self._writer = writer
        # Library users may never call begin(); deliveries still need their campaign row.
        self._write(_ENSURE, (self.campaign,), wait=True)

    def begin(self, record: CampaignRecord | None = None) -> None:
        """Create or update the campaign row (None: keep its settings, note this run)."""
        if record is None:
            self._write(_TOUCH, (self.campaign,), wait=True)
            return
        params = (
            record.id,
            record.source,
            record.template_hash,
            record.transport,
            json.dumps(record.settings, sort_keys=True),
        )
        self._write(_CAMPAIGN, params, wait=True)

    def close(self) -> None:
        """Commit everything queued, stop the writer, release the lock. Safe to call twice.

        A Ctrl-C (KeyboardInterrupt) or a host's SIGTERM handler's SystemExit meanwhile is
        raised only once the writer has committed what is queued and the lock is released:
        released before that commit, the lock lets the next run find this run's finished rows
        still `sending` (in doubt), and a process that ends there loses their outcomes. The
        wait is one commit (at most SQLite's busy timeout)."""
        writer = self._writer
        if writer is not None and writer.pid != os.getpid():
            # A forked child's copy: the writer thread, the connections and the lock are
            # the parent's (multiprocessing forks on Linux). Nothing of them is touched here.
            try:
                self._writer = self._closing = None
            finally:
                self.lock.release()  # only closes the child's copy of the lock file
            return
        interrupted: KeyboardInterrupt | SystemExit | None = None
        try:
            # Let go of the writer inside the try: an interrupt landing just after would
            # otherwise skip both the commit and the unlock below. It is kept for flush()
            # meanwhile: see there.
            self._closing = writer
            self._writer = None
        finally:
            try:
                if writer is not None:
                    interrupted = writer.finish()
                    if writer.gone is not None:
                        raise _gone(self.path, writer)
                    if writer.error is not None:
                        raise _failure(self.path, "could not record outcomes", writer.error)
            finally:
                self.lock.release()
                with self._guard:
                    conns, self._connections = self._connections, []
                for conn in conns:
                    # One opened by another (ended) thread cannot be closed here; the GC
                    # closes it.
                    with contextlib.suppress(sqlite3.ProgrammingError):
                        conn.close()
                if interrupted is not None:
                    raise interrupted

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the Journal protocol ----------------------------------------------------------------

    def skip_reason(self, recipient: str, row: Row) -> str | None:
        return self.skip_reasons([(recipient, row)])[0]

    def skip_reasons(self, items: Sequence[tuple[str, Row]]) -> list[str | None]:
        """`skip_reason` for many rows in two queries, one answer per item, in order.

        The send pass asks for a few dozen rows at a time: one query per row there costs the
        producer a GIL hand-back to eight busy workers per statement.
        """
        keys = [recipient_key(recipient) for recipient, _row in items]
        conn = self.conn()
        try:
            # A campaign with no deliveries when this run began has nothing to look up: the
            # only rows it gains are this run's own, and pre-flight already dropped duplicates.
            found: dict[str, str] = {}
            if not self._fresh:
                wanted = list(dict.fromkeys(keys))
                for start in range(0, len(wanted), _READ_BATCH):
                    chunk = wanted[start : start + _READ_BATCH]
                    marks = ",".join("?" * len(chunk))
                    sql = (
                        "SELECT recipient, status FROM deliveries WHERE campaign = ? "
                        f"AND recipient IN ({marks})"
                    )
                    found.update(conn.execute(sql, (self.campaign, *chunk)).fetchall())
            suppressed = SuppressionList(conn).reasons(keys)
        except sqlite3.Error as exc:
            raise LedgerError(f"{self.path}: cannot read the ledger ({exc})") from None
        return [self._veto(key, found.get(key), suppressed.get(key)) for key in keys]

    def _veto(self, key: str, status: str | None, suppressed: str | None) -> str | None:
        if status == "sent":
            return "already sent"
        if status == "sending":
            if key not in self.in_doubt:
                return "already being sent"
            if self.resend != "in-doubt":
                return in_doubt_reason(self.campaign)
        if status == "failed" and self.resend != "failed":
            return f"failed before (smartmail retry {self.campaign} sends it again)"
        if suppressed is not None:
            return f"suppressed: {suppressed}"
        return None

    def suppressed(self, addresses: Sequence[str]) -> dict[str, str]:
        """Which of a message's other envelope addresses (Cc, Bcc) are suppressed, and why.

        Only the suppression list applies to them, never this campaign's deliveries: the
        ledger keys one delivery per row recipient, and a Cc (an account manager, an archive
        box) may rightly be copied on many rows' messages of one campaign.
        """
        try:
            return SuppressionList(self.conn()).reasons(addresses)
        except sqlite3.Error as exc:
            raise LedgerError(f"{self.path}: cannot read the suppression list ({exc})") from None

    def mark(self, messages: Sequence[OutgoingMessage]) -> None:
        """Make `sending` durable for rows about to be queued, in one commit.

        The send pass calls this before it queues them, so a worker finds its row marked and
        `sending()` returns at once. The calling thread commits (with whatever outcomes are
        queued) itself: no hand-off to the writer thread and back.
        """
        if not messages:
            return
        ops = [
            _Op(_SENDING, self._mark(message, key), None, key)
            for message in messages
            if (key := recipient_key(message.recipient))
        ]
        if not ops:
            return

        def marked() -> None:
            # Under the commit lock: an abort's `release_ahead` that came during the commit
            # waits for it, and finds these rows to put back.
            if all(op.error is None for op in ops):
                with self._guard:
                    self._premarked.update(op.key for op in ops if op.key)

        self._writable().commit_now(ops, marked)
        failed = next((op.error for op in ops if op.error is not None), None)
        if failed is not None:
            raise _failure(self.path, "could not record to the ledger", failed)

    def sending(self, message: OutgoingMessage) -> None:
        key = recipient_key(message.recipient)
        if key in self._premarked:
            with self._guard:
                self._premarked.discard(key)
            return
        self._note_cycle()
        ahead: dict[str, _Op] | None = getattr(self._local, "ahead", None)
        op = ahead.pop(key, None) if ahead else None
        with self._guard:
            self._marked_ahead.discard(key)
        if op is None:
            op = _Op(_SENDING, self._mark(message, key), _held_lock(), key)
            self._writable().queue(op, urgent=True)
            self._wait(op, ring=False)
            return
        self._wait(op)

    def ahead(self, message: OutgoingMessage) -> None:
        """Start marking the row this thread will send next, while it sends the current one.

        The mark is committed in the background, so `sending()` for that row rarely waits.
        The price: a crash can leave two rows per worker in doubt (the one in flight and the
        one marked ahead) instead of one.
        """
        key = recipient_key(message.recipient)
        ahead: dict[str, _Op] | None = getattr(self._local, "ahead", None)
        if ahead is None:
            ahead = self._local.ahead = {}
        if not key or len(ahead) > 1:  # the row about to be sent and one more, at most
            return
        op = _Op(_SENDING, self._mark(message, key), _held_lock(), key)
        with self._guard:
            self._marked_ahead.add(key)
        self._writable().queue(op, urgent=False)
        ahead[key] = op

    def _note_cycle(self) -> None:
        """Feed the writer's estimate of how long a worker takes per message."""
        now = time.monotonic()
        last: float | None = getattr(self._local, "last_sending", None)
        self._local.last_sending = now
        writer = self._writer
        if last is not None and writer is not None:
            # Unlocked read-modify-write: a lost update among workers only slows the average.
            writer.cycle += (min(now - last, 1.0) - writer.cycle) / 16

    def release_ahead(self, reason: str = "not attempted (the run was aborted)") -> None:
        """Put rows marked ahead but never attempted back to `pending`, for an abort: only the
        messages really in flight are then left in doubt.

        A commit of marks under way (the signal came as the send pass committed them) ends
        first: those rows will never be sent either (the run is stopping), and are put back
        with the others rather than left `sending` by an exit right after the commit.
        """
        writer = self._writer
        with writer.commit_lock if writer is not None else contextlib.nullcontext():
            with self._guard:
                keys, self._marked_ahead = self._marked_ahead | self._premarked, set()
                self._premarked = set()
                for key in keys:
                    self._in_flight.pop(key, None)
            for key in keys:
                self._put_back(key, reason)

    def _put_back(self, key: str, reason: str) -> None:
        """A row marked and then not attempted (the run stopped) goes back to what it was
        before this run, so the same command picks it up next time: pending for a send, failed
        (its error kept) for a `retry`, in doubt (left `sending`) for a `retry --in-doubt`.
        Pending, a retry's row was for no later `retry`, and only a `send` of the whole list
        would have sent it."""
        if self.resend == "in-doubt":
            return
        if self.resend == "failed":
            self._write(_BACK_TO_FAILED, (self.campaign, key), key=key)
            return
        self._write(_BACK_TO_PENDING, (reason, self.campaign, key), key=key)

    def _mark(self, message: OutgoingMessage, key: str) -> tuple[Any, ...]:
        with self._guard:
            self._in_flight[key] = message.row.number
        row = message.row
        return (self.campaign, key, row.number, row_json(row), message.message_id)

    def record(self, outcome: Outcome) -> None:
        key = recipient_key(outcome.recipient)
        if not key:
            return
        with self._guard:
            # Only the outcome of the row that was marked finishes the mark: the send pass
            # records a duplicate of an address in flight skipped, and that must not turn the
            # marked row's own `unsent` into a no-op (left `sending`: in doubt, never tried).
            mine = self._in_flight.get(key) == outcome.row.number
            if mine:
                del self._in_flight[key]
                self._marked_ahead.discard(key)
                self._premarked.discard(key)
        ahead: dict[str, _Op] | None = getattr(self._local, "ahead", None)
        if ahead:
            ahead.pop(key, None)  # marked ahead but ended unsent (a stop): pending again below
        status = outcome.status
        if mine:
            if status == "sent":
                self._write(_SENT_MINE, (outcome.message_id, self.campaign, key), key=key)
                return
            if status == "failed":
                self._write(_FAILED_MINE, (outcome.reason, self.campaign, key), key=key)
                return
            if status == "unsent":
                self._put_back(key, outcome.reason)
                return
        row = outcome.row
        base = (self.campaign, key, row.number, row_json(row))
        if status == "sent":
            self._write(_SENT, (*base, outcome.message_id), key=key)
        elif status == "failed":
            self._write(_FAILED, (*base, outcome.reason), key=key)
        elif status == "skipped":
            self._write(_SKIPPED, (*base, outcome.reason), key=key)
        elif status == "in-doubt":
            self._write(_IN_DOUBT, (outcome.reason, self.campaign, key), key=key)
        else:
            self._write(_PENDING, (*base, outcome.reason), key=key)

    # --- helpers -----------------------------------------------------------------------------

    def conn(self) -> sqlite3.Connection:
        """This thread's read connection to the state database (unacquired, no schema upgrade
        and no file made: see the class)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = state.connect(self.path, upgrade=self._writes)
            self._local.conn = conn
            with self._guard:
                self._connections.append(conn)
        return conn

    def _forget_reads(self) -> None:
        """Close the read connections opened so far (only this thread's, before any other
        thread uses the ledger); the next read opens a new one."""
        with self._guard:
            conns, self._connections = self._connections, []
        self._local = threading.local()
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def flush(self) -> None:
        """Wait until every write queued so far is committed.

        Also while close() is stopping the writer: a second Ctrl-C at the CLI flushes and
        then ends the process at once, and landing as close() commits the last outcomes it
        must wait for that commit (bounded by SQLite's busy timeout), or rows it counted as
        sent would stay `sending`."""
        if self._writer is not None:
            self._write(None, (), wait=True)
            return
        closing = self._closing
        if closing is not None:
            closing.finished.wait(CLOSE_WAIT)

    def _is_fresh(self) -> bool:
        found = self.conn().execute(
            "SELECT 1 FROM deliveries WHERE campaign = ? LIMIT 1", (self.campaign,)
        )
        return found.fetchone() is None

    def _sending_rows(self) -> frozenset[str]:
        rows = self.conn().execute(
            "SELECT recipient FROM deliveries WHERE campaign = ? AND status = 'sending'",
            (self.campaign,),
        )
        return frozenset(r[0] for r in rows)

    def _writable(self) -> _Writer:
        writer = self._writer
        if writer is None:
            raise LedgerError(f"ledger of campaign {self.campaign!r} is not open for writing")
        if writer.error is not None:
            raise _failure(self.path, "could not record outcomes", writer.error)
        return writer

    def _write(
        self,
        sql: str | None,
        params: tuple[Any, ...],
        *,
        wait: bool = False,
        key: str | None = None,
    ) -> None:
        writer = self._writable()
        if not wait:
            writer.queue(_Op(sql, params, None, key), urgent=False)
            return
        op = _Op(sql, params, _held_lock())
        writer.queue(op, urgent=True)
        self._wait(op, ring=False)

    def _wait(self, op: _Op, *, ring: bool = True) -> None:
        """Until the writer has committed `op` (queued by this thread with its lock).
        `ring=False` when `op` was queued urgent: a second ring would cost a second commit."""
        done, writer = op.done, self._writer
        assert done is not None
        if not done.acquire(blocking=False):
            if writer is None:
                raise LedgerError(f"ledger of campaign {self.campaign!r} is not open for writing")
            if ring:
                writer.doorbell.put(True)  # no lingering: this thread needs it now
            while not done.acquire(timeout=WRITER_CHECK):
                if not writer.is_alive():
                    raise LedgerError(f"{self.path}: the ledger writer stopped") from writer.error
        if op.error is not None:
            raise _failure(self.path, "could not record to the ledger", op.error)


def _held_lock() -> threading.Lock:
    """A lock already taken: its waiter blocks on it until the writer releases it."""
    done = threading.Lock()
    done.acquire()
    return done


def row_json(row: Row) -> str:
    """The row's values as the ledgers store them (JSON, UTF-8 where it can be)."""
    text = json.dumps(row.values, ensure_ascii=False, separators=(",", ":"))
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            # A lone surrogate (a CSV read as UTF-7 can hold one, in a column no message
            # uses): no UTF-8 holds it, so the store would refuse the row. Escaped instead.
            return json.dumps(row.values, separators=(",", ":"))
    return text
