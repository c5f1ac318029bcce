"""`make bench`: every scenario of docs/benchmarks.md, then one table of figures and targets.

    .venv/bin/python benchmarks/run_all.py [--quick] [--json PATH]

Runs, in this order (about 9 minutes on 2 cores; --quick: smaller sizes, about 3):
bench_cli (smtp://, whole `smartmail send` process, ledger on, 3,000 and 20,000 rows, with the
ceiling of benchmarks/ideal_smtp.py beside it; then again with `--pin`, the sink alone on one
CPU as a server elsewhere would be, as context rows),
bench_ses_api (ses:// against the fast local endpoint), bench_workers (1, 2 and 4
`smartmail worker` processes on one queue and one dynamodb:// state, 1,500 rows, against the
local SES + SQS + DynamoDB stand-in), bench_rate (adaptive rate against throttling SMTP and
SES; precision at the receiver), bench_startup, bench_dryrun (1,000,000 rows). Each prints
its own lines as it goes; the table at the end has, per figure: the value, the bare baseline
beside it, the ratio, the target and whether it was met.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks import (
    bench_cli,
    bench_dryrun,
    bench_rate,
    bench_ses_api,
    bench_startup,
    bench_workers,
)
from benchmarks.bench_smtp import compile_smartmail

Row = tuple[str, str, str, str, str, bool | None]


def rows_from(results: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for size in results["cli"]["sizes"]:
        n, bare = size["messages"], size["bare"]["rate"]
        for key, label, target in (
            ("ledger", "ledger on (default)", 0.90),
            ("no-state", "--no-state", None),
        ):
            s = size[key]
            rows.append(
                (
                    f"smtp:// send, {label}, {n:,} rows, msg/s",
                    f"{s['rate']:,.0f}",
                    f"bare smtplib {bare:,.0f}",
                    f"{s['ratio']:.2f}",
                    f">= {target:.2f}" if target else "(context)",
                    s["ratio"] >= target if target else None,
                )
            )
        s = size["ledger"]
        rows.append(
            (
                f"  of which: ledger-on send pass alone, {n:,} rows, msg/s",
                f"{s['send_pass_rate']:,.0f}",
                f"bare smtplib {bare:,.0f} (whole)",
                f"{s['send_pass_rate'] / bare:.2f}",
                "(context)",
                None,
            )
        )
        rows.append(
            (
                f"  and outside it (start-up, pre-flight of {n:,} rows, exit), s",
                f"{s['outside_send_pass_s']:.2f}",
                f"bare whole run {n / bare:.2f} s",
                "",
                "(context)",
                None,
            )
        )
        if "ideal+ledger" in size:
            s = size["ideal+ledger"]
            rows.append(
                (
                    f"  ceiling: ideal_smtp.py --ledger, {n:,} rows, msg/s",
                    f"{s['rate']:,.0f}",
                    f"bare smtplib {bare:,.0f}",
                    f"{s['ratio']:.2f}",
                    "(context)",
                    None,
                )
            )
    for size in results.get("cli_pinned", {}).get("sizes", []):
        n, bare = size["messages"], size["bare"]["rate"]
        for key, label in (("ledger", "ledger on"), ("no-state", "--no-state")):
            s = size[key]
            rows.append(
                (
                    f"  server on a CPU of its own: {label}, {n:,} rows, msg/s",
                    f"{s['rate']:,.0f}",
                    f"bare smtplib {bare:,.0f}",
                    f"{s['ratio']:.2f}",
                    "(context)",
                    None,
                )
            )
    ses = results["ses"]
    rows.append(
        (
            f"ses:// send, ledger on, {ses['messages']:,} rows, msg/s",
            f"{ses['smartmail_rate']:,.0f}",
            f"bare boto3 {ses['bare_rate']:,.0f}",
            f"{ses['ratio']:.2f}",
            ">= 0.85",
            ses["ratio"] >= 0.85,
        )
    )
    rows.append(
        (
            f"ses:// peak RSS, {ses['workers']} workers, MB",
            f"{ses['smartmail_peak_rss_mb']:.0f}",
            f"bare boto3 {ses['bare_peak_rss_mb']:.0f}",
            "",
            "<= 100",
            ses["smartmail_peak_rss_mb"] <= 100,
        )
    )
    if "workers" in results:
        rows.extend(worker_rows(results["workers"]))
    rate = results["rate"]
    limit = rate["limit"]
    for key, label in (
        ("smtp_rate_above", f"smtp:// --rate {4 * limit}"),
        ("smtp_no_rate", "smtp:// no --rate"),
        ("ses_rate_above", f"ses:// quota rate {4 * limit}"),
    ):
        r = rate[key]
        rows.append(
            (
                f"{label} vs server limit {limit}/s: goodput after 5 s",
                f"{r['goodput_after_5s']:.1f}/s",
                f"limit {limit}/s",
                f"{r['goodput_after_5s'] / limit:.2f}",
                ">= 0.90",
                r["goodput_after_5s"] >= 0.9 * limit,
            )
        )
        rows.append(
            (
                f"{label}: throttled attempts / messages; each row once",
                f"{r['throttled_share']:.1%}; {'yes' if r['exactly_once'] else 'NO'}",
                f"{r['throttled']} of {rate['messages']}",
                "",
                "< 10%; yes",
                r["throttled_share"] < 0.10 and r["exactly_once"],
            )
        )
    p = rate["precision"]
    rows.append(
        (
            "--rate 100 --burst 5: largest 1-s window at the receiver",
            str(p["max_window"]),
            "rate + burst 105",
            "",
            "<= 105",
            p["max_window"] <= 105,
        )
    )
    rows.append(
        (
            f"--rate 100 --burst 5: achieved rate over {p['accepted']:,} messages",
            f"{p['achieved']:.2f}/s",
            "--rate 100",
            f"{p['achieved'] / 100:.4f}",
            "within 1%",
            abs(p["achieved"] / 100 - 1) <= 0.01,
        )
    )
    st = results["startup"]
    for key, label in (("help", "smartmail --help"), ("dry_run", "10-row dry-run")):
        ratio = st[key] / st["baseline"]
        rows.append(
            (
                f"start-up: {label}, ms",
                f"{st[key] * 1000:.0f}",
                f"import click, jinja2 {st['baseline'] * 1000:.0f}",
                f"{ratio:.2f}",
                "<= 1.50",
                ratio <= 1.5,
            )
        )
    counted = st.get("instructions")
    if counted:  # the same ratio by a count the load does not move (valgrind installed)
        for key, label in (("help", "smartmail --help"), ("dry_run", "10-row dry-run")):
            rows.append(
                (
                    f"  {label} by instructions (callgrind), M",
                    f"{counted[key] / 1e6:.1f}",
                    f"import click, jinja2 {counted['baseline'] / 1e6:.1f}",
                    f"{counted[key] / counted['baseline']:.2f}",
                    "(context)",
                    None,
                )
            )
    if "dryrun" in results:
        d = results["dryrun"]
        rows.append(
            (
                f"dry-run {d['rows']:,} rows: rows/s; peak RSS MB",
                f"{d['rows_per_second']:,.0f}; {d['peak_rss_mb']:.0f}",
                "",
                "",
                ">= 10,000; < 150",
                d["rows_per_second"] >= 10_000 and d["peak_rss_mb"] < 150,
            )
        )
    return rows


def worker_rows(w: dict[str, Any]) -> list[Row]:
    """bench_workers' figures: msg/s per worker process count, against one worker."""
    rows: list[Row] = []
    base = w["processes"]["1"]["rate"]
    for k, run in w["processes"].items():
        goal: str = f"(context: {w['cpus']} cores)"
        met: bool | None = None
        if k == "1":
            goal = "(baseline)"
        elif k == "2":
            goal, met = "> 1.00 (2 workers > 1 on 2 cores)", run["ratio"] > 1.0
        rows.append(
            (
                f"smartmail worker x{k}, SQS + dynamodb:// + ses://, {w['messages']:,} rows, msg/s",
                f"{run['rate']:,.0f}",
                f"1 worker {base:,.0f}",
                f"{run['ratio']:.2f}",
                goal,
                met,
            )
        )
    return rows


