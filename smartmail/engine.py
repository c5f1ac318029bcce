"""The dispatch engine: pre-flight every row, then rows -> messages -> limiter -> transport.

Two passes over the source. Pre-flight renders and validates every row and sends nothing;
if it finds a problem that stops the run, nothing leaves. The send pass streams the file
again: the main thread renders and builds each message and puts it on a bounded queue, and
`workers` threads (a ThreadPoolExecutor) take from it, wait for the shared rate limiter,
send through their own transport session with retries, and record the outcome. Memory is
bounded by the queue, whatever the file size.

The engine knows nothing of which transport it drives: it acts on the error classes of
`smartmail.errors` alone. A `Journal` (the ledger, when there is one) is told before each send
and after each outcome, and can veto a row (suppressed, already sent).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from . import addresses
from .errors import (
    ConfigError,
    InvalidRowError,
    PermanentError,
    PreflightError,
    SourceError,
    StopRunError,
    TemplateError,
    ThrottledError,
    TransientError,
)
from .message import OutgoingMessage, build
from .progress import NullProgress, ProgressDisplay
from .ratelimit import Limiter, Unlimited
from .report import Metrics, Outcome, Status, Summary
from .retry import RetryPolicy
from .sources import RecipientSource, Row, RowProblem
from .templates import MessageTemplate, RenderedMessage
from .transports.base import Transport

log = logging.getLogger("smartmail")

ON_INVALID = ("skip", "abort")
ON_MALFORMED = ("abort", "skip")
ON_DUPLICATE = ("once", "all", "abort")
MAX_PROBLEMS_KEPT = 1000


@dataclass
class SendOptions:
    """How a run treats its rows. Defaults are the documented safe ones."""

    workers: int = 4
    limit: int | None = None
    test_to: str | None = None
    on_invalid: str = "skip"
    on_malformed: str = "abort"
    on_duplicate: str = "once"
    preview: int = 0
    campaign: str = "adhoc"
    tags: dict[str, str] = field(default_factory=dict)
    failed_csv: Path | None = None
    # Pre-flight keeps rendered messages up to this many characters, so the send pass does not
    # render those rows a second time (most lists fit; a huge one is re-rendered past it).
    render_cache_chars: int = 32 * 1024 * 1024
    shutdown_grace: float = 30.0

    def check(self) -> None:
        if self.workers < 1:
            raise ConfigError("--workers must be at least 1")
        if self.limit is not None and self.limit < 0:
            raise ConfigError("--limit must be zero or more")
        for name, value, allowed in (
            ("--on-invalid", self.on_invalid, ON_INVALID),
            ("--on-malformed", self.on_malformed, ON_MALFORMED),
            ("--on-duplicate", self.on_duplicate, ON_DUPLICATE),
        ):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}")
        if self.test_to is not None:
            try:
                self.test_to = addresses.validate(self.test_to)
            except addresses.AddressError as exc:
                raise ConfigError(f"--test-to: {exc}") from None


class Journal(Protocol):
    """What the engine tells a ledger. The default `NullJournal` keeps nothing."""

    def skip_reason(self, recipient: str, row: Row) -> str | None:
        """Why this recipient must not be sent to now (suppressed, already sent), or None."""
        ...

    def sending(self, message: OutgoingMessage) -> None:
        """Called just before the first attempt; must be durable before it returns."""
        ...

    def record(self, outcome: Outcome) -> None:
        """Called once per row with how it ended."""
        ...


# A journal may also have `ahead(message)`: a worker calls it with the row it will send next
# while it sends the current one, so the journal can make that row's mark durable in the
# background and `sending()` for it need not wait (the ledger does; see docs/ledger.md).


class NullJournal:
    def skip_reason(self, recipient: str, row: Row) -> str | None:
        return None

    def sending(self, message: OutgoingMessage) -> None:
        return None

    def record(self, outcome: Outcome) -> None:
        return None


@dataclass
class PreflightResult:
    """What pre-flight found: the rows to skip and why, the problems, and the previews."""

    source: str
    rows: int = 0
    valid: int = 0
    skipped: dict[int, str] = field(default_factory=dict)
    problems: list[RowProblem] = field(default_factory=list)
    problem_count: int = 0
    fatal: list[str] = field(default_factory=list)
    fatal_count: int = 0
    invalid: int = 0
    duplicates: int = 0
    previews: list[OutgoingMessage] = field(default_factory=list)
    rendered: dict[int, RenderedMessage] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the run may go ahead (skipped rows allowed)."""
        return not self.fatal_count

    @property
    def clean(self) -> bool:
        """True when every row is valid (what dry-run's exit status reports)."""
        return not self.fatal_count and not self.invalid

    def add_problem(self, problem: RowProblem, fatal: bool) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS_KEPT:
            self.problems.append(problem)
        if fatal:
            self.fatal_count += 1
            if len(self.fatal) < MAX_PROBLEMS_KEPT:
                self.fatal.append(str(problem))


