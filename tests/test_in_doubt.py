"""At most once, really: a reply lost after the whole message was handed over is *in doubt*.

Real aiosmtpd servers that keep a message and then drop the connection before their 250, the
real CLI, the real SQLite ledger. Retrying such a message could deliver it twice, so it is never
retried; it stays `sending` in the ledger (as a crash leaves it) until `retry --in-doubt`.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import Envelope, Session

from smartmail import (
    MessageTemplate,
    RecipientSource,
    RetryPolicy,
    SendOptions,
    SourceSpec,
    send_campaign,
)
from smartmail.errors import InDoubtError
from smartmail.transports import TransportOptions, get_transport

from .conftest import (
    SMTP_PASSWORD,
    SMTP_USER,
    RecordingHandler,
    SmtpServer,
    _authenticator,
    _start,
    make_csv,
)
from .test_ledger import counts, per_recipient, report, run_cli, send_args

NO_WAIT = RetryPolicy(max_retries=3, initial=0.0, maximum=0.0, jitter=0.0)


@dataclass
class DropAfterData(RecordingHandler):
    """Keeps the message (it counts as delivered), then drops the connection before the 250.

    `drop_for`: the recipients whose messages are dropped this way, each once.
    """

    drop_for: set[str] | None = None

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        targets = self.drop_for or set()
        hit = [r for r in envelope.rcpt_tos if r.lower() in targets]
        if reply.startswith("250") and hit:
            targets.difference_update(r.lower() for r in hit)
            server.transport.abort()
        return reply


@dataclass
class SlowAfterData(RecordingHandler):
    """Keeps the message, then answers only after the client's timeout has passed."""

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        if len(self.received) == 1:
            await asyncio.sleep(1.0)
        return reply


