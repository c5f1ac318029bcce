"""A plain-SMTP sink on 127.0.0.1 for the benchmarks: accepts every message and discards it.

    python benchmarks/smtp_sink.py [--max-seconds 900] [--limit R] [--record JSON]

Runs in its own process so its CPU does not share the benchmark's GIL. It prints
`PORT <n>` on stdout once listening, counts accepted messages (`NOOP` answers `250 <count>`
so a client can read the count over SMTP), and exits when its stdin closes (the parent
died or is done), on SIGTERM, or after --max-seconds at the latest.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import sys
import time
from typing import Any

from aiosmtpd.smtp import SMTP


class Sink:
    """aiosmtpd handler: accept and forget, keeping a count (and with --record, when each
    message arrived and for whom; with --limit R, answering 454 above R a second, as SES)."""

    def __init__(self, limit: int = 0, record: bool = False) -> None:
        self.messages = 0
        self.limit = limit
        self.record = record
        self.window: collections.deque[float] = collections.deque()
        self.times: list[float] = []
        self.recipients: collections.Counter[str] = collections.Counter()
        self.throttled = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.limit or self.record:
            now = time.monotonic()
            if self.limit:
                while self.window and self.window[0] <= now - 1.0:
                    self.window.popleft()
                if len(self.window) >= self.limit:
                    self.throttled += 1
                    return "454 4.7.0 Throttling failure: Maximum sending rate exceeded."
                self.window.append(now)
            self.times.append(now)
            for rcpt in envelope.rcpt_tos:
                self.recipients[rcpt] += 1
        self.messages += 1
        return "250 2.0.0 Ok: discarded"

    def dump(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(
                {
                    "accepted": self.messages,
                    "throttled": self.throttled,
                    "times": self.times,
                    "distinct": len(self.recipients),
                    "duplicates": sum(1 for c in self.recipients.values() if c > 1),
                },
                fh,
            )

    async def handle_NOOP(self, server: Any, session: Any, envelope: Any, arg: str) -> str:
        return f"250 {self.messages}"


async def serve(max_seconds: float, limit: int = 0, record: str | None = None) -> None:
    loop = asyncio.get_running_loop()
    sink = Sink(limit, record is not None)
    server = await loop.create_server(
        lambda: SMTP(sink, hostname="sink.localhost", enable_SMTPUTF8=True),
        host="127.0.0.1",
        port=0,
    )
    port = server.sockets[0].getsockname()[1]
    print(f"PORT {port}", flush=True)
    done = asyncio.Event()

    def on_stdin() -> None:
        if not os.read(stdin, 4096):
            done.set()

    stdin = sys.stdin.fileno()
    loop.add_reader(stdin, on_stdin)
    loop.add_signal_handler(signal.SIGTERM, done.set)
    with contextlib.suppress(TimeoutError):  # the upper bound on the sink's life
        await asyncio.wait_for(done.wait(), timeout=max_seconds)
    server.close()
    if record is not None:
        sink.dump(record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-seconds", type=float, default=900.0)
    parser.add_argument("--limit", type=int, default=0, help="answer 454 above R messages/s")
    parser.add_argument("--record", metavar="JSON", help="write arrival times here at exit")
    args = parser.parse_args()
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    asyncio.run(serve(args.max_seconds, args.limit, args.record))


if __name__ == "__main__":
    main()
