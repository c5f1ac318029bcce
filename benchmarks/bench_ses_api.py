"""`smartmail send --transport ses://` (whole process, ledger on) vs a bare boto3 loop, against
the fast local SES endpoint of benchmarks/ses_endpoint.py.

    .venv/bin/python benchmarks/bench_ses_api.py [--messages 3000] [--workers 8] [--rounds 3]

Each round runs, one after the other, two child processes timed from spawn to exit:
(a) bare: `python benchmarks/bare_ses.py`, `--workers` threads each with its own boto3 sesv2
    client calling `send_email` (Raw) with one pre-built message;
(b) `python -m smartmail send CSV -t TEMPLATE --transport ses://us-east-1 --workers 8 --yes`
    with the default ledger.
Both point at the endpoint through AWS_ENDPOINT_URL with made-up credentials; nothing leaves
127.0.0.1. The endpoint's count must grow by exactly N each run, with no address twice.
Reported: medians of msg/s, the ratio, CPU per message and peak RSS of each child.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.bench_cli import timed
from benchmarks.bench_smtp import SinkProcess, compile_smartmail, write_campaign
from smartmail import MessageTemplate, RecipientSource, SourceSpec, build

HERE = Path(__file__).resolve().parent
ENDPOINT = HERE / "ses_endpoint.py"
BARE = HERE / "bare_ses.py"
REGION = "us-east-1"


def endpoint_stats(port: int, what: str = "stats") -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{what}", timeout=10) as answer:
        data: dict[str, Any] = json.loads(answer.read())
    return data


def aws_env(port: int, state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMARTMAIL_", "AWS_"))}
    env.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="AKIDEXAMPLEBENCH0000",
        AWS_SECRET_ACCESS_KEY="bench-secret",
        AWS_DEFAULT_REGION=REGION,
        XDG_STATE_HOME=str(state),
    )
    return env


def send_command(csv_path: Path, template: Path, workers: int, report: Path) -> list[str]:
    return [
        sys.executable, "-m", "smartmail", "send", str(csv_path), "-t", str(template),
        "--transport", f"ses://{REGION}", "--workers", str(workers), "--yes",
        "--progress", "none", "--report", str(report),
        "--failed-csv", str(report.with_suffix(".failed.csv")),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    compile_smartmail()
    n, workers = args.messages, args.workers
    rates: dict[str, list[float]] = {"bare": [], "smartmail": []}
    cpu: dict[str, list[float]] = {"bare": [], "smartmail": []}
    rss: dict[str, list[float]] = {"bare": [], "smartmail": []}
    server = SinkProcess(script=ENDPOINT)
    try:
        with tempfile.TemporaryDirectory(prefix="smartmail-bench-") as tmp:
            folder = Path(tmp)
            csv_path, template = write_campaign(folder, n)
            first, _ = next(RecipientSource(SourceSpec(str(csv_path))).rows())
            message = folder / "message.eml"
            message.write_bytes(build(MessageTemplate.load(template).render(first, "email")).data)
            for round_no in range(1, args.rounds + 1):
                for name in ("bare", "smartmail"):
                    endpoint_stats(server.port, "reset")
                    env = aws_env(server.port, folder / f"state-{round_no}")
                    report = folder / f"report-{round_no}.json"
                    if name == "bare":
                        cmd = [sys.executable, str(BARE), str(message), str(n), str(workers)]
                    else:
                        cmd = send_command(csv_path, template, workers, report)
                    seconds, cpu_s, peak = timed(cmd, env)
                    after = endpoint_stats(server.port)
                    if (after["accepted"], after["distinct"], after["duplicates"]) != (n, n, 0):
                        raise RuntimeError(f"{name}: the endpoint saw {after['accepted']} of {n}")
                    if name == "smartmail":
                        summary = json.loads(report.read_text(encoding="utf-8"))
                        if summary["sent"] != n:
                            raise RuntimeError(f"smartmail sent {summary['sent']} of {n}")
                    rates[name].append(n / seconds)
                    cpu[name].append(cpu_s / n * 1000)
                    rss[name].append(peak)
                    print(
                        f"  round {round_no} {name:<9} {seconds:6.2f} s {n / seconds:7.0f} msg/s"
                        f"  CPU {cpu[name][-1]:.3f} ms/msg  peak RSS {peak:.0f} MB",
                        flush=True,
                    )
    finally:
        server.stop()
    bare, smart = statistics.median(rates["bare"]), statistics.median(rates["smartmail"])
    result = {
        "messages": n,
        "workers": workers,
        "bare_rate": bare,
        "smartmail_rate": smart,
        "ratio": smart / bare,
        "bare_cpu_ms": statistics.median(cpu["bare"]),
        "smartmail_cpu_ms": statistics.median(cpu["smartmail"]),
        "bare_peak_rss_mb": max(rss["bare"]),
        "smartmail_peak_rss_mb": max(rss["smartmail"]),
    }
    print(
        f"ses:// {n} messages, {workers} workers, median of {args.rounds}: bare boto3 "
        f"{bare:.0f} msg/s, smartmail {smart:.0f} msg/s = {smart / bare:.1%}; CPU/msg "
        f"{result['bare_cpu_ms']:.3f} vs {result['smartmail_cpu_ms']:.3f} ms; peak RSS "
        f"{result['bare_peak_rss_mb']:.0f} vs {result['smartmail_peak_rss_mb']:.0f} MB"
    )
    return result


if __name__ == "__main__":
    main()
