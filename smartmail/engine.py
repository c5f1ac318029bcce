"""The dispatch engine: pre-flight every row, then rows -> messages -> limiter -> transport.

Two passes over the source, which for a send is a `Snapshot` (a private copy, so both passes
read the same bytes). Pre-flight renders and validates every row and checks all that could
stop its MIME message from being built (attachments read and encoded, headers encoded), and
sends nothing; if it finds a problem that stops the run, nothing leaves. The send pass streams
the snapshot again: the main thread builds each message from what pre-flight kept (or renders
it again past the cache) and puts it on a bounded queue, and `workers` threads (a
ThreadPoolExecutor) take from it, wait for the shared rate limiter, send through their own
transport session with retries, and record the outcome. Memory is bounded by the queue and
the cache budget, whatever the file size.

The engine knows nothing of which transport it drives: it acts on the error classes of
`smartmail.errors` alone. A `Journal` (the ledger, when there is one) is told before each send
and after each outcome, and can veto a row (suppressed, already sent); a shared ledger can
also refuse the claim `sending()` makes (`AlreadyClaimedError`: another worker has the row),
and the row is skipped, never sent twice. Every other envelope
address (Cc, Bcc, a second To) is checked against the suppression list too: a suppressed one
is left out of that message, envelope and visible header alike, and the row still goes to the
rest. The ledger's "already sent" applies to the row's recipient only: its key is the
campaign's delivery (one per recipient), while a Cc such as an account manager or an archive
box legitimately receives many rows' messages in one campaign.

Two rules keep a run honest when the provider misbehaves. A lost answer after the whole
message was handed over (`InDoubtError`) is never retried: the row is *in doubt*, left for
`retry --in-doubt`. And an outage is not the rows' fault: a circuit breaker counts consecutive
sends that could not reach the provider (`ConnectionFailedError`) or lost its answer, across
all workers, resets whenever the provider answers, and at `max_connect_failures` stops the
run with the rest left unsent (exit 4), as a `StopRunError` from the transport does.
"""

from __future__ import annotations

import contextlib
import csv
import enum
import hashlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar

from . import addresses, logs, prerender
from .addresses import Mailbox
from .errors import (
    AlreadyClaimedError,
    ConfigError,
    ConnectionFailedError,
    InDoubtError,
    InvalidRowError,
    PermanentError,
    PreflightError,
    SmartmailError,
    SourceError,
    StopRunError,
    TemplateError,
    ThrottledError,
    TransientError,
    TransportError,
)
from .message import OutgoingMessage, build, check_buildable
from .progress import NullProgress, ProgressDisplay
from .ratelimit import Limiter, Unlimited
from .records import Described
from .report import Metrics, Outcome, Status, Summary
from .sources import RecipientSource, Row, RowProblem
from .suppression import key as address_key
from .templates import HeaderValue, MessageTemplate, RenderedMessage

if TYPE_CHECKING:  # a dry run (pre-flight, summary) needs none of these; `Run` imports them
    import queue

    from .retry import RetryPolicy
    from .transports.base import Delivery, Session, Transport

log = logs.getLogger("smartmail")

ON_INVALID = ("skip", "abort")
ON_MALFORMED = ("abort", "skip")
ON_DUPLICATE = ("once", "all", "abort")
MAX_PROBLEMS_KEPT = 1000
_Item = TypeVar("_Item", bound=tuple[Any, ...])
CHECK_AHEAD = 32  # rows the send pass asks the journal about at once (see Run._checked_rows)


class _Ask(enum.Enum):
    """A row the journal has not been asked about yet."""

    ASK = 0


@dataclass(repr=False, eq=False)
class SendOptions(Described):
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
    # Pre-flight keeps built messages up to this many bytes, so the send pass neither renders
    # nor builds those rows a second time (most lists fit; a huge one is rebuilt past it).
    render_cache_chars: int = 32 * 1024 * 1024
    # Pre-flight may render part of a long list in a forked helper process on a second CPU
    # (`smartmail.prerender`); False keeps all of it in this process.
    preflight_helper: bool = True
    # Consecutive sends, across workers, that could not reach the provider (or lost its answer)
    # before the run stops as an outage, leaving the rest unsent. Any answer resets the count.
    max_connect_failures: int = 5

    def check(self) -> None:
        if self.workers < 1:
            raise ConfigError("--workers must be at least 1")
        if self.max_connect_failures < 1:
            raise ConfigError("--max-connect-failures must be at least 1")
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
    """What the engine tells a ledger. The default `NullJournal` keeps nothing.

    A journal may also have `suppressed(addresses) -> {address: reason}` (see `NullJournal`
    and the `Ledger`): the engine asks it about a message's other envelope addresses (Cc,
    Bcc, a second To) and leaves the suppressed ones out. It is optional, so a journal
    written before it still works (and checks the row's recipient only).
    """

    def skip_reason(self, recipient: str, row: Row) -> str | None:
        """Why this recipient must not be sent to now (suppressed, already sent), or None."""
        ...

    def sending(self, message: OutgoingMessage) -> None:
        """Called just before the first attempt; must be durable before it returns.

        A ledger shared by many workers may refuse with `AlreadyClaimedError` (another worker
        holds the row, or sent it meanwhile): the row is then skipped, and nothing is sent.
        """
        ...

    def record(self, outcome: Outcome) -> None:
        """Called once per row with how it ended."""
        ...


