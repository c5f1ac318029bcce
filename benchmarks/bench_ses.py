"""Messages/second through ses:// against a moto server on 127.0.0.1, and where the CPU goes.

    .venv/bin/python benchmarks/bench_ses.py [--messages 2000] [--workers 4] [--write-docs]

Two measurements:
1. Throughput: the real engine (pre-flight, render, MIME, token bucket off, N workers, one
   boto3 client each) sending N rows through SES v2 SendEmail to a ThreadedMotoServer in this
   process. moto's server shares the process and the GIL, so this is a floor, not SES's speed.
2. CPU profile: the same run with a `cProfile` profiler per thread that counts CPU time
   (`time.thread_time`), so waiting on the socket or for the GIL is not counted. Time inside
   boto3's `send_email` call (request signing, serialising, HTTP, parsing) is botocore's; every
   other CPU second in the sending threads is smartmail's own (rows, Jinja2, MIME, engine,
   limiter, metrics), divided by the number of messages.

No network beyond 127.0.0.1; every loop is bounded by --messages.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import os
import pstats
import queue
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

from smartmail import MessageTemplate, RecipientSource, RetryPolicy, SendOptions, SourceSpec
from smartmail.engine import Run, _Job, preflight
from smartmail.message import OutgoingMessage
from smartmail.transports import get_transport

REGION = "us-east-1"
TEMPLATE = """\
From: Acme News <news@acme.example>
To: {{ name }} <{{ email }}>
Subject: Your spring offer, {{ name }}

Dear {{ name }},

your personal code is {{ code }}. It is valid until the end of the month.
"""
HTML = "<p>Dear <b>{{ name }}</b>,</p><p>your personal code is <code>{{ code }}</code>.</p>\n"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADING = "### SES API transport (moto, library API)"


def setup(n: int, folder: Path) -> tuple[Path, Path]:
    rows = ["email,name,code"] + [f"user{i}@example.org,User {i},C{i:06d}" for i in range(n)]
    csv_path = folder / "recipients.csv"
    csv_path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    template = folder / "offer.txt"
    template.write_text(TEMPLATE, encoding="utf-8")
    (folder / "offer.html").write_text(HTML, encoding="utf-8")
    return csv_path, template


class MeasuredRun(Run):
    """The engine's run, counting the CPU time of every sending thread (and, optionally,
    profiling it with cProfile on CPU time). The moto server's threads are not counted."""

    profile = False
    lock = threading.Lock()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cpu_seconds = 0.0
        self.profiles: list[cProfile.Profile] = []

    def _measured(self, work: Any, *args: Any) -> Any:
        profile = cProfile.Profile(time.thread_time) if self.profile else None
        started = time.thread_time()
        if profile:
            profile.enable()
        try:
            return work(*args)
        finally:
            if profile:
                profile.disable()
            spent = time.thread_time() - started
            with self.lock:
                self.cpu_seconds += spent
                if profile:
                    self.profiles.append(profile)

    def _worker(self, jobs: queue.Queue[_Job | None]) -> None:
        self._measured(super()._worker, jobs)

    def run(self) -> Any:
        return self._measured(super().run)


class NullSession:
    def send(self, message: OutgoingMessage) -> str:
        return message.message_id

    def close(self) -> None:
        return None


class NullTransport:
    """Takes every message and does nothing: what is left is smartmail's own cost."""

    url = "null://"
    allow_utf8_local = False

    def open_session(self) -> NullSession:
        return NullSession()

    def default_rate(self) -> float | None:
        return None

    def close(self) -> None:
        return None


def run_once(
    csv_path: Path, template_path: Path, workers: int, *, profile: bool = False, null: bool = False
) -> tuple[float, int, MeasuredRun]:
    source = RecipientSource(SourceSpec(str(csv_path)))
    template = MessageTemplate.load(template_path)
    transport: Any = NullTransport() if null else get_transport(f"ses://{REGION}")
    options = SendOptions(workers=workers)
    checked = preflight(source, template, options, allow_utf8_local=False)
    runner = MeasuredRun(
        source, template, transport, checked, options=options, retry=RetryPolicy(max_retries=0)
    )
    runner.profile = profile
    started = time.perf_counter()
    summary = runner.run()
    elapsed = time.perf_counter() - started
    if summary.sent != checked.valid:
        raise SystemExit(f"only {summary.sent} of {checked.valid} sent: {summary.failure_reasons}")
    return elapsed, summary.sent, runner


def breakdown(profiles: list[cProfile.Profile], sent: int) -> dict[str, float]:
    """CPU ms per message: total, inside boto3's send_email, creating clients, and our own."""
    stats = pstats.Stats(profiles[0])
    for extra in profiles[1:]:
        stats.add(extra)
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in table.values())

    def cumulative(file_part: str, name: str) -> float:
        return float(
            sum(
                entry[3]
                for (file, _, func), entry in table.items()
                if file_part in file and func == name
            )
        )

    api = cumulative("botocore/client.py", "_api_call")
    clients = cumulative("smartmail/aws.py", "client")
    signing = cumulative("botocore/auth.py", "add_auth")
    http = cumulative("botocore/endpoint.py", "_send")
    per = 1000.0 / sent
    return {
        "total": total * per,
        "botocore": api * per,
        "signing": signing * per,
        "http": http * per,
        "clients": clients * per,
        "own": (total - api - clients) * per,
    }


