"""The SMTP transport against a real aiosmtpd server: plain, STARTTLS + AUTH, and faults."""

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
from smartmail.transports import TransportOptions, get_transport

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
