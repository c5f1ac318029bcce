"""Start-up: `smartmail --help` and a 10-row dry-run next to `python -c "import click, jinja2"`.

    .venv/bin/python benchmarks/bench_startup.py [--repeat 7]

Each command runs `--repeat` times, interleaved so outside load hits all alike; the median
wall time of each (spawn to exit) is reported with its ratio to the bare import.

`--instructions` also counts each command's instructions once under valgrind's callgrind
(about 20 s in all): a figure the machine's load does not move, where the wall-clock ratio
of a ~0.1 s process moves by a fifth from one minute to the next. `make bench` adds it when
valgrind is installed.

The dry run reads a state database of its own (XDG_STATE_HOME in the scratch folder), made
before timing: as for a user who has sent before, it opens the ledger and the suppression
list, and it never reads or writes the real one. (With no state file at all it would skip
them: a first dry run is a little faster.) Its cache of compiled templates is in the scratch
folder too (XDG_CACHE_HOME), filled by one untimed dry run: what is timed is a run after the
first, as a user runs a template again (the first run of a template also compiles it).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.bench_smtp import compile_smartmail, write_campaign
from smartmail import state


def wall(cmd: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - began


def instructions(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Instructions the command executes (user space, every thread), counted by callgrind."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise RuntimeError("valgrind is not installed")
    tool = [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    done = subprocess.run(
        [*tool, *cmd], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind of {cmd} failed: {done.stderr[-500:]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--instructions", action="store_true", help="count them (valgrind)")
    args = parser.parse_args(argv)
    compile_smartmail()
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="smartmail-bench-") as tmp:
        csv_path, template = write_campaign(Path(tmp), 10)
        env = {
            **os.environ,
            "XDG_STATE_HOME": str(Path(tmp) / "state"),
            "XDG_CACHE_HOME": str(Path(tmp) / "cache"),
        }
        env.pop(state.STATE_ENV, None)
        state.connect(Path(tmp) / "state" / "smartmail" / "smartmail.db").close()
        commands = {
            "baseline": [py, "-c", "import click, jinja2"],
            "help": [py, "-m", "smartmail", "--help"],
            "dry_run": [py, "-m", "smartmail", "dry-run", str(csv_path), "-t", str(template)],
        }
        wall(commands["dry_run"], env)  # compiles the template into the cache
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeat):
            for name, cmd in commands.items():
                times[name].append(wall(cmd, env))
        counted = (
            {name: instructions(cmd, env) for name, cmd in commands.items()}
            if args.instructions
            else {}
        )
    result: dict[str, Any] = {name: statistics.median(values) for name, values in times.items()}
    base = result["baseline"]
    print(
        f"start-up (median of {args.repeat}): import click, jinja2 {base * 1000:.0f} ms; "
        f"smartmail --help {result['help'] * 1000:.0f} ms ({result['help'] / base:.2f}x); "
        f"10-row dry-run {result['dry_run'] * 1000:.0f} ms ({result['dry_run'] / base:.2f}x)"
    )
    if counted:
        result["instructions"] = counted
        b = counted["baseline"]
        print(
            f"start-up by instructions (callgrind): import click, jinja2 {b / 1e6:.1f} M; "
            f"--help {counted['help'] / 1e6:.1f} M ({counted['help'] / b:.2f}x); "
            f"10-row dry-run {counted['dry_run'] / 1e6:.1f} M ({counted['dry_run'] / b:.2f}x)"
        )
    return result


if __name__ == "__main__":
    main()
