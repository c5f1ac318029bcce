"""The rate at the receiver: adaptive against a provider that throttles, and precise when set.

    .venv/bin/python benchmarks/bench_rate.py [--messages 1000] [--limit 50] [--precise 1500]

Each scenario runs `python -m smartmail send` (8 workers, default retries) as a child process
against a server in its own process that records when each message arrived:

- smtp, --rate above the limit: the aiosmtpd sink answers "454 4.7.0 Throttling failure:
  Maximum sending rate exceeded." once `--limit` messages arrived in the last second;
- smtp, no --rate (the SMTP default: an unlimited limiter until the first throttle);
- ses://, the quota's MaxSendRate above the limit: benchmarks/ses_endpoint.py answers SES's
  400 Throttling "Maximum sending rate exceeded." the same way;
- precision: `--rate 100 --burst 5`, a sink that never throttles, `--precise` messages.

Reported at the receiver: goodput after the first 5 s (accepted messages a second), throttled
attempts per message, whether every row arrived exactly once, the largest count in any
one-second window, and the achieved rate (messages - 1 over first-to-last arrival).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.bench_cli import timed
from benchmarks.bench_ses_api import ENDPOINT, REGION, aws_env, endpoint_stats
from benchmarks.bench_smtp import SinkProcess, compile_smartmail, write_campaign

WORKERS = 8


def max_in_any_window(times: list[float], window: float = 1.0) -> int:
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] > window:
            start += 1
        best = max(best, end - start + 1)
    return best


def analyse(stats: dict[str, Any], n: int) -> dict[str, Any]:
    times = sorted(stats["times"])
    t0 = times[0]
    late = [t for t in times if t >= t0 + 5.0]
    span = times[-1] - (t0 + 5.0)
    return {
        "accepted": stats["accepted"],
        "exactly_once": (stats["accepted"], stats["distinct"], stats["duplicates"]) == (n, n, 0),
        "throttled": stats["throttled"],
        "throttled_share": stats["throttled"] / n,
        "goodput_after_5s": len(late) / span if span > 0 else 0.0,
        "max_window": max_in_any_window(times),
        "achieved": (len(times) - 1) / (times[-1] - t0) if len(times) > 1 else 0.0,
        "seconds": times[-1] - t0,
    }


def send(
    folder: Path, name: str, transport: list[str], extra: list[str], env: dict[str, str]
) -> tuple[dict[str, Any], float]:
    report = folder / f"{name}.report.json"
    cmd = [
        sys.executable, "-m", "smartmail", "send", str(folder / "recipients.csv"),
        "-t", str(folder / "offer.txt"), *transport, "--workers", str(WORKERS), "--yes",
        "--progress", "none", "--report", str(report),
        "--failed-csv", str(folder / f"{name}.failed.csv"), *extra,
    ]  # fmt: skip
    seconds, _cpu, _rss = timed(cmd, env)
    summary: dict[str, Any] = json.loads(report.read_text(encoding="utf-8"))
    return summary, seconds


def smtp_scenario(folder: Path, name: str, n: int, limit: int, extra: list[str]) -> dict[str, Any]:
    record = folder / f"{name}.sink.json"
    args = ("--record", str(record), *(("--limit", str(limit)) if limit else ()))
    sink = SinkProcess(args=args)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMARTMAIL_")}
    env["XDG_STATE_HOME"] = str(folder / f"state-{name}")
    try:
        transport = ["--transport", f"smtp://127.0.0.1:{sink.port}", "--smtp-security", "none"]
        summary, _ = send(folder, name, transport, extra, env)
    finally:
        sink.stop()
    result = analyse(json.loads(record.read_text(encoding="utf-8")), n)
    result.update(sent=summary["sent"], failed=summary["failed"])
    return result


def ses_scenario(folder: Path, name: str, n: int, limit: int, quota_rate: float) -> dict[str, Any]:
    server = SinkProcess(
        script=ENDPOINT, args=("--limit", str(limit), "--max-send-rate", str(quota_rate))
    )
    try:
        env = aws_env(server.port, folder / f"state-{name}")
        summary, _ = send(folder, name, ["--transport", f"ses://{REGION}"], [], env)
        stats = endpoint_stats(server.port)
    finally:
        server.stop()
    result = analyse(stats, n)
    result.update(sent=summary["sent"], failed=summary["failed"])
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--precise", type=int, default=1500)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--burst", type=int, default=5)
    args = parser.parse_args(argv)
    compile_smartmail()
    n, limit = args.messages, args.limit
    results: dict[str, Any] = {"limit": limit, "messages": n}
    with tempfile.TemporaryDirectory(prefix="smartmail-bench-") as tmp:
        folder = Path(tmp)
        write_campaign(folder, n)
        above = ["--rate", str(4 * limit)]
        results["smtp_rate_above"] = smtp_scenario(folder, "smtp-above", n, limit, above)
        results["smtp_no_rate"] = smtp_scenario(folder, "smtp-none", n, limit, [])
        results["ses_rate_above"] = ses_scenario(folder, "ses-above", n, limit, 4.0 * limit)
        precise = folder / "precise"
        precise.mkdir()
        write_campaign(precise, args.precise)
        burst = ["--rate", str(args.rate), "--burst", str(args.burst)]
        results["precision"] = smtp_scenario(precise, "precise", args.precise, 0, burst)
    for key in ("smtp_rate_above", "smtp_no_rate", "ses_rate_above"):
        r = results[key]
        print(
            f"{key:<16} limit {limit}/s: goodput after 5 s {r['goodput_after_5s']:.1f}/s "
            f"({r['goodput_after_5s'] / limit:.1%}), throttled {r['throttled']} "
            f"({r['throttled_share']:.1%} of {n}), exactly once {r['exactly_once']}, "
            f"sent {r['sent']} failed {r['failed']}"
        )
    p = results["precision"]
    print(
        f"precision --rate {args.rate:g} --burst {args.burst}: largest 1-s window "
        f"{p['max_window']} "
        f"(limit {args.rate + args.burst:g}), achieved {p['achieved']:.2f}/s "
        f"({p['achieved'] / args.rate - 1:+.2%}), exactly once {p['exactly_once']}"
    )
    return results


if __name__ == "__main__":
    main()