def _problem(exc: InvalidRowError | TemplateError, source: str, row: Row) -> RowProblem:
    where = exc.where
    column = getattr(where, "column", None)
    return RowProblem(row=row.number, column=column, message=exc.problem, file=source)


def preflight(
    source: RecipientSource,
    template: MessageTemplate,
    options: SendOptions,
    *,
    allow_utf8_local: bool = True,
    journal: Journal | None = None,
    keep_rendered: int = 0,
) -> PreflightResult:
    """Render and validate every row; send nothing. Shape errors of the file raise SourceError.

    `keep_rendered` is a budget in characters: rendered messages are kept (by row number) until
    it is spent, for a send pass that follows; a dry run keeps none.
    """
    result = PreflightResult(source=source.name)
    budget = keep_rendered
    seen: set[int] = set()
    for row, ragged in source.rows():
        result.rows += 1
        if ragged:
            problem = RowProblem(
                row.number, None, "wrong number of fields for the header (ragged row)", source.name
            )
            result.add_problem(problem, fatal=options.on_malformed == "abort")
            result.skipped[row.number] = "malformed row"
            continue
        try:
            rendered = template.render(
                row, source.to_column, source_name=source.name, allow_utf8_local=allow_utf8_local
            )
        except InvalidRowError as exc:
            result.invalid += 1
            result.add_problem(_problem(exc, source.name, row), fatal=options.on_invalid == "abort")
            result.skipped[row.number] = f"invalid: {exc.problem}"
            continue
        except TemplateError as exc:
            result.add_problem(_problem(exc, source.name, row), fatal=True)
            result.skipped[row.number] = f"template error: {exc.problem}"
            continue
        key = hash(addresses.normalise(rendered.recipient))
        if key in seen and options.on_duplicate != "all":
            result.duplicates += 1
            problem = RowProblem(
                row.number,
                source.to_column,
                f"duplicate recipient {rendered.recipient} (an earlier row has it)",
                source.name,
            )
            result.add_problem(problem, fatal=options.on_duplicate == "abort")
            result.skipped[row.number] = "duplicate recipient"
            continue
        if journal is not None:
            veto = journal.skip_reason(addresses.normalise(rendered.recipient), row)
            if veto is not None:
                result.skipped[row.number] = veto
                continue
        seen.add(key)
        result.valid += 1
        if budget > 0:
            budget -= len(rendered.text) + len(rendered.html or "") + 200
            result.rendered[row.number] = rendered
        if len(result.previews) < options.preview:
            envelope = [options.test_to] if options.test_to else None
            result.previews.append(build(rendered, envelope_to=envelope, tags=options.tags))
    if result.rows == 0:
        raise SourceError(source.name, "no data rows after the header; nothing to send")
    return result


class _Interrupted(Exception):
    """Raised inside an attempt when the run is stopping: the row stays unsent."""


@dataclass
class _Job:
    message: OutgoingMessage


