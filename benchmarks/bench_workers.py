"""Messages/s of 1, 2 and 4 `smartmail worker` processes sharing one SQS queue and one
`dynamodb://` state, sending through `ses://`, all against the fast local stand-in of
benchmarks/aws_endpoint.py (SES, SQS and DynamoDB in one asyncio process; moto would cap the
whole run near 100 requests/s).

    .venv/bin/python benchmarks/bench_workers.py [--messages 3000] [--processes 1,2,4]
                                                 [--rounds 1] [--threads 4]

For each round and each process count (interleaved: 1, 2, 4, then 4, 2, 1 in the next
round, so a change in the machine's load falls on every configuration alike):

1. a new queue and a new state table; `smartmail enqueue CSV -t TEMPLATE --transport
   ses://us-east-1 --queue URL --state dynamodb://TABLE --workers THREADS` (not timed);
2. K `smartmail worker --queue URL --state dynamodb://TABLE --idle-exit 2` processes started
   at once; timed from just before the first start to the delete that emptied the queue
   (the stand-in notes that moment), so process start-up is counted and the idle exit is not;
3. checked, failing loudly otherwise: the stand-in accepted exactly N SES messages, one per
   recipient; it refused no request (an expression it does not implement); every worker
   exited 0; the ledger says N sent, none pending or in doubt.

Reported per K: msg/s (median over rounds), CPU ms per message of the workers together
(user + system), and the ratio to one worker. On 2 cores one worker process is CPU-bound
(boto3 costs ~1.5 ms of CPU a call, and a row takes an SES call and several DynamoDB calls),
so 2 workers should add throughput and 4 should not add more.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.bench_ses_api import REGION, aws_env, endpoint_stats
from benchmarks.bench_smtp import SinkProcess, write_campaign

HERE = Path(__file__).resolve().parent
ENDPOINT = HERE / "aws_endpoint.py"
IDLE_EXIT = 2
ENQUEUE_TIMEOUT = 300.0


def run_checked(cmd: list[str], env: dict[str, str], timeout: float) -> str:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:4])} exited {done.returncode}: {done.stderr[-800:]}")
    return done.stdout


def enqueue_command(
    csv_path: Path, template: Path, url: str, state: str, threads: int
) -> list[str]:
    return [
        sys.executable, "-m", "smartmail", "enqueue", str(csv_path), "-t", str(template),
        "--transport", f"ses://{REGION}", "--queue", url, "--state", state,
        "--workers", str(threads),
    ]  # fmt: skip


def make_queue(port: int, name: str) -> str:
    import boto3

    sqs = boto3.client(
        "sqs",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name=REGION,
        aws_access_key_id="AKIDEXAMPLEBENCH0000",
        aws_secret_access_key="bench-secret",
    )
    url: str = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "60"})["QueueUrl"]
    return url


def ledger_counts(port: int, state_url: str) -> dict[str, int]:
    """What the shared ledger says, read as `smartmail status` reads it."""
    import boto3

    from smartmail.state_dynamodb import open_state

    client = boto3.client(
        "dynamodb",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name=REGION,
        aws_access_key_id="AKIDEXAMPLEBENCH0000",
        aws_secret_access_key="bench-secret",
    )
    [status] = open_state(state_url, client=client).statuses()
    return {
        "sent": status.sent,
        "pending": status.pending,
        "in_doubt": status.in_doubt,
        "in_flight": status.in_flight,
        "failed": status.failed,
    }


def run_workers(
    k: int, port: int, queue: str, url: str, state: str, env: dict[str, str], timeout: float
) -> tuple[float, float]:
    """Start K workers at once; (seconds to the queue drained, the workers' CPU seconds)."""
    command = [
        sys.executable, "-m", "smartmail", "worker", "--queue", url, "--state", state,
        "--idle-exit", str(IDLE_EXIT),
    ]  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        logs: list[IO[bytes]] = [stack.enter_context(tempfile.TemporaryFile()) for _ in range(k)]
        try:
            return _timed(procs, logs, command, port, queue, env, timeout)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)


