"""Multi-recipient envelopes: the row's own recipient decides whether the row was sent.

A row addressed To: the recipient, Cc: and Bcc: others, against a real aiosmtpd server that
refuses some addresses at RCPT. If the row's recipient is refused the row fails and nothing is
sent, even though the server accepted the Cc; if only a Cc/Bcc is refused, the message goes to
the rest and the refused addresses are reported with the row.
"""

from __future__ import annotations

from pathlib import Path

from smartmail import (
    MessageTemplate,
    RecipientSource,
    RetryPolicy,
    SendOptions,
    SourceSpec,
    send_campaign,
)
from smartmail.report import Summary
from smartmail.transports import TransportOptions, get_transport

from .conftest import SmtpServer, make_csv, write

NO_WAIT = RetryPolicy(max_retries=2, initial=0.0, maximum=0.0, jitter=0.0)
TEMPLATE = """\
From: Acme <news@acme.example>
To: {{ name }} <{{ email }}>
Cc: Boss <boss@example.net>
Bcc: audit@example.net
Subject: Hello {{ name }}

Hi {{ name }}.
"""


def _send(server: SmtpServer, tmp_path: Path, rows: int) -> Summary:
    return send_campaign(
        RecipientSource(SourceSpec(str(make_csv(tmp_path / "r.csv", rows)))),
        MessageTemplate.load(write(tmp_path / "t.txt", TEMPLATE)),
        get_transport(server.url, TransportOptions(smtp_security="none")),
        options=SendOptions(workers=2),
        retry=NO_WAIT,
    )


def test_refused_primary_with_accepted_cc_fails_the_row_and_sends_nothing(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    smtp_server.handler.reject_rcpt = {"user1@example.org"}
    summary = _send(smtp_server, tmp_path, 3)
    assert (summary.sent, summary.failed) == (2, 1)
    assert list(summary.failure_reasons) == ["permanent"]
    # Neither the boss nor the auditor got user1's message: the transaction was reset.
    assert len(smtp_server.handler.received) == 2
    envelopes = sorted(sorted(got.rcpt_tos) for got in smtp_server.handler.received)
    assert envelopes == [
        ["audit@example.net", "boss@example.net", f"user{i}@example.org"] for i in (0, 2)
    ]
    assert smtp_server.handler.data_commands == 2


def test_refused_bcc_is_sent_without_and_reported(smtp_server: SmtpServer, tmp_path: Path) -> None:
    smtp_server.handler.reject_rcpt = {"audit@example.net"}
    summary = _send(smtp_server, tmp_path, 3)
    assert (summary.sent, summary.failed) == (3, 0)
    envelopes = sorted(sorted(got.rcpt_tos) for got in smtp_server.handler.received)
    assert envelopes == [["boss@example.net", f"user{i}@example.org"] for i in range(3)]
    assert sorted(r["recipient"] for r in summary.sent_without) == [
        f"user{i}@example.org" for i in range(3)
    ]
    assert all(
        r["refused"] == ["audit@example.net: 550 5.1.1 <audit@example.net>: Recipient address "
                         "rejected: User unknown"]
        for r in summary.sent_without
    )  # fmt: skip
    assert any("3 message(s) went without some Cc/Bcc" in w for w in summary.warnings)


def test_an_address_in_to_and_again_in_cc_or_bcc_is_one_rcpt_and_gets_one_copy(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    # The same mailbox twice in one envelope is two RCPT TOs: servers that do not merge them
    # (case differs, or no duplicate filter) deliver a copy for each, and SES bills each.
    template = write(
        tmp_path / "t.txt",
        "From: news@acme.example\nTo: {{ email }}\nCc: {{ manager }}\nBcc: {{ email }}, "
        "audit@example.net\nSubject: Hi\n\nHi\n",
    )
    csv = write(
        tmp_path / "r.csv",
        "email,manager\nann@example.org,ANN@Example.ORG\nbob@example.org,ann@example.org\n",
    )
    summary = send_campaign(
        RecipientSource(SourceSpec(str(csv))),
        MessageTemplate.load(template),
        get_transport(smtp_server.url, TransportOptions(smtp_security="none")),
        options=SendOptions(workers=1),
        retry=NO_WAIT,
    )
    assert summary.sent == 2
    envelopes = sorted(got.rcpt_tos for got in smtp_server.handler.received)
    assert envelopes == [
        ["ann@example.org", "audit@example.net"],
        ["bob@example.org", "ann@example.org", "audit@example.net"],
    ]
    # Ann gets her own message once and Bob's once (as his manager): two, not four.
    assert len(smtp_server.handler.by_recipient()["ann@example.org"]) == 2
