"""Messages/second through smtp:// against a local sink, next to a bare smtplib loop.

    .venv/bin/python benchmarks/bench_smtp.py [--messages 20000] [--workers 8] [--rounds 3]

The sink (benchmarks/smtp_sink.py, aiosmtpd, plain SMTP on 127.0.0.1) runs in a separate
process, so its CPU does not share this process's GIL. Each round runs, one after the other:

(a) bare: `--workers` threads, each holding one persistent `smtplib.SMTP` connection and
    calling `sendmail()` with one pre-built message (built once by smartmail from the first
    row, so the size and MIME shape are the same as in (b)) until N messages are sent;
(b) smartmail: `send_campaign()` through the library API with `smtp://127.0.0.1:PORT`,
    `--workers` workers and no rate limit, from a generated N-row CSV and a text + HTML
    template with a non-ASCII name now and then. Its time includes everything a user waits
    for: pre-flight of every row, then rendering, MIME, queue, sends and outcomes.

Rounds alternate (a) and (b) so that load from other processes hits both alike; the medians
and the ratio smartmail/bare are printed. The sink's own count (read with NOOP) must grow by
exactly N in each run, or the benchmark fails. No network beyond 127.0.0.1; every loop is
bounded by the message count, and the sink is stopped at the end.
"""

from __future__ import annotations

import argparse
import compileall
import itertools
import logging
import os
import selectors
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from smartmail import (
    MessageTemplate,
    RecipientSource,
    SendOptions,
    SourceSpec,
    TransportOptions,
    build,
    get_transport,
    send_campaign,
)

SINK = Path(__file__).resolve().with_name("smtp_sink.py")


def compile_smartmail() -> None:
    """Write smartmail's bytecode before timing it, as `pip install` does.

    This checkout is an editable install and the machine sets PYTHONDONTWRITEBYTECODE, so
    without this every child process compiles smartmail's source again (~70 ms of a
    dry-run's start-up, ~0.03 ms a message of a 3,000-row send), while click, jinja2 and
    boto3, installed from wheels, load their bytecode.
    """
    compileall.compile_dir(Path(__file__).resolve().parents[1] / "smartmail", quiet=1)


SENDER = "news@acme.example"
TEMPLATE = """\
From: Acme News <news@acme.example>
To: {{ name }} <{{ email }}>
Reply-To: Acme Support <support@acme.example>
Subject: {{ name }}, your spring offer is here

Dear {{ name }},

thank you for being a customer since {{ since }}. Your personal code is {{ code }};
it takes 15% off anything in the spring collection until the end of the month.

Use it online at https://shop.acme.example/spring or show it in any of our shops.

Kind regards,
the Acme team
"""
HTML = """\
<html><body>
<p>Dear <b>{{ name }}</b>,</p>
<p>thank you for being a customer since {{ since }}. Your personal code is
<code>{{ code }}</code>; it takes 15% off anything in the spring collection until the end
of the month.</p>
<p><a href="https://shop.acme.example/spring">Shop the spring collection</a></p>
<p>Kind regards,<br>the Acme team</p>
</body></html>
"""
NAMES = ["Ann Lee", "Bob Stone", "Chloé Dubois", "Dan Ray", "Eve Park", "Jörg Müller", "Kim Yu"]


def write_campaign(folder: Path, n: int) -> tuple[Path, Path]:
    """An N-row recipients CSV (every 7th-ish name non-ASCII) and a text + HTML template."""
    csv_path = folder / "recipients.csv"
    with open(csv_path, "w", encoding="utf-8", newline="") as fh:
        fh.write("email,name,code,since\n")
        for i in range(n):
            name = NAMES[i % len(NAMES)]
            fh.write(f"user{i}@example.org,{name},C{i:07d},{2000 + i % 25}\n")
    template = folder / "offer.txt"
    template.write_text(TEMPLATE, encoding="utf-8")
    (folder / "offer.html").write_text(HTML, encoding="utf-8")
    return csv_path, template


class SinkProcess:
    """The sink in its own process; the port is read from its first line of output."""

    def __init__(
        self, start_timeout: float = 20.0, script: Path = SINK, args: tuple[str, ...] = ()
    ) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(script), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout=start_timeout):
                self.stop()
                raise RuntimeError(f"the SMTP sink did not start within {start_timeout}s")
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"the SMTP sink did not start: {line!r}")
        self.port = int(line.split()[1])

    def count(self) -> int:
        """Messages the sink has accepted so far (asked over SMTP with NOOP)."""
        with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as conn:
            code, reply = conn.noop()
        if code != 250:
            raise RuntimeError(f"sink NOOP answered {code}")
        return int(reply)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def split(n: int, workers: int) -> list[int]:
    return [n // workers + (1 if i < n % workers else 0) for i in range(workers)]


def run_bare(port: int, data: bytes, recipients: list[str], workers: int) -> float:
    """(a) N sendmail() calls over `workers` persistent connections; returns seconds."""
    errors: list[BaseException] = []
    start = threading.Barrier(workers + 1)
    shares = split(len(recipients), workers)
    offsets = list(itertools.accumulate([0, *shares]))

    def worker(index: int) -> None:
        try:
            start.wait()
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as conn:
                for rcpt in recipients[offsets[index] : offsets[index + 1]]:
                    conn.sendmail(SENDER, [rcpt], data)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"bare smtplib loop failed: {errors[0]!r}")
    return elapsed


