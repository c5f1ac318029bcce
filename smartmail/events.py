"""Amazon SES feedback (bounces, complaints, deliveries, ...) applied to the state database.

SES publishes to an SNS topic; an SQS queue subscribed to it holds the messages until
`smartmail events` (or a Lambda handler) reads them; `ses_feedback.parse` reads each one.

What each event does (see docs/events.md): a permanent bounce or a complaint suppresses every
recipient it lists and marks the delivery; a transient bounce and a delivery only mark it;
every event is kept in `events`. Applying a message is one transaction and idempotent: the
`events` UNIQUE key (feedback id, recipient, type) makes a re-delivered message a no-op, so a
message is deleted from the queue only after it is applied, and a crash in between is harmless.
A message that cannot be read is reported and left on the queue for its dead-letter policy.
"""

from __future__ import annotations

import re
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from .errors import EXIT_SOME_FAILED, ConfigError, SmartmailError
from .ses_feedback import Feedback, MalformedMessage, RecipientEvent, parse
from .suppression import SuppressionList

__all__ = [
    "Applied",
    "ConsumeSummary",
    "Feedback",
    "FeedbackStore",
    "MalformedMessage",
    "QueueError",
    "RecordResult",
    "SqliteFeedback",
    "apply",
    "batch_item_failures",
    "consume",
    "handle_sqs_records",
    "parse",
    "region_from_queue_url",
    "transaction",
]

SQS_BATCH = 10
SQS_MAX_WAIT = 20
SQS_MAX_VISIBILITY = 43200
# Later feedback may only raise a delivery's feedback, never lower it: events arrive out of
# order, and a complaint must not be overwritten by the delivery event that preceded it.
FEEDBACK_RANK = {"soft-bounced": 1, "delivered": 2, "bounced": 3, "complained": 4}
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d+\Z")


class QueueError(SmartmailError):
    """SQS could not be read or written (network, throttling); the run stops."""

    exit_code = EXIT_SOME_FAILED


# --- applying ---------------------------------------------------------------------------------


