"""What the send ledger costs: messages/s with no ledger and with the SQLite ledger.

The transport here answers at once (the pipeline's own ceiling, where the ledger's cost shows
most), then after 10 ms, a fast provider's API latency (where it should hardly show). Nothing
leaves the machine. Run: `python benchmarks/bench_ledger.py [ROWS]`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from smartmail import MessageTemplate, OutgoingMessage, RecipientSource, SendOptions, SourceSpec
from smartmail.engine import send_campaign
from smartmail.ledger import Ledger

TEMPLATE = "From: Acme <news@acme.example>\nSubject: Hello {{ name }}\n\nHi {{ name }}.\n"


class InstantSession:
    def __init__(self, latency: float) -> None:
        self.latency = latency

    def send(self, message: OutgoingMessage) -> str:
        if self.latency:
            time.sleep(self.latency)
        return message.message_id

    def close(self) -> None:
        return None


class InstantTransport:
    url = "instant://"
    allow_utf8_local = True

    def __init__(self, latency: float) -> None:
        self.latency = latency

    def open_session(self) -> InstantSession:
        return InstantSession(self.latency)

    def default_rate(self) -> float | None:
        return None

    def close(self) -> None:
        return None


def run(folder: Path, rows: int, workers: int, latency: float, with_ledger: bool) -> float:
    csv = folder / "list.csv"
    csv.write_text("email,name\n" + "".join(f"user{i}@example.org,User {i}\n" for i in range(rows)))
    template = folder / "msg.txt"
    template.write_text(TEMPLATE)
    campaign = f"bench-{workers}-{with_ledger}-{time.monotonic_ns()}"
    ledger = Ledger(folder / "state.db", campaign) if with_ledger else None
    if ledger is not None:
        ledger.acquire()
    try:
        summary = send_campaign(
            RecipientSource(SourceSpec(str(csv))),
            MessageTemplate.load(template),
            InstantTransport(latency),
            options=SendOptions(workers=workers, campaign=campaign),
            journal=ledger,
        )
    finally:
        if ledger is not None:
            ledger.close()
    assert summary.sent == rows
    return summary.rate_per_second


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{rows} messages; messages/s of the send pass")
        for latency in (0.0, 0.01):
            for workers in (4, 16):
                plain = run(Path(tmp), rows, workers, latency, with_ledger=False)
                ledgered = run(Path(tmp), rows, workers, latency, with_ledger=True)
                print(
                    f"provider latency {latency * 1000:2.0f} ms, workers={workers:2d}: "
                    f"no ledger {plain:6.0f}/s, ledger {ledgered:6.0f}/s ({ledgered / plain:.0%})"
                )


if __name__ == "__main__":
    main()