def run_smartmail(
    port: int, csv_path: Path, template_path: Path, workers: int
) -> tuple[float, float]:
    """(b) send_campaign(); returns (seconds end to end, seconds of the send pass alone).

    End to end is what a user waits for: reading the template, pre-flight of every row, then
    the send pass. The send pass is what smartmail's own summary times ("elapsed", "achieved
    rate"): from the first row rendered for sending to the last outcome.
    """
    began = time.perf_counter()
    source = RecipientSource(SourceSpec(str(csv_path)))
    template = MessageTemplate.load(template_path)
    transport = get_transport(f"smtp://127.0.0.1:{port}", TransportOptions(smtp_security="none"))
    summary = send_campaign(
        source, template, transport, options=SendOptions(workers=workers, failed_csv=None)
    )
    elapsed = time.perf_counter() - began
    if summary.sent != summary.rows or summary.failed or summary.unsent:
        raise RuntimeError(f"smartmail did not send every row: {summary.to_json()}")
    return elapsed, summary.elapsed_seconds


class Measured:
    """Rates and client CPU per message of one contender over the rounds."""

    def __init__(self, name: str, n: int) -> None:
        self.name = name
        self.n = n
        self.rates: list[float] = []
        self.pass_rates: list[float] = []
        self.cpu_ms: list[float] = []

    def add(self, seconds: float, cpu_seconds: float, pass_seconds: float | None = None) -> str:
        self.rates.append(self.n / seconds)
        self.cpu_ms.append(cpu_seconds / self.n * 1000)
        line = (
            f"{self.name:<13} {self.n} messages in {seconds:6.2f} s {self.n / seconds:8.1f} msg/s"
        )
        if pass_seconds is not None:
            self.pass_rates.append(self.n / pass_seconds)
            line += f" (send pass {self.n / pass_seconds:7.1f} msg/s)"
        return line + f"  client CPU {self.cpu_ms[-1]:.3f} ms/msg"

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    @property
    def pass_rate(self) -> float:
        return statistics.median(self.pass_rates or self.rates)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpu_ms)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    n, workers = args.messages, args.workers
    logging.getLogger("smartmail").setLevel(logging.WARNING)
    bare, smart = Measured("bare smtplib", n), Measured("smartmail", n)
    delivered: list[int] = []

    sink = SinkProcess()
    try:
        with tempfile.TemporaryDirectory(prefix="smartmail-bench-") as tmp:
            csv_path, template_path = write_campaign(Path(tmp), n)
            source = RecipientSource(SourceSpec(str(csv_path)))
            template = MessageTemplate.load(template_path)
            first_row, _ = next(source.rows())
            data = build(template.render(first_row, source.to_column)).data
            recipients = [f"user{i}@example.org" for i in range(n)]
            for round_no in range(1, args.rounds + 1):
                before, cpu = sink.count(), time.process_time()
                seconds = run_bare(sink.port, data, recipients, workers)
                cpu = time.process_time() - cpu
                got = sink.count() - before
                if got != n:
                    raise RuntimeError(f"bare smtplib: the sink received {got} of {n} messages")
                print(f"round {round_no}  {bare.add(seconds, cpu)}", flush=True)

                before, cpu = sink.count(), time.process_time()
                seconds, pass_seconds = run_smartmail(sink.port, csv_path, template_path, workers)
                cpu = time.process_time() - cpu
                got = sink.count() - before
                delivered.append(got)
                if got != n:
                    raise RuntimeError(f"smartmail: the sink received {got} of {n} messages")
                print(f"round {round_no}  {smart.add(seconds, cpu, pass_seconds)}", flush=True)
    finally:
        sink.stop()
    result: dict[str, Any] = {
        "messages": n,
        "workers": workers,
        "message_bytes": len(data),
        "bare_rate": bare.rate,
        "smartmail_rate": smart.rate,
        "smartmail_send_pass_rate": smart.pass_rate,
        "ratio": smart.rate / bare.rate,
        "send_pass_ratio": smart.pass_rate / bare.rate,
        "bare_rates": bare.rates,
        "smartmail_rates": smart.rates,
        "smartmail_send_pass_rates": smart.pass_rates,
        "smartmail_delivered": delivered,
        "bare_cpu_ms": bare.cpu,
        "smartmail_cpu_ms": smart.cpu,
    }
    print(
        f"median of {args.rounds} rounds ({workers} workers, {len(data)}-byte messages, "
        f"{os.cpu_count()} CPUs):\n"
        f"  bare smtplib          {bare.rate:8.1f} msg/s\n"
        f"  smartmail end to end  {smart.rate:8.1f} msg/s  = {result['ratio']:.1%} of bare "
        "(pre-flight of every row included)\n"
        f"  smartmail send pass   {smart.pass_rate:8.1f} msg/s  = {result['send_pass_ratio']:.1%}"
        " of bare (the rate its summary reports)\n"
        f"  client CPU per message (this process, not the sink): bare {bare.cpu:.3f} ms, "
        f"smartmail {smart.cpu:.3f} ms"
    )
    return result


if __name__ == "__main__":
    main()