@dataclass
class Applied:
    """What applying one message changed."""

    type: str
    recorded: int = 0
    duplicates: int = 0
    suppressed: int = 0
    deliveries: int = 0


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction (a savepoint inside a caller's transaction)."""
    if conn.in_transaction:
        conn.execute("SAVEPOINT smartmail_feedback")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK TO smartmail_feedback")
            conn.execute("RELEASE smartmail_feedback")
            raise
        conn.execute("RELEASE smartmail_feedback")
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class FeedbackStore(Protocol):
    """Where feedback is applied: the SQLite state (`SqliteFeedback`) or DynamoDB
    (`smartmail.dynamo_suppression.DynamoFeedback`). `apply` acts through it, so the CLI and
    the Lambda handler share one set of rules whatever holds the state."""

    def transaction(self) -> AbstractContextManager[None]: ...

    def seen(self, fb: Feedback, rcpt: RecipientEvent) -> bool:
        """True when this recipient's event was applied before (a re-delivered message)."""
        ...

    def suppress(self, address: str, reason: str, detail: str) -> bool:
        """Suppress the address; False when it already was (the first reason is kept)."""
        ...

    def mark(self, provider_id: str, recipient: str, feedback: str) -> int:
        """Raise the delivery's feedback (never lower it); return how many were changed."""
        ...

    def record(self, fb: Feedback, rcpt: RecipientEvent) -> bool:
        """Keep the event, after acting on it; False when another consumer kept it first."""
        ...


class SqliteFeedback:
    """The SQLite state database as a `FeedbackStore`: one transaction per message."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.suppressions = SuppressionList(conn)

    def transaction(self) -> AbstractContextManager[None]:
        return transaction(self.conn)

    def seen(self, fb: Feedback, rcpt: RecipientEvent) -> bool:
        found = self.conn.execute(
            "SELECT 1 FROM events WHERE feedback_id = ? AND recipient = ? AND type = ?",
            (fb.feedback_id, rcpt.address, fb.type),
        ).fetchone()
        return found is not None

    def suppress(self, address: str, reason: str, detail: str) -> bool:
        return self.suppressions.add(address, reason, detail)

    def mark(self, provider_id: str, recipient: str, feedback: str) -> int:
        return _mark(self.conn, provider_id, recipient, feedback)

    def record(self, fb: Feedback, rcpt: RecipientEvent) -> bool:
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO events"
            "(provider_id, recipient, type, subtype, detail, feedback_id) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (fb.provider_id, rcpt.address, fb.type, rcpt.subtype, rcpt.detail, fb.feedback_id),
        )
        return cur.rowcount > 0


State = sqlite3.Connection | FeedbackStore


def _store(state: State) -> FeedbackStore:
    return SqliteFeedback(state) if isinstance(state, sqlite3.Connection) else state


def apply(state: State, fb: Feedback) -> Applied:
    """Act on the event and keep it. Applying it again changes nothing.

    The event is kept after its actions, and every action is idempotent, so a consumer that
    dies in between (where there is no transaction: DynamoDB) applies it again in full when
    the message comes back, never skipping a suppression.
    """
    store = _store(state)
    result = Applied(fb.type)
    with store.transaction():
        for rcpt in fb.recipients:
            if store.seen(fb, rcpt):
                result.duplicates += 1
                continue
            feedback = _act(store, fb, rcpt, result)
            if feedback and fb.provider_id and rcpt.address:
                result.deliveries += store.mark(fb.provider_id, rcpt.address, feedback)
            if store.record(fb, rcpt):
                result.recorded += 1
            else:
                result.duplicates += 1
    return result


def _act(store: FeedbackStore, fb: Feedback, rcpt: RecipientEvent, result: Applied) -> str | None:
    """Suppress when the event calls for it; return the delivery feedback to set, if any."""
    if fb.type == "Bounce":
        if not fb.permanent:
            return "soft-bounced"
        sub = (rcpt.subtype or "").partition("/")[2] or "Permanent"
        detail = f"{sub}: {rcpt.detail}" if rcpt.detail else sub
        if rcpt.address and store.suppress(rcpt.address, "bounce", detail):
            result.suppressed += 1
        return "bounced"
    if fb.type == "Complaint":
        if rcpt.address and store.suppress(rcpt.address, "complaint", rcpt.subtype or ""):
            result.suppressed += 1
        return "complained"
    if fb.type == "Delivery":
        return "delivered"
    return None


def _mark(conn: sqlite3.Connection, provider_id: str, recipient: str, feedback: str) -> int:
    rank = FEEDBACK_RANK[feedback]
    cur = conn.execute(
        """
        UPDATE deliveries
           SET feedback = ?,
               feedback_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),
               updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
         WHERE provider_id = ? AND recipient = ?
           AND (feedback IS NULL OR CASE feedback
                WHEN 'soft-bounced' THEN 1 WHEN 'delivered' THEN 2
                WHEN 'bounced' THEN 3 WHEN 'complained' THEN 4 ELSE 0 END <= ?)
        """,
        (feedback, provider_id, recipient, rank),
    )
    return cur.rowcount


# --- SQS records (the CLI and a Lambda handler share this) -------------------------------------


@dataclass
class RecordResult:
    """How one SQS record went. `malformed` records must stay on the queue."""

    message_id: str
    ok: bool
    applied: Applied | None = None
    malformed: bool = False
    error: str = ""


def handle_sqs_records(records: Iterable[Mapping[str, Any]], state: State) -> list[RecordResult]:
    """Apply each record (SQS ReceiveMessage `Body`/`MessageId`, or Lambda `body`/`messageId`).

    Never raises for one bad record: each gets a result, so a Lambda handler can return the
    failures as `batchItemFailures` (see `batch_item_failures`) and the rest are deleted.
    """
    results: list[RecordResult] = []
    for record in records:
        message_id = str(record.get("MessageId") or record.get("messageId") or "?")
        body = record.get("Body", record.get("body"))
        try:
            if not isinstance(body, str):
                raise MalformedMessage("the record has no body")
            feedback = parse(body)
        except MalformedMessage as exc:
            results.append(RecordResult(message_id, False, malformed=True, error=str(exc)))
            continue
        try:
            applied = apply(state, feedback)
        except sqlite3.Error as exc:
            results.append(RecordResult(message_id, False, error=f"state database: {exc}"))
            continue
        except SmartmailError as exc:
            results.append(RecordResult(message_id, False, error=f"state: {exc}"))
            continue
        except Exception as exc:
            # Whatever it is, it is this record's: it stays on the queue (and reaches its
            # dead-letter queue), while the rest of the batch is applied and deleted.
            results.append(
                RecordResult(message_id, False, error=f"unexpected {type(exc).__name__}: {exc}")
            )
            continue
        results.append(RecordResult(message_id, True, applied))
    return results


def batch_item_failures(results: Iterable[RecordResult]) -> dict[str, list[dict[str, str]]]:
    """The Lambda partial-batch response: the failed records stay on the queue."""
    return {"batchItemFailures": [{"itemIdentifier": r.message_id} for r in results if not r.ok]}


# --- consuming a queue ------------------------------------------------------------------------


@dataclass
class ConsumeSummary:
    """What one `smartmail events` run did."""

    queue: str
    received: int = 0
    applied: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    suppressed: int = 0
    deliveries_marked: int = 0
    deleted: int = 0
    malformed: list[tuple[str, str]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    delete_failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.malformed and not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "received": self.received,
            "applied": dict(sorted(self.applied.items())),
            "duplicates": self.duplicates,
            "suppressed_added": self.suppressed,
            "deliveries_marked": self.deliveries_marked,
            "deleted": self.deleted,
            "malformed": [{"message_id": m, "error": e} for m, e in self.malformed],
            "errors": [{"message_id": m, "error": e} for m, e in self.errors],
            "delete_failed": [{"message_id": m, "error": e} for m, e in self.delete_failed],
        }


def region_from_queue_url(url: str) -> str | None:
    """us-east-1 from https://sqs.us-east-1.amazonaws.com/123/q (or the legacy form)."""
    parts = (urlsplit(url).hostname or "").split(".")
    for candidate in parts[:2]:
        if _REGION.match(candidate):
            return candidate
    return None