def report(args: argparse.Namespace, r: dict[str, Any]) -> str:
    b = r["breakdown"]
    ses_cpu, own_cpu = r["ses_cpu_ms"], r["own_cpu_ms"]
    command = f".venv/bin/python benchmarks/bench_ses.py --messages {args.messages} " + (
        f"--workers {args.workers} --profile-messages {args.profile_messages}"
    )
    return "\n".join(
        [
            HEADING,
            "",
            f"Measured {time.strftime('%Y-%m-%d')} on a 2-core machine shared with other jobs, "
            f"Python {sys.version.split()[0]}, boto3 {boto3.__version__}, against a moto "
            "`ThreadedMotoServer` on 127.0.0.1 in the same process. moto spends far more per "
            "request than smartmail does and shares the GIL, so the rate is moto's ceiling, "
            "not SES's or smartmail's.",
            "",
            "```",
            command,
            "```",
            "",
            "| run | messages | seconds | messages/s | client-side CPU ms / message |",
            "|---|---:|---:|---:|---:|",
            f"| ses:// to moto, {args.workers} workers | {r['sent']} | {r['seconds']:.2f} | "
            f"{r['sent'] / r['seconds']:,.0f} | {ses_cpu:.3f} |",
            f"| same rows, transport that does nothing | {r['sent']} | {r['null_seconds']:.2f} | "
            f"{r['sent'] / r['null_seconds']:,.0f} | {own_cpu:.3f} |",
            "",
            "Client-side CPU is the CPU time (`time.thread_time`) of the threads that send: the "
            "main thread (CSV, Jinja2, MIME, queue) and the workers (limiter, boto3, outcomes), "
            "not moto's server threads. The run with a do-nothing transport is smartmail's own "
            f"cost: **{own_cpu:.3f} ms of our own CPU per message** (target: under 1 ms). "
            f"boto3/botocore add {ses_cpu - own_cpu:.3f} ms a message on top.",
            "",
            f"Where the CPU goes inside a send, from `cProfile` on CPU time in every sending "
            f"thread ({r['profiled']} messages; profiling inflates pure-Python code, so use the "
            "shares, not the absolute figures):",
            "",
            "| where | profiled CPU ms / message | share |",
            "|---|---:|---:|",
            *(
                f"| {label} | {b[key]:.3f} | {100 * b[key] / b['total']:.0f}% |"
                for key, label in (
                    ("own", "smartmail's own code (CSV, Jinja2, MIME, engine, limiter)"),
                    ("botocore", "inside boto3 `send_email` (serialise, sign, HTTP, parse)"),
                    ("signing", "  of which SigV4 signing"),
                    ("http", "  of which the HTTP exchange (urllib3, http.client)"),
                    ("clients", "creating one boto3 client per worker (once per run)"),
                )
            ),
            "",
        ]
    )


def write_docs(section: str) -> None:
    text = DOCS.read_text(encoding="utf-8") if DOCS.exists() else "# Benchmarks\n\n"
    if HEADING in text:
        start = text.index(HEADING)
        found = re.search(r"\n#{2,3} ", text[start + len(HEADING) :])
        following = start + len(HEADING) + found.start() if found else -1
        end = len(text) if following < 0 else following + 1
        text = text[:start] + section + ("\n" + text[end:] if following >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--profile-messages", type=int, default=500)
    parser.add_argument("--write-docs", action="store_true", help=f"update {DOCS}")
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="AKIDEXAMPLEBENCH0000",
        AWS_SECRET_ACCESS_KEY="bench-secret",
        AWS_DEFAULT_REGION=REGION,
    )
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    results: dict[str, Any] = {}
    try:
        boto3.client("sesv2", region_name=REGION).create_email_identity(
            EmailIdentity="acme.example"
        )
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            csv_path, template = setup(args.messages, folder)
            secs, sent, runner = run_once(csv_path, template, args.workers)
            results.update(seconds=secs, sent=sent, ses_cpu_ms=1000 * runner.cpu_seconds / sent)
            print(f"ses://, {args.workers} workers: {sent} in {secs:.2f} s = {sent / secs:,.0f}/s")
            secs, sent, runner = run_once(csv_path, template, args.workers, null=True)
            results.update(null_seconds=secs, own_cpu_ms=1000 * runner.cpu_seconds / sent)
            small = folder / "small"
            small.mkdir()
            csv_path, template = setup(args.profile_messages, small)
            _, sent, runner = run_once(csv_path, template, args.workers, profile=True)
            results.update(breakdown=breakdown(runner.profiles, sent), profiled=sent)
    finally:
        server.stop()
    section = report(args, results)
    print()
    print(section)
    if args.write_docs:
        write_docs(section)
        print(f"written to {DOCS}")


if __name__ == "__main__":
    main()