@dataclass
class DropAtRcpt(RecordingHandler):
    """Drops the connection at the first RCPT: before the dot, so nothing was handed over."""

    dropped: bool = False

    async def handle_RCPT(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if not self.dropped:
            self.dropped = True
            server.transport.abort()
        return await super().handle_RCPT(server, session, envelope, address, options)


@pytest.fixture
def dropping_server() -> Iterator[SmtpServer]:
    handler = DropAfterData(drop_for={"user1@example.org"})
    controller = _start(handler)
    try:
        yield SmtpServer(controller.hostname, controller.port, handler)
    finally:
        controller.stop()


def test_no_retry_policy_retries_an_in_doubt_error() -> None:
    calls: list[int] = []

    def attempt() -> str:
        calls.append(1)
        raise InDoubtError("answer lost")

    with pytest.raises(InDoubtError):
        RetryPolicy(max_retries=5, initial=0.0, maximum=0.0, jitter=0.0).call(attempt)
    assert len(calls) == 1


def test_lost_reply_after_the_dot_is_in_doubt_and_never_retried(
    dropping_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    csv = make_csv(tmp_path / "r.csv", 4)
    summary = send_campaign(
        RecipientSource(SourceSpec(str(csv))),
        MessageTemplate.load(template_file),
        get_transport(dropping_server.url, TransportOptions(smtp_security="none")),
        options=SendOptions(workers=2),
        retry=NO_WAIT,
    )
    assert per_recipient(dropping_server) == {f"user{i}@example.org": 1 for i in range(4)}
    assert (summary.sent, summary.failed, summary.lost_replies, summary.in_doubt) == (3, 0, 1, 1)
    assert summary.retries == 0
    [row] = summary.in_doubt_rows
    assert row["recipient"] == "user1@example.org" and row["row"] == 3
    assert "after the whole message" in row["reason"]


def test_a_reply_that_times_out_after_the_dot_is_in_doubt(
    tmp_path: Path, template_file: Path
) -> None:
    handler = SlowAfterData()
    controller = _start(handler)
    try:
        summary = send_campaign(
            RecipientSource(SourceSpec(str(make_csv(tmp_path / "r.csv", 3)))),
            MessageTemplate.load(template_file),
            get_transport(
                f"smtp://127.0.0.1:{controller.port}",
                TransportOptions(smtp_security="none", timeout=0.3),
            ),
            options=SendOptions(workers=1),
            retry=NO_WAIT,
        )
        assert {k: len(v) for k, v in handler.by_recipient().items()} == {
            f"user{i}@example.org": 1 for i in range(3)
        }
    finally:
        controller.stop()
    assert (summary.sent, summary.lost_replies, summary.retries) == (2, 1, 0)
    assert "timed out" in summary.in_doubt_rows[0]["reason"]


def test_a_drop_before_the_dot_is_retried_and_delivered_once(
    tmp_path: Path, template_file: Path
) -> None:
    handler = DropAtRcpt()
    controller = _start(handler)
    try:
        summary = send_campaign(
            RecipientSource(SourceSpec(str(make_csv(tmp_path / "r.csv", 3)))),
            MessageTemplate.load(template_file),
            get_transport(
                f"smtp://127.0.0.1:{controller.port}", TransportOptions(smtp_security="none")
            ),
            options=SendOptions(workers=1),
            retry=NO_WAIT,
        )
        got = {k: len(v) for k, v in handler.by_recipient().items()}
    finally:
        controller.stop()
    assert got == {f"user{i}@example.org": 1 for i in range(3)}
    assert (summary.sent, summary.lost_replies, summary.in_doubt, summary.retries) == (3, 0, 0, 1)


def test_in_doubt_row_stays_sending_until_retry_in_doubt(
    dropping_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    csv = make_csv(tmp_path / "r.csv", 4)
    db = tmp_path / "state.db"
    args = send_args(csv, template_file, dropping_server, db, "--campaign", "c")
    code, out = run_cli([*args, "--report", str(tmp_path / "1.json")])
    assert code == 1, out  # a row in doubt needs a look, as a failed one does
    first = report(tmp_path / "1.json")
    assert (first["sent"], first["failed"], first["in_doubt"], first["lost_replies"]) == (
        3,
        0,
        1,
        1,
    )
    assert [r["recipient"] for r in first["in_doubt_rows"]] == ["user1@example.org"]
    assert "in doubt" in out
    assert counts(db, "c") == {"sent": 3, "sending": 1}
    assert not (tmp_path / "failed.csv").exists()  # never offered for a blind re-drive
    code, out = run_cli(["status", "c", "--state", str(db), "--json"])
    assert json.loads(out)[0]["in_doubt"] == 1

    # A plain re-run (cron) does not send it again.
    code, out = run_cli([*args, "--report", str(tmp_path / "2.json")])
    assert code == 0, out
    second = report(tmp_path / "2.json")
    assert (second["sent"], second["in_doubt"], second["lost_replies"]) == (0, 1, 0)
    assert per_recipient(dropping_server)["user1@example.org"] == 1

    # Only the deliberate retry does, once.
    code, out = run_cli(["retry", "c", "--in-doubt", "--state", str(db), "--yes",
                         "--progress", "none"])  # fmt: skip
    assert code == 0, out
    assert per_recipient(dropping_server) == {
        "user0@example.org": 1,
        "user1@example.org": 2,  # the one the user chose to send again
        "user2@example.org": 1,
        "user3@example.org": 1,
    }
    assert counts(db, "c") == {"sent": 4}


def test_ses_smtp_follows_the_same_rule_over_starttls(
    ca: trustme.CA, ca_file: str, tmp_path: Path, template_file: Path
) -> None:
    """ses+smtp:// is the SMTP transport underneath: a lost 250 over TLS is in doubt too."""
    handler = DropAfterData(drop_for={"user0@example.org"})
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    controller = _start(
        handler,
        tls_context=context,
        require_starttls=True,
        authenticator=_authenticator,
        auth_required=True,
        auth_require_tls=True,
    )
    try:
        url = f"ses+smtp://us-east-1?endpoint=127.0.0.1:{controller.port}"
        login = TransportOptions(smtp_user=SMTP_USER, smtp_password=SMTP_PASSWORD, ca_file=ca_file)
        summary = send_campaign(
            RecipientSource(SourceSpec(str(make_csv(tmp_path / "r.csv", 2)))),
            MessageTemplate.load(template_file),
            get_transport(url, login),
            options=SendOptions(workers=1),
            retry=NO_WAIT,
        )
        got = {k: len(v) for k, v in handler.by_recipient().items()}
    finally:
        controller.stop()
    assert got == {"user0@example.org": 1, "user1@example.org": 1}
    assert (summary.sent, summary.lost_replies, summary.retries) == (1, 1, 0)


def test_the_in_doubt_total_is_shown_only_for_rows_the_skip_reasons_do_not_name() -> None:
    from smartmail.ledger import in_doubt_reason
    from smartmail.report import Summary

    def table(skipped: int, lost: int) -> dict[str, str]:
        reasons = {in_doubt_reason("c"): skipped} if skipped else {}
        summary = Summary(
            "c", "file://o", "r.csv", 10, 10 - skipped - lost, 0, skipped, 0, 0, 1.0, 1.0,
            None, None, skip_reasons=reasons, in_doubt=skipped + lost, lost_replies=lost,
        )  # fmt: skip
        return dict(summary.table_rows())

    # After a crash: the earlier run's rows, named once with the retry command.
    rows = table(skipped=8, lost=0)
    assert rows["  in doubt (smartmail retry c --in-doubt sends it again)"] == "8"
    assert "in doubt (not sent again)" not in rows
    # This run's lost answers are in no skip reason: the total says so.
    rows = table(skipped=2, lost=1)
    assert rows["in doubt (not sent again)"] == "3"
    assert rows["  answer lost after sending (this run)"] == "1"