def check_queue_url(url: str) -> None:
    parsed = urlsplit(url)
    if parsed.scheme not in ("https", "http") or not parsed.hostname or parsed.path in ("", "/"):
        raise ConfigError(
            f"--queue {url!r}: expected a queue URL such as "
            "https://sqs.us-east-1.amazonaws.com/123456789012/ses-feedback"
        )


def consume(
    queue_url: str,
    conn: State,
    *,
    max_messages: int = 100,
    wait_seconds: int = 5,
    visibility_timeout: int | None = None,
    sqs: Any = None,
    on_problem: Callable[[str], None] | None = None,
) -> ConsumeSummary:
    """Read up to `max_messages` from the queue, apply each, delete the applied ones.

    Stops when a receive (a long poll of at most `wait_seconds`) brings nothing new, so an
    empty queue ends the run within `wait_seconds`. A message received again in the same run
    (a malformed one becoming visible again) is not handled twice. Only ReceiveMessage and
    DeleteMessageBatch are called.
    """
    check_queue_url(queue_url)
    if max_messages < 1:
        raise ConfigError("--max-messages must be at least 1")
    if not 0 <= wait_seconds <= SQS_MAX_WAIT:
        raise ConfigError(f"--wait-seconds must be between 0 and {SQS_MAX_WAIT}")
    if visibility_timeout is not None and not 0 <= visibility_timeout <= SQS_MAX_VISIBILITY:
        raise ConfigError(f"--visibility-timeout must be between 0 and {SQS_MAX_VISIBILITY}")
    if sqs is None:
        from . import aws

        sqs = aws.client("sqs", region=region_from_queue_url(queue_url))
    report = on_problem or (lambda _line: None)
    summary = ConsumeSummary(queue_url)
    seen: set[str] = set()
    taken = 0
    while taken < max_messages:
        request: dict[str, Any] = {
            "QueueUrl": queue_url,
            "MaxNumberOfMessages": min(SQS_BATCH, max_messages - taken),
            "WaitTimeSeconds": wait_seconds,
        }
        if visibility_timeout is not None:
            request["VisibilityTimeout"] = visibility_timeout
        messages = _sqs_call(sqs, "receive_message", queue_url, request).get("Messages") or []
        taken += len(messages)
        fresh = [m for m in messages if m.get("MessageId") not in seen]
        if not fresh:
            break
        seen.update(str(m.get("MessageId")) for m in fresh)
        summary.received += len(fresh)
        handles = {str(m.get("MessageId")): str(m.get("ReceiptHandle")) for m in fresh}
        done: list[str] = []
        for result in handle_sqs_records(fresh, conn):
            if result.ok and result.applied is not None:
                applied = result.applied
                if applied.recorded:
                    summary.applied[applied.type] += 1
                elif applied.duplicates:
                    summary.duplicates += 1
                summary.suppressed += applied.suppressed
                summary.deliveries_marked += applied.deliveries
                done.append(result.message_id)
            elif result.malformed:
                summary.malformed.append((result.message_id, result.error))
                report(f"malformed message {result.message_id}: {result.error}; left on the queue")
            else:
                summary.errors.append((result.message_id, result.error))
                report(
                    f"message {result.message_id} not applied: {result.error}; left on the queue"
                )
        _delete(sqs, queue_url, [(mid, handles[mid]) for mid in done], summary, report)
    return summary


