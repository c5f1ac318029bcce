"""SES API: which side of the request a network failure is on decides whether it is retried.

A scripted HTTP endpoint on 127.0.0.1 (AWS_ENDPOINT_URL) reads each SendEmail request in full
and then, per request, hangs past the read timeout, drops the connection, or answers 200. What
it reads is what SES would hold: a request that was read is never sent again, by smartmail or
by botocore's own retry layer.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

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

from .conftest import make_csv

pytestmark = pytest.mark.usefixtures("aws_env")
NO_WAIT = RetryPolicy(max_retries=3, initial=0.0, maximum=0.0, jitter=0.0)
LIMIT = 5.0  # seconds any socket here may wait: a bound on the test, not a measurement


@dataclass
class ScriptedEndpoint:
    """Answers the n-th request as `script[n]` says ('hang', 'drop'), then 200 with an id."""

    script: list[str]
    requests: list[bytes] = field(default_factory=list)
    sock: socket.socket = field(default_factory=socket.socket)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(LIMIT)
        with conn:
            while not self.done.is_set():
                request = _read_request(conn)
                if request is None:
                    return
                n = len(self.requests)
                self.requests.append(request)
                action = self.script[n] if n < len(self.script) else "ok"
                if action == "drop":
                    return
                if action == "hang":
                    self.done.wait(LIMIT)
                    return
                body = json.dumps({"MessageId": f"ses-id-{n}"}).encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )


def _read_request(conn: socket.socket) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = conn.recv(65536)
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        body += chunk
    return head + b"\r\n\r\n" + body


@pytest.fixture
def endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[ScriptedEndpoint]:
    server = ScriptedEndpoint(script=[])
    server.sock.bind(("127.0.0.1", 0))
    server.sock.listen()
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    try:
        yield server
    finally:
        server.done.set()
        thread.join(LIMIT)
        server.sock.close()


def _send(csv: Path, template: Path, **options: object) -> Summary:
    return send_campaign(
        RecipientSource(SourceSpec(str(csv))),
        MessageTemplate.load(template),
        get_transport("ses://us-east-1", TransportOptions(timeout=0.5)),
        options=SendOptions(workers=1, **options),  # type: ignore[arg-type]
        retry=NO_WAIT,
    )


def test_read_timeout_or_drop_after_the_request_is_in_doubt_and_sent_once(
    endpoint: ScriptedEndpoint, tmp_path: Path, template_file: Path
) -> None:
    endpoint.script = ["hang", "drop"]
    summary = _send(make_csv(tmp_path / "r.csv", 3), template_file)
    # Each request reached the endpoint exactly once: no retry by smartmail or botocore.
    assert len(endpoint.requests) == 3
    assert all(b"SendEmail" in r or b"/v2/email/outbound-emails" in r for r in endpoint.requests)
    assert (summary.sent, summary.failed, summary.unsent, summary.retries) == (1, 0, 0, 0)
    assert (summary.lost_replies, summary.in_doubt) == (2, 2)
    assert [r["recipient"] for r in summary.in_doubt_rows] == [
        "user0@example.org",
        "user1@example.org",
    ]
    assert all("no answer from SES" in r["reason"] for r in summary.in_doubt_rows)


def test_every_answer_lost_trips_the_breaker(
    endpoint: ScriptedEndpoint, tmp_path: Path, template_file: Path
) -> None:
    """A provider that takes every request and never answers: stop before the whole list."""
    endpoint.script = ["drop"] * 100
    summary = _send(make_csv(tmp_path / "r.csv", 10), template_file, max_connect_failures=3)
    assert len(endpoint.requests) == 3
    assert (summary.lost_replies, summary.sent, summary.failed, summary.unsent) == (3, 0, 0, 7)
    assert summary.stopped and "lost the provider's answer" in summary.stopped
