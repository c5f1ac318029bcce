"""ses+smtp://: the SES SMTP interface against a real STARTTLS+AUTH server, SES's reply wording,
SES's message ids, and the SMTP password derived from an IAM secret key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from moto import mock_aws

from smartmail import (
    MessageTemplate,
    RecipientSource,
    RetryPolicy,
    SendOptions,
    SourceSpec,
    Summary,
    TokenBucket,
    send_campaign,
)
from smartmail.engine import Journal
from smartmail.errors import ConfigError
from smartmail.transports import TransportOptions, get_transport
from smartmail.transports.ses_smtp import SesSmtpTransport, smtp_password

from .conftest import (
    SMTP_PASSWORD,
    SMTP_USER,
    RecordingHandler,
    SmtpServer,
    free_port,
    make_csv,
)
from .test_ses_transport import ListJournal

NO_WAIT = RetryPolicy(max_retries=3, initial=0.0, maximum=0.0, jitter=0.0)


def ses_url(server: SmtpServer) -> str:
    return f"ses+smtp://us-east-1?endpoint={server.host}:{server.port}"


def send(url: str, csv: Path, template: Path, journal: Journal | None = None, **kw: Any) -> Summary:
    options = TransportOptions(**kw)
    return send_campaign(
        RecipientSource(SourceSpec(str(csv))),
        MessageTemplate.load(template),
        get_transport(url, options),
        options=SendOptions(workers=1),
        limiter=TokenBucket(1000.0, sleep=lambda s: None),
        retry=NO_WAIT,
        journal=journal,
    )


def login(server: SmtpServer) -> dict[str, Any]:
    return {"smtp_user": SMTP_USER, "smtp_password": SMTP_PASSWORD, "ca_file": server.ca_file}


# --- the password -------------------------------------------------------------------------------


# The AWS documentation gives the algorithm and a script but no input/output pair; these
# vectors are terraform-provider-aws's (internal/service/iam/access_key_test.go,
# TestSESSMTPPasswordFromSecretKeySigV4), an implementation known to authenticate against SES.
@pytest.mark.parametrize(
    ("region", "secret", "expected"),
    [
        ("eu-central-1", "some+secret+key", "BMXhUYlu5Z3gSXVQORxlVa7XPaz91aGWdfHxvkOZdWZ2"),
        ("eu-central-1", "another+secret+key", "BBbphbrQmrKMx42d1N6+C7VINYEBGI5v9VsZeTxwskfh"),
        ("us-west-1", "some+secret+key", "BH+jbMzper5WwlwUar9E1ySBqHa9whi0GPo+sJ0mVYJj"),
        ("us-west-1", "another+secret+key", "BKVmjjMDFk/qqw8EROW99bjCS65PF8WKvK5bSr4Y6EqF"),
    ],
)
def test_smtp_password_matches_published_vectors(region: str, secret: str, expected: str) -> None:
    assert smtp_password(secret, region) == expected


def test_smtp_password_is_the_documented_hmac_chain_step_by_step() -> None:
    secret, region = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "us-east-1"
    k_date = hmac.new(b"AWS4" + secret.encode(), b"11111111", hashlib.sha256).digest()
    k_region = hmac.new(k_date, b"us-east-1", hashlib.sha256).digest()
    k_service = hmac.new(k_region, b"ses", hashlib.sha256).digest()
    k_terminal = hmac.new(k_service, b"aws4_request", hashlib.sha256).digest()
    signature = hmac.new(k_terminal, b"SendRawEmail", hashlib.sha256).digest()
    expected = base64.b64encode(b"\x04" + signature).decode()
    password = smtp_password(secret, region)
    assert password == expected
    assert base64.b64decode(password)[0] == 4 and len(password) == 44
    assert smtp_password(secret, "eu-west-1") != password  # the password is per region


# --- endpoints and ports ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "port", "security"),
    [
        ("ses+smtp://eu-west-1", 587, "starttls"),
        ("ses+smtp://eu-west-1:2587", 2587, "starttls"),
        ("ses+smtp://eu-west-1:25", 25, "starttls"),
        ("ses+smtp://eu-west-1:465", 465, "tls"),
        ("ses+smtp://eu-west-1:2465", 2465, "tls"),
    ],
)
def test_ses_smtp_host_port_and_tls_mode(url: str, port: int, security: str) -> None:
    transport = get_transport(url, TransportOptions(smtp_user="u", smtp_password="p"))
    assert isinstance(transport, SesSmtpTransport)
    assert (transport.host, transport.port, transport.security) == (
        "email-smtp.eu-west-1.amazonaws.com",
        port,
        security,
    )
    assert transport.allow_utf8_local is False


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("ses+smtp://eu-west-1:8025", {}, "SES listens on"),
        ("ses+smtp://eu-west-1", {"smtp_security": "none"}, "always uses TLS"),
        ("ses+smtp://eu-west-1?endpoint=nohostport", {}, "HOST:PORT"),
        ("ses+smtp://eu-west-1?host=x", {}, "unknown URL parameter"),
        ("ses+smtp://", {}, "needs a region"),
        ("ses+smtp://eu-west-1", {"smtp_password": None}, "SMARTMAIL_SMTP_PASSWORD"),
    ],
)
def test_bad_ses_smtp_settings_are_config_errors(
    url: str, options: dict[str, Any], message: str
) -> None:
    settings: dict[str, Any] = {"smtp_user": "u", "smtp_password": "p", **options}
    with pytest.raises(ConfigError, match=message):
        get_transport(url, TransportOptions(**settings))


# --- against a real STARTTLS + AUTH server ------------------------------------------------------


def test_sends_over_starttls_and_records_the_ses_message_id(
    tls_smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    tls_smtp_server.handler.ok_reply = "250 Ok 0100018c-{n:08d}-ses"
    journal = ListJournal()
    csv = make_csv(tmp_path / "r.csv", 4)
    summary = send(ses_url(tls_smtp_server), csv, template_file, journal, **login(tls_smtp_server))
    assert summary.sent == 4
    got = tls_smtp_server.handler.by_recipient()
    assert sorted(got) == [f"user{i}@example.org" for i in range(4)]
    assert got["user2@example.org"][0].message["Subject"] == "Hello User 2"
    ids = sorted(o.message_id or "" for o in journal.outcomes)
    assert ids == [f"0100018c-{n:08d}-ses" for n in range(1, 5)]


def test_the_ledger_keeps_the_ses_message_id_from_the_reply_for_feedback(
    tls_smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    # The id SES gave in its reply is the one its bounces and complaints name: kept as the
    # delivery's provider id, beside the message's own Message-ID.
    import sqlite3

    from smartmail.ledger import Ledger

    tls_smtp_server.handler.ok_reply = "250 Ok 0100018c-{n:08d}-ses"
    csv = make_csv(tmp_path / "r.csv", 3)
    db = tmp_path / "state.db"
    ledger = Ledger(db, "ses-smtp")
    ledger.acquire()
    try:
        summary = send(
            ses_url(tls_smtp_server), csv, template_file, ledger, **login(tls_smtp_server)
        )
    finally:
        ledger.close()
    assert summary.sent == 3
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT provider_id, message_id FROM deliveries").fetchall()
    conn.close()
    assert sorted(p for p, _ in rows) == [f"0100018c-{n:08d}-ses" for n in range(1, 4)]
    assert all(m and m.startswith("<") for _, m in rows)


def test_454_throttling_is_retried_and_slows_down(
    tls_smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    tls_smtp_server.handler.throttle_first = 2
    csv = make_csv(tmp_path / "r.csv", 3)
    summary = send(ses_url(tls_smtp_server), csv, template_file, **login(tls_smtp_server))
    assert (summary.sent, summary.failed, summary.retries) == (3, 0, 2)
    assert summary.throttles == 2 and summary.slowdowns == 1
    assert len(tls_smtp_server.handler.received) == 3


@pytest.mark.parametrize(
    "reply",
    [
        "454 Throttling failure: Daily message quota exceeded.",
        "554 Message rejected: Email address is not verified. The following identities failed "
        "the check in region US-EAST-1: news@acme.example",
        "554 Message rejected: Sending paused for this account.",
    ],
)
def test_quota_and_sender_replies_stop_the_run_leaving_rows_unsent(
    tls_smtp_server: SmtpServer, tmp_path: Path, template_file: Path, reply: str
) -> None:
    tls_smtp_server.handler.data_replies = [reply]
    csv = make_csv(tmp_path / "r.csv", 4)
    summary = send(ses_url(tls_smtp_server), csv, template_file, **login(tls_smtp_server))
    assert (summary.sent, summary.failed, summary.unsent, summary.retries) == (0, 0, 4, 0)
    assert summary.stopped is not None and reply.split(":")[0][4:] in summary.stopped


def test_other_554_rejections_fail_one_row_and_the_rest_are_sent(
    tls_smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    tls_smtp_server.handler.data_replies = [
        "554 Message rejected: Email address is not verified. The following identities failed "
        "the check in region US-EAST-1: user0@example.org",
        "554 Transaction failed: Duplicate header 'Subject'.",
    ]
    journal = ListJournal()
    csv = make_csv(tmp_path / "r.csv", 4)
    summary = send(ses_url(tls_smtp_server), csv, template_file, journal, **login(tls_smtp_server))
    assert (summary.sent, summary.failed, summary.retries) == (2, 2, 0)
    failed = sorted(o.recipient for o in journal.outcomes if o.status == "failed")
    assert failed == ["user0@example.org", "user1@example.org"]


@pytest.fixture
def iam_login_server(ca: trustme.CA, ca_file: str) -> Iterator[tuple[SmtpServer, list[str]]]:
    """STARTTLS + AUTH that accepts only the SMTP login SES would derive from the test keys."""
    expected = ("AKIDEXAMPLETESTING00", smtp_password("testing-secret-key", "us-east-1"))
    logins: list[str] = []

    def authenticator(*args: Any) -> AuthResult:
        data = args[-1]
        ok = (
            isinstance(data, LoginPassword)
            and (
                data.login.decode(),
                data.password.decode(),
            )
            == expected
        )
        logins.append(data.login.decode() if isinstance(data, LoginPassword) else "?")
        return AuthResult(success=ok)

    handler = RecordingHandler()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=free_port(),
        tls_context=context,
        require_starttls=True,
        authenticator=authenticator,
        auth_required=True,
        auth_require_tls=True,
    )
    controller.start()
    try:
        yield SmtpServer("127.0.0.1", controller.port, handler, ca_file), logins
    finally:
        controller.stop()


@pytest.mark.usefixtures("aws_env")
def test_without_an_smtp_user_the_login_is_derived_from_the_iam_keys(
    iam_login_server: tuple[SmtpServer, list[str]], tmp_path: Path, template_file: Path
) -> None:
    server, logins = iam_login_server
    csv = make_csv(tmp_path / "r.csv", 2)
    summary = send(ses_url(server), csv, template_file, ca_file=server.ca_file)
    assert summary.sent == 2
    assert logins == ["AKIDEXAMPLETESTING00"]  # one login: the connection was reused


@pytest.mark.usefixtures("aws_env")
def test_temporary_credentials_cannot_become_an_smtp_login(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token")
    with pytest.raises(ConfigError, match="temporary"):
        get_transport("ses+smtp://us-east-1")


@pytest.mark.usefixtures("aws_env")
@mock_aws
def test_ses_smtp_reads_its_rate_from_the_account_quota() -> None:
    transport = get_transport("ses+smtp://us-east-1", TransportOptions())
    assert transport.default_rate() == 1.0
