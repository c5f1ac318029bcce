"""A fast local stand-in for the SES API, for the benchmarks (moto spends ~10 ms a request).

    python benchmarks/ses_endpoint.py [--limit R] [--max-send-rate Q] [--max-seconds 900]

An asyncio HTTP/1.1 server on 127.0.0.1 (keep-alive, in its own process so its CPU does not
share the benchmark's GIL) that answers, in microseconds:

- SESv2 `SendEmail` (POST /v2/email/outbound-emails): `{"MessageId": ...}`, or, with
  `--limit R`, a 400 `Throttling` "Maximum sending rate exceeded." when R messages were
  already accepted in the last second (SES's own answer);
- SES v1 `GetSendQuota` (POST / Action=GetSendQuota): Max24HourSend -1 (unlimited),
  MaxSendRate `--max-send-rate`;
- SESv2 `GetEmailIdentity` (GET /v2/email/identities/ID): verified.

It prints `PORT <n>` once listening. GET /stats answers the counts and the arrival times of
accepted messages (JSON), for the benchmark to check exactly-once delivery and the rate at
the receiver; GET /reset clears them. It exits when stdin closes, on SIGTERM, or after
--max-seconds. Requests are not signature-checked: this measures the client, not SES.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable

_RECIPIENT = re.compile(rb'"ToAddresses":\s*\["([^"]*)"')


class Counters:
    def __init__(self, limit: int, max_send_rate: float) -> None:
        self.limit = limit
        self.max_send_rate = max_send_rate
        self.accepted: list[float] = []
        self.recipients: collections.Counter[str] = collections.Counter()
        self.throttled = 0
        self.window: collections.deque[float] = collections.deque()

    def reset(self) -> None:
        self.accepted.clear()
        self.recipients.clear()
        self.throttled = 0
        self.window.clear()

    def send(self, body: bytes) -> tuple[int, bytes]:
        now = time.monotonic()
        if self.limit:
            window = self.window
            while window and window[0] <= now - 1.0:
                window.popleft()
            if len(window) >= self.limit:
                self.throttled += 1
                return 400, (b'{"__type":"Throttling","message":"Maximum sending rate exceeded."}')
            window.append(now)
        self.accepted.append(now)
        found = _RECIPIENT.search(body)
        self.recipients[found.group(1).decode() if found else ""] += 1
        return 200, b'{"MessageId":"0100018c-%08d-bench"}' % len(self.accepted)

    def stats(self) -> bytes:
        twice = sum(1 for c in self.recipients.values() if c > 1)
        return json.dumps(
            {
                "accepted": len(self.accepted),
                "throttled": self.throttled,
                "distinct": len(self.recipients),
                "duplicates": twice,
                "times": self.accepted,
            }
        ).encode()

    def quota(self) -> bytes:
        return (
            b'<GetSendQuotaResponse xmlns="http://ses.amazonaws.com/doc/2010-12-01/">'
            b"<GetSendQuotaResult><Max24HourSend>-1.0</Max24HourSend>"
            b"<MaxSendRate>%.1f</MaxSendRate><SentLast24Hours>0.0</SentLast24Hours>"
            b"</GetSendQuotaResult><ResponseMetadata><RequestId>r</RequestId>"
            b"</ResponseMetadata></GetSendQuotaResponse>" % self.max_send_rate
        )


IDENTITY = (
    b'{"IdentityType":"DOMAIN","VerifiedForSendingStatus":true,'
    b'"VerificationStatus":"SUCCESS","FeedbackForwardingStatus":true}'
)


class Http(asyncio.Protocol):
    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.held = False  # a response is pending: read no further request on this connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while not self.held:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buffer[:end].split(b"\r\n")
            headers: dict[bytes, bytes] = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get(b"content-length", b"0"))
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            method, path = lines[0].split(b" ", 2)[:2]
            self.answer(method, path, headers, body)

    def answer(self, method: bytes, path: bytes, headers: dict[bytes, bytes], body: bytes) -> None:
        kind = b"application/json"
        if method == b"POST" and path.startswith(b"/v2/email/outbound-emails"):
            status, out = self.counters.send(body)
        elif method == b"GET" and path.startswith(b"/v2/email/identities/"):
            status, out = 200, IDENTITY
        elif method == b"POST" and b"Action=GetSendQuota" in body:
            status, out, kind = 200, self.counters.quota(), b"text/xml"
        elif path.startswith(b"/reset"):
            self.counters.reset()
            status, out = 200, b"{}"
        elif path.startswith(b"/stats"):
            status, out = 200, self.counters.stats()
        else:
            status, out = 404, b'{"__type":"NotFoundException","message":"not in the fake"}'
        extra = b"x-amzn-ErrorType: Throttling\r\n" if status == 400 else b""
        self.respond(status, out, kind, extra)

    def respond(self, status: int, out: bytes, kind: bytes, extra: bytes = b"") -> None:
        """Write one response; `held` requests (a long poll) answer later through here too."""
        reason = b"OK" if status == 200 else b"Bad Request"
        head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (
            status,
            reason,
            kind,
            len(out),
        )
        assert self.transport is not None
        self.transport.write(head + extra + b"x-amzn-RequestId: bench\r\n\r\n" + out)


async def serve(
    args: argparse.Namespace, protocol: Callable[[Counters], asyncio.Protocol] = Http
) -> None:
    loop = asyncio.get_running_loop()
    counters = Counters(args.limit, args.max_send_rate)
    server = await loop.create_server(lambda: protocol(counters), host="127.0.0.1", port=0)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    done = asyncio.Event()
    stdin = sys.stdin.fileno()

    def on_stdin() -> None:
        if not os.read(stdin, 4096):
            done.set()

    loop.add_reader(stdin, on_stdin)
    loop.add_signal_handler(signal.SIGTERM, done.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), timeout=args.max_seconds)
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=0, help="throttle above R messages a second")
    parser.add_argument("--max-send-rate", type=float, default=100000.0)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