def _delete(
    sqs: Any,
    queue_url: str,
    items: list[tuple[str, str]],
    summary: ConsumeSummary,
    report: Callable[[str], None],
) -> None:
    if not items:
        return
    entries = [{"Id": str(i), "ReceiptHandle": handle} for i, (_mid, handle) in enumerate(items)]
    response = _sqs_call(
        sqs, "delete_message_batch", queue_url, {"QueueUrl": queue_url, "Entries": entries}
    )
    summary.deleted += len(response.get("Successful") or [])
    for failure in response.get("Failed") or []:
        mid = items[int(failure.get("Id", 0))][0]
        why = f"{failure.get('Code', '')} {failure.get('Message', '')}".strip()
        summary.delete_failed.append((mid, why))
        report(
            f"message {mid} was applied but not deleted ({why}); "
            "it will come back and be recognised as already applied"
        )


_CONFIG_CODES = {
    "AccessDenied",
    "AccessDeniedException",
    "AWS.SimpleQueueService.NonExistentQueue",
    "QueueDoesNotExist",
    "InvalidAddress",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "SignatureDoesNotMatch",
}


def _sqs_call(sqs: Any, operation: str, queue_url: str, request: dict[str, Any]) -> Any:
    """Call SQS; turn botocore errors into one line without request ids or credentials."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    api = "".join(word.title() for word in operation.split("_"))
    try:
        return getattr(sqs, operation)(**request)
    except ClientError as exc:
        err = exc.response.get("Error", {})
        code = str(err.get("Code", "")) or "error"
        text = f"{queue_url}: SQS {api}: {code} {err.get('Message', '')}".strip()
        if code in _CONFIG_CODES:
            raise ConfigError(text) from None
        raise QueueError(text) from None
    except NoCredentialsError:
        raise ConfigError("no AWS credentials found (environment, profile or role)") from None
    except BotoCoreError as exc:
        raise QueueError(f"{queue_url}: SQS {api}: {exc}") from None
