"""The headline: `smartmail send` as a user runs it (whole process, ledger on) vs a bare loop.

    .venv/bin/python benchmarks/bench_cli.py [--messages 3000,20000] [--workers 8] [--rounds 3]

Against the aiosmtpd sink of benchmarks/smtp_sink.py (its own process, 127.0.0.1), each round
runs, one after the other, three child processes timed from spawn to exit:

(a) bare: `python benchmarks/bare_smtp.py`, `--workers` threads with persistent smtplib
    connections sending one pre-built message (built by smartmail from the first row, so
    size and MIME shape match);
(b) `python -m smartmail send CSV -t TEMPLATE --transport smtp://... --workers 8 --yes`
    with the default ledger (a state database under a fresh XDG_STATE_HOME);
(c) the same with `--no-state`.

Rounds alternate so outside load hits all three alike; medians and ratios to (a) are
reported, with each child's CPU (user + system, from `os.wait4`) per message. The sink's count
must grow by exactly N in every run and smartmail's report must say N sent.

For smartmail the send pass's own rate (from its report) is printed too, and the seconds outside
it (the whole run less the send pass: start-up, the pre-flight that renders and checks every row
before anything is sent, and exit): the bare loop renders and checks nothing, so this is what
the whole-process ratio pays for that promise.

`--pin` puts the sink alone on one CPU and every client (bare, smartmail, ideal) on another,
as when the server is another machine: the clients then compete with each other's work only,
not with the server's. Without it (the default, and the headline) the sink and the client
share the machine's cores, so every millisecond of client CPU is one the sink may lose.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.bench_smtp import SinkProcess, compile_smartmail, write_campaign
from smartmail import MessageTemplate, RecipientSource, SourceSpec, build

BARE = Path(__file__).resolve().with_name("bare_smtp.py")
IDEAL = Path(__file__).resolve().with_name("ideal_smtp.py")
TIMEOUT = 600.0


def timed(
    cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[float, float, float]:
    """Run a child to completion: (wall seconds, CPU seconds, peak RSS MB). Fails loudly.

    Give `cwd` outside any source tree when the child is `python -m smartmail`: `-m` puts the
    working directory first on sys.path, ahead of PYTHONPATH, so run from the repository it
    would import the repository's smartmail even when PYTHONPATH names another tree.
    """
    began = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd
    )
    timer = threading.Timer(TIMEOUT, proc.kill)
    timer.start()
    try:
        _pid, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    seconds = time.perf_counter() - began
    assert proc.stderr is not None
    err = proc.stderr.read().decode("utf-8", "replace")
    proc.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... exited {code}: {err.strip()[-800:]}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def send_command(
    csv_path: Path, template: Path, port: int, workers: int, report: Path
) -> list[str]:
    return [
        sys.executable, "-m", "smartmail", "send", str(csv_path), "-t", str(template),
        "--transport", f"smtp://127.0.0.1:{port}", "--smtp-security", "none",
        "--workers", str(workers), "--yes", "--progress", "none", "--report", str(report),
        "--failed-csv", str(report.with_suffix(".failed.csv")),
    ]  # fmt: skip


class Series:
    def __init__(self) -> None:
        self.rates: list[float] = []
        self.cpu_ms: list[float] = []
        self.pass_rates: list[float] = []
        self.outside: list[float] = []  # seconds outside the send pass: start-up, pre-flight, exit
        self.rss: list[float] = []

    def add(self, n: int, seconds: float, cpu: float, rss: float) -> None:
        self.rates.append(n / seconds)
        self.cpu_ms.append(cpu / n * 1000)
        self.rss.append(rss)

    def median(self, values: list[float]) -> float:
        return statistics.median(values) if values else 0.0


def measure(
    sink: SinkProcess,
    folder: Path,
    n: int,
    workers: int,
    rounds: int,
    other: str | None = None,
    ceiling: bool = False,
) -> dict[str, Any]:
    sub = folder / str(n)
    sub.mkdir()
    csv_path, template = write_campaign(sub, n)
    source = RecipientSource(SourceSpec(str(csv_path)))
    first, _ = next(source.rows())
    message = sub / "message.eml"
    message.write_bytes(build(MessageTemplate.load(template).render(first, "email")).data)
    series = {"bare": Series(), "ledger": Series(), "no-state": Series()}
    if other:
        series["other"] = Series()
    if ceiling:
        series["ideal"] = Series()
        series["ideal+ledger"] = Series()
    for round_no in range(1, rounds + 1):
        for name, series_of in series.items():
            before = sink.count()
            report = sub / f"{name}-{round_no}.json"
            if name == "bare":
                cmd = [sys.executable, str(BARE), str(sink.port), str(message), str(n)]
                seconds, cpu, rss = timed([*cmd, str(workers)])
            elif name.startswith("ideal"):
                cmd = [
                    sys.executable, str(IDEAL), str(sink.port), str(csv_path), str(template),
                    str(template.with_suffix(".html")), str(message), str(workers),
                ]  # fmt: skip
                if name == "ideal+ledger":
                    cmd += ["--ledger", str(sub / f"ideal-{round_no}.db")]
                seconds, cpu, rss = timed(cmd)
            else:
                cmd = send_command(csv_path, template, sink.port, workers, report)
                env = {k: v for k, v in os.environ.items() if not k.startswith("SMARTMAIL_")}
                env["XDG_STATE_HOME"] = str(sub / f"state-{name}-{round_no}")
                if name == "no-state":
                    cmd.append("--no-state")
                if name == "other":
                    env["PYTHONPATH"] = str(other)
                seconds, cpu, rss = timed(cmd, env, cwd=sub)
                summary = json.loads(report.read_text(encoding="utf-8"))
                if summary["sent"] != n:
                    raise RuntimeError(f"smartmail sent {summary['sent']} of {n}")
                series_of.pass_rates.append(float(summary["rate_per_second"]))
                series_of.outside.append(seconds - float(summary["elapsed_seconds"]))
            got = sink.count() - before
            if got != n:
                raise RuntimeError(f"{name}: the sink received {got} of {n} messages")
            series_of.add(n, seconds, cpu, rss)
            print(
                f"  {n} rows round {round_no} {name:<12} {seconds:6.2f} s {n / seconds:7.0f} msg/s"
                f"  CPU {series_of.cpu_ms[-1]:.3f} ms/msg",
                flush=True,
            )
    out: dict[str, Any] = {"messages": n}
    bare = statistics.median(series["bare"].rates)
    for name, s in series.items():
        out[name] = {
            "rate": statistics.median(s.rates),
            "rates": s.rates,
            "cpu_ms": statistics.median(s.cpu_ms),
            "send_pass_rate": s.median(s.pass_rates),
            "outside_send_pass_s": s.median(s.outside),
            "peak_rss_mb": max(s.rss),
            "ratio": statistics.median(s.rates) / bare,
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", default="3000,20000")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--other",
        metavar="DIR",
        help="also run (ledger on) the smartmail package found in DIR (e.g. an older checkout): "
        "a before/after comparison in the same rounds",
    )
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="also run benchmarks/ideal_smtp.py without and with its durable marks: the least "
        "a sender that renders every row first (and marks it before sending) can cost",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the sink alone on one CPU, the clients on another (a server elsewhere); needs 2",
    )
    args = parser.parse_args(argv)
    compile_smartmail()
    if args.other:  # the same footing: bytecode written for the other tree too
        compileall.compile_dir(Path(args.other) / "smartmail", quiet=1)
    sizes = [int(x) for x in args.messages.split(",")]
    results: dict[str, Any] = {"workers": args.workers, "sizes": [], "pinned": args.pin}
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and len(cpus) < 2:
        raise SystemExit("--pin needs two CPUs")
    sink = SinkProcess()
    before = set(cpus)
    if args.pin:
        os.sched_setaffinity(sink.proc.pid, {cpus[0]})
        os.sched_setaffinity(0, {cpus[1]})  # every client spawned from here inherits it
    try:
        with tempfile.TemporaryDirectory(prefix="smartmail-bench-") as tmp:
            for n in sizes:
                results["sizes"].append(
                    measure(sink, Path(tmp), n, args.workers, args.rounds, args.other, args.ceiling)
                )
    finally:
        sink.stop()
        os.sched_setaffinity(0, before)
    for size in results["sizes"]:
        bare = size["bare"]["rate"]
        pinned = ", sink and clients on CPUs of their own" if args.pin else ""
        print(
            f"{size['messages']} messages, {args.workers} workers, median of {args.rounds}{pinned}:"
        )
        for name in size:
            if name == "messages":
                continue
            s = size[name]
            print(
                f"  {name:<12} {s['rate']:7.0f} msg/s  {s['rate'] / bare:6.1%}  "
                f"CPU {s['cpu_ms']:.3f} ms/msg  peak RSS {s['peak_rss_mb']:.0f} MB"
                + (
                    f"  (send pass {s['send_pass_rate']:.0f} msg/s; start-up, pre-flight and "
                    f"exit {s['outside_send_pass_s']:.2f} s)"
                    if name != "bare" and not name.startswith("ideal")
                    else ""
                )
            )
    return results


if __name__ == "__main__":
    main()
