"""The bare loop smartmail is measured against, as a whole process of its own.

    python benchmarks/bare_smtp.py PORT MESSAGE_FILE COUNT WORKERS

`WORKERS` threads, each with one persistent `smtplib.SMTP` connection to 127.0.0.1:PORT,
`sendmail()` the same pre-built message (read from MESSAGE_FILE) to user0..userN-1@example.org
until COUNT are sent. No ledger, no template, no rate limit: what the libraries alone allow.
Exits non-zero if any send fails.
"""

from __future__ import annotations

import smtplib
import sys
import threading


def main() -> None:
    port, path, count, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with open(path, "rb") as fh:
        data = fh.read()
    shares = [count // workers + (1 if i < count % workers else 0) for i in range(workers)]
    errors: list[BaseException] = []

    def worker(first: int, n: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", int(port), timeout=30) as conn:
                for i in range(first, first + n):
                    conn.sendmail("news@acme.example", [f"user{i}@example.org"], data)
        except BaseException as exc:
            errors.append(exc)

    threads, first = [], 0
    for n in shares:
        threads.append(threading.Thread(target=worker, args=(first, n)))
        first += n
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"bare smtplib loop failed: {errors[0]!r}")


if __name__ == "__main__":
    main()