# A journal may also have `mark(messages)`: the send pass then makes the rows' marks durable
# a few at a time (one commit for `workers // 2` rows) before it queues them, and `sending()`
# for a row so marked returns at once; the pass never has more than twice `workers` rows marked
# and unfinished, so a crash leaves at most that many in doubt (the ledger does; see
# docs/ledger.md). Without it, a journal may have `ahead(message)`: a worker calls it with the
# row it will send next while it sends the current one, so the journal can make that row's
# mark durable in the background and `sending()` for it need not wait.
# It may also have `skip_reasons([(recipient, row), ...]) -> [reason or None, ...]`, the
# answers of `skip_reason` for many rows at once: pre-flight and the send pass then ask in
# groups of `CHECK_AHEAD` rows (the ledger answers each group in two queries).


class NullJournal:
    def skip_reason(self, recipient: str, row: Row) -> str | None:
        return None

    def suppressed(self, addresses: Sequence[str]) -> dict[str, str]:
        """Which of a message's other envelope addresses (Cc, Bcc, a second To) are suppressed:
        {address as given: reason}. Asked only for messages that have such addresses."""
        return {}

    def sending(self, message: OutgoingMessage) -> None:
        return None

    def record(self, outcome: Outcome) -> None:
        return None


@dataclass(repr=False, eq=False)
class PreflightResult(Described):
    """What pre-flight found: the rows to skip and why, the problems, and the previews.

    `kept` holds the rendered and checked messages (by row number) within the cache budget,
    for the send pass to build and send without rendering them again; `suppressed_copies`
    counts the Cc/Bcc addresses left out because they are suppressed (each is also a warning
    in `problems`), `empty_subjects` the rows whose Subject renders empty (each a warning
    too); `envelope_recipients` counts the envelope addresses (To + Cc + Bcc) of the
    valid rows, which is what SES counts against its quota; `source_sha256` is the snapshot's
    digest, which the send pass checks it reads.
    """

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
    kept: dict[int, RenderedMessage] = field(default_factory=dict)
    suppressed_copies: int = 0
    empty_subjects: int = 0
    envelope_recipients: int = 0
    source_sha256: str | None = None

    @property
    def ok(self) -> bool:
        """True when the run may go ahead (skipped rows allowed)."""
        return not self.fatal_count

    @property
    def clean(self) -> bool:
        """True when every row is valid (what dry-run's exit status reports)."""
        return not self.fatal_count and not self.invalid

    def add_invalid(self, problem: RowProblem, fatal: bool) -> None:
        """An invalid row: counted, reported, and skipped with the problem as its reason."""
        self.invalid += 1
        self.add_problem(problem, fatal)
        self.skipped[problem.row] = f"invalid: {problem.message}"

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
    attachments: dict[str, Path] | None = None,
) -> PreflightResult:
    """Render and validate every row, and check it can be built; send nothing. Shape errors
    raise SourceError.

    `keep_rendered` is a budget in bytes: checked messages are kept rendered (by row number)
    until it is spent, for a send pass that follows; a dry run keeps none (its previews are
    built). `attachments`, when given, gets every valid row's attachment paths as the rows
    give them and the files they resolved to as they were checked (the queue's bundle takes
    those, never a file a link turned to since).

    On a second CPU a helper process renders part of a long list (`smartmail.prerender`,
    unless `options.preflight_helper` is False); every check here is made as without it.
    """
    if options.test_to and not allow_utf8_local:
        try:  # the proof's address must be one this transport can send to, as every row's
            addresses.validate(options.test_to, allow_utf8_local=False)
        except addresses.AddressError as exc:
            raise ConfigError(f"--test-to: {exc}") from None
    result = PreflightResult(source=source.name, source_sha256=getattr(source, "sha256", None))
    budget = keep_rendered
    held: set[int] = set()  # ids of the encoded attachments kept messages hold (counted once)
    seen: set[int] = set()  # _seen_key of each recipient kept
    envelope = [options.test_to] if options.test_to else None
    asked: dict[int, tuple[str, str | None]] = {}  # row number: (key, veto), asked ahead
    rendered_rows = prerender.rendered_rows(
        source,
        template,
        allow_utf8_local=allow_utf8_local,
        helper=options.preflight_helper and prerender.usable(source),
    )
    rows: Iterator[tuple[Row, bool, RenderedMessage | None]] = rendered_rows
    many = getattr(journal, "skip_reasons", None) if journal is not None else None
    if many is not None:
        rows = _asking_ahead(rows, source.to_column, many, asked)
    with contextlib.closing(rendered_rows):  # a helper process is stopped on any error
        for row, ragged, ready in rows:
            result.rows += 1
            ahead = asked.pop(row.number, None)
            if ragged:
                problem = RowProblem(
                    row.number,
                    None,
                    "wrong number of fields for the header (ragged row)",
                    source.name,
                )
                result.add_problem(problem, fatal=options.on_malformed == "abort")
                result.skipped[row.number] = "malformed row"
                continue
            try:
                rendered = ready
                if rendered is None:  # not rendered by pre-flight's helper process
                    rendered = template.render(
                        row,
                        source.to_column,
                        source_name=source.name,
                        allow_utf8_local=allow_utf8_local,
                    )
            except InvalidRowError as exc:
                result.add_invalid(_problem(exc, source.name, row), options.on_invalid == "abort")
                continue
            except TemplateError as exc:
                result.add_problem(_problem(exc, source.name, row), fatal=True)
                result.skipped[row.number] = f"template error: {exc.problem}"
                continue
            except UnicodeEncodeError as exc:
                # A lone surrogate in a header (a CSV read as UTF-7 can hold one): this row's
                # value, not a crash of the whole run.
                problem = RowProblem(row.number, None, _build_problem(exc), source.name)
                result.add_invalid(problem, options.on_invalid == "abort")
                continue
            key = addresses.normalise(rendered.recipient)
            seen_key = _seen_key(key)
            if seen_key in seen and options.on_duplicate != "all":
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
                veto = (
                    ahead[1]
                    if ahead is not None and ahead[0] == key
                    else journal.skip_reason(key, row)
                )
                if veto is not None:
                    result.skipped[row.number] = veto
                    continue
                rendered, dropped = drop_suppressed_copies(rendered, journal)
                for header, address, why in dropped:
                    result.suppressed_copies += 1
                    note = (
                        f"{header}: {address} is suppressed ({why}); left out of this message, "
                        "which still goes to its other recipients"
                    )
                    result.add_problem(RowProblem(row.number, None, note, source.name), fatal=False)
                if not rendered.envelope_to:
                    result.skipped[row.number] = "suppressed: every address of the message"
                    continue
            try:
                rendered = check_buildable(rendered, envelope)
                preview = (
                    build(rendered, envelope_to=envelope, tags=options.tags)
                    if len(result.previews) < options.preview
                    else None
                )
            except (OSError, ValueError) as exc:
                # Found now, not in the send pass: an unreadable attachment, a value that cannot
                # be encoded. The row is invalid, under the same policy as any other.
                problem = RowProblem(row.number, None, _build_problem(exc), source.name)
                result.add_invalid(problem, options.on_invalid == "abort")
                continue
            except Exception as exc:
                log.exception("row %s: unexpected error building the message", row.number)
                what = f"cannot build the message: {type(exc).__name__}: {exc}"
                result.add_problem(RowProblem(row.number, None, what, source.name), fatal=True)
                result.skipped[row.number] = f"internal error: {what}"
                continue
            seen.add(seen_key)
            result.valid += 1
            if attachments is not None:
                for file in rendered.attachments:
                    attachments.setdefault(file.given, file.path)
            if rendered.empty_subject is not None:  # the row goes; the operator hears of it first
                column, note = rendered.empty_subject
                result.empty_subjects += 1
                result.add_problem(RowProblem(row.number, column, note, source.name), fatal=False)
            result.envelope_recipients += len(envelope or rendered.envelope_to)
            if budget > 0:
                budget -= _rendered_size(rendered, held)
                result.kept[row.number] = rendered
            if preview is not None:
                result.previews.append(preview)
    if result.rows == 0:
        raise SourceError(source.name, "no data rows after the header; nothing to send")
    return result


