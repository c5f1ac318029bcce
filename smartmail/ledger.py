"""The send ledger: one record per (campaign, recipient address), so a re-run never double-sends.

A `Ledger` is the engine's `Journal`. Before the first attempt of a message it commits
`sending` (durably: `synchronous=FULL`); after the outcome it commits `sent`, `failed`,
`skipped`, or puts an unsent row back to `pending`. A row still `sending` when a new run takes
the campaign lock was in flight when an earlier process died, or its provider's answer was lost
after the whole message was handed over (an `in-doubt` outcome leaves it `sending` on purpose):
the message may or may not have left. It is *in doubt* and, by default, not sent again (at
most once); `smartmail retry CAMPAIGN --in-doubt` sends those on purpose.

Writes go through one writer thread with its own connection that commits whatever is queued in
one transaction (group commit), so a 16-worker run pays one fsync per batch, not one per
message. A worker waits only for its `sending` commit. Outcomes are queued without waiting: the
writer takes the queue in order, so a worker's outcome is committed no later than its next
`sending`, and at most one row per worker can be left in doubt by a crash. `close()` commits
the rest. Reads (`skip_reason`) use a connection per calling thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sqlite3
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import state
from .errors import SmartmailError
from .lock import CampaignLock
from .message import OutgoingMessage
from .report import Outcome
from .sources import Row
from .suppression import SuppressionList
from .suppression import key as suppression_key

Resend = Literal["failed", "in-doubt"] | None
NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
BATCH = 500

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
_BACK_TO_PENDING = f"""
UPDATE deliveries SET status = 'pending', last_error = ?, updated_at = {NOW}
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


def recipient_key(address: str) -> str:
    """The ledger's key for an address: the suppression list's, which SES feedback uses too."""
    return suppression_key(address)


def in_doubt_reason(campaign: str) -> str:
    return f"in doubt (smartmail retry {campaign} --in-doubt sends it again)"


@dataclass
class CampaignRecord:
    """What the campaigns row keeps so `retry` can send again the same way. Never a secret."""

    id: str
    source: str
    template_hash: str = ""
    transport: str = ""
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Op:
    sql: str | None
    params: tuple[Any, ...] = ()
    done: Future[None] | None = None


