"""A plain-SMTP sink on 127.0.0.1 for the benchmarks: accepts every message and discards it.

    python benchmarks/smtp_sink.py [--max-seconds 900]

Runs in its own process so its CPU does not share the benchmark's GIL. It prints
`PORT <n>` on stdout once listening, counts accepted messages (`NOOP` answers `250 <count>`
so a client can read the count over SMTP), and exits when its stdin closes (the parent
died or is done), on SIGTERM, or after --max-seconds at the latest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any

from aiosmtpd.smtp import SMTP


class Sink:
    """aiosmtpd handler: accept and forget, keeping only a count."""

    def __init__(self) -> None:
        self.messages = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages += 1
        return "250 2.0.0 Ok: discarded"

    async def handle_NOOP(self, server: Any, session: Any, envelope: Any, arg: str) -> str:
        return f"250 {self.messages}"


async def serve(max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    sink = Sink()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args()
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    asyncio.run(serve(args.max_seconds))


if __name__ == "__main__":
    main()