def _rendered_size(rendered: RenderedMessage, held: set[int]) -> int:
    """About the bytes keeping a message adds: its text, its row's values (a 100 KB note
    column is held with it) and the objects around it (row, headers, mailboxes: ~300 bytes
    a header, measured with tracemalloc), and each encoded
    attachment not yet held by a message kept before (a file attached to every row is encoded
    once and shared; an invoice per row is not, and must count). `held` has the ids of those
    already counted: each stays alive, so its id stays its own, while the messages are kept."""
    head = rendered.head or ()
    text = len(rendered.text) + len(rendered.html or "") + sum(map(len, head))
    text += sum(map(len, rendered.row.values.values()))  # the row is kept with it
    size = text + 300 * len(rendered.headers) + 500
    for part in rendered.attachment_parts or ():
        if id(part) not in held:
            held.add(id(part))
            size += len(part)
    return size


def _asking_ahead(
    rows: Iterator[_Item],
    to_column: str,
    many: Callable[[Sequence[tuple[str, Row]]], list[str | None]],
    asked: dict[int, tuple[str, str | None]],
) -> Iterator[_Item]:
    """Pass `rows` (tuples whose first item is the row) through, asking the journal about
    `CHECK_AHEAD` of them at a time.

    The answers go in `asked` by row number, keyed by the raw column's normalised address;
    pre-flight uses one only when the rendered recipient has that same key, and asks again
    otherwise, so a row is judged exactly as one at a time would judge it.
    """
    while True:
        chunk = list(itertools.islice(rows, CHECK_AHEAD))
        if not chunk:
            return
        ask = [(addresses.normalise(item[0].values.get(to_column, "")), item[0]) for item in chunk]
        for (key, row), veto in zip(ask, many(ask), strict=True):
            asked[row.number] = (key, veto)
        yield from chunk


