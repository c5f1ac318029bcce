"""Shared fixtures: real SMTP servers (aiosmtpd on 127.0.0.1, plain, STARTTLS+AUTH, faulty),
a test CA, and helpers to write CSVs and templates.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

pytest_plugins = ["tests.aws_recorder", "tests.aws_helpers"]

SMTP_USER = "mailer"
SMTP_PASSWORD = "s3cret-Pa55word"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str] = field(default_factory=list)

    @property
    def message(self) -> EmailMessage:
        msg = message_from_bytes(self.data, policy=policy.SMTP)
        assert isinstance(msg, EmailMessage)
        return msg


@dataclass
class RecordingHandler:
    """Accepts mail and records it. Faults can be switched on per test.

    - `temp_fail_every`: every Nth DATA answers 451 (transient).
    - `reject_rcpt`: these recipients get 550 at RCPT (permanent).
    - `temp_fail_first`: the first N DATA commands answer 451.
    - `throttle_first`: the first N DATA commands answer 454 Throttling failure.
    - `data_replies`: replies given, in order, to the next DATA commands (then normal).
    - `ok_reply`: the 250 reply to an accepted DATA; `{n}` is the DATA command's number.
    """

    received: list[Received] = field(default_factory=list)
    temp_fail_every: int = 0
    temp_fail_first: int = 0
    throttle_first: int = 0
    reject_rcpt: set[str] = field(default_factory=set)
    data_replies: list[str] = field(default_factory=list)
    ok_reply: str = "250 2.0.0 Ok: queued as {n:08d}"
    noop_reply: str = ""  # set: NOOP gets this answer (and a 421 closes the connection)
    data_commands: int = 0
    peers: set[Any] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_EHLO(
        self, server: Any, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        with self.lock:  # one peer (client address and port) per TCP connection
            self.peers.add(session.peer)
        session.host_name = hostname
        return responses

    async def handle_NOOP(self, server: Any, session: Session, envelope: Envelope, arg: str) -> str:
        if not self.noop_reply:
            return "250 OK"
        if self.noop_reply == "never":  # a server that stopped answering, without closing
            await asyncio.sleep(30)
        if self.noop_reply.startswith("421"):
            server.transport.close()  # as a server that timed the client out does
        return self.noop_reply

    @property
    def connections(self) -> int:
        return len(self.peers)

    async def handle_RCPT(
        self,
        server: Any,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address.lower() in self.reject_rcpt:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        with self.lock:
            self.data_commands += 1
            n = self.data_commands
            if self.data_replies:
                return self.data_replies.pop(0)
            if n <= self.throttle_first:
                return "454 4.7.0 Throttling failure: Maximum sending rate exceeded."
            if n <= self.temp_fail_first or (
                self.temp_fail_every and n % self.temp_fail_every == 0
            ):
                return "451 4.3.0 Temporary local problem, try again"
            content = envelope.original_content or b""
            self.received.append(
                Received(
                    str(envelope.mail_from),
                    list(envelope.rcpt_tos),
                    bytes(content),
                    list(envelope.mail_options),
                )
            )
            return self.ok_reply.format(n=n)

    def by_recipient(self) -> dict[str, list[Received]]:
        out: dict[str, list[Received]] = {}
        for r in self.received:
            for rcpt in r.rcpt_tos:
                out.setdefault(rcpt.lower(), []).append(r)
        return out


@dataclass
class SmtpServer:
    host: str
    port: int
    handler: RecordingHandler
    ca_file: str | None = None

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"


def _authenticator(
    server: Any, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == SMTP_USER.encode()
        and auth_data.password == SMTP_PASSWORD.encode()
    )
    return AuthResult(success=ok, handled=False)


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def _start(handler: RecordingHandler, **server_kwargs: Any) -> Controller:
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(), **server_kwargs)
    controller.start()
    return controller


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    """A plain SMTP server (no TLS, no AUTH) that records what it accepts. It offers
    SMTPUTF8 (aiosmtpd's Controller does by default); `ascii_smtp_server` does not."""
    handler = RecordingHandler()
    controller = _start(handler)
    try:
        yield SmtpServer(controller.hostname, controller.port, handler)
    finally:
        controller.stop()


@pytest.fixture
def ascii_smtp_server() -> Iterator[SmtpServer]:
    """`smtp_server` without SMTPUTF8 (it does not offer it in its EHLO answer)."""
    handler = RecordingHandler()
    controller = _start(handler, enable_SMTPUTF8=False)
    try:
        yield SmtpServer(controller.hostname, controller.port, handler)
    finally:
        controller.stop()


@pytest.fixture
def tls_smtp_server(ca: trustme.CA, ca_file: str) -> Iterator[SmtpServer]:
    """STARTTLS and AUTH required (AUTH only after TLS); certificate from the test CA."""
    handler = RecordingHandler()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    controller = _start(
        handler,
        tls_context=context,
        require_starttls=True,
        authenticator=_authenticator,
        auth_required=True,
        auth_require_tls=True,
    )
    try:
        yield SmtpServer(controller.hostname, controller.port, handler, ca_file)
    finally:
        controller.stop()


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


TEMPLATE = """\
From: Acme <news@acme.example>
To: {{ name }} <{{ email }}>
Subject: Hello {{ name }}

Hi {{ name }}, your code is {{ code }}.
"""


@pytest.fixture
def template_file(tmp_path: Path) -> Path:
    return write(tmp_path / "msg.txt", TEMPLATE)


def make_csv(path: Path, n: int, *, domain: str = "example.org") -> Path:
    lines = ["email,name,code"] + [f"user{i}@{domain},User {i},C{i:05d}" for i in range(n)]
    return write(path, "\n".join(lines) + "\n")


@pytest.fixture(autouse=True)
def private_state(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No test (or subprocess it starts) reads or writes the user's real state database (the
    ledger would remember every test campaign and skip it as already sent next time) or cache."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("xdg-state")))
    # Nor the user's cache of compiled templates (codecache.py).
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    # A subprocess killed by a test leaves its private copy of the list here, not in /tmp.
    monkeypatch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmpdir")))
    monkeypatch.delenv("SMARTMAIL_STATE", raising=False)


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The CLI's `main` as a user runs it: its exit status (as Python gives it: None 0, a
    message 1), stdout and stderr."""
    from smartmail.cli import main

    try:
        main(args)
        code: object = 0
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code
    out, err = capsys.readouterr()
    return (code if isinstance(code, int) else 1), out, err


def smtp_send(
    csv: Path, template: Path, server: SmtpServer, tmp_path: Path, *extra: str
) -> list[str]:
    """`send` arguments for a plain-SMTP test server, its state and failed rows in tmp_path."""
    return [
        "send", str(csv), "-t", str(template), "--transport", server.url,
        "--smtp-security", "none", "--state", str(tmp_path / "state.db"), "--yes",
        "--progress", "none", "--retry-wait", "0", "--failed-csv", str(tmp_path / "f.csv"),
        *extra,
    ]  # fmt: skip
