"""The bare SES loop smartmail is measured against, as a whole process of its own.

    python benchmarks/bare_ses.py MESSAGE_FILE COUNT WORKERS   (AWS_ENDPOINT_URL set)

`WORKERS` threads, each with its own boto3 `sesv2` client (retries off), call
`send_email` with Raw content (the same pre-built message) to user0..userN-1@example.org until
COUNT are sent. No ledger, no template, no rate limit. Exits non-zero if any call fails.
"""

from __future__ import annotations

import sys
import threading

import boto3
from botocore.config import Config


def main() -> None:
    path, count, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with open(path, "rb") as fh:
        data = fh.read()
    shares = [count // workers + (1 if i < count % workers else 0) for i in range(workers)]
    config = Config(retries={"total_max_attempts": 1, "mode": "standard"})
    clients = [boto3.session.Session().client("sesv2", config=config) for _ in range(workers)]
    errors: list[BaseException] = []

    def worker(client: object, first: int, n: int) -> None:
        send = client.send_email  # type: ignore[attr-defined]
        try:
            for i in range(first, first + n):
                send(
                    FromEmailAddress="news@acme.example",
                    Destination={"ToAddresses": [f"user{i}@example.org"]},
                    Content={"Raw": {"Data": data}},
                )
        except BaseException as exc:
            errors.append(exc)

    threads, first = [], 0
    for client, n in zip(clients, shares, strict=True):
        threads.append(threading.Thread(target=worker, args=(client, first, n)))
        first += n
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"bare boto3 loop failed: {errors[0]!r}")


if __name__ == "__main__":
    main()
