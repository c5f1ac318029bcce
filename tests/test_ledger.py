"""The send ledger in-process: real SQLite, real aiosmtpd, the real CLI through CliRunner.

Crash, overlap and signal behaviour with real processes is in test_ledger_processes.py.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from smartmail import (
    MessageTemplate,
    RecipientSource,
    RetryPolicy,
    SendOptions,
    SourceSpec,
    build,
    preflight,
    send_campaign,
)
from smartmail.cli import cli
from smartmail.errors import LockedError, SmartmailError
from smartmail.events import SqliteFeedback
from smartmail.ledger import Ledger
from smartmail.state import connect
from smartmail.suppression import SuppressionList
from smartmail.terminal import printable
from smartmail.transports import TransportOptions, get_transport

from .conftest import SMTP_PASSWORD, SMTP_USER, SmtpServer, make_csv, write


def run_cli(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """Invoke the CLI as a user would; SmartmailError maps to its exit code as in `main`."""
    result = CliRunner().invoke(cli, args, env=env, catch_exceptions=True)
    code = result.exit_code
    if isinstance(result.exception, SmartmailError):
        code = result.exception.exit_code
        return code, result.output + str(result.exception)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return code, result.output


def send_args(csv: Path, template: Path, server: SmtpServer, db: Path, *extra: str) -> list[str]:
    return [
        "send", str(csv), "-t", str(template), "--transport", server.url,
        "--smtp-security", "none", "--state", str(db), "--yes", "--progress", "none",
        "--retry-wait", "0", "--failed-csv", str(db.parent / "failed.csv"), *extra,
    ]  # fmt: skip


def counts(db: Path, campaign: str) -> dict[str, int]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT status, count(*) FROM deliveries WHERE campaign = ? GROUP BY status",
            (campaign,),
        )
        return {status: n for status, n in rows}
    finally:
        conn.close()


def report(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def per_recipient(server: SmtpServer) -> dict[str, int]:
    return {k: len(v) for k, v in server.handler.by_recipient().items()}


def send_through(
    ledger: Ledger,
    server: SmtpServer,
    csv: Path,
    template: Path,
    retry: RetryPolicy | None = None,
    **options: Any,
) -> Any:
    """`send_campaign` to `server` with `ledger` as the journal, acquired and closed here."""
    ledger.acquire()
    try:
        return send_campaign(
            RecipientSource(SourceSpec(str(csv))),
            MessageTemplate.load(template),
            get_transport(server.url, TransportOptions(smtp_security="none")),
            options=SendOptions(**options),
            retry=retry,
            journal=ledger,
        )
    finally:
        ledger.close()


# --- the ledger under load -----------------------------------------------------------------


def test_an_smtp_delivery_keeps_its_message_id_and_no_provider_id_of_its_own(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    """The Message-ID the server received is the delivery's; an SMTP server gives no id that
    feedback could name, so none is stored as one (only SES's are, see test_ledger_feedback)."""
    csv = make_csv(tmp_path / "r.csv", 5)
    db = tmp_path / "state.db"
    assert run_cli(send_args(csv, template_file, smtp_server, db))[0] == 0
    sent = {
        r.rcpt_tos[0]: message_from_bytes(r.data)["Message-ID"]
        for r in smtp_server.handler.received
    }
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT recipient, message_id, provider_id FROM deliveries").fetchall()
    indexed = conn.execute("SELECT count(*) FROM deliveries WHERE provider_id IS NOT NULL")
    assert indexed.fetchone()[0] == 0
    conn.close()
    assert {r: m for r, m, _ in rows} == sent and len(sent) == 5
    assert {p for _, _, p in rows} == {None}


def test_sixteen_workers_lose_no_outcome(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    n = 300
    csv = make_csv(tmp_path / "r.csv", n)
    with csv.open("a") as fh:  # three rows the pre-flight skips as invalid
        fh.write("not-an-address,Bad,X\n@nowhere,Bad,Y\nspace @x.org,Bad,Z\n")
    smtp_server.handler.temp_fail_every = 7
    smtp_server.handler.reject_rcpt = {f"user{i}@example.org" for i in (3, 50, 299)}
    db = tmp_path / "state.db"
    retry = RetryPolicy(max_retries=10, initial=0.0, maximum=0.0, jitter=0.0)
    summary = send_through(
        Ledger(db, "load"), smtp_server, csv, template_file, retry, workers=16, campaign="load"
    )
    assert (summary.sent, summary.failed, summary.skipped) == (n - 3, 3, 3), summary.failure_reasons
    assert counts(db, "load") == {"sent": n - 3, "failed": 3, "skipped": 3}
    assert len(smtp_server.handler.received) == n - 3
    conn = sqlite3.connect(db)
    ids = [r[0] for r in conn.execute("SELECT message_id FROM deliveries WHERE status = 'sent'")]
    errors = [r[0] for r in conn.execute("SELECT last_error FROM deliveries WHERE status='failed'")]
    conn.close()
    assert None not in ids and len(set(ids)) == n - 3
    assert all("550" in e for e in errors)
    # A campaign driven from Python has no stored template: retry says so instead of guessing.
    code, out = run_cli(["retry", "load", "--state", str(db), "--yes"])
    assert code == 2 and "no stored template" in out


class WatchedLedger(Ledger):
    """The real ledger; after each batch the send pass marks, counts the rows the database
    holds as `sending`: what a crash at that moment would leave in doubt."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []
        self.sending_seen: list[int] = []

    def mark(self, messages: Any) -> None:
        super().mark(messages)
        self.batches.append(len(messages))
        conn = sqlite3.connect(self.path)
        try:
            (count,) = conn.execute(
                "SELECT count(*) FROM deliveries WHERE status = 'sending'"
            ).fetchone()
        finally:
            conn.close()
        self.sending_seen.append(count)


def test_the_send_pass_marks_rows_a_few_per_commit_and_never_more_than_two_per_worker(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    n, workers = 61, 4
    csv = make_csv(tmp_path / "r.csv", n)
    db = tmp_path / "state.db"
    ledger = WatchedLedger(db, "bound")
    summary = send_through(
        ledger, smtp_server, csv, template_file, workers=workers, campaign="bound"
    )
    assert summary.sent == n and counts(db, "bound") == {"sent": n}
    # Half the workers' rows per commit (the last batch is what is left)...
    assert ledger.batches == [workers // 2] * (n // 2) + [1]
    # ...and at no moment more than two rows per worker marked and not finished: a crash then
    # could leave no more than that in doubt.
    assert max(ledger.sending_seen) <= 2 * workers
    assert len(smtp_server.handler.received) == n


def test_a_ledger_that_fails_while_marking_stops_the_run_and_sends_nothing_unmarked(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    from smartmail.ledger import LedgerError

    class FailingDisk(Ledger):
        """The real ledger, whose disk fails on the third batch of marks."""

        batches = 0

        def mark(self, messages: Any) -> None:
            self.batches += 1
            if self.batches == 3:
                raise LedgerError("state.db: could not record to the ledger (disk I/O error)")
            super().mark(messages)

    csv = make_csv(tmp_path / "r.csv", 20)
    db = tmp_path / "state.db"
    with pytest.raises(LedgerError):
        send_through(
            FailingDisk(db, "disk"), smtp_server, csv, template_file, workers=4, campaign="disk"
        )
    # Only rows of the two batches marked were sent, and each of them is on record as sent;
    # the run stopped at the failure, so rows queued but not yet attempted went back to
    # pending and none is left in doubt.
    got = set(smtp_server.handler.by_recipient())
    assert got and got <= {f"user{i}@example.org" for i in range(4)}
    recorded = statuses(db)
    assert {r for r, status in recorded.items() if status == "sent"} == got
    assert set(recorded.values()) <= {"sent", "pending"}


class InterruptedLedger(Ledger):
    """The real ledger; Ctrl-C (a library caller's KeyboardInterrupt) lands just after the
    third batch of marks is committed, before the send pass can queue those rows."""

    def mark(self, messages: Any) -> None:
        super().mark(messages)
        self.marked = getattr(self, "marked", 0) + 1
        if self.marked == 3:
            raise KeyboardInterrupt


def test_ctrl_c_as_the_send_pass_marks_rows_leaves_none_of_them_in_doubt(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    n, workers = 40, 4
    csv = make_csv(tmp_path / "r.csv", n)
    db = tmp_path / "state.db"
    with pytest.raises(KeyboardInterrupt):
        send_through(InterruptedLedger(db, "c"), smtp_server, csv, template_file, workers=workers)
    # The third batch was marked and never queued: back to pending, not in doubt; what the
    # server got is recorded sent.
    first = counts(db, "c")
    assert "sending" not in first
    assert first.get("sent", 0) == len(smtp_server.handler.received) < n
    assert first.get("pending", 0) >= workers // 2
    # The re-run sends the rest, and nobody twice.
    summary = send_through(Ledger(db, "c"), smtp_server, csv, template_file, workers=workers)
    assert summary.sent == n - first.get("sent", 0)
    assert counts(db, "c") == {"sent": n}
    assert set(per_recipient(smtp_server).values()) == {1} and len(per_recipient(smtp_server)) == n


def test_ctrl_c_as_the_send_pass_marks_rows_puts_every_row_left_unsent_in_the_redrive_file(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    n, workers = 40, 4
    csv = make_csv(tmp_path / "r.csv", n)
    db, failed = tmp_path / "state.db", tmp_path / "failed.csv"
    with pytest.raises(KeyboardInterrupt):
        send_through(
            InterruptedLedger(db, "c"), smtp_server, csv, template_file, workers=workers,
            failed_csv=failed,
        )  # fmt: skip
    # The batch being marked when Ctrl-C came is unsent like every row after it: all of them
    # are in the re-drive file, not only those the workers gave up.
    conn = sqlite3.connect(db)
    unsent = conn.execute("SELECT recipient FROM deliveries WHERE status != 'sent'")
    pending = {r for (r,) in unsent}
    conn.close()
    redrive = {line.split(",")[0] for line in failed.read_text().splitlines()[1:]}
    assert len(pending) >= workers // 2 and pending <= redrive


class Shown:
    """A library caller's progress display: it keeps the counts it is given to show."""

    metrics: Any = None

    def start(self, metrics: Any, title: str) -> None:
        self.metrics = metrics

    def stop(self) -> None:
        return None


@pytest.mark.parametrize("where", ["after", "before"])
def test_ctrl_c_as_a_row_is_put_on_the_workers_queue_counts_it_once(
    smtp_server: SmtpServer,
    tmp_path: Path,
    template_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
):
    import queue
    import threading

    from smartmail.engine import _Job

    # Ctrl-C lands on the caller's thread as the send pass puts its 7th row on the workers'
    # queue: after the row is on it (in the wake-up of a worker), or before.
    real_put, puts = queue.Queue.put, []

    def put(self: Any, item: Any, *args: Any, **kwargs: Any) -> None:
        mine = isinstance(item, _Job) and threading.current_thread() is threading.main_thread()
        if mine:
            puts.append(1)
        if mine and len(puts) == 7 and where == "before":
            raise KeyboardInterrupt
        real_put(self, item, *args, **kwargs)
        if mine and len(puts) == 7:
            raise KeyboardInterrupt

    monkeypatch.setattr(queue.Queue, "put", put)
    n = 20
    csv = make_csv(tmp_path / "r.csv", n)
    db, failed, shown = tmp_path / "state.db", tmp_path / "failed.csv", Shown()
    ledger = Ledger(db, "q")
    ledger.acquire()
    try:
        with pytest.raises(KeyboardInterrupt):
            send_campaign(
                RecipientSource(SourceSpec(str(csv))),
                MessageTemplate.load(template_file),
                get_transport(smtp_server.url, TransportOptions(smtp_security="none")),
                options=SendOptions(workers=4, failed_csv=failed),
                journal=ledger,
                progress=shown,
            )
    finally:
        ledger.close()
    # The re-drive file lists each row the send pass reached and did not send once, and no
    # row the server got (re-driving it would send that one twice); so does the ledger.
    got = set(smtp_server.handler.by_recipient())
    counted = shown.metrics.snapshot()
    assert counted["sent"] == len(got) < n and counted["done"] == n, counted
    redrive = [line.split(",")[0] for line in failed.read_text().splitlines()[1:]]
    assert redrive and len(redrive) == len(set(redrive)), redrive
    assert not set(redrive) & got
    recorded = statuses(db)
    assert {r for r, status in recorded.items() if status == "sent"} == got
    assert {r for r, status in recorded.items() if status == "pending"} == set(redrive)
    assert set(recorded.values()) == {"sent", "pending"}


def test_ctrl_c_inside_a_mark_commit_loses_no_outcome_and_breaks_no_ledger(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path, monkeypatch: pytest.MonkeyPatch
):
    import threading

    from smartmail import ledger as ledger_module

    real_apply, calls = ledger_module._apply, []

    def apply_then_ctrl_c(conn: sqlite3.Connection, batch: list[Any]) -> None:
        # Ctrl-C lands on the caller's thread between the statements and the COMMIT of a
        # batch of marks, which also carries outcomes the workers queued.
        real_apply(conn, batch)
        if threading.current_thread() is threading.main_thread():
            calls.append(len(batch))
            if len(calls) == 6:
                raise KeyboardInterrupt

    monkeypatch.setattr(ledger_module, "_apply", apply_then_ctrl_c)
    n, workers = 60, 4
    csv = make_csv(tmp_path / "r.csv", n)
    db = tmp_path / "state.db"
    with pytest.raises(KeyboardInterrupt):
        send_through(Ledger(db, "k"), smtp_server, csv, template_file, workers=workers)
    monkeypatch.setattr(ledger_module, "_apply", real_apply)
    # Every message the server got is recorded sent (the outcomes in the rolled-back commit
    # were committed later, by close), and nothing is left in doubt.
    first = counts(db, "k")
    assert first.get("sent", 0) == len(smtp_server.handler.received) < n
    assert "sending" not in first
    summary = send_through(Ledger(db, "k"), smtp_server, csv, template_file, workers=workers)
    assert summary.sent == n - first.get("sent", 0)
    assert counts(db, "k") == {"sent": n}
    assert set(per_recipient(smtp_server).values()) == {1} and len(per_recipient(smtp_server)) == n


def test_ctrl_c_at_any_point_of_a_mark_commit_loses_no_statement_queued_by_others(
    tmp_path: Path,
):
    import sys
    import threading

    from smartmail import ledger as ledger_module
    from smartmail.ledger import _ENSURE, _PENDING, _SENDING, _held_lock, _Op, _Writer

    # A signal's exception lands on the caller's thread after any call returns. Try each such
    # point of `commit_now` in turn: whatever other threads queued (outcomes, and a statement
    # someone waits for) is committed in the end, once, and its waiter released.
    where = {
        _Writer.commit_now.__code__,
        _Writer._commit.__code__,
        ledger_module._apply.__code__,
    }
    errors: list[BaseException | None] = []
    hook, threading.excepthook = threading.excepthook, lambda args: errors.append(args.exc_value)
    try:
        point = 0
        while True:
            point += 1
            db = tmp_path / f"{point}.db"
            writer = _Writer(db)  # not started yet: nothing else takes from its queue
            writer.conn = connect(db, shared=True)
            writer.commit_now([_Op(_ENSURE, ("c",), None)])
            others = [
                _Op(_PENDING, ("c", f"o{i}@x.org", i, "{}", "stopped"), None, f"o{i}@x.org")
                for i in range(3)
            ]
            waited = _Op(None, (), _held_lock())  # a flush: its caller blocks on `done`
            writer.ops.extend([others[0], waited, *others[1:]])
            marks = [
                _Op(_SENDING, ("c", f"m{i}@x.org", 10 + i, "{}", f"<{i}@x>"), None, f"m{i}@x.org")
                for i in range(2)
            ]
            returns = 0

            def interrupt(frame: Any, event: str, arg: Any, at: int = point) -> None:
                nonlocal returns
                if event == "c_return" and frame.f_code in where:
                    returns += 1
                    if returns == at:
                        raise KeyboardInterrupt

            sys.setprofile(interrupt)
            try:
                writer.commit_now(marks)
            except KeyboardInterrupt:
                interrupted = True
            else:
                interrupted = False
            finally:
                sys.setprofile(None)
            writer.conn.close()
            writer.conn = None
            writer.start()  # the writer thread commits whatever is left on the queue
            writer.stop()
            writer.join(10)
            assert not writer.is_alive() and not errors, (point, errors)
            assert not writer.ops and all(op.finished for op in [*others, waited]), point
            assert waited.done is not None and waited.done.acquire(timeout=5), point
            conn = connect(db)
            found = dict(conn.execute("SELECT recipient, status FROM deliveries"))
            conn.close()
            assert {k: v for k, v in found.items() if k.startswith("o")} == {
                f"o{i}@x.org": "pending" for i in range(3)
            }, point
            if not interrupted:
                break
        assert point > 5  # the commit had that many points an interrupt could land at
    finally:
        threading.excepthook = hook


@pytest.mark.parametrize("where", ["stop", "wait", "sigterm"])
def test_ctrl_c_as_the_ledger_closes_commits_every_outcome_before_the_lock_is_released(
    smtp_server: SmtpServer,
    tmp_path: Path,
    template_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
):
    import os
    import signal
    import threading
    import time

    from smartmail.ledger import _Writer

    # The last outcomes of a run are committed by close(), on a slow disk here. A library
    # caller's Ctrl-C lands as close asks the writer to stop, or (a real SIGINT) while it
    # waits for that commit. Before, the lock was released at once and the outcomes were
    # still uncommitted: the sent rows were `sending`, in doubt for the next run (and lost
    # for good had the process ended there). "sigterm": a host whose SIGTERM handler raises
    # SystemExit (`sys.exit(143)`, a common one), which must wait for the commit the same way.
    real_stop, real_commit = _Writer.stop, _Writer._commit
    interrupted: list[int] = []

    def stop(self: _Writer) -> None:
        real_stop(self)
        if where == "stop" and not interrupted:
            interrupted.append(1)
            raise KeyboardInterrupt

    def commit(self: _Writer, conn: sqlite3.Connection, batch: list[Any]) -> None:
        if self.stopping and threading.current_thread() is self:
            if where != "stop" and not interrupted:
                interrupted.append(1)
                os.kill(os.getpid(), signal.SIGTERM if where == "sigterm" else signal.SIGINT)
            time.sleep(0.3)
        real_commit(self, conn, batch)

    monkeypatch.setattr(_Writer, "stop", stop)
    monkeypatch.setattr(_Writer, "_commit", commit)
    # The last outcomes must still be queued when close() comes: on a slow machine the
    # writer's idle flush (0.2 s) could commit them first, and nothing would be left to
    # interrupt.
    from smartmail import ledger as ledger_module

    monkeypatch.setattr(ledger_module, "IDLE_FLUSH", 30.0)
    n = 8
    csv = make_csv(tmp_path / "r.csv", n)
    db = tmp_path / "state.db"

    def exit_143(signum: int, frame: object) -> None:
        raise SystemExit(143)

    host = signal.signal(signal.SIGTERM, exit_143) if where == "sigterm" else None
    try:
        with pytest.raises(SystemExit if where == "sigterm" else KeyboardInterrupt):
            send_through(Ledger(db, "c"), smtp_server, csv, template_file, workers=2)
    finally:
        if host is not None:
            signal.signal(signal.SIGTERM, host)
    assert interrupted
    assert counts(db, "c") == {"sent": n}
    code, out = run_cli(["status", "c", "--state", str(db), "--json"])
    shown = json.loads(out)[0]
    assert (code, shown["running"], shown["sent"], shown["in_doubt"]) == (0, False, n, 0), out
    monkeypatch.setattr(_Writer, "stop", real_stop)
    monkeypatch.setattr(_Writer, "_commit", real_commit)
    again = send_through(Ledger(db, "c"), smtp_server, csv, template_file, workers=2)
    assert again.sent == 0 and len(smtp_server.handler.received) == n


def test_a_run_stopped_by_a_ledger_failure_still_accounts_for_every_row(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path, monkeypatch: pytest.MonkeyPatch
):
    import threading

    from smartmail import ledger as ledger_module

    real_apply, calls = ledger_module._apply, []

    def apply_then_fail(conn: sqlite3.Connection, batch: list[Any]) -> None:
        real_apply(conn, batch)
        if threading.current_thread() is threading.main_thread():
            calls.append(1)
            if len(calls) == 4:  # the disk fails as the send pass marks a batch
                raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(ledger_module, "_apply", apply_then_fail)
    n = 60
    csv = make_csv(tmp_path / "r.csv", n)
    db, out = tmp_path / "state.db", tmp_path / "report.json"
    code, text = run_cli(send_args(csv, template_file, smtp_server, db, "--report", str(out)))
    assert code == 5, text
    # The rows the send pass never reached are not sent, and counted so: the summary's
    # counts add up to its rows.
    summary = report(out)
    counted = sum(summary[k] for k in ("sent", "failed", "skipped", "unsent", "lost_replies"))
    assert summary["rows"] == n == counted, {k: v for k, v in summary.items() if k != "campaign"}
    assert summary["sent"] == len(smtp_server.handler.received) < n


def test_rows_read_into_a_batch_when_the_list_turns_out_changed_are_recorded_not_lost(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    class Shrinking(RecipientSource):
        """The list as pre-flight read it (7 rows); 5 rows when the send pass reads it."""

        reads = 0

        def rows(self) -> Any:
            self.reads += 1
            rows = super().rows()
            return rows if self.reads == 1 else itertools.islice(rows, 5)

    csv = make_csv(tmp_path / "r.csv", 7)
    db = tmp_path / "state.db"
    ledger = Ledger(db, "shrunk")
    ledger.acquire()
    try:
        source, template = Shrinking(SourceSpec(str(csv))), MessageTemplate.load(template_file)
        options = SendOptions(workers=4)
        checked = preflight(source, template, options, journal=ledger)
        with pytest.raises(SmartmailError, match="changed during the run"):
            send_campaign(
                source,
                template,
                get_transport(smtp_server.url, TransportOptions(smtp_security="none")),
                options=options,
                journal=ledger,
                checked=checked,
            )
    finally:
        ledger.close()
    # Rows 1-4 went in two batches of two; row 5 was read into the third when the list ran
    # short. It was never sent, and the ledger says so rather than not at all.
    assert len(smtp_server.handler.received) == 4
    conn = sqlite3.connect(db)
    found = dict(conn.execute("SELECT row_number, status FROM deliveries"))
    conn.close()
    assert found == {2: "sent", 3: "sent", 4: "sent", 5: "sent", 6: "pending"}


def test_a_failed_rows_file_that_cannot_be_written_costs_no_row_and_says_so(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    n = 20
    csv = make_csv(tmp_path / "r.csv", n)
    smtp_server.handler.reject_rcpt = {"user3@example.org", "user11@example.org"}
    db = tmp_path / "state.db"
    gone = tmp_path / "gone" / "failed.csv"  # its folder is not there (removed mid-run)
    summary = send_through(
        Ledger(db, "f"), smtp_server, csv, template_file, workers=4, failed_csv=gone
    )
    # Every row still went its way and is recorded; the summary says the file is short.
    assert (summary.sent, summary.failed) == (n - 2, 2)
    assert counts(db, "f") == {"sent": n - 2, "failed": 2}
    assert summary.failed_csv is None
    assert any(str(gone) in w and "2 row(s)" in w for w in summary.warnings), summary.warnings


class StopAtTheDuplicate(Ledger):
    """The real ledger; Ctrl-C lands just as the send pass records a duplicate row skipped."""

    stop: Any = None

    def record(self, outcome: Any) -> None:
        super().record(outcome)
        if outcome.status == "skipped" and outcome.reason == "duplicate recipient":
            self.stop.set()


def test_a_stop_leaves_no_row_in_doubt_whose_duplicate_was_skipped_meanwhile(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    import threading

    from smartmail.ratelimit import TokenBucket

    # One worker at one message every 5 s: row 2 goes at once, row 3 waits for its slot, row
    # 4 is marked and queued behind it; row 5, the same address again, is skipped as a
    # duplicate while row 4 waits, and the stop comes then. Row 4 was never attempted: it goes
    # back to pending like the rows around it, not left in doubt.
    rows = ["y", "x", "a", "a", "b", "c"]
    csv = write(
        tmp_path / "r.csv",
        "email,name,code\n" + "".join(f"{r}@example.org,{r.upper()},C{r}\n" for r in rows),
    )
    db = tmp_path / "state.db"
    stop = threading.Event()
    ledger = StopAtTheDuplicate(db, "dup")
    ledger.stop = stop

    def pause(seconds: float) -> None:  # the run's stop-aware sleep, as `CampaignRun` gives
        stop.wait(seconds)

    ledger.acquire()
    try:
        summary = send_campaign(
            RecipientSource(SourceSpec(str(csv))),
            MessageTemplate.load(template_file),
            get_transport(smtp_server.url, TransportOptions(smtp_security="none")),
            options=SendOptions(workers=1),
            limiter=TokenBucket(0.2, 1, sleep=pause),
            journal=ledger,
            stop=stop,
        )
    finally:
        ledger.close()
    assert [r.rcpt_tos for r in smtp_server.handler.received] == [["y@example.org"]]
    assert summary.sent == 1
    conn = sqlite3.connect(db)
    found = dict(conn.execute("SELECT recipient, status FROM deliveries"))
    conn.close()
    assert found == {
        "y@example.org": "sent",
        "x@example.org": "pending",
        "a@example.org": "pending",  # not `sending`: nobody tried to send it
        "b@example.org": "pending",
        "c@example.org": "pending",
    }


def test_a_retry_of_rows_stored_with_different_columns_exports_every_failure(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    # A column was added to the list between two runs of the campaign, and a row of each run
    # failed: the retry's rows do not all have the same columns. The failed-rows export takes
    # them all, and the send goes on.
    db, csv = tmp_path / "state.db", tmp_path / "r.csv"
    smtp_server.handler.reject_rcpt = {"user1@example.org", "user4@example.org"}
    make_csv(csv, 3)
    assert run_cli(send_args(csv, template_file, smtp_server, db, "--campaign", "c"))[0] == 1
    lines = ["email,name,code,plan"] + [f"user{i}@example.org,User {i},C{i},gold" for i in range(6)]
    write(csv, "\n".join(lines) + "\n")
    assert run_cli(send_args(csv, template_file, smtp_server, db, "--campaign", "c"))[0] == 1
    assert counts(db, "c") == {"sent": 4, "failed": 2}
    failed_csv = tmp_path / "retry-failed.csv"
    code, out = run_cli(
        ["retry", "c", "--state", str(db), "--yes", "--smtp-security", "none",
         "--failed-csv", str(failed_csv)]
    )  # fmt: skip
    assert code == 1, out
    assert counts(db, "c") == {"sent": 4, "failed": 2}
    exported = failed_csv.read_text().splitlines()
    assert exported[0] == "email,name,code,plan,error"
    assert sorted(line.split(",")[:4] for line in exported[1:]) == [
        ["user1@example.org", "User 1", "C00001", ""],
        ["user4@example.org", "User 4", "C4", "gold"],
    ]


def test_a_value_no_utf8_can_hold_in_a_column_the_template_does_not_use_is_recorded(
    tmp_path: Path,
):
    # UTF-7 decodes `+2AA-` to a lone surrogate. In a column no message uses, the row is
    # valid and is sent; the ledger keeps its values all the same (escaped), rather than
    # failing every statement of the commit and stopping the run with nothing recorded.
    csv = write(
        tmp_path / "r.csv",
        "email,name,notes\nuser0@example.org,Ann,ok\nuser1@example.org,Bob,x+2AA-\n"
        "user2@example.org,Cy,ok\n",
    )
    template = write(tmp_path / "t.txt", "From: a@acme.example\nTo: {{ email }}\nSubject: Hi\n\n")
    db, outbox = tmp_path / "state.db", tmp_path / "out"
    args = ["send", str(csv), "-t", str(template), "--encoding", "utf-7", "--transport",
            f"file://{outbox}", "--state", str(db), "--campaign", "u7", "--yes",
            "--progress", "none"]  # fmt: skip
    code, out = run_cli(args)
    assert code == 0, out
    assert len(list(outbox.iterdir())) == 3
    assert counts(db, "u7") == {"sent": 3}
    conn = sqlite3.connect(db)
    stored = dict(conn.execute("SELECT row_number, row_json FROM deliveries"))
    conn.close()
    assert json.loads(stored[3])["notes"] == "x\ud800"


def test_a_failed_row_holding_a_value_no_utf8_can_hold_is_exported(
    smtp_server: SmtpServer, tmp_path: Path
):
    # The same UTF-7 value, in a row the server refuses: the row is failed, in the ledger and
    # in the failed-rows file (the value escaped), and the other rows go on.
    csv = write(
        tmp_path / "r.csv",
        "email,name,notes\nuser0@example.org,Ann,ok\nuser1@example.org,Bob,x+2AA-\n"
        "user2@example.org,Cy,ok\n",
    )
    template = write(tmp_path / "t.txt", "From: a@acme.example\nTo: {{ email }}\nSubject: Hi\n\n")
    smtp_server.handler.reject_rcpt = {"user1@example.org"}
    db = tmp_path / "state.db"
    code, out = run_cli(
        send_args(csv, template, smtp_server, db, "--encoding", "utf-7", "--campaign", "u7")
    )
    assert code == 1, out
    assert counts(db, "u7") == {"sent": 2, "failed": 1}
    exported = (tmp_path / "failed.csv").read_text().splitlines()
    assert exported[1].startswith("user1@example.org,Bob,x\\ud800,"), exported


def test_a_second_lock_on_the_same_campaign_is_refused(tmp_path: Path):
    db = tmp_path / "state.db"
    first = Ledger(db, "weekly")
    first.acquire()
    other = Ledger(db, "monthly")
    other.acquire()  # another campaign is independent
    with pytest.raises(LockedError, match="another smartmail run"):
        Ledger(db, "weekly").acquire()
    first.close()
    again = Ledger(db, "weekly")
    again.acquire()  # released on close
    again.close()
    other.close()


# --- re-runs, retry and status through the CLI --------------------------------------------


def test_rerun_of_a_finished_campaign_sends_nothing(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    csv = make_csv(tmp_path / "r.csv", 12)
    db = tmp_path / "state.db"
    code, _ = run_cli(send_args(csv, template_file, smtp_server, db, "--campaign", "news"))
    assert code == 0 and len(smtp_server.handler.received) == 12
    code, out = run_cli(
        send_args(csv, template_file, smtp_server, db, "--campaign", "news",
                  "--report", str(tmp_path / "again.json"))
    )  # fmt: skip
    assert code == 0
    assert "already sent: 12" in out and "nothing new to send" in out
    assert len(smtp_server.handler.received) == 12
    again = report(tmp_path / "again.json")
    assert (again["sent"], again["skipped"], again["skip_reasons"]) == (0, 12, {"already sent": 12})
    code, out = run_cli(["dry-run", str(csv), "-t", str(template_file), "--state", str(db),
                         "--campaign", "news", "--preview", "0"])  # fmt: skip
    assert code == 0 and "already sent: 12" in out


def test_an_address_in_several_rows_gets_one_message_now_and_none_later(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    csv = write(
        tmp_path / "r.csv",
        "email,name,code\na@x.org,A,1\nb@x.org,B,2\nA@X.org,A again,3\nb@x.org,B again,4\n",
    )
    db = tmp_path / "state.db"
    args = send_args(csv, template_file, smtp_server, db, "--report", str(tmp_path / "r.json"))
    assert run_cli(args)[0] == 0
    assert per_recipient(smtp_server) == {"a@x.org": 1, "b@x.org": 1}
    assert report(tmp_path / "r.json")["skip_reasons"] == {"duplicate recipient": 2}
    code, _ = run_cli(args)
    assert code == 0
    assert report(tmp_path / "r.json")["skip_reasons"] == {"already sent": 4}  # rows, not addresses
    assert per_recipient(smtp_server) == {"a@x.org": 1, "b@x.org": 1}


def test_default_campaign_id_is_stable_across_runs(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path, monkeypatch: pytest.MonkeyPatch
):
    csv = make_csv(tmp_path / "r.csv", 5)
    db = tmp_path / "state.db"
    assert run_cli(send_args(csv, template_file, smtp_server, db, "--limit", "2"))[0] == 0
    # The same file named another way (relative, from its folder) is the same campaign.
    monkeypatch.chdir(tmp_path)
    code, out = run_cli(send_args(Path("r.csv"), template_file, smtp_server, db))
    assert code == 0 and "already sent: 2" in out
    assert per_recipient(smtp_server) == {f"user{i}@example.org": 1 for i in range(5)}


def test_retry_sends_only_the_failed_rows(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    csv = make_csv(tmp_path / "r.csv", 10)
    db = tmp_path / "state.db"
    handler = smtp_server.handler
    handler.reject_rcpt = {"user2@example.org", "user7@example.org"}
    handler.temp_fail_first = 1
    args = send_args(csv, template_file, smtp_server, db, "--campaign", "c", "--workers", "1",
                     "--max-retries", "0")  # fmt: skip
    code, _ = run_cli(args)
    assert code == 1
    assert counts(db, "c") == {"sent": 7, "failed": 3}
    assert len(handler.received) == 7
    # A plain re-run does not hammer the failed addresses: that is what `retry` is for.
    code, out = run_cli(args)
    assert code == 0 and len(handler.received) == 7
    assert "failed before" in out
    handler.reject_rcpt = set()
    code, out = run_cli(["retry", "c", "--state", str(db), "--yes", "--progress", "none",
                         "--report", str(tmp_path / "retry.json")])  # fmt: skip
    assert code == 0, out
    assert report(tmp_path / "retry.json")["sent"] == 3
    assert per_recipient(smtp_server) == {f"user{i}@example.org": 1 for i in range(10)}
    assert counts(db, "c") == {"sent": 10}
    # Nothing left: a report all the same, so a script does not read the last one as this.
    code, out = run_cli(["retry", "c", "--state", str(db), "--yes",
                         "--report", str(tmp_path / "retry.json")])  # fmt: skip
    assert code == 0 and "nothing to retry" in out
    assert report(tmp_path / "retry.json")["sent"] == 0


def test_retry_resends_in_doubt_rows_only_on_request(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    csv = make_csv(tmp_path / "r.csv", 6)
    db = tmp_path / "state.db"
    args = send_args(csv, template_file, smtp_server, db, "--campaign", "d")
    assert run_cli([*args, "--limit", "2"])[0] == 0
    # A run that dies after committing `sending` for two rows and before their outcome:
    # exactly what SIGKILL leaves (the process tests do it for real).
    source = RecipientSource(SourceSpec(str(csv)))
    template = MessageTemplate.load(template_file)
    dying = Ledger(db, "d")
    dying.acquire()
    for row, _ in list(source.rows())[3:5]:
        dying.sending(build(template.render(row, "email")))
    dying.close()
    code, out = run_cli([*args, "--report", str(tmp_path / "r2.json")])
    assert code == 0
    again = report(tmp_path / "r2.json")
    assert (again["sent"], again["in_doubt"]) == (2, 2)
    # Once in the table, as the skip reason naming the command (it wraps at 80 columns).
    assert "in doubt (smartmail retry d --in-doubt" in out and "not sent again" not in out
    assert sorted(per_recipient(smtp_server)) == [f"user{i}@example.org" for i in (0, 1, 2, 5)]
    code, out = run_cli(["status", "d", "--state", str(db), "--json"])
    assert json.loads(out)[0]["in_doubt"] == 2
    code, out = run_cli(["retry", "d", "--in-doubt", "--state", str(db), "--yes",
                         "--progress", "none"])  # fmt: skip
    assert code == 0, out
    assert per_recipient(smtp_server) == {f"user{i}@example.org": 1 for i in range(6)}
    assert counts(db, "d") == {"sent": 6}


def test_suppressed_addresses_are_skipped_by_send_and_dry_run(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    csv = make_csv(tmp_path / "r.csv", 4)
    db = tmp_path / "state.db"
    conn = connect(db)
    SuppressionList(conn).add("User1@Example.org", "bounce")
    SuppressionList(conn).add("user3@example.org", "complaint")
    conn.close()
    code, _ = run_cli(["dry-run", str(csv), "-t", str(template_file), "--state", str(db),
                       "--preview", "0", "--report", str(tmp_path / "dry.json")])  # fmt: skip
    assert code == 0
    assert report(tmp_path / "dry.json")["skip_reasons"] == {"suppressed": 2}
    code, _ = run_cli(send_args(csv, template_file, smtp_server, db, "--campaign", "s",
                                "--report", str(tmp_path / "send.json")))  # fmt: skip
    assert code == 0
    assert sorted(per_recipient(smtp_server)) == ["user0@example.org", "user2@example.org"]
    assert report(tmp_path / "send.json")["skipped"] == 2
    conn = sqlite3.connect(db)
    why = dict(conn.execute("SELECT recipient, last_error FROM deliveries WHERE status='skipped'"))
    conn.close()
    assert why == {
        "user1@example.org": "suppressed: bounce",
        "user3@example.org": "suppressed: complaint",
    }


def test_test_to_runs_leave_the_ledger_alone(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    csv = make_csv(tmp_path / "r.csv", 3)
    db = tmp_path / "state.db"
    args = send_args(csv, template_file, smtp_server, db, "--campaign", "t")
    assert run_cli([*args, "--test-to", "me@example.net"])[0] == 0
    assert per_recipient(smtp_server) == {"me@example.net": 1}
    assert not db.exists()
    assert run_cli(args)[0] == 0
    assert per_recipient(smtp_server)["user0@example.org"] == 1
    assert counts(db, "t") == {"sent": 3}


def test_status_lists_campaigns_with_counts_and_feedback(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    db = tmp_path / "state.db"
    csv = make_csv(tmp_path / "r.csv", 5)
    smtp_server.handler.reject_rcpt = {"user4@example.org"}
    run_cli(send_args(csv, template_file, smtp_server, db, "--campaign", "spring"))
    run_cli(send_args(csv, template_file, smtp_server, db, "--campaign", "autumn", "--limit", "3"))
    conn = sqlite3.connect(db)
    for who, what in (("user0", "delivered"), ("user1", "bounced"), ("user2", "complained")):
        conn.execute(
            "UPDATE deliveries SET feedback = ? WHERE campaign = 'spring' AND recipient = ?",
            (what, f"{who}@example.org"),
        )
    conn.commit()
    conn.close()
    code, out = run_cli(["status", "--state", str(db), "--json"])
    assert code == 0
    by_id = {c["campaign"]: c for c in json.loads(out)}
    spring, autumn = by_id["spring"], by_id["autumn"]
    assert (spring["sent"], spring["failed"], spring["pending"]) == (4, 1, 0)
    assert (spring["delivered"], spring["bounced"], spring["complained"]) == (1, 1, 1)
    assert (autumn["sent"], autumn["pending"], autumn["in_doubt"]) == (3, 2, 0)
    code, out = run_cli(["status", "--state", str(db)])
    assert code == 0
    assert "spring" in out and "autumn" in out and "in doubt" in out and "complained" in out
    # While a run holds the campaign, its `sending` rows are in flight, not in doubt.
    live = Ledger(db, "autumn")
    live.acquire()
    row = next(RecipientSource(SourceSpec(str(csv))).rows())[0]
    live.sending(build(MessageTemplate.load(template_file).render(row, "email")))
    code, out = run_cli(["status", "autumn", "--state", str(db), "--json"])
    (autumn,) = json.loads(out)
    assert (autumn["running"], autumn["in_flight"], autumn["in_doubt"]) == (True, 1, 0)
    code, out = run_cli(["status", "--state", str(db)])
    assert "autumn (running)" in out and "1 sending" in out
    live.close()
    code, out = run_cli(["status", "autumn", "--state", str(db), "--json"])
    assert json.loads(out)[0]["in_doubt"] == 1
    code, out = run_cli(["status", "nosuch", "--state", str(db)])
    assert code == 2 and "no campaign 'nosuch'" in out
    code, out = run_cli(["retry", "nosuch", "--state", str(db)])
    assert code == 2 and "no campaign 'nosuch'" in out


def test_retry_uses_stored_settings_and_the_password_from_the_environment_only(
    tls_smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    assert tls_smtp_server.ca_file is not None
    csv = make_csv(tmp_path / "r.csv", 4)
    db = tmp_path / "state.db"
    tls_smtp_server.handler.reject_rcpt = {"user1@example.org"}
    env = {"SMARTMAIL_SMTP_PASSWORD": SMTP_PASSWORD}
    code, _ = run_cli(
        ["send", str(csv), "-t", str(template_file), "--transport", tls_smtp_server.url,
         "--smtp-user", SMTP_USER, "--smtp-ca-file", tls_smtp_server.ca_file, "--state", str(db),
         "--campaign", "tls", "--yes", "--progress", "none",
         "--failed-csv", str(tmp_path / "f.csv")],
        env=env,
    )  # fmt: skip
    assert code == 1
    tls_smtp_server.handler.reject_rcpt = set()
    code, out = run_cli(["retry", "tls", "--state", str(db), "--yes"], env={})
    assert code == 2 and "SMARTMAIL_SMTP_PASSWORD" in out  # not stored, so not found
    assert len(tls_smtp_server.handler.received) == 3
    code, out = run_cli(["retry", "tls", "--state", str(db), "--yes"], env=env)
    assert code == 0, out
    assert len(tls_smtp_server.handler.received) == 4
    assert SMTP_PASSWORD.encode() not in db.read_bytes()


def test_on_duplicate_all_needs_no_state(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    csv = write(tmp_path / "r.csv", "email,name,code\na@x.org,A,1\na@x.org,A,2\n")
    db = tmp_path / "state.db"
    code, out = run_cli(send_args(csv, template_file, smtp_server, db, "--on-duplicate", "all"))
    assert code == 2 and "--no-state" in out and not smtp_server.handler.received
    code, _ = run_cli(send_args(csv, template_file, smtp_server, db, "--on-duplicate", "all",
                                "--no-state"))  # fmt: skip
    assert code == 0 and len(smtp_server.handler.received) == 2


def test_status_shows_a_campaign_name_as_written_not_as_markup(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    db = tmp_path / "state.db"
    csv = make_csv(tmp_path / "r.csv", 1)
    name = "[bold red]x[/]\x1b[2J"
    assert run_cli(send_args(csv, template_file, smtp_server, db, "--campaign", name))[0] == 0
    code, out = run_cli(["status", "--state", str(db)])
    assert code == 0
    assert "[bold red]x[/]" in out and "\x1b" not in out


@pytest.mark.parametrize("folder", ["runs [/archive]", "a[bold]b"])
def test_status_names_a_state_file_whose_folder_holds_brackets_as_it_is(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path, folder: str
):
    """The title names the state file: a folder such as "runs [/archive]" was read as rich
    markup, a traceback ("closing tag ... has nothing to close"), and "a[bold]b" was shown
    as "ab", a file that is not there."""
    db = tmp_path / folder / "state.db"  # "runs [" and, inside it, "archive]"
    db.parent.mkdir(parents=True)
    csv = make_csv(tmp_path / "r.csv", 1)
    assert run_cli(send_args(csv, template_file, smtp_server, db))[0] == 0
    code, out = run_cli(["status", "--state", str(db)])
    assert code == 0 and f"campaigns in {db}" in out


def _messages(tmp_path: Path, n: int) -> list[Any]:
    csv = make_csv(tmp_path / "list.csv", n)
    template = MessageTemplate.load(
        write(tmp_path / "m.txt", "From: a@acme.example\nSubject: Hi\n\nHi\n")
    )
    source = RecipientSource(SourceSpec(str(csv)))
    return [build(template.render(row, source.to_column)) for row, _ in source.rows()]


def statuses(db: Path) -> dict[str, str]:
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT recipient, status FROM deliveries"))
    finally:
        conn.close()


def test_a_row_marked_ahead_is_durable_before_it_is_sent_and_pending_again_if_never_sent(
    tmp_path: Path,
):
    from smartmail.report import Outcome

    db = tmp_path / "state.db"
    first, second, third = _messages(tmp_path, 3)
    ledger = Ledger(db, "c")
    ledger.acquire()
    try:
        ledger.ahead(second)
        ledger.sending(first)
        # The worker's own row is on disk before it is sent; the next one is on its way.
        assert statuses(db)[first.recipient] == "sending"
        ledger.record(Outcome(first.row, first.recipient, "sent", message_id="p1"))
        ledger.ahead(third)  # marked ahead while `second` would be in flight
        ledger.sending(second)
        assert statuses(db)[second.recipient] == "sending"
        ledger.record(Outcome(second.row, second.recipient, "sent", message_id="p2"))
        # The run stops before `third` is sent: it must not be left in doubt.
        ledger.record(Outcome(third.row, third.recipient, "unsent", reason="interrupted"))
    finally:
        ledger.close()
    assert statuses(db) == {
        first.recipient: "sent",
        second.recipient: "sent",
        third.recipient: "pending",
    }
    again = Ledger(db, "c")
    try:
        assert again.in_doubt == frozenset()
    finally:
        again.close()


def test_rows_the_send_pass_marks_are_durable_at_once_and_pending_again_if_never_sent(
    tmp_path: Path,
):
    from smartmail.report import Outcome

    db = tmp_path / "state.db"
    first, second = _messages(tmp_path, 2)
    ledger = Ledger(db, "c")
    ledger.acquire()
    try:
        ledger.mark([first, second])
        # On disk before mark() returns, both: the workers need not wait for them.
        assert statuses(db) == {first.recipient: "sending", second.recipient: "sending"}
        ledger.sending(first)  # marked already: no second write
        ledger.record(Outcome(first.row, first.recipient, "sent", message_id="p1"))
        ledger.release_ahead()  # an abort before `second` was attempted
    finally:
        ledger.close()
    assert statuses(db) == {first.recipient: "sent", second.recipient: "pending"}
    conn = sqlite3.connect(db)
    try:
        attempts = dict(conn.execute("SELECT recipient, attempts FROM deliveries"))
    finally:
        conn.close()
    assert attempts == {first.recipient: 1, second.recipient: 1}
    again = Ledger(db, "c")
    try:
        assert again.in_doubt == frozenset()
    finally:
        again.close()


def test_marks_made_ahead_and_outcomes_are_all_committed_by_close(tmp_path: Path):
    from smartmail.report import Outcome

    db = tmp_path / "state.db"
    messages = _messages(tmp_path, 40)
    ledger = Ledger(db, "c")
    ledger.acquire()
    try:
        for i, message in enumerate(messages):
            if i + 1 < len(messages):
                ledger.ahead(messages[i + 1])
            ledger.sending(message)
            ledger.record(Outcome(message.row, message.recipient, "sent", message_id=f"p{i}"))
    finally:
        ledger.close()
    assert set(statuses(db).values()) == {"sent"} and len(statuses(db)) == 40


def test_the_writer_lingers_no_longer_than_a_worker_takes_to_need_its_mark(tmp_path: Path):
    """Group commit waits for more statements, but a mark made ahead must be durable by the
    time its worker reaches the row: the wait follows how fast the workers are going."""
    from smartmail.ledger import LINGER

    db = tmp_path / "state.db"
    messages = _messages(tmp_path, 30)
    ledger = Ledger(db, "c")
    ledger.acquire()
    try:
        writer = ledger._writer
        assert writer is not None
        assert writer.linger() == LINGER  # nothing known yet: the longest wait
        for message in messages:  # one worker going as fast as it can
            ledger.sending(message)
        assert writer.linger() < LINGER / 2
        writer.cycle, writer.commit_time = 0.0006, 0.0005  # faster than a commit: no wait
        assert writer.linger() == 0.0
        writer.cycle, writer.commit_time = 0.5, 0.0005  # a slow provider: the longest wait
        assert writer.linger() == LINGER
    finally:
        ledger.close()


def _as_schema_1(db: Path) -> None:
    """Make a state file exactly what schema 1 left on disk: its two full indexes."""
    conn = sqlite3.connect(db)
    conn.executescript(
        "DROP INDEX deliveries_provider; DROP INDEX deliveries_sending;"
        "CREATE INDEX deliveries_provider_id ON deliveries(provider_id);"
        "CREATE INDEX deliveries_status ON deliveries(campaign, status);"
        "PRAGMA user_version=1;"
    )
    conn.close()


def _schema(db: Path) -> tuple[int, set[str]]:
    """The file's schema version and the names of its indexes (SQLite's own left out)."""
    conn = sqlite3.connect(db)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        names = conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        )
        return version, {r[0] for r in names}
    finally:
        conn.close()


def test_a_state_database_made_by_schema_1_is_upgraded_and_keeps_every_record(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    """A user's existing state file: its indexes are replaced in place, nothing recorded is
    lost, and what the old indexes served (in-doubt rows, feedback by provider id) still
    works and uses the new ones."""
    csv = make_csv(tmp_path / "r.csv", 4)
    db = tmp_path / "state.db"
    args = send_args(csv, template_file, smtp_server, db, "--campaign", "old")
    assert run_cli([*args, "--limit", "2"])[0] == 0
    dying = Ledger(db, "old")  # a run that died after marking row 3: in doubt
    dying.acquire()
    row3 = list(RecipientSource(SourceSpec(str(csv))).rows())[2][0]
    dying.sending(build(MessageTemplate.load(template_file).render(row3, "email")))
    dying.close()
    _as_schema_1(db)
    conn = sqlite3.connect(db)
    # Schema 1 kept every SMTP Message-ID as a provider id too; SES's own ids are what
    # feedback names, so one such id stands for a delivery made through SES.
    provider_id = "0100018c-ses-id-0"
    conn.execute(
        "UPDATE deliveries SET provider_id = ? WHERE recipient = 'user0@example.org'",
        (provider_id,),
    )
    conn.commit()
    conn.close()

    upgraded = connect(db)
    indexes = {r[0] for r in upgraded.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert upgraded.execute("PRAGMA user_version").fetchone()[0] == 2
    assert {"deliveries_provider", "deliveries_sending"} <= indexes
    assert not indexes & {"deliveries_provider_id", "deliveries_status"}
    plan = upgraded.execute(
        "EXPLAIN QUERY PLAN SELECT 1 FROM deliveries WHERE provider_id = ? AND recipient = ?",
        (provider_id, "user0@example.org"),
    ).fetchall()
    assert "deliveries_provider" in str([tuple(r) for r in plan])
    assert SqliteFeedback(upgraded).mark(provider_id, "user0@example.org", "bounced") == 1
    upgraded.commit()
    upgraded.close()
    assert counts(db, "old") == {"sent": 2, "sending": 1, "pending": 1}

    code, out = run_cli(["status", "old", "--state", str(db), "--json"])
    assert (json.loads(out)[0]["in_doubt"], json.loads(out)[0]["bounced"]) == (1, 1)
    assert run_cli([*args, "--report", str(tmp_path / "r2.json")])[0] == 0
    again = report(tmp_path / "r2.json")
    assert (again["sent"], again["in_doubt"]) == (1, 1)
    code, out = run_cli(["retry", "old", "--in-doubt", "--state", str(db), "--yes",
                         "--progress", "none"])  # fmt: skip
    assert code == 0, out
    assert per_recipient(smtp_server) == {f"user{i}@example.org": 1 for i in range(4)}
    assert counts(db, "old") == {"sent": 4}


def test_a_schema_1_state_database_this_user_may_only_read_still_shows_its_status(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    """`status` only reads. Before schema 2 it showed a state file this user may not write (a
    copy made read-only, another user's ledger); the upgrade it cannot make must not turn
    that into "cannot open the state database": schema 1 differs only by its indexes."""
    import shutil

    from .unprivileged import unprivileged

    csv = make_csv(tmp_path / "r.csv", 3)
    db = tmp_path / "state.db"
    assert run_cli(send_args(csv, template_file, smtp_server, db, "--campaign", "old"))[0] == 0
    _as_schema_1(db)

    def body(folder: Path) -> None:
        copy = folder / "state.db"
        shutil.copy(db, copy)
        copy.chmod(0o444)
        code, out = run_cli(["status", "old", "--state", str(copy), "--json"])
        assert code == 0, out
        assert (json.loads(out)[0]["sent"], json.loads(out)[0]["in_doubt"]) == (3, 0)
        code, out = run_cli(["status", "--state", str(copy)])
        assert code == 0 and "old" in out, out
        assert sqlite3.connect(copy).execute("PRAGMA user_version").fetchone()[0] == 1

    unprivileged(body)


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["status"], "old"),
        (["status", "old", "--json"], '"sent": 2'),
        (["dry-run", "CSV", "-t", "TEMPLATE", "--campaign", "old", "--preview", "0"],
         "already sent: 2"),
        (["suppress", "list", "--json"], "user2@example.org"),
        (["suppress", "export", "-"], "user2@example.org,manual"),
        (["retry", "nope", "--yes", "--progress", "none"], "no campaign 'nope'"),
    ],
    ids=["status", "status-json", "dry-run", "suppress-list", "suppress-export", "retry-unknown"],
)  # fmt: skip
def test_a_command_that_only_reads_leaves_a_schema_1_state_database_to_the_older_smartmail(
    smtp_server: SmtpServer,
    tmp_path: Path,
    template_file: Path,
    command: list[str],
    expected: str,
):
    """An older smartmail refuses a file a newer one upgraded ("made by a newer smartmail"),
    so an operator trying the new version's `status` once stopped the cron job still running
    the old one. Only a command that writes may upgrade; one that only reads shows the old
    file's records and leaves its schema as it was."""
    csv = make_csv(tmp_path / "r.csv", 3)
    db = tmp_path / "state.db"
    assert run_cli([*send_args(csv, template_file, smtp_server, db, "--campaign", "old"),
                    "--limit", "2"])[0] == 0  # fmt: skip
    assert run_cli(["suppress", "add", "user2@example.org", "--state", str(db)])[0] == 0
    _as_schema_1(db)
    before = _schema(db)
    args = [{"CSV": str(csv), "TEMPLATE": str(template_file)}.get(a, a) for a in command]

    code, out = run_cli([*args, "--state", str(db)])

    assert expected in out, out
    assert code == (2 if command[0] == "retry" else 0), out
    assert before[0] == 1 and {"deliveries_provider_id", "deliveries_status"} <= before[1]
    assert _schema(db) == before
    # The first command that writes upgrades it, as before.
    assert run_cli(send_args(csv, template_file, smtp_server, db, "--campaign", "old"))[0] == 0
    version, indexes = _schema(db)
    assert version == 2 and {"deliveries_provider", "deliveries_sending"} <= indexes
    assert not indexes & {"deliveries_provider_id", "deliveries_status"}


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["status"], "(no such file)"),  # a mistyped --state says so
        (["status", "nope"], "no campaign 'nope' in"),
        (["suppress", "list"], "(no such file)"),
        (["suppress", "export", "-"], "email,reason,detail,created_at"),
        (["retry", "nope", "--yes", "--progress", "none"], "no campaign 'nope' in"),
    ],
    ids=["status", "status-unknown", "suppress-list", "suppress-export", "retry-unknown"],
)
def test_a_command_that_only_reads_makes_no_state_file_where_there_is_none(
    tmp_path: Path, command: list[str], expected: str
):
    """A file made there would have this smartmail's schema, which the older smartmail that
    later comes to use that path (a cron job not moved over yet) refuses; `status` and
    `dry-run` already made none. There is nothing to read: an empty list, no such campaign."""
    db = tmp_path / "state" / "smartmail.db"

    code, out = run_cli([*command, "--state", str(db)])

    assert code == (2 if "nope" in command else 0), out
    assert expected in out
    assert "nope" not in command or "(no such file)" in out
    assert not db.parent.exists()


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["status", "--json"],
        ["dry-run", "CSV", "-t", "TEMPLATE", "--preview", "0"],
        ["suppress", "list"],
        ["suppress", "export", "-"],
        ["retry", "nope", "--yes", "--progress", "none"],
    ],
    ids=["status", "status-json", "dry-run", "suppress-list", "suppress-export", "retry-unknown"],
)
def test_a_command_that_only_reads_leaves_an_empty_state_file_empty(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path, command: list[str]
):
    """An empty file (`touch`, or `install -m600 /dev/null` before the first cron run) was
    given this smartmail's schema by `status`: the older smartmail meant to use it then
    refused it. It reads as an empty state; the first send makes it a ledger."""
    csv = make_csv(tmp_path / "r.csv", 2)
    db = tmp_path / "state.db"
    db.touch()
    args = [{"CSV": str(csv), "TEMPLATE": str(template_file)}.get(a, a) for a in command]

    code, out = run_cli([*args, "--state", str(db)])

    assert code == (2 if command[0] == "retry" else 0), out
    assert db.stat().st_size == 0 and sorted(p.name for p in tmp_path.iterdir()) == [
        "msg.txt",
        "r.csv",
        "state.db",
    ]
    assert run_cli(send_args(csv, template_file, smtp_server, db))[0] == 0
    assert _schema(db)[0] == 2


def test_a_flush_while_the_ledger_closes_returns_only_once_every_outcome_is_committed(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path, monkeypatch: pytest.MonkeyPatch
):
    """A second Ctrl-C at the CLI flushes the ledger and then ends the process at once. When
    it lands as the run's own close() commits the last outcomes, that flush returned at once
    (close had already let go of the writer) and the process ended before the commit: rows
    counted as sent on screen stayed `sending`, in doubt."""
    import threading
    import time

    from smartmail.ledger import _Writer
    from smartmail.report import Outcome

    real_commit = _Writer._commit

    def slow_last_commit(self: _Writer, conn: sqlite3.Connection, batch: list[Any]) -> None:
        if self.stopping and threading.current_thread() is self:
            time.sleep(0.5)  # a slow disk under the final commit
        real_commit(self, conn, batch)

    csv = make_csv(tmp_path / "r.csv", 4)
    db = tmp_path / "state.db"
    template = MessageTemplate.load(template_file)
    rows = [row for row, _ in RecipientSource(SourceSpec(str(csv))).rows()]
    ledger = Ledger(db, "c")
    ledger.acquire()
    messages = [build(template.render(row, "email")) for row in rows]
    ledger.mark(messages)
    for message in messages:
        ledger.sending(message)
        ledger.record(
            Outcome(row=message.row, recipient=message.recipient, status="sent", message_id="<p>")
        )
    monkeypatch.setattr(_Writer, "_commit", slow_last_commit)
    closing = threading.Thread(target=ledger.close)
    closing.start()
    try:
        deadline = time.monotonic() + 5
        while ledger._writer is not None and time.monotonic() < deadline:
            time.sleep(0.005)  # close() has taken the writer and waits for its last commit
        ledger.flush()  # what the abort does before it ends the process
        assert counts(db, "c") == {"sent": 4}
    finally:
        closing.join(10)


def test_a_forked_child_closing_the_parents_ledger_neither_hangs_nor_unlocks_the_campaign(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    """multiprocessing forks by default on Linux: a child that closes (leaving a `with` block) a
    ledger its parent acquired must not free the parent's campaign lock, which would let a
    second run send the same campaign at once, nor hang waiting for a writer thread that
    does not exist in the child."""
    import os
    import signal

    db = tmp_path / "state.db"
    ledger = Ledger(db, "c")
    ledger.acquire()
    pid = os.fork()
    if pid == 0:  # the child: report how close() went in the exit status, never return
        signal.alarm(5)  # a hang ends the child with SIGALRM
        try:
            ledger.close()
            os._exit(0)
        except BaseException as exc:
            os.write(2, f"child close: {exc!r}\n".encode())
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    with pytest.raises(LockedError):  # the parent's run still holds the campaign
        Ledger(db, "c").acquire()
    csv = make_csv(tmp_path / "r.csv", 2)
    template = MessageTemplate.load(template_file)
    row = next(RecipientSource(SourceSpec(str(csv))).rows())[0]
    ledger.sending(build(template.render(row, "email")))  # and its ledger still records
    ledger.close()
    assert counts(db, "c") == {"sending": 1}
    again = Ledger(db, "c")
    again.acquire()  # released by the parent's own close
    again.close()


class InterruptedAsItCloses(Ledger):
    """The real ledger; Ctrl-C (a library caller's KeyboardInterrupt) lands the moment close()
    has let go of its writer, before it commits the last outcomes and unlocks the campaign."""

    closing = False

    def close(self) -> None:
        self.closing = True
        super().close()

    @property
    def _writer(self) -> Any:
        return self.__dict__["_writer"]

    @_writer.setter
    def _writer(self, writer: Any) -> None:
        self.__dict__["_writer"] = writer
        if writer is None and self.closing and not self.__dict__.get("interrupted"):
            self.__dict__["interrupted"] = True
            raise KeyboardInterrupt


def test_ctrl_c_just_as_the_ledger_lets_go_of_its_writer_still_records_and_unlocks(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    """Landing between close() letting go of the writer and its commit, the interrupt skipped
    both the commit and the unlock: the next run of the campaign was refused as locked (by a
    process that had given up on it), and the outcomes still queued could be lost."""
    n = 6
    csv = make_csv(tmp_path / "r.csv", n)
    db = tmp_path / "state.db"
    ledger = InterruptedAsItCloses(db, "c")
    with pytest.raises(KeyboardInterrupt):
        send_through(ledger, smtp_server, csv, template_file, workers=2)
    assert ledger.__dict__.get("interrupted")
    assert counts(db, "c") == {"sent": n}
    code, out = run_cli(["status", "c", "--state", str(db), "--json"])
    shown = json.loads(out)[0]
    assert (code, shown["running"], shown["sent"], shown["in_doubt"]) == (0, False, n, 0), out
    again = send_through(Ledger(db, "c"), smtp_server, csv, template_file, workers=2)
    assert again.sent == 0 and len(smtp_server.handler.received) == n


def _send_failing_to_record(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> tuple[Path, list[str], int, str]:
    """A send through the CLI whose ledger fails once it has marked a few rows."""
    csv = make_csv(tmp_path / "r.csv", 30)
    db = tmp_path / "state.db"
    args = send_args(csv, template_file, smtp_server, db, "--campaign", "c", "--workers", "2")
    code, text = run_cli(args)
    return db, args, code, text


def _assert_stopped_and_unlocked(db: Path, code: int, text: str) -> None:
    assert code == 5, text
    shown = json.loads(run_cli(["status", "c", "--state", str(db), "--json"])[1])[0]
    assert shown["running"] is False, shown  # the campaign is free for the next run
    again = Ledger(db, "c")
    again.acquire()
    again.close()


def test_a_database_error_while_recording_is_reported_as_the_databases_own(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    # A real SQLite error from the state database: a trigger refusing the `sent` outcomes,
    # as a full disk refuses a write.
    db = tmp_path / "state.db"
    connect(db).close()
    conn = sqlite3.connect(db)
    conn.execute(
        "CREATE TRIGGER full BEFORE UPDATE OF status ON deliveries WHEN NEW.status = 'sent' "
        "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
    )
    conn.commit()
    conn.close()
    _db, _args, code, text = _send_failing_to_record(smtp_server, tmp_path, template_file)
    assert "could not record" in text and "(database or disk is full)" in text, text
    assert "internal error" not in text
    _assert_stopped_and_unlocked(db, code, text)


def test_a_bug_while_recording_is_reported_as_an_internal_error_with_its_type(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path, monkeypatch: pytest.MonkeyPatch
):
    """A programming error in the writer was reported as "could not record outcomes
    (unsupported operand ...)", which reads as a database problem: the user goes to check a
    disk that is fine. It says it is an internal error, and which."""
    from smartmail import ledger as ledger_module

    real_apply = ledger_module._apply

    def apply_with_a_bug(conn: sqlite3.Connection, batch: list[Any]) -> None:
        # At the first `sent` outcome, so a message has surely gone (exit 5, not 2): a count
        # of commits depends on how the machine schedules the threads.
        if any(op.sql is ledger_module._SENT_MINE for op in batch):
            raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")
        real_apply(conn, batch)

    monkeypatch.setattr(ledger_module, "_apply", apply_with_a_bug)
    db, _args, code, text = _send_failing_to_record(smtp_server, tmp_path, template_file)
    assert "internal error: TypeError: unsupported operand" in text, text
    _assert_stopped_and_unlocked(db, code, text)


def test_a_campaign_whose_id_holds_controls_is_named_back_as_status_shows_it(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    """The id comes from the file's name; the operator copies it from `status` to retry."""
    csv = make_csv(tmp_path / "ev\x1b[31mil\u202e\u200bx000.csv", 3)
    db = tmp_path / "state.db"
    smtp_server.handler.reject_rcpt = {"user1@example.org"}
    args = send_args(csv, template_file, smtp_server, db, "--max-retries", "0")
    assert run_cli(args)[0] == 1
    code, out = run_cli(["status", "--state", str(db), "--json"])
    (raw,) = [c["campaign"] for c in json.loads(out)]
    shown = printable(raw)
    assert shown != raw and shown.startswith("ev\\x1b[31mil\\u202e\\u200bx000-")
    code, out = run_cli(["status", "--state", str(db)])
    assert code == 0 and shown in out
    code, out = run_cli(["status", shown, "--state", str(db), "--json"])
    assert code == 0, out
    assert [c["campaign"] for c in json.loads(out)] == [raw]
    smtp_server.handler.reject_rcpt = set()
    code, out = run_cli(["retry", shown, "--state", str(db), "--yes", "--progress", "none"])
    assert code == 0, out
    assert per_recipient(smtp_server) == {f"user{i}@example.org": 1 for i in range(3)}
    assert counts(db, raw) == {"sent": 3}


def test_a_name_that_several_campaigns_show_as_is_refused_as_ambiguous(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    db = tmp_path / "state.db"
    csv = make_csv(tmp_path / "r.csv", 1)
    # Both print as \x1b\x1b: one ESC then the text "\x1b", and the text then an ESC.
    for name in ("\x1b\\x1b", "\\x1b\x1b"):
        assert run_cli(send_args(csv, template_file, smtp_server, db, "--campaign", name))[0] == 0
    for command in ("status", "retry"):
        code, out = run_cli([command, "\\x1b\\x1b", "--state", str(db)])
        assert code != 0
        assert "2 campaigns" in out and "show as" in out
    # None shows that way: the plain "no campaign" error, as before.
    code, out = run_cli(["retry", "nope", "--state", str(db)])
    assert code != 0 and "no campaign 'nope'" in out


@pytest.mark.parametrize("resend", ["failed", "in-doubt"])
def test_a_retry_that_stops_leaves_the_rows_it_did_not_get_to_for_the_next_retry(
    tmp_path: Path, resend: str
):
    """They went back to `pending` (a review: Ctrl-C during `retry --in-doubt`): no later
    `retry` sent them, only a `send` of the whole list would have."""
    from smartmail.report import Outcome

    db = tmp_path / "state.db"
    first, second, third = _messages(tmp_path, 3)
    before = Ledger(db, "c")
    before.acquire()
    try:  # a first run: every row failed, or every row left in doubt
        before.mark([first, second, third])
        for message in (first, second, third):
            before.sending(message)
            if resend == "failed":
                outcome = Outcome(message.row, message.recipient, "failed", reason="550 no")
                before.record(outcome)
    finally:
        before.close()
    ledger = Ledger(db, "c", resend=resend)  # type: ignore[arg-type]
    ledger.acquire()
    try:
        ledger.mark([first, second, third])
        ledger.sending(first)
        ledger.record(Outcome(first.row, first.recipient, "sent", message_id="p1"))
        ledger.record(Outcome(second.row, second.recipient, "unsent", reason="interrupted"))
        ledger.release_ahead()  # and `third`, marked ahead, never attempted either
    finally:
        ledger.close()
    left = "failed" if resend == "failed" else "sending"
    assert statuses(db) == {first.recipient: "sent", second.recipient: left, third.recipient: left}
    if resend == "failed":
        conn = sqlite3.connect(db)
        try:
            errors = dict(conn.execute("SELECT recipient, last_error FROM deliveries"))
        finally:
            conn.close()
        assert errors[third.recipient] == "550 no"  # its own failure, not "interrupted"
    from smartmail.state_store import SqliteState

    state = SqliteState(db)
    try:  # what the next `retry` (or `retry --in-doubt`) sends
        rows = state.retry_rows("c", resend)  # type: ignore[arg-type]
    finally:
        state.close()
    assert {row.number for row in rows} == {second.row.number, third.row.number}
