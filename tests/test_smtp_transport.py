"""The SMTP transport against a real aiosmtpd server: plain, STARTTLS + AUTH, and faults."""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from smartmail import (
    MessageTemplate,
    RecipientSource,
    RetryPolicy,
    SendOptions,
    SourceSpec,
    send_campaign,
)
from smartmail.errors import PermanentError, StopRunError, ThrottledError, TransientError
from smartmail.transports import TransportOptions, get_transport
from smartmail.transports.smtp import classify_reply, quote_address

from .conftest import SMTP_PASSWORD, SMTP_USER, SmtpServer, make_csv


def _run(server_url: str, csv: Path, template: Path, **transport_kw: object):
    source = RecipientSource(SourceSpec(str(csv)))
    tmpl = MessageTemplate.load(template)
    transport = get_transport(server_url, TransportOptions(**transport_kw))  # type: ignore[arg-type]
    return send_campaign(
        source,
        tmpl,
        transport,
        options=SendOptions(workers=3),
        retry=RetryPolicy(max_retries=3, initial=0.0, maximum=0.0, jitter=0.0),
    )


def test_plain_smtp_delivers_one_message_per_row(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    csv = make_csv(tmp_path / "r.csv", 20)
    summary = _run(smtp_server.url, csv, template_file, smtp_security="none")
    assert (summary.sent, summary.failed, summary.skipped, summary.unsent) == (20, 0, 0, 0)
    got = smtp_server.handler.by_recipient()
    assert sorted(got) == sorted(f"user{i}@example.org" for i in range(20))
    assert all(len(v) == 1 for v in got.values())
    msg = got["user7@example.org"][0].message
    assert msg["Subject"] == "Hello User 7"
    assert "your code is C00007" in msg.get_content()


def test_starttls_and_auth_with_verified_certificate(
    tls_smtp_server: SmtpServer, tmp_path: Path, template_file: Path
):
    csv = make_csv(tmp_path / "r.csv", 5)
    summary = _run(
        tls_smtp_server.url,
        csv,
        template_file,
        smtp_user=SMTP_USER,
        smtp_password=SMTP_PASSWORD,
        ca_file=tls_smtp_server.ca_file,
    )
    assert summary.sent == 5
    assert len(tls_smtp_server.handler.received) == 5


@pytest.mark.parametrize(
    ("code", "text", "kind"),
    [
        (421, "Service not available, closing channel", TransientError),
        (451, "Temporary local problem", TransientError),
        (452, "Insufficient system storage", TransientError),
        (454, "Throttling failure: Maximum sending rate exceeded.", ThrottledError),
        (550, "Mailbox unavailable", PermanentError),
        (552, "Message size exceeds fixed maximum", PermanentError),
        (554, "Transaction failed", PermanentError),
        (535, "Authentication credentials invalid", StopRunError),
    ],
)
def test_reply_classification(code: int, text: str, kind: type) -> None:
    error = classify_reply(code, text, "DATA")
    assert type(error) is kind
    assert str(code) in str(error)


def test_421_closes_the_connection_and_the_next_attempt_reconnects(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    smtp_server.handler.data_replies = ["421 4.3.2 Service shutting down"]
    csv = make_csv(tmp_path / "r.csv", 5)
    source = RecipientSource(SourceSpec(str(csv)))
    summary = send_campaign(
        source,
        MessageTemplate.load(template_file),
        get_transport(smtp_server.url, TransportOptions(smtp_security="none")),
        options=SendOptions(workers=1),
        retry=RetryPolicy(max_retries=2, initial=0.0, maximum=0.0, jitter=0.0),
    )
    assert summary.sent == 5 and summary.retries == 1
    assert smtp_server.handler.connections == 2
    assert len(smtp_server.handler.received) == 5


def test_server_without_starttls_is_refused_unless_security_none(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    csv = make_csv(tmp_path / "r.csv", 2)
    summary = _run(smtp_server.url, csv, template_file)  # default: starttls
    assert summary.unsent == 2 and summary.stopped and "STARTTLS" in summary.stopped
    assert smtp_server.handler.received == []


_ADDRESS_CHARS = "abcXYZ019!#$%&'*+/=?^_`{|}~-.@\"<> ()[],;:\\\r\nü"


@settings(deadline=None)
@given(st.text(alphabet=_ADDRESS_CHARS, min_size=1, max_size=24))
@example("First.Last+tag@example.co.uk")
@example("o'neil@x.org")
@example('"john doe"@example.com')
@example("Name <a@b.c>")
@example("a@b.c>\r\nRCPT TO:<x@y.z")
def test_envelope_addresses_are_quoted_exactly_as_smtplib_does(address: str) -> None:
    """MAIL FROM / RCPT TO skip smtplib's parser for plain addresses: same bytes on the wire."""
    assert quote_address(address) == smtplib.quoteaddr(address)