def table(rows: list[Row]) -> str:
    head = ("figure", "smartmail", "baseline", "ratio", "target", "met")
    cells = [head, *[(*r[:5], {True: "yes", False: "NO", None: ""}[r[5]]) for r in rows]]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = []
    for i, c in enumerate(cells):
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write every figure here")
    args = parser.parse_args(argv)
    compile_smartmail()
    q = args.quick
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()
    results: dict[str, Any] = {}
    print("== smtp:// whole process, ledger on (bench_cli)", flush=True)
    sizes = "1000,3000" if q else "3000,20000"
    results["cli"] = bench_cli.main(
        ["--messages", sizes, "--rounds", "1" if q else "3", "--ceiling"]
    )
    if len(os.sched_getaffinity(0)) >= 2:
        print("== the same, the sink alone on one CPU (bench_cli --pin)", flush=True)
        results["cli_pinned"] = bench_cli.main(
            ["--messages", sizes, "--rounds", "1" if q else "3", "--pin"]
        )
    print("== ses:// whole process (bench_ses_api)", flush=True)
    results["ses"] = bench_ses_api.main(
        ["--messages", "1000" if q else "3000", "--rounds", "1" if q else "3"]
    )
    print("== queue workers, 1, 2 and 4 processes (bench_workers)", flush=True)
    results["workers"] = bench_workers.main(["--messages", "300" if q else "1500"])
    print("== rate at the receiver (bench_rate)", flush=True)
    rate_args = ["--messages", "400", "--precise", "600"] if q else []
    results["rate"] = bench_rate.main(rate_args)
    print("== start-up (bench_startup)", flush=True)
    counting = ["--instructions"] if shutil.which("valgrind") else []
    results["startup"] = bench_startup.main(["--repeat", "3" if q else "7", *counting])
    print("== dry-run (bench_dryrun)", flush=True)
    results["dryrun"] = bench_dryrun.main(["--rows", "100000" if q else "1000000"])
    rows = rows_from(results)
    end_load = os.getloadavg()
    print()
    print(
        f"smartmail benchmarks, {started}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, load average {load[0]:.1f} at the start, "
        f"{end_load[0]:.1f} at the end{' (--quick sizes)' if q else ''}"
    )
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    return {"results": results, "rows": rows}


if __name__ == "__main__":
    main()