def _timed(
    procs: list[subprocess.Popen[bytes]],
    logs: list[IO[bytes]],
    command: list[str],
    port: int,
    queue: str,
    env: dict[str, str],
    timeout: float,
) -> tuple[float, float]:
    k = len(logs)
    began = time.monotonic()
    for log in logs:
        procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=log))
    drained_at = None
    while time.monotonic() - began < timeout:
        time.sleep(0.1)
        q = endpoint_stats(port)["queues"][queue]
        if q["drained_at"] is not None and q["visible"] + q["in_flight"] == 0:
            drained_at = q["drained_at"]
            break
        if all(p.poll() is not None for p in procs):
            break
    if drained_at is None:
        raise RuntimeError(f"{k} worker(s): the queue was not drained within {timeout:.0f} s")
    cpu = 0.0
    for proc, log in zip(procs, logs, strict=True):
        timer = threading.Timer(IDLE_EXIT + 60, proc.kill)
        timer.start()
        try:
            _pid, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        cpu += usage.ru_utime + usage.ru_stime
        if proc.returncode != 0:
            log.seek(0)
            tail = log.read().decode("utf-8", "replace")[-800:]
            raise RuntimeError(f"a worker exited {proc.returncode}: {tail}")
    return drained_at - began, cpu


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--processes", default="1,2,4", help="worker process counts to run")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=4, help="senders within each worker")
    parser.add_argument("--timeout", type=float, default=300.0, help="per configuration")
    args = parser.parse_args(argv)
    n = args.messages
    counts = [int(k) for k in args.processes.split(",")]
    rates: dict[int, list[float]] = {k: [] for k in counts}
    cpu_ms: dict[int, list[float]] = {k: [] for k in counts}
    stand_in_ms: dict[int, list[float]] = {k: [] for k in counts}
    checks: dict[int, dict[str, list[dict[str, int]]]] = {
        k: {"delivered": [], "ledger": []} for k in counts
    }
    server = SinkProcess(script=ENDPOINT)
    try:
        with tempfile.TemporaryDirectory(prefix="smartmail-bench-") as tmp:
            folder = Path(tmp)
            csv_path, template = write_campaign(folder, n)
            env = aws_env(server.port, folder / "xdg")
            for round_no in range(1, args.rounds + 1):
                order = counts if round_no % 2 else counts[::-1]
                for k in order:
                    name = f"bench-w{k}-r{round_no}"
                    url = make_queue(server.port, name)
                    state = f"dynamodb://{name}"
                    run_checked(
                        enqueue_command(csv_path, template, url, state, args.threads),
                        env,
                        ENQUEUE_TIMEOUT,
                    )
                    endpoint_stats(server.port, "reset")
                    stand_in_cpu = endpoint_stats(server.port)["cpu_seconds"]
                    seconds, cpu = run_workers(k, server.port, name, url, state, env, args.timeout)
                    stats = endpoint_stats(server.port)
                    stand_in_ms[k].append((stats["cpu_seconds"] - stand_in_cpu) / n * 1000)
                    seen = (stats["accepted"], stats["distinct"], stats["duplicates"])
                    if seen != (n, n, 0):
                        raise RuntimeError(
                            f"{k} worker(s): the endpoint accepted {seen[0]} messages for "
                            f"{seen[1]} recipients ({seen[2]} more than once); expected {n} once"
                        )
                    if stats["refused_count"]:
                        raise RuntimeError(f"the stand-in refused requests: {stats['refused']}")
                    ledger = ledger_counts(server.port, state)
                    if ledger["sent"] != n or any(ledger[k] for k in ledger if k != "sent"):
                        raise RuntimeError(f"{k} worker(s): the ledger says {ledger}")
                    checks[k]["delivered"].append(
                        {"accepted": seen[0], "distinct": seen[1], "duplicates": seen[2]}
                    )
                    checks[k]["ledger"].append(ledger)
                    rates[k].append(n / seconds)
                    cpu_ms[k].append(cpu / n * 1000)
                    print(
                        f"  round {round_no}: {k} worker process(es) {seconds:6.2f} s "
                        f"{n / seconds:6.0f} msg/s  CPU {cpu_ms[k][-1]:.2f} ms/msg (stand-in "
                        f"{stand_in_ms[k][-1]:.2f}); "
                        f"each row sent once",
                        flush=True,
                    )
    finally:
        server.stop()
    per: dict[int, dict[str, Any]] = {
        k: {
            "rate": statistics.median(rates[k]),
            "cpu_ms": statistics.median(cpu_ms[k]),
            "stand_in_cpu_ms": statistics.median(stand_in_ms[k]),
            "rates": rates[k],
            **checks[k],
        }
        for k in counts
    }
    base = per[counts[0]]["rate"]
    for k in counts:
        per[k]["ratio"] = per[k]["rate"] / base
    print(
        f"smartmail worker, {n} rows, {args.threads} threads each, median of {args.rounds}: "
        + "; ".join(
            f"{k} process(es) {per[k]['rate']:.0f} msg/s (x{per[k]['ratio']:.2f}, "
            f"{per[k]['cpu_ms']:.2f} ms CPU/msg)"
            for k in counts
        )
        + f"; {os.cpu_count()} CPUs"
    )
    return {
        "messages": n,
        "threads": args.threads,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "processes": {str(k): v for k, v in per.items()},
    }


if __name__ == "__main__":
    main()