def _seen_key(address: str) -> int:
    """A 128-bit BLAKE2b digest of a normalised address, for the duplicate check.

    `hash()` (64 bits) could make two real recipients collide (about 3 in 10^8 runs of a
    million rows) and skip one as a duplicate; at 128 bits that is about 10^-27, so nobody
    is ever skipped by chance. Storing the addresses themselves would be exact too, but
    measured here a million of them take 109 MB against 78 MB for these digests (and 69 MB
    for `hash()`), and the million-row dry-run must stay under 150 MB.
    """
    return int.from_bytes(hashlib.blake2b(address.encode(), digest_size=16).digest(), "big")


def _build_problem(exc: Exception) -> str:
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"attachment{where} cannot be read: {exc.strerror or exc}"
    return f"the message cannot be encoded: {exc}"


_ENVELOPE_HEADERS = frozenset({"to", "cc", "bcc"})


def drop_suppressed_copies(
    rendered: RenderedMessage, journal: Journal
) -> tuple[RenderedMessage, list[tuple[str, str, str]]]:
    """Leave suppressed addresses other than the row's recipient out of a message.

    Returns the message without them (envelope and To/Cc/Bcc headers) and, for each address
    left out, (header, address, reason). A message with no other address costs no lookup.
    """
    primary = address_key(rendered.recipient)
    others = [a for a in rendered.envelope_to if address_key(a) != primary]
    if not others:
        return rendered, []
    found = _suppressed(journal, others)
    if not found:
        return rendered, []
    gone = {address_key(a): why for a, why in found.items()}
    dropped: list[tuple[str, str, str]] = []
    headers: list[tuple[str, HeaderValue]] = []
    for name, value in rendered.headers:
        if name.lower() not in _ENVELOPE_HEADERS or isinstance(value, str):
            headers.append((name, value))
            continue
        kept: list[Mailbox] = []
        for box in value:
            key = address_key(box.address)
            why = gone.get(key) if key != primary else None
            if why is None:
                kept.append(box)
            else:
                dropped.append((name, box.address, why))
        if kept:
            headers.append((name, tuple(kept)))
    envelope = [a for a in rendered.envelope_to if address_key(a) not in gone]
    # head=None: the builder encodes the shorter header block again.
    return rendered._replace(headers=headers, envelope_to=envelope, head=None), dropped


def _suppressed(journal: Journal, others: Sequence[str]) -> dict[str, str]:
    lookup = getattr(journal, "suppressed", None)  # optional: older journals lack it
    return dict(lookup(others)) if lookup is not None else {}


class _Interrupted(Exception):
    """Raised inside an attempt when the run is stopping: the row stays unsent."""


class CircuitBreaker:
    """Counts consecutive outage signals across workers; any answer of the provider resets it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.answers = 0  # ever, so a row can tell whether anyone got through meanwhile
        self._lock = threading.Lock()

    def failure(self) -> int | None:
        """Note one failure; the count when it reaches the limit (trip), else None."""
        with self._lock:
            self.count += 1
            return self.count if self.count >= self.limit else None

    def answered(self) -> None:
        """The provider answered (accepted, or refused with a reply): it is reachable."""
        with self._lock:
            self.count = 0
            self.answers += 1


class _Budget:
    """How many more rows the send pass may mark: twice the workers, less the rows marked and
    not finished. It bounds what a crash can leave in doubt; `take` waits for room for a
    whole batch, so one commit marks several rows."""

    def __init__(self, size: int) -> None:
        self.free = size
        self.wanted = 1
        self._cond = threading.Condition(threading.Lock())

    def take(self, count: int, workers_gone: Callable[[], bool]) -> None:
        with self._cond:
            self.wanted = count
            while self.free < count:
                if workers_gone():
                    raise RuntimeError("every send worker stopped")
                self._cond.wait(0.2)
            self.free -= count

    def give(self, count: int = 1) -> None:
        with self._cond:
            self.free += count
            if self.free >= self.wanted:
                self._cond.notify()


class _Job:
    """A message on the workers' queue (None there means: stop). `taken`: a worker has it."""

    __slots__ = ("message", "taken")

    def __init__(self, message: OutgoingMessage) -> None:
        self.message = message
        self.taken = False


def _job_queue(maxsize: int) -> queue.Queue[_Job | None]:
    """The workers' queue, which marks each job `taken` as a worker takes it, under the
    queue's lock: a library caller's Ctrl-C can land in `put()` before or after the job is
    on the queue, and only this tells the send pass which rows no worker has (`_withdraw`)."""
    import queue

    class Jobs(queue.Queue[_Job | None]):
        def _get(self) -> _Job | None:
            job: _Job | None = self.queue.popleft()
            if job is not None:
                job.taken = True
            return job

    return Jobs(maxsize)


def _withdraw(jobs: queue.Queue[_Job | None], batch: list[_Job]) -> list[_Job]:
    """The jobs of `batch` no worker has taken, taken off the queue if they are on it: the
    send pass accounts for those rows, the workers for the others, so each is counted once."""
    with jobs.mutex:
        left = [job for job in batch if not job.taken]
        for job in left:
            with contextlib.suppress(ValueError):  # never put: the interrupt came before
                jobs.queue.remove(job)
    return left


