"""Start-up: `smartmail --help` and a 10-row dry-run next to `python -c "import click, jinja2"`.

    .venv/bin/python benchmarks/bench_startup.py [--repeat 7]

Each command runs `--repeat` times, interleaved so outside load hits all alike; the median
wall time of each (spawn to exit) is reported with its ratio to the bare import.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.bench_smtp import compile_smartmail, write_campaign


def wall(cmd: list[str]) -> float:
    began = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    compile_smartmail()
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="smartmail-bench-") as tmp:
        csv_path, template = write_campaign(Path(tmp), 10)
        commands = {
            "baseline": [py, "-c", "import click, jinja2"],
            "help": [py, "-m", "smartmail", "--help"],
            "dry_run": [py, "-m", "smartmail", "dry-run", str(csv_path), "-t", str(template)],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeat):
            for name, cmd in commands.items():
                times[name].append(wall(cmd))
    result = {name: statistics.median(values) for name, values in times.items()}
    base = result["baseline"]
    print(
        f"start-up (median of {args.repeat}): import click, jinja2 {base * 1000:.0f} ms; "
        f"smartmail --help {result['help'] * 1000:.0f} ms ({result['help'] / base:.2f}x); "
        f"10-row dry-run {result['dry_run'] * 1000:.0f} ms ({result['dry_run'] / base:.2f}x)"
    )
    return result


if __name__ == "__main__":
    main()
