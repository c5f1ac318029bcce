"""An outage stops the run; it does not fail the list.

Problems of the server, not of a row (a 554 greeting, a refused sender, a TLS mismatch, nothing
listening), stop the run with exit 4 and leave every row unsent (`pending` in the ledger), so
the next run, against a working server, sends each exactly once. Real CLI, real SQLite ledger,
aiosmtpd and scripted raw-socket servers on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import Envelope, Session

from smartmail import (
    MessageTemplate,
    RecipientSource,
    RetryPolicy,
    SendOptions,
    SourceSpec,
    send_campaign,
)
from smartmail.errors import EXIT_SOME_FAILED, EXIT_STOPPED
from smartmail.transports import TransportOptions, get_transport

from .conftest import RecordingHandler, SmtpServer, _start, free_port, make_csv
from .test_ledger import counts, per_recipient, report, run_cli

ROWS = 6
LIMIT = 30.0  # a bound on how long a stop may take: a loop bound, not a measurement


@dataclass
class Scripted:
    """A raw-socket 'SMTP server' that greets with `greeting` (None: closes at once)."""

    greeting: str | None
    sock: socket.socket = field(default_factory=socket.socket)
    accepted: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.sock.getsockname()[1]}"

    def serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            with conn:
                if self.greeting is not None:
                    conn.sendall(self.greeting.encode() + b"\r\n")
                    conn.settimeout(1.0)
                    with contextlib.suppress(OSError):  # smtplib sends QUIT; read it, close
                        conn.recv(1024)


@pytest.fixture
def scripted() -> Iterator[Any]:
    servers: list[Scripted] = []

    threads: list[threading.Thread] = []

    def start(greeting: str | None) -> Scripted:
        server = Scripted(greeting)
        server.sock.bind(("127.0.0.1", 0))
        server.sock.listen(64)
        threads.append(threading.Thread(target=server.serve, daemon=True))
        threads[-1].start()
        servers.append(server)
        return server

    yield start
    for server, thread in zip(servers, threads, strict=True):
        server.done.set()
        thread.join(LIMIT)
        server.sock.close()


@dataclass
class RefuseSender(RecordingHandler):
    async def handle_MAIL(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        return "550 5.7.1 <news@acme.example>: Sender address rejected: blocked"


def cli_send(url: str, csv: Path, template: Path, db: Path, *extra: str) -> tuple[int, str]:
    return run_cli([
        "send", str(csv), "-t", str(template), "--transport", url, "--state", str(db),
        "--campaign", "c", "--yes", "--progress", "none", "--retry-wait", "0.01",
        "--failed-csv", str(db.parent / "failed.csv"), "--report", str(db.parent / "r.json"),
        *extra,
    ])  # fmt: skip


def assert_stopped_all_unsent(code: int, out: str, db: Path, why: str) -> None:
    assert code == EXIT_STOPPED, out
    summary = report(db.parent / "r.json")
    assert (summary["sent"], summary["failed"], summary["unsent"]) == (0, 0, ROWS)
    assert summary["stopped"] and why in summary["stopped"]
    assert counts(db, "c") == {"pending": ROWS}


def assert_next_run_sends_all_once(good: SmtpServer, csv: Path, template: Path, db: Path) -> None:
    code, out = cli_send(good.url, csv, template, db, "--smtp-security", "none")
    assert code == 0, out
    assert per_recipient(good) == {f"user{i}@example.org": 1 for i in range(ROWS)}
    assert counts(db, "c") == {"sent": ROWS}


def test_554_at_the_greeting_stops_at_once(
    scripted: Any, smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    blocked = scripted("554 5.7.1 Service unavailable; client host blocked using zen.example")
    csv, db = make_csv(tmp_path / "r.csv", ROWS), tmp_path / "state.db"
    code, out = cli_send(blocked.url, csv, template_file, db, "--smtp-security", "none")
    assert_stopped_all_unsent(code, out, db, "554")
    assert blocked.accepted <= 4  # one per worker at most; nothing retried
    assert_next_run_sends_all_once(smtp_server, csv, template_file, db)


def test_nothing_listening_stops_in_a_few_attempts(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    dead = f"smtp://127.0.0.1:{free_port()}"
    csv, db = make_csv(tmp_path / "r.csv", ROWS), tmp_path / "state.db"
    started = time.monotonic()
    code, out = cli_send(dead, csv, template_file, db, "--smtp-security", "none")
    assert time.monotonic() - started < LIMIT
    assert_stopped_all_unsent(code, out, db, "could not reach")
    assert_next_run_sends_all_once(smtp_server, csv, template_file, db)


def test_consecutive_connection_failures_trip_the_breaker_across_workers(
    scripted: Any, tmp_path: Path, template_file: Path
) -> None:
    """A server that accepts TCP and closes at once: counted, and the run stops at the limit."""
    mute = scripted(None)
    csv = make_csv(tmp_path / "r.csv", 40)
    summary = send_campaign(
        RecipientSource(SourceSpec(str(csv))),
        MessageTemplate.load(template_file),
        get_transport(mute.url, TransportOptions(smtp_security="none", timeout=2.0)),
        options=SendOptions(workers=4, max_connect_failures=3),
        retry=RetryPolicy(max_retries=10, initial=0.0, maximum=0.0, jitter=0.0),
    )
    assert summary.stopped and "3 sends could not reach the provider in a row" in summary.stopped
    assert (summary.sent, summary.failed, summary.unsent) == (0, 0, 40)
    # Three failures trip it; workers already mid-attempt may add one each, never 40 x 11.
    assert 3 <= mute.accepted <= 3 + 4


def test_tls_against_a_plain_server_stops(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    csv, db = make_csv(tmp_path / "r.csv", ROWS), tmp_path / "state.db"
    code, out = cli_send(smtp_server.url, csv, template_file, db, "--smtp-security", "tls")
    assert_stopped_all_unsent(code, out, db, "TLS handshake failed")
    assert smtp_server.handler.received == []
    assert_next_run_sends_all_once(smtp_server, csv, template_file, db)


def test_starttls_not_offered_stops(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    csv, db = make_csv(tmp_path / "r.csv", ROWS), tmp_path / "state.db"
    code, out = cli_send(smtp_server.url, csv, template_file, db)  # default: starttls
    assert_stopped_all_unsent(code, out, db, "does not offer STARTTLS")
    assert_next_run_sends_all_once(smtp_server, csv, template_file, db)


def test_5xx_to_mail_from_stops(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    handler = RefuseSender()
    controller = _start(handler)
    try:
        refusing = f"smtp://127.0.0.1:{controller.port}"
        csv, db = make_csv(tmp_path / "r.csv", ROWS), tmp_path / "state.db"
        code, out = cli_send(refusing, csv, template_file, db, "--smtp-security", "none")
        assert_stopped_all_unsent(code, out, db, "refuses the sender")
        assert handler.received == []
    finally:
        controller.stop()
    assert_next_run_sends_all_once(smtp_server, csv, template_file, db)


@dataclass
class RefuseSenderAfter(RecordingHandler):
    """Takes `accept` messages, then refuses the sender (a stop) and removes `remove`, the
    folder of the run's --report, as someone tidying up during a long run would."""

    accept: int = 2
    remove: Path | None = None

    async def handle_MAIL(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if len(self.received) < self.accept:
            envelope.mail_from = address
            envelope.mail_options.extend(options)
            return "250 OK"
        if self.remove is not None:
            shutil.rmtree(self.remove, ignore_errors=True)
        return "550 5.7.1 <news@acme.example>: Sender address rejected: blocked"


def test_a_report_not_written_after_a_stop_that_followed_sends_is_exit_5_not_4(
    tmp_path: Path, template_file: Path
) -> None:
    # Exit 4 tells a cron wrapper "the provider stopped it, the next run sends the rest"; it
    # must also learn that the report it reads next is not this run's, as 5 says (and as it
    # does over 130/143). Before, the stop's 4 hid the report that was not written.
    handler = RefuseSenderAfter(remove=tmp_path / "reports")
    controller = _start(handler)
    report_path = tmp_path / "reports" / "r.json"
    report_path.parent.mkdir()
    try:
        csv, db = make_csv(tmp_path / "r.csv", ROWS), tmp_path / "state.db"
        code, out = cli_send(
            f"smtp://127.0.0.1:{controller.port}", csv, template_file, db,
            "--smtp-security", "none", "--workers", "1", "--report", str(report_path),
        )  # fmt: skip
    finally:
        controller.stop()
    assert code == 5, out
    assert "refuses the sender" in out and "cannot write the report" in out, out
    assert len(handler.received) == 2 and not report_path.exists()
    assert counts(db, "c") == {"sent": 2, "pending": ROWS - 2}


def test_a_row_whose_retries_run_out_while_the_server_takes_others_is_failed(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    """Transient trouble of one row while the server takes others is not an outage."""
    smtp_server.handler.data_replies = ["451 4.3.0 try again"] * 2  # one row, both attempts
    csv, db = make_csv(tmp_path / "r.csv", ROWS), tmp_path / "state.db"
    code, out = cli_send(smtp_server.url, csv, template_file, db, "--smtp-security", "none",
                         "--workers", "1", "--max-retries", "1")  # fmt: skip
    assert code == EXIT_SOME_FAILED, out
    summary = report(tmp_path / "r.json")
    assert (summary["sent"], summary["failed"], summary["unsent"]) == (ROWS - 1, 1, 0)
    assert summary["stopped"] is None


def test_max_connect_failures_option(scripted: Any, tmp_path: Path, template_file: Path) -> None:
    mute = scripted(None)
    csv, db = make_csv(tmp_path / "r.csv", ROWS), tmp_path / "state.db"
    code, out = cli_send(mute.url, csv, template_file, db, "--smtp-security", "none",
                         "--max-connect-failures", "2", "--max-retries", "10",
                         "--workers", "1")  # fmt: skip
    assert_stopped_all_unsent(code, out, db, "2 sends could not reach the provider in a row")
    assert mute.accepted == 2


@dataclass
class HangUpAtEhlo(RecordingHandler):
    """Hangs up at EHLO on the connections numbered in `hang_up` (counted from 1)."""

    hang_up: set[int] = field(default_factory=set)
    ehlos: int = 0

    async def handle_EHLO(
        self, server: Any, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        self.ehlos += 1
        if self.ehlos in self.hang_up:
            server.transport.abort()
        return await super().handle_EHLO(server, session, envelope, hostname, responses)


def test_a_row_that_cannot_connect_while_others_get_through_is_failed_not_a_stop(
    tmp_path: Path, template_file: Path
) -> None:
    """Connection trouble of one worker while another keeps sending is not an outage."""
    handler = HangUpAtEhlo(hang_up={2, 3, 4})  # the second worker's three attempts
    controller = _start(handler)
    try:
        summary = send_campaign(
            RecipientSource(SourceSpec(str(make_csv(tmp_path / "r.csv", 300)))),
            MessageTemplate.load(template_file),
            get_transport(
                f"smtp://127.0.0.1:{controller.port}", TransportOptions(smtp_security="none")
            ),
            options=SendOptions(workers=2, max_connect_failures=10),
            retry=RetryPolicy(max_retries=2, initial=0.05, maximum=0.05, jitter=0.0),
        )
    finally:
        controller.stop()
    assert summary.stopped is None
    assert (summary.sent, summary.failed, summary.unsent) == (299, 1, 0)
    assert list(summary.failure_reasons) == ["gave up after retries"]
