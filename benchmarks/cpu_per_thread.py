"""Where a `smartmail send` process spends its CPU, per thread and per phase, per message.

    .venv/bin/python benchmarks/cpu_per_thread.py [--messages 3000] [--rounds 5] [--other DIR]

Against the aiosmtpd sink (its own process), each round runs `python -m smartmail send ...
--workers 8` with the ledger on, and with `--no-state`; `--other DIR` adds the same command
with PYTHONPATH=DIR (an older tree, e.g. from `git archive`) in the same rounds. The child
runs under a small wrapper that adds up `time.thread_time()` of every thread as it ends
(main, the 8 send workers, the ledger writer) and of pre-flight and of the send pass's
producer (`Run.run` on the main thread). Prints the medians in ms of CPU per message. On a
busy 2-core machine CPU per message is steadier than any wall-clock figure.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.bench_cli import send_command, timed
from benchmarks.bench_smtp import SinkProcess, compile_smartmail, write_campaign

WRAPPER = """
import atexit, collections, json, os, resource, runpy, sys, threading, time
acc = collections.Counter()
run = threading.Thread.run
def timed_run(self):
    try:
        run(self)
    finally:
        acc[self.name.split("_")[0]] += time.thread_time()
threading.Thread.run = timed_run
import smartmail.engine as engine, smartmail.ledger as ledger
def phase(name, fn):
    def inner(*a, **k):
        began = time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            acc[name] += time.thread_time() - began
    return inner
engine.preflight = phase("pre-flight", engine.preflight)
engine.Run.run = phase("send pass (producer)", engine.Run.run)
writer_run = ledger._Writer.run
def writer(self):
    try:
        writer_run(self)
    finally:
        acc["ledger writer"] += time.thread_time()
ledger._Writer.run = writer
def report():
    acc["main thread"] = time.thread_time()
    use = resource.getrusage(resource.RUSAGE_SELF)
    acc["whole process"] = use.ru_utime + use.ru_stime
    acc["context switches"] = use.ru_nvcsw + use.ru_nivcsw
    with open(os.environ["CPU_PER_THREAD_OUT"], "a") as out:
        out.write(json.dumps(acc) + "\\n")
atexit.register(report)
sys.argv = ["smartmail", *sys.argv[1:]]
runpy.run_module("smartmail", run_name="__main__", alter_sys=True)
"""

ORDER = (
    "whole process",
    "main thread",
    "pre-flight",
    "send pass (producer)",
    "smartmail-send",
    "ledger writer",
    "context switches",
)

LABELS = {"context switches": "context switches / msg", "smartmail-send": "8 workers"}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--other", help="another tree's root, run in the same rounds")
    args = parser.parse_args(argv)
    compile_smartmail()
    if args.other:  # the same footing: bytecode written for the other tree too
        compileall.compile_dir(Path(args.other) / "smartmail", quiet=1)
    n = args.messages
    kinds = ["ledger", "no-state", *(["other"] if args.other else [])]
    with tempfile.TemporaryDirectory(prefix="smartmail-cpu-") as tmp:
        root = Path(tmp)
        wrapper = root / "wrapper.py"
        wrapper.write_text(WRAPPER, encoding="utf-8")
        csv_path, template = write_campaign(root, n)
        sink = SinkProcess()
        try:
            for round_no in range(args.rounds):
                for kind in kinds:
                    report = root / f"{kind}-{round_no}.json"
                    cmd = send_command(csv_path, template, sink.port, 8, report)
                    cmd = [sys.executable, str(wrapper), *cmd[3:]]  # in place of -m smartmail
                    if kind == "no-state":
                        cmd.append("--no-state")
                    env = {k: v for k, v in os.environ.items() if not k.startswith("SMARTMAIL_")}
                    env["XDG_STATE_HOME"] = str(root / f"state-{kind}-{round_no}")
                    env["CPU_PER_THREAD_OUT"] = str(root / f"{kind}.jsonl")
                    if kind == "other":
                        env["PYTHONPATH"] = str(args.other)
                    timed(cmd, env, cwd=root)
                    if json.loads(report.read_text(encoding="utf-8"))["sent"] != n:
                        raise RuntimeError(f"{kind}: not every row was sent")
        finally:
            sink.stop()
        result: dict[str, dict[str, float]] = {}
        for kind in kinds:
            lines = (root / f"{kind}.jsonl").read_text(encoding="utf-8").splitlines()
            runs = [json.loads(line) for line in lines]
            result[kind] = {
                key: statistics.median(r.get(key, 0.0) for r in runs) / n * 1000 for key in ORDER
            }
    print(f"ms of CPU per message, {n} rows, 8 workers, medians of {args.rounds} rounds")
    print(f"{'':24}" + "".join(f"{kind:>10}" for kind in kinds))
    for key in ORDER:
        scale = 1 / 1000 if key == "context switches" else 1.0
        label = LABELS.get(key, key)
        print(f"{label:24}" + "".join(f"{result[k][key] * scale:10.3f}" for k in kinds))
    return result


if __name__ == "__main__":
    main()
