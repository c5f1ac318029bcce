"""The least any sender keeping smartmail's two costly promises could do: a ceiling for target 1.

    python benchmarks/ideal_smtp.py PORT CSV TEMPLATE HTML MESSAGE_FILE WORKERS [--ledger DB]

What it does, and nothing more:

1. imports click and jinja2 (the CLI and the templates are built on them), as `smartmail send`
   must before it can read an option;
2. **renders every row before the first message leaves** (the promise that a bad row stops
   the run with nothing sent): one Jinja2 render of the whole template file and one of the HTML
   part per row, kept for the send pass; no address, header or attachment checks, no MIME;
3. with `--ledger DB`, **marks each row `sending` durably before it is sent** (the promise
   that a crash never double-sends): SQLite in WAL mode with `synchronous=FULL`, one thread
   marking rows 4 at a time (one multi-row INSERT and one fsync'd commit a batch) ahead of 8
   workers, never more than two rows per worker marked and unfinished, each outcome updated
   in the next commit, as smartmail's send pass does;
4. sends, like `bare_smtp.py`, one pre-built message per row over `WORKERS` persistent smtplib
   connections.

Anything smartmail does beyond this (validation, MIME per row, retries, rate limiting, the
report, the failed-rows CSV) costs more; so the ratio of this process to the bare loop bounds
what smartmail's ratio can reach on the same machine. Exits non-zero if a send fails.
"""

from __future__ import annotations

import csv
import queue
import smtplib
import sqlite3
import sys
import threading
from pathlib import Path

BATCH = 4  # rows a commit: half the workers, as smartmail's send pass marks them


def render_all(csv_path: str, template: str, html: str) -> list[tuple[str, str, str]]:
    """Every row rendered before anything is sent: (recipient, text, html)."""
    import click  # noqa: F401  (the CLI's import cost, paid before any option is read)
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    text_t = env.from_string(Path(template).read_text(encoding="utf-8"))
    html_t = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=True).from_string(
        Path(html).read_text(encoding="utf-8")
    )
    with open(csv_path, encoding="utf-8", newline="") as fh:
        return [(r["email"], text_t.render(r), html_t.render(r)) for r in csv.DictReader(fh)]


class Marks:
    """Rows marked `sending` (durably) before a worker may take them, BATCH per commit."""

    def __init__(self, path: str, rows: list[str], workers: int) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS d (recipient TEXT PRIMARY KEY, status TEXT, pid TEXT)"
        )
        self.rows, self.budget = rows, 2 * workers
        self.jobs: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self.done: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.room = threading.Condition(self.lock)
        self.open = 0  # marked and not finished

    def feed(self, workers: int) -> None:
        """The producer: mark a batch, commit it (fsync), queue it; outcomes ride along."""
        for start in range(0, len(self.rows), BATCH):
            batch = list(range(start, min(start + BATCH, len(self.rows))))
            with self.room:
                while self.open + len(batch) > self.budget:
                    self.room.wait()
                self.open += len(batch)
                done, self.done = self.done, []
            self.conn.execute("BEGIN")
            self.conn.execute(
                "INSERT INTO d VALUES " + ", ".join(["(?, 'sending', NULL)"] * len(batch)),
                [self.rows[i] for i in batch],
            )
            if done:
                self.conn.executemany(
                    "UPDATE d SET status = 'sent', pid = ? WHERE recipient = ?", done
                )
            self.conn.execute("COMMIT")
            for i in batch:
                self.jobs.put(i)
        for _ in range(workers):
            self.jobs.put(None)

    def finished(self, row: int, provider_id: str) -> None:
        with self.room:
            self.done.append((provider_id, self.rows[row]))
            self.open -= 1
            self.room.notify()

    def close(self) -> None:
        if self.done:
            self.conn.executemany(
                "UPDATE d SET status = 'sent', pid = ? WHERE recipient = ?", self.done
            )
        self.conn.close()


def main() -> None:
    port, csv_path, template, html, message, workers = sys.argv[1:7]
    ledger = sys.argv[8] if sys.argv[7:8] == ["--ledger"] else None
    n_workers = int(workers)
    rendered = render_all(csv_path, template, html)
    recipients = [r for r, _text, _html in rendered]
    data = Path(message).read_bytes()
    errors: list[BaseException] = []
    marks = Marks(ledger, recipients, n_workers) if ledger else None
    plain: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    if marks is None:
        for i in range(len(recipients)):
            plain.put(i)
        for _ in range(n_workers):
            plain.put(None)
    jobs = marks.jobs if marks else plain

    def worker() -> None:
        try:
            with smtplib.SMTP("127.0.0.1", int(port), timeout=30) as conn:
                while (i := jobs.get()) is not None:
                    conn.sendmail("news@acme.example", [recipients[i]], data)
                    if marks:
                        marks.finished(i, f"<{i}@acme.example>")
        except BaseException as exc:
            errors.append(exc)
            if marks:
                with marks.room:
                    marks.budget = 1 << 30  # let the producer finish; the run fails below
                    marks.room.notify_all()

    threads = [threading.Thread(target=worker) for _ in range(n_workers)]
    for t in threads:
        t.start()
    if marks:
        marks.feed(n_workers)
    for t in threads:
        t.join()
    if marks:
        marks.close()
    if errors:
        raise SystemExit(f"ideal loop failed: {errors[0]!r}")


if __name__ == "__main__":
    main()
