"""Start-up cost of the command line: `smartmail --help` against `python -c "import click, jinja2"`.

Issue 9 asks for `smartmail --help` within 1.5x of importing Click and Jinja2 alone. Each
command runs `--runs` times, interleaved so that a busy machine slows them alike; the figure
is the median CPU time (user + system) of the child process, steadier than wall time when
other work shares the cores, with the median wall time beside it.

    python benchmarks/bench_startup.py --runs 30
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def commands() -> dict[str, list[str]]:
    script = shutil.which("smartmail", path=str(Path(sys.executable).parent))
    found = {
        "python -c 'import click, jinja2'": [sys.executable, "-c", "import click, jinja2"],
        "python -m smartmail --help": [sys.executable, "-m", "smartmail", "--help"],
    }
    if script:
        found["smartmail --help"] = [script, "--help"]
    return found


def measure(command: list[str]) -> tuple[float, float]:
    """(CPU ms, wall ms) of one run of `command`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    wall = (time.perf_counter() - started) * 1000
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000
    return cpu, wall


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args(argv)
    todo = commands()
    cpu: dict[str, list[float]] = {name: [] for name in todo}
    wall: dict[str, list[float]] = {name: [] for name in todo}
    for _ in range(args.runs):
        for name, command in todo.items():
            c, w = measure(command)
            cpu[name].append(c)
            wall[name].append(w)
    base = statistics.median(cpu["python -c 'import click, jinja2'"])
    result: dict[str, dict[str, float]] = {}
    print(f"| command ({args.runs} runs) | CPU median (ms) | wall median (ms) | CPU vs baseline |")
    print("|---|---|---|---|")
    for name in todo:
        c, w = statistics.median(cpu[name]), statistics.median(wall[name])
        result[name] = {"cpu_ms": c, "wall_ms": w, "ratio": c / base if base else 0.0}
        print(f"| `{name}` | {c:.0f} | {w:.0f} | {result[name]['ratio']:.2f}x |")
    return result


if __name__ == "__main__":
    main()
