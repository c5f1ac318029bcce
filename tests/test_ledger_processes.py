"""Crash safety with real processes: `python -m smartmail send` subprocesses against an
aiosmtpd server in this process that records every message it accepts.

The server holds each DATA reply back a little (after recording the message), so a kill that
lands just after a message was accepted catches that message in flight: the worst case, a
message delivered but not acknowledged. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope, Session

from .conftest import RecordingHandler, SmtpServer, free_port, make_csv, write

WORKERS = 4
# A worker has the row it sends in flight and marks its next row ahead (docs/ledger.md).
IN_DOUBT_PER_WORKER = 2
WAIT = 30.0  # seconds: the bound on every wait; a healthy run needs a few


@dataclass
class SlowHandler(RecordingHandler):
    """Records the message, then waits `delay` seconds before answering 250."""

    delay: float = 0.0

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        await asyncio.sleep(self.delay)
        return reply


@pytest.fixture
def slow_server() -> Iterator[SmtpServer]:
    handler = SlowHandler(delay=0.4)
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield SmtpServer("127.0.0.1", controller.port, handler)
    finally:
        controller.stop()


class Runner:
    """Starts `smartmail send` for one campaign as a user's cron line would."""

    def __init__(self, tmp: Path, server: SmtpServer, rows: int, rate: float) -> None:
        self.tmp = tmp
        self.server = server
        self.db = tmp / "state.db"
        self.csv = make_csv(tmp / "list.csv", rows)
        self.template = write(
            tmp / "msg.txt", "From: a@acme.example\nSubject: Hi {{ name }}\n\nCode {{ code }}\n"
        )
        self.rate = rate
        self.count = 0
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SMARTMAIL_")}
        self.env.update(XDG_STATE_HOME=str(tmp / "xdg"), PYTHONUNBUFFERED="1", COLUMNS="120")

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        self.count += 1
        n = self.count
        command = [sys.executable, "-m", "smartmail", *args]
        with open(self.tmp / f"{n}.out", "wb") as out, open(self.tmp / f"{n}.err", "wb") as err:
            return subprocess.Popen(command, stdout=out, stderr=err, cwd=self.tmp, env=self.env)

    def send(self) -> subprocess.Popen[bytes]:
        return self.start(
            "send", str(self.csv), "-t", str(self.template), "--campaign", "cron",
            "--transport", self.server.url, "--smtp-security", "none", "--state", str(self.db),
            "--yes", "--workers", str(WORKERS), "--rate", str(self.rate), "--progress", "none",
            "--report", str(self.tmp / f"report{self.count + 1}.json"),
        )  # fmt: skip

    def output(self, n: int) -> tuple[str, str]:
        return (self.tmp / f"{n}.out").read_text(), (self.tmp / f"{n}.err").read_text()

    def report(self, n: int) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.tmp / f"report{n}.json").read_text())
        return data

    def statuses(self) -> dict[str, str]:
        conn = sqlite3.connect(self.db)
        try:
            return dict(conn.execute("SELECT recipient, status FROM deliveries"))
        finally:
            conn.close()

    def received(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.server.handler.by_recipient().items()}


def wait_until(condition: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def accepted(handler: RecordingHandler, count: int) -> Callable[[], bool]:
    return lambda: len(handler.received) >= count


def finish(proc: subprocess.Popen[bytes]) -> int:
    return proc.wait(timeout=WAIT)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [(1,), (4, 9), (14,)], ids=["early", "twice", "late"])
