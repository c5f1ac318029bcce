"""Rows/second and peak RSS of `smartmail dry-run` on a generated 1,000,000-row CSV.

    .venv/bin/python benchmarks/bench_dryrun.py [--rows 1000000]

Writes the CSV (four columns, a non-ASCII name now and then) and the text + HTML template of
benchmarks/bench_smtp.py into a temporary folder, then runs the installed package as a user
would, `python -m smartmail dry-run CSV -t TEMPLATE --preview 0 --report JSON`, in a child
process. Rows/second is rows over the child's whole wall time (interpreter start-up and
imports included); peak RSS is the child's own `ru_maxrss` from `os.wait4`, so nothing
else this process started is counted. The report must say every row was valid, or the
benchmark fails. The child is killed after --timeout seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.bench_smtp import compile_smartmail, write_campaign


def run_dry_run(csv_path: Path, template: Path, report: Path, timeout: float) -> dict[str, Any]:
    """One `smartmail dry-run` in a child process: wall seconds, peak RSS, exit code."""
    cmd = [sys.executable, "-m", "smartmail", "dry-run", str(csv_path)]
    cmd += ["-t", str(template), "--preview", "0", "--report", str(report)]
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        _pid, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    seconds = time.perf_counter() - began
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.stderr is not None
    stderr = proc.stderr.read().decode("utf-8", "replace")
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"dry-run exited {proc.returncode}: {stderr.strip()[-500:]}")
    return {
        "seconds": seconds,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux reports kilobytes
        "report": json.loads(report.read_text(encoding="utf-8")),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    compile_smartmail()
    with tempfile.TemporaryDirectory(prefix="smartmail-bench-") as tmp:
        folder = Path(tmp)
        csv_path, template = write_campaign(folder, args.rows)
        size_mb = csv_path.stat().st_size / 1e6
        result = run_dry_run(csv_path, template, folder / "report.json", args.timeout)
    report = result["report"]
    if report["rows"] != args.rows or report["sent"] != args.rows:
        raise RuntimeError(f"dry-run did not find {args.rows} valid rows: {report}")
    rate = args.rows / result["seconds"]
    print(
        f"dry-run of {args.rows:,} rows ({size_mb:.0f} MB CSV): {result['seconds']:.1f} s, "
        f"{rate:,.0f} rows/s, peak RSS {result['peak_rss_mb']:.0f} MB ({os.cpu_count()} CPUs)"
    )
    return {
        "rows": args.rows,
        "seconds": result["seconds"],
        "rows_per_second": rate,
        "peak_rss_mb": result["peak_rss_mb"],
        "valid": report["sent"],
    }


if __name__ == "__main__":
    main()