class FailedRows:
    """The re-drive CSV: original columns plus `error`, for rows that failed or went unsent."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path = path
        self.columns = columns
        self._fh: IO[str] | None = None
        self._writer: csv.DictWriter[str] | None = None
        self._lock = threading.Lock()
        self.count = 0
        self.missing = 0  # rows it should hold and could not be given (the ledger has them)
        self.error: str | None = None

    def add(self, outcome: Outcome) -> None:
        """Add a row; a file that cannot be written (its folder gone, a full disk) costs the
        send nothing: the ledger records every outcome anyway. The summary says so."""
        with self._lock:
            if self.error is not None:
                self.missing += 1
                return
            try:
                if self._writer is None:
                    # A value no UTF-8 holds (a lone surrogate from a UTF-7 list) is escaped,
                    # not a crash of the worker recording a failed row.
                    self._fh = open(  # noqa: SIM115
                        self.path, "w", newline="", encoding="utf-8", errors="backslashreplace"
                    )
                    self._writer = csv.DictWriter(self._fh, [*self.columns, "error"])
                    self._writer.writeheader()
                self._writer.writerow({**outcome.row.values, "error": outcome.reason})
                self.count += 1
            except OSError as exc:
                self.error = exc.strerror or type(exc).__name__
                self.missing += 1
                log.error("cannot write %s: %s", self.path, self.error)

    def warning(self, campaign: str) -> str | None:
        if self.error is None:
            return None
        return (
            f"cannot write {self.path} ({self.error}): {self.missing} row(s) to re-drive are "
            f"not in it; the ledger has them (`smartmail status {campaign}`; `smartmail retry "
            f"{campaign}` re-drives them)"
        )

    def close(self, *, remove_stale: bool = True) -> None:
        """Finish the file. When this run had no row to re-drive, a file an earlier run left
        at this path goes too: it would offer rows since sent, to be sent a second time."""
        with self._lock:
            if self._fh is not None:
                try:
                    self._fh.close()
                except OSError as exc:  # the last rows did not reach the disk
                    self.error = exc.strerror or type(exc).__name__
                    self.missing += self.count
                    self.count = 0
            elif remove_stale:
                try:
                    self.path.unlink(missing_ok=True)
                except OSError as exc:
                    log.warning("%s is from an earlier run; cannot remove it: %s", self.path, exc)


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
        self.limiter: Limiter = limiter or Unlimited(sleep=self._pause)
        self.stop = stop or threading.Event()
        if retry is None:
            from .retry import RetryPolicy

            retry = RetryPolicy(sleep=self._pause)
        self.retry = retry
        self.journal: Journal = journal or NullJournal()
        if options.test_to:
            self.journal = NullJournal()
        self.progress = progress or NullProgress()
        self.metrics = Metrics(checked.rows)
        self.breaker = CircuitBreaker(options.max_connect_failures)
        self.stop_reason: str | None = None
        self.failed_rows = (
            FailedRows(options.failed_csv, source.columns) if options.failed_csv else None
        )
        self._queued = 0  # messages the send pass has queued so far
        self._budget: _Budget | None = None  # set by run() when the journal marks in batches

    def _pause(self, seconds: float) -> None:
        """Sleep that wakes early when the run is stopping (retries and rate waits)."""
        self.stop.wait(seconds)

    # --- outcomes ----------------------------------------------------------------------------

    def _finish(self, outcome: Outcome) -> None:
        # The ledger first: an outcome counted is then queued for the ledger already, so the
        # counts an abort commits and shows never run ahead of what the ledger gets.
        try:
            self.journal.record(outcome)
        except Exception as exc:
            # Sending on without a record would risk double sends on the next run: stop.
            log.exception("could not record the outcome of row %s", outcome.row.number)
            self.stop_reason = self.stop_reason or f"could not record an outcome: {exc}"
            self.stop.set()
            raise
        finally:
            self.metrics.record(outcome)
            redrive = outcome.status == "failed" or (
                outcome.status == "unsent" and (self.stop_reason or self.stop.is_set())
            )
            if self.failed_rows is not None and redrive:
                self.failed_rows.add(outcome)

    def _outcome(self, row: Row, recipient: str, status: Status, reason: str = "") -> None:
        self._finish(Outcome(row=row, recipient=recipient, status=status, reason=reason))

    # --- producer ----------------------------------------------------------------------------

    def _messages(self) -> Iterator[OutgoingMessage]:
        """Stream the snapshot again; record skips; yield the messages to send, in row order."""
        opts = self.options
        self._queued = 0
        seen_rows = 0
        limit = opts.limit if opts.limit is not None else (1 if opts.test_to else None)
        expected = self.checked.source_sha256
        if expected is not None and getattr(self.source, "sha256", None) != expected:
            raise SourceError(
                self.source.name,
                "the send pass is not reading the snapshot pre-flight checked; nothing sent",
            )
        for row, recipient, veto in self._checked_rows(limit):
            seen_rows += 1
            skip = self.checked.skipped.get(row.number)
            if skip is not None:
                self._outcome(row, recipient, "skipped", skip)
                continue
            if self.stop.is_set() or (limit is not None and self._queued >= limit):
                reason = self.stop_reason or (
                    "interrupted" if self.stop.is_set() else "over --limit"
                )
                self.checked.kept.pop(row.number, None)
                self._outcome(row, recipient, "unsent", reason)
                continue
            if veto is _Ask.ASK:
                veto = self.journal.skip_reason(addresses.normalise(recipient), row)
            if veto is not None:
                self.checked.kept.pop(row.number, None)
                self._outcome(row, recipient, "skipped", veto)
                continue
            try:
                message = self._compose(row)
            except (InvalidRowError, TemplateError) as exc:
                self._outcome(row, recipient, "failed", f"render: {exc.problem}")
                continue
            except (OSError, ValueError) as exc:
                self._outcome(row, recipient, "failed", _build_problem(exc))
                continue
            except SmartmailError:
                raise  # the ledger cannot be read: the run stops, as for skip_reason
            except Exception as exc:
                # A bug, not the row's fault: this row fails, the run goes on.
                log.exception("row %s: unexpected error preparing the message", row.number)
                why = f"internal error: {type(exc).__name__}: {exc}"
                self._outcome(row, recipient, "failed", why)
                continue
            if message is None:
                self._outcome(row, recipient, "skipped", "suppressed: every address of the message")
                continue
            self._queued += 1
            yield message
        if seen_rows != self.checked.rows:
            raise SourceError(
                self.source.name,
                f"the file changed during the run ({self.checked.rows} rows at pre-flight, "
                f"{seen_rows} now)",
            )

    def _checked_rows(self, limit: int | None) -> Iterator[tuple[Row, str, str | _Ask | None]]:
        """The snapshot's rows: (row, recipient, the journal's veto or `_Ask.ASK`).

        A journal with `skip_reasons` is asked about `CHECK_AHEAD` rows at a time, the rows
        pre-flight skipped left out; the check then runs at most that many rows (about one
        queue's depth) before the row is queued, still after pre-flight. Once the run stops
        or `limit` rows are queued no row is asked about any more.
        """
        many = getattr(self.journal, "skip_reasons", None)
        rows = self.source.rows()
        if many is None:
            for row, _ragged in rows:
                yield row, row.values.get(self.source.to_column, "").strip(), _Ask.ASK
            return
        to_column, skipped = self.source.to_column, self.checked.skipped
        while True:
            chunk = [
                (row, row.values.get(to_column, "").strip())
                for row, _ragged in itertools.islice(rows, CHECK_AHEAD)
            ]
            if not chunk:
                return
            ask = [
                (addresses.normalise(recipient), row)
                for row, recipient in chunk
                if row.number not in skipped
            ]
            wanted = not self.stop.is_set() and (limit is None or self._queued < limit)
            vetoes = iter(many(ask) if ask and wanted else ())
            for row, recipient in chunk:
                if row.number in skipped:
                    yield row, recipient, None
                else:
                    yield row, recipient, next(vetoes, _Ask.ASK)

    def _compose(self, row: Row) -> OutgoingMessage | None:
        """The row's message, built now: from what pre-flight rendered when it kept it, else
        rendered again. Either way a copy (Cc, Bcc) suppressed since pre-flight is left out;
        None when no address of the message is left.
        """
        rendered = self.checked.kept.pop(row.number, None)
        if rendered is None:
            rendered = self.template.render(
                row,
                self.source.to_column,
                source_name=self.source.name,
                allow_utf8_local=self.transport.allow_utf8_local,
            )
        rendered, dropped = drop_suppressed_copies(rendered, self.journal)
        for header, address, why in dropped:
            log.info("row %s: %s %s left out (suppressed: %s)", row.number, header, address, why)
        if not rendered.envelope_to:
            return None
        envelope = [self.options.test_to] if self.options.test_to else None
        return build(rendered, envelope_to=envelope, tags=self.options.tags)

    # --- workers -----------------------------------------------------------------------------

    def _worker(self, jobs: queue.Queue[_Job | None]) -> None:
        import queue

        session = self.transport.open_session()
        budget = self._budget
        # Without batched marks, a journal with `ahead` starts marking the next row while
        # this one is sent.
        ahead = None if budget is not None else getattr(self.journal, "ahead", None)
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
                try:
                    self._send_one(session, job.message)
                finally:
                    if budget is not None:
                        budget.give()
        finally:
            session.close()

    def _stop_run(self, reason: str) -> None:
        """Stop taking rows; the first reason given is the one the summary shows."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stop.set()

    def _outage(self, exc: Exception, what: str) -> bool:
        """Count an outage signal; stop the run when the breaker trips. True if it did."""
        count = self.breaker.failure()
        if count is None:
            return False
        self._stop_run(
            f"{count} {what} in a row (last: {exc}); the provider looks unreachable, so the "
            "run stopped and the rest is left unsent for a later run"
        )
        return True

    def _send_one(self, session: Session, message: OutgoingMessage) -> None:
        from .transports.base import Delivery  # loaded already: the run's transport is one

        row, recipient = message.row, message.recipient
        if self.stop.is_set():
            self._outcome(row, recipient, "unsent", self.stop_reason or "interrupted")
            return
        send = session.send
        started = 0.0
        marked = False

        def attempt() -> str | Delivery:
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
            try:
                result = send(message)
            except ConnectionFailedError as exc:
                if self._outage(exc, "sends could not reach the provider"):
                    raise _Interrupted from exc
                raise
            except InDoubtError:
                raise
            except TransportError:
                self.breaker.answered()  # a refusal is still an answer: the provider is up
                raise
            self.breaker.answered()
            return result

        def before_retry(exc: TransientError, wait: float) -> None:
            self.metrics.retried()
            if isinstance(exc, ThrottledError):
                self.limiter.throttled()
            log.debug("row %s: %s; retrying in %.1fs", row.number, exc, wait)

        answers_before = self.breaker.answers
        try:
            result, attempts = self.retry.call(attempt, before_retry=before_retry)
        except _Interrupted:
            self._outcome(row, recipient, "unsent", self.stop_reason or "interrupted")
        except AlreadyClaimedError as exc:
            # Another worker won the row between our check and our claim: theirs to send.
            log.debug("row %s: %s", row.number, exc)
            self._outcome(row, recipient, "skipped", exc.skip_reason)
        except StopRunError as exc:
            self._stop_run(str(exc))
            self._outcome(row, recipient, "unsent", str(exc))
        except InDoubtError as exc:
            # Never retried: the provider may hold the message. Left for `retry --in-doubt`.
            self._outage(exc, "sends lost the provider's answer")
            self._outcome(row, recipient, "in-doubt", f"in doubt: {exc}")
        except ConnectionFailedError as exc:
            if self.breaker.answers != answers_before:
                # Others got through meanwhile: the provider is up, this row had bad luck.
                self._outcome(row, recipient, "failed", f"gave up after retries: {exc}")
            else:
                # No send got through during all of this row's attempts: an outage.
                self._stop_run(
                    f"could not reach the provider in {self.retry.max_retries + 1} attempts "
                    f"(last: {exc}); the run stopped and the rest is left unsent for a later run"
                )
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
            provider_id, refused = (
                (result.provider_id, result.refused)
                if isinstance(result, Delivery)
                else (result, ())
            )
            self._finish(
                Outcome(
                    row=row,
                    recipient=recipient,
                    status="sent",
                    reason=f"sent without refused recipient(s): {'; '.join(refused)}"
                    if refused
                    else "",
                    message_id=provider_id,
                    attempts=attempts,
                    latency=time.monotonic() - started,
                    refused=refused,
                )
            )

    # --- the run -----------------------------------------------------------------------------

    def _feed(self, jobs: queue.Queue[_Job | None], workers_gone: Callable[[], bool]) -> None:
        import queue

        for message in self._messages():
            while True:
                try:
                    jobs.put(_Job(message), timeout=0.2)
                    break
                except queue.Full:
                    if workers_gone():
                        raise RuntimeError("every send worker stopped") from None

    def _feed_marked(
        self,
        jobs: queue.Queue[_Job | None],
        mark: Callable[[list[OutgoingMessage]], None],
        workers_gone: Callable[[], bool],
    ) -> None:
        """Mark rows `workers // 2` at a time, in one commit, then queue them.

        The next batch is built while the workers send, and marked once that many rows have
        finished: the workers then find their rows durable already and rarely wait for one.
        """
        budget = self._budget
        assert budget is not None
        size = max(1, self.options.workers // 2)
        messages = self._messages()
        while True:
            batch: list[OutgoingMessage] = []
            todo: list[_Job] = []  # the batch's jobs, once they are being put on the queue
            took = 0  # budget taken for the batch
            try:
                for message in messages:
                    batch.append(message)
                    if len(batch) == size:
                        break
                if not batch:
                    return
                budget.take(len(batch), workers_gone)
                took = len(batch)
                if self.stop.is_set():  # stopping: these were never attempted, so never marked
                    raise _Interrupted
                try:
                    mark(batch)
                except Exception as exc:
                    self._stop_run(f"could not record in the ledger: {exc}")
                    raise
                todo = [_Job(message) for message in batch]
                for job in todo:
                    jobs.put(job)
            except _Interrupted:
                budget.give(took)
                self._never_queued(batch, self.stop_reason or "interrupted")
            except BaseException as exc:
                # The snapshot changed, the ledger failed, every worker stopped, or Ctrl-C in
                # a library caller (within the commit, or after it, as early as within a
                # `put`): the rows of the batch no worker took were never attempted.
                # Recorded unsent, a mark that landed goes back to pending instead of leaving
                # them in doubt.
                if not isinstance(exc, Exception):
                    # Stopping before these are recorded: no worker starts another row
                    # meanwhile, and they are unsent rows of a stopped run (re-driven).
                    self.stop.set()
                left = _withdraw(jobs, todo)
                budget.give(took - (len(todo) - len(left)))
                why = str(exc) if isinstance(exc, Exception) else "interrupted"
                self._never_queued([job.message for job in left] if todo else batch, why)
                raise

    def _never_queued(self, batch: list[OutgoingMessage], reason: str) -> None:
        """Outcomes for rows the send pass marked (or tried to) and will never queue."""
        for message in batch:
            with contextlib.suppress(Exception):  # the ledger may be what failed
                self._outcome(message.row, message.recipient, "unsent", reason)

    def run(self) -> Summary:
        import queue  # neither for a dry run's pre-flight
        from concurrent.futures import ThreadPoolExecutor

        opts = self.options
        mark: Callable[[list[OutgoingMessage]], None] | None = getattr(self.journal, "mark", None)
        # Batched marks bound the rows queued by the budget; otherwise the queue's size does.
        jobs = _job_queue(0 if mark else opts.workers * 4)
        self._budget = _Budget(2 * opts.workers) if mark is not None else None
        title = f"sending via {self.transport.url}"
        self._display(lambda: self.progress.start(self.metrics, title))
        try:
            with ThreadPoolExecutor(opts.workers, thread_name_prefix="smartmail-send") as pool:
                workers = [pool.submit(self._worker, jobs) for _ in range(opts.workers)]

                def workers_gone() -> bool:
                    if not all(w.done() for w in workers):
                        return False
                    for w in workers:
                        w.result()
                    return True

                try:
                    if mark is not None:
                        self._feed_marked(jobs, mark, workers_gone)
                    else:
                        self._feed(jobs, workers_gone)
                except BaseException as exc:
                    if not isinstance(exc, Exception):
                        self.stop.set()  # Ctrl-C in a library caller: the workers stop too
                    raise
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
            self.metrics.count_unreached()  # the workers are done: no outcome comes later
            self.metrics.finish()
            self._display(lambda: self.progress.stop())
            if self.failed_rows is not None:
                self.failed_rows.close(remove_stale=not opts.test_to)  # a proof changes nothing
            self.transport.close()
        summary = Summary.build(
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
            warnings=[w for w in [self.failed_rows.warning(opts.campaign)] if w]
            if self.failed_rows
            else [],
        )
        _note_preflight(summary, self.checked)
        return summary

    def _display(self, step: Callable[[], None]) -> None:
        """Start or stop the progress display; one that fails never stops the send pass, nor
        keeps the failed rows from being written. rich, whose console meets a closed pipe,
        raises SystemExit(1), hence the catch; the display is then left off."""
        try:
            step()
        except (Exception, SystemExit) as exc:
            log.warning("the progress display failed and is off: %s: %s", type(exc).__name__, exc)
            self.progress = NullProgress()


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
    """Validate every row, then send. Raises PreflightError (nothing sent) on a fatal problem.

    Without `checked`, both passes read one private snapshot of `source`, taken here. A caller
    that runs `preflight` itself passes its result and the snapshot it checked (see
    `RecipientSource.snapshot`).
    """
    options = options or SendOptions()
    options.check()
    if checked is not None:
        return _send_checked(
            source, template, transport, checked, options, limiter, retry, journal, progress, stop
        )
    with source.snapshot() as snapshot:
        checked = preflight(
            snapshot,
            template,
            options,
            allow_utf8_local=transport.allow_utf8_local,
            journal=None if options.test_to else journal,  # a test send ignores the ledger
            keep_rendered=options.render_cache_chars,
        )
        return _send_checked(
            snapshot, template, transport, checked, options, limiter, retry, journal, progress, stop
        )


def _send_checked(
    source: RecipientSource,
    template: MessageTemplate,
    transport: Transport,
    checked: PreflightResult,
    options: SendOptions,
    limiter: Limiter | None,
    retry: RetryPolicy | None,
    journal: Journal | None,
    progress: ProgressDisplay | None,
    stop: threading.Event | None,
) -> Summary:
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


def _note_preflight(summary: Summary, checked: PreflightResult) -> None:
    """What pre-flight warned of in rows that went (suppressed Cc/Bcc addresses left out, an
    empty Subject) is no skip: say so in the summary, where a cron mail's reader looks."""
    if checked.suppressed_copies:
        summary.warnings.append(
            f"{checked.suppressed_copies} suppressed Cc/Bcc address(es) left out of their "
            "messages (pre-flight listed them)"
        )
    if checked.empty_subjects:
        summary.warnings.append(
            f"{checked.empty_subjects} row(s) render an empty Subject; a message sent for "
            "one goes without it (pre-flight listed them)"
        )


def dry_run_summary(checked: PreflightResult, options: SendOptions, transport: str) -> Summary:
    """The summary of a dry run: valid rows count as 'sent' would, nothing else happened."""
    metrics = Metrics(checked.rows)
    metrics.counts["sent"] = checked.valid
    metrics.counts["skipped"] = len(checked.skipped)
    for reason in checked.skipped.values():
        metrics.reasons["skipped"][reason.split(": ", 1)[0]] += 1
    metrics.finish()
    summary = Summary.build(
        metrics,
        Unlimited().stats(),
        campaign=options.campaign,
        transport=transport,
        source=checked.source,
        dry_run=True,
    )
    _note_preflight(summary, checked)
    return summary