def test_sigkill_at_any_point_never_double_sends(
    slow_server: SmtpServer, tmp_path: Path, kill_after: tuple[int, ...]
):
    n = 16
    run = Runner(tmp_path, slow_server, n, rate=12)
    handler = slow_server.handler
    in_doubt: set[str] = set()
    for k in kill_after:
        proc = run.send()
        assert wait_until(accepted(handler, k)), "the run never got going"
        proc.send_signal(signal.SIGKILL)
        assert finish(proc) == -signal.SIGKILL
        left = {r for r, status in run.statuses().items() if status == "sending"}
        assert len(left - in_doubt) <= IN_DOUBT_PER_WORKER * WORKERS
        in_doubt |= left
    # The message just accepted when the kill landed was still waiting for its reply: the
    # worst case, delivered but not acknowledged.
    assert in_doubt and any(run.received().get(a) for a in in_doubt)
    sent_before = sum(1 for s in run.statuses().values() if s == "sent")

    final = run.send()
    assert finish(final) == 0, run.output(run.count)
    summary = run.report(run.count)
    assert summary["in_doubt"] == len(in_doubt)
    assert summary["skip_reasons"].get("already sent", 0) == sent_before
    assert summary["sent"] == n - sent_before - len(in_doubt)
    # The table names the rows in doubt once, with the command that sends them; the one-line
    # notice after it is for a cron mail. The report keeps every count.
    out, _ = run.output(run.count)
    rows = [line for line in out.splitlines() if "in doubt" in line and "in doubt:" not in line]
    assert len(rows) == 1, out
    assert "smartmail retry cron --in-doubt" in rows[0] and f" {len(in_doubt)} " in rows[0], out
    assert out.count(f"in doubt: {len(in_doubt)} (") == 1, out
    assert summary["lost_replies"] == 0
    got = run.received()
    for i in range(n):
        address = f"user{i}@example.org"
        if address in in_doubt:
            assert got.get(address, 0) <= 1, address
        else:
            assert got.get(address) == 1, address
    statuses = run.statuses()
    assert sorted(statuses.values()).count("sent") == n - len(in_doubt)

    # Sending the in-doubt rows again is a deliberate choice, and does exactly that.
    retry = run.start("retry", "cron", "--in-doubt", "--state", str(run.db), "--yes")
    assert finish(retry) == 0, run.output(run.count)
    again = run.received()
    assert all(again.get(f"user{i}@example.org", 0) >= 1 for i in range(n))
    assert {a for a, c in again.items() if c > 1} <= in_doubt
    assert set(run.statuses().values()) == {"sent"}


@pytest.mark.slow
def test_overlapping_runs_of_one_campaign_only_one_sends(slow_server: SmtpServer, tmp_path: Path):
    n = 12
    run = Runner(tmp_path, slow_server, n, rate=10)
    first = run.send()
    assert wait_until(accepted(slow_server.handler, 1))
    second = run.send()
    assert finish(second) == 3
    out, err = run.output(2)
    assert f"being sent by another smartmail run (pid {first.pid})" in err
    assert "sent nothing" in err and "summary" not in out
    assert finish(first) == 0, run.output(1)
    assert run.received() == {f"user{i}@example.org": 1 for i in range(n)}


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_records_everything_and_a_rerun_completes_it(
    slow_server: SmtpServer, tmp_path: Path, sig: signal.Signals, code: int
):
    n = 20
    run = Runner(tmp_path, slow_server, n, rate=10)
    proc = run.send()
    assert wait_until(accepted(slow_server.handler, 4))
    proc.send_signal(sig)
    assert finish(proc) == code
    out, _ = run.output(1)
    assert "smartmail summary" in out and "interrupted" in out
    first = run.report(1)
    assert first["interrupted"] is True
    assert first["sent"] == len(slow_server.handler.received)  # in-flight sends finished
    assert first["sent"] + first["failed"] + first["skipped"] + first["unsent"] == n
    assert first["unsent"] > 0
    statuses = sorted(run.statuses().values())
    assert statuses.count("sent") == first["sent"]
    assert "sending" not in statuses  # nothing left in doubt by a graceful stop

    again = run.send()
    assert finish(again) == 0, run.output(2)
    second = run.report(2)
    assert second["sent"] == n - first["sent"]
    assert second["skip_reasons"] == {"already sent": first["sent"]}
    assert run.received() == {f"user{i}@example.org": 1 for i in range(n)}