class _Writer(threading.Thread):
    """The one thread that writes: commits each batch of queued statements in one transaction."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="smartmail-ledger", daemon=True)
        self.path = path
        self.ops: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.ready: Future[None] = Future()

    def run(self) -> None:
        try:
            conn = state.connect(self.path)
            conn.execute("PRAGMA synchronous=FULL")
        except BaseException as exc:
            self.ready.set_exception(exc)
            return
        self.ready.set_result(None)
        try:
            while self._commit_batch(conn):
                pass
        finally:
            conn.close()

    def _commit_batch(self, conn: sqlite3.Connection) -> bool:
        first = self.ops.get()
        if first is None:
            return False
        batch, more = [first], True
        while len(batch) < BATCH:
            try:
                op = self.ops.get_nowait()
            except queue.Empty:
                break
            if op is None:
                more = False
                break
            batch.append(op)
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                if op.sql is not None:
                    conn.execute(op.sql, op.params)
            conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self.error = exc
            for op in batch:
                if op.done is not None:
                    op.done.set_exception(exc)
        else:
            for op in batch:
                if op.done is not None:
                    op.done.set_result(None)
        return more


class Ledger:
    """The ledger of one campaign in a state database; implements the engine's `Journal`.

    `acquire()` takes the campaign lock (LockedError if another run has it) and notes the rows
    left in doubt; without it the ledger only reads (what dry-run needs). `resend` lets a
    `retry` send rows that a normal run skips: the failed ones, or the in-doubt ones.
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
        self._in_flight: set[str] = set()
        self._writer: _Writer | None = None
        # Unlocked (dry-run): rows `sending` under a live run are in flight, not in doubt.
        live = self.lock.held_elsewhere()
        self.in_doubt: frozenset[str] = frozenset() if live else self._sending_rows()
        self._fresh = self._is_fresh()

    # --- lifecycle -------------------------------------------------------------------------

    def acquire(self) -> None:
        """Lock the campaign for this process; rows still `sending` now are in doubt."""
        self.lock.acquire()
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
        """Commit everything queued, stop the writer, release the lock. Safe to call twice."""
        writer, self._writer = self._writer, None
        try:
            if writer is not None:
                writer.ops.put(None)
                writer.join()
                if writer.error is not None:
                    raise LedgerError(f"{self.path}: could not record outcomes ({writer.error})")
        finally:
            self.lock.release()
            with self._guard:
                conns, self._connections = self._connections, []
            for conn in conns:
                # One opened by another (ended) thread cannot be closed here; the GC closes it.
                with contextlib.suppress(sqlite3.ProgrammingError):
                    conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the Journal protocol ----------------------------------------------------------------

    def skip_reason(self, recipient: str, row: Row) -> str | None:
        key = recipient_key(recipient)
        conn = self.conn()
        try:
            # A campaign with no deliveries when this run began has nothing to look up: the
            # only rows it gains are this run's own, and pre-flight already dropped duplicates.
            found = None
            if not self._fresh:
                found = conn.execute(
                    "SELECT status FROM deliveries WHERE campaign = ? AND recipient = ?",
                    (self.campaign, key),
                ).fetchone()
            suppressed = SuppressionList(conn).reason(key)
        except sqlite3.Error as exc:
            raise LedgerError(f"{self.path}: cannot read the ledger ({exc})") from None
        status = found[0] if found else None
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

    def sending(self, message: OutgoingMessage) -> None:
        key = recipient_key(message.recipient)
        with self._guard:
            self._in_flight.add(key)
        row = message.row
        params = (self.campaign, key, row.number, _row_json(row), message.message_id)
        self._write(_SENDING, params, wait=True)

    def record(self, outcome: Outcome) -> None:
        key = recipient_key(outcome.recipient)
        if not key:
            return
        with self._guard:
            mine = key in self._in_flight
            self._in_flight.discard(key)
        row = outcome.row
        base = (self.campaign, key, row.number, _row_json(row))
        if outcome.status == "sent":
            self._write(_SENT, (*base, outcome.message_id))
        elif outcome.status == "failed":
            self._write(_FAILED, (*base, outcome.reason))
        elif outcome.status == "skipped":
            self._write(_SKIPPED, (*base, outcome.reason))
        elif outcome.status == "in-doubt":
            self._write(_IN_DOUBT, (outcome.reason, self.campaign, key))
        elif mine:
            self._write(_BACK_TO_PENDING, (outcome.reason, self.campaign, key))
        else:
            self._write(_PENDING, (*base, outcome.reason))

    # --- helpers -----------------------------------------------------------------------------

    def conn(self) -> sqlite3.Connection:
        """This thread's read connection to the state database."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = state.connect(self.path)
            self._local.conn = conn
            with self._guard:
                self._connections.append(conn)
        return conn

    def flush(self) -> None:
        """Wait until every write queued so far is committed."""
        if self._writer is not None:
            self._wait(_Op(None, (), Future()))

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

    def _write(self, sql: str, params: tuple[Any, ...], *, wait: bool = False) -> None:
        writer = self._writer
        if writer is None:
            raise LedgerError(f"ledger of campaign {self.campaign!r} is not open for writing")
        if writer.error is not None:
            raise LedgerError(f"{self.path}: could not record outcomes ({writer.error})")
        if wait:
            self._wait(_Op(sql, params, Future()))
        else:
            writer.ops.put(_Op(sql, params))

    def _wait(self, op: _Op) -> None:
        assert self._writer is not None and op.done is not None
        self._writer.ops.put(op)
        try:
            op.done.result()
        except sqlite3.Error as exc:
            raise LedgerError(f"{self.path}: could not record to the ledger ({exc})") from None


def _row_json(row: Row) -> str:
    return json.dumps(row.values, ensure_ascii=False, separators=(",", ":"))