class FailedRows:
    """The re-drive CSV: original columns plus `error`, for rows that failed or went unsent."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path = path
        self.columns = columns
        self._fh: IO[str] | None = None
        self._writer: csv.DictWriter[str] | None = None
        self._lock = threading.Lock()
        self.count = 0

    def add(self, outcome: Outcome) -> None:
        with self._lock:
            if self._writer is None:
                self._fh = open(self.path, "w", newline="", encoding="utf-8")  # noqa: SIM115
                self._writer = csv.DictWriter(self._fh, [*self.columns, "error"])
                self._writer.writeheader()
            self._writer.writerow({**outcome.row.values, "error": outcome.reason})
            self.count += 1

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()


class Run:
    """One send pass. Build it, call `run()`, read the `Summary`."""

    def __init__(
        self,
        source: RecipientSource,
        template: MessageTemplate,
        transport: Transport,
        checked: PreflightResult,
        *,
        options: SendOptions,
        limiter: Limiter | None = None,
        retry: RetryPolicy | None = None,
        journal: Journal | None = None,
        progress: ProgressDisplay | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.source = source
        self.template = template
        self.transport = transport
        self.checked = checked
        self.options = options
        self.limiter: Limiter = limiter or Unlimited()
        self.stop = stop or threading.Event()
        self.retry = retry or RetryPolicy(sleep=self._pause)
        self.journal: Journal = journal or NullJournal()
        if options.test_to:
            self.journal = NullJournal()
        self.progress = progress or NullProgress()
        self.metrics = Metrics(checked.rows)
        self.stop_reason: str | None = None
        self.failed_rows = (
            FailedRows(options.failed_csv, source.columns) if options.failed_csv else None
        )

    def _pause(self, seconds: float) -> None:
        """Sleep that wakes early when the run is stopping (retries and rate waits)."""
        self.stop.wait(seconds)

    # --- outcomes ----------------------------------------------------------------------------

    def _finish(self, outcome: Outcome) -> None:
        self.metrics.record(outcome)
        redrive = outcome.status == "failed" or (
            outcome.status == "unsent" and (self.stop_reason or self.stop.is_set())
        )
        if self.failed_rows is not None and redrive:
            self.failed_rows.add(outcome)
        try:
            self.journal.record(outcome)
        except Exception as exc:
            # Sending on without a record would risk double sends on the next run: stop.
            log.exception("could not record the outcome of row %s", outcome.row.number)
            self.stop_reason = self.stop_reason or f"could not record an outcome: {exc}"
            self.stop.set()
            raise

    def _outcome(self, row: Row, recipient: str, status: Status, reason: str = "") -> None:
        self._finish(Outcome(row=row, recipient=recipient, status=status, reason=reason))

    # --- producer ----------------------------------------------------------------------------

    def _messages(self) -> Iterator[OutgoingMessage]:
        """Stream the file again; record skips; yield the messages to send, in row order."""
        opts = self.options
        allow_utf8 = self.transport.allow_utf8_local
        queued = 0
        seen_rows = 0
        envelope = [opts.test_to] if opts.test_to else None
        limit = opts.limit if opts.limit is not None else (1 if opts.test_to else None)
        for row, _ragged in self.source.rows():
            seen_rows += 1
            recipient = row.values.get(self.source.to_column, "").strip()
            skip = self.checked.skipped.get(row.number)
            if skip is not None:
                self._outcome(row, recipient, "skipped", skip)
                continue
            if self.stop.is_set() or (limit is not None and queued >= limit):
                reason = self.stop_reason or (
                    "interrupted" if self.stop.is_set() else "over --limit"
                )
                self._outcome(row, recipient, "unsent", reason)
                continue
            veto = self.journal.skip_reason(addresses.normalise(recipient), row)
            if veto is not None:
                self._outcome(row, recipient, "skipped", veto)
                continue
            try:
                rendered = self.checked.rendered.pop(row.number, None) or self.template.render(
                    row,
                    self.source.to_column,
                    source_name=self.source.name,
                    allow_utf8_local=allow_utf8,
                )
            except (InvalidRowError, TemplateError) as exc:
                self._outcome(row, recipient, "failed", f"render: {exc.problem}")
                continue
            queued += 1
            yield build(rendered, envelope_to=envelope, tags=opts.tags)
        if seen_rows != self.checked.rows:
            raise SourceError(
                self.source.name,
                f"the file changed during the run ({self.checked.rows} rows at pre-flight, "
                f"{seen_rows} now)",
            )

    # --- workers -----------------------------------------------------------------------------

    def _worker(self, jobs: queue.Queue[_Job | None]) -> None:
        session = self.transport.open_session()
        # A journal with `ahead` starts marking the next row while this one is sent.
        ahead = getattr(self.journal, "ahead", None)
        following: list[_Job | None] = []
        try:
            while True:
                job = following.pop() if following else jobs.get()
                if job is None:
                    return
                if ahead is not None:
                    with contextlib.suppress(queue.Empty):
                        following.append(jobs.get_nowait())
                    if following and following[0] is not None and not self.stop.is_set():
                        with contextlib.suppress(Exception):  # sending() reports any error
                            ahead(following[0].message)
                self._send_one(session, job.message)
        finally:
            session.close()

    def _send_one(self, session: object, message: OutgoingMessage) -> None:
        row, recipient = message.row, message.recipient
        if self.stop.is_set():
            self._outcome(row, recipient, "unsent", self.stop_reason or "interrupted")
            return
        send = session.send  # type: ignore[attr-defined]
        started = 0.0
        marked = False

        def attempt() -> str:
            nonlocal started, marked
            if self.stop.is_set():
                raise _Interrupted
            if not marked:
                # Durable before the rate slot is taken: a slow disk then delays the slot, not
                # the send after it, so sends never bunch up at the receiver.
                self.journal.sending(message)
                marked = True
            self.limiter.acquire()
            if self.stop.is_set():
                raise _Interrupted
            started = time.monotonic()  # latency is the provider's, not our rate-limit wait
            result: str = send(message)
            return result

        def before_retry(exc: TransientError, wait: float) -> None:
            self.metrics.retried()
            if isinstance(exc, ThrottledError):
                self.limiter.throttled()
            log.debug("row %s: %s; retrying in %.1fs", row.number, exc, wait)

        try:
            provider_id, attempts = self.retry.call(attempt, before_retry=before_retry)
        except _Interrupted:
            self._outcome(row, recipient, "unsent", self.stop_reason or "interrupted")
        except StopRunError as exc:
            if self.stop_reason is None:
                self.stop_reason = str(exc)
            self.stop.set()
            self._outcome(row, recipient, "unsent", str(exc))
        except (PermanentError, TransientError) as exc:
            if isinstance(exc, ThrottledError):
                self.limiter.throttled()
            kind = "permanent" if isinstance(exc, PermanentError) else "gave up after retries"
            self._outcome(row, recipient, "failed", f"{kind}: {exc}")
        except Exception as exc:
            log.exception("row %s: unexpected error", row.number)
            self._outcome(row, recipient, "failed", f"internal error: {type(exc).__name__}: {exc}")
        else:
            self._finish(
                Outcome(
                    row=row,
                    recipient=recipient,
                    status="sent",
                    message_id=provider_id,
                    attempts=attempts,
                    latency=time.monotonic() - started,
                )
            )

    # --- the run -----------------------------------------------------------------------------

    def run(self) -> Summary:
        opts = self.options
        jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=opts.workers * 4)
        title = f"sending via {self.transport.url}"
        self.progress.start(self.metrics, title)
        try:
            with ThreadPoolExecutor(opts.workers, thread_name_prefix="smartmail-send") as pool:
                workers = [pool.submit(self._worker, jobs) for _ in range(opts.workers)]
                try:
                    for message in self._messages():
                        while True:
                            try:
                                jobs.put(_Job(message), timeout=0.2)
                                break
                            except queue.Full:
                                if all(w.done() for w in workers):
                                    for w in workers:
                                        w.result()
                                    raise RuntimeError("every send worker stopped") from None
                finally:
                    for _ in workers:
                        while True:
                            try:
                                jobs.put(None, timeout=0.2)
                                break
                            except queue.Full:
                                if all(w.done() for w in workers):
                                    break
                for w in workers:
                    w.result()
        finally:
            self.metrics.finish()
            self.progress.stop()
            if self.failed_rows is not None:
                self.failed_rows.close()
            self.transport.close()
        return Summary.build(
            self.metrics,
            self.limiter.stats(),
            campaign=opts.campaign,
            transport=self.transport.url,
            source=self.source.name,
            stopped=self.stop_reason,
            interrupted=self.stop.is_set() and self.stop_reason is None,
            test_to=opts.test_to,
            failed_csv=str(self.failed_rows.path)
            if self.failed_rows and self.failed_rows.count
            else None,
        )


def default_campaign_id(source_identity: str, template_text: str) -> str:
    """A stable id: the same cron line (same file, same template) maps to the same campaign."""
    digest = hashlib.sha256(f"{source_identity}\0{template_text}".encode()).hexdigest()[:10]
    stem = Path(source_identity.rstrip("/")).stem or "campaign"
    return f"{stem}-{digest}"


def send_campaign(
    source: RecipientSource,
    template: MessageTemplate,
    transport: Transport,
    *,
    options: SendOptions | None = None,
    limiter: Limiter | None = None,
    retry: RetryPolicy | None = None,
    journal: Journal | None = None,
    progress: ProgressDisplay | None = None,
    stop: threading.Event | None = None,
    checked: PreflightResult | None = None,
) -> Summary:
    """Validate every row, then send. Raises PreflightError (nothing sent) on a fatal problem."""
    options = options or SendOptions()
    options.check()
    if checked is None:
        checked = preflight(
            source,
            template,
            options,
            allow_utf8_local=transport.allow_utf8_local,
            journal=None if options.test_to else journal,  # a test send ignores the ledger
            keep_rendered=options.render_cache_chars,
        )
    if not checked.ok:
        raise PreflightError(checked.fatal, checked.fatal_count)
    return Run(
        source,
        template,
        transport,
        checked,
        options=options,
        limiter=limiter,
        retry=retry,
        journal=journal,
        progress=progress,
        stop=stop,
    ).run()


def dry_run_summary(checked: PreflightResult, options: SendOptions, transport: str) -> Summary:
    """The summary of a dry run: valid rows count as 'sent' would, nothing else happened."""
    metrics = Metrics(checked.rows)
    metrics.counts["sent"] = checked.valid
    metrics.counts["skipped"] = len(checked.skipped)
    for reason in checked.skipped.values():
        metrics.reasons["skipped"][reason.split(": ", 1)[0]] += 1
    metrics.finish()
    return Summary.build(
        metrics,
        Unlimited().stats(),
        campaign=options.campaign,
        transport=transport,
        source=checked.source,
        dry_run=True,
    )
