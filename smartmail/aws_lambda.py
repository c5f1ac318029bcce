"""AWS Lambda entry points: thin wrappers over the library, configured by environment.

`feedback_handler` applies SES bounces and complaints to the suppression list with the code
of `smartmail events` (`events.handle_sqs_records`, `events.apply`), on the state named by
$SMARTMAIL_STATE (`dynamodb://TABLE`; a Lambda has no disk to keep SQLite on). It takes
either event source:

- SNS (the function subscribed to the SES notifications topic): each record's `Sns` object
  is the SNS envelope `ses_feedback.parse` reads. A record that could not be applied makes
  the invocation fail, so Lambda retries it (applying is idempotent) and then hands it to
  the function's dead-letter queue.
- SQS (a queue subscribed to the topic, with `ReportBatchItemFailures`): returns
  `batchItemFailures`, so only the records that failed stay on the queue and the rest are
  deleted; a malformed one goes to the queue's dead-letter queue after maxReceiveCount.

Logs are plain `logging` records, written as JSON by the Lambda runtime when the function's
LoggingConfig says `LogFormat: JSON` (deploy/template.yaml does): no logging library needed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError, SmartmailError
from .events import RecordResult, batch_item_failures, handle_sqs_records
from .state import STATE_ENV
from .state_dynamodb import DynamoState, is_dynamodb_url, open_state

log = logging.getLogger("smartmail.aws_lambda")
log.setLevel(os.environ.get("SMARTMAIL_LOG_LEVEL", "INFO"))

# One state per container (Lambda reuses it across invocations): the table is checked once.
_STATES: dict[str, DynamoState] = {}


class FeedbackFailed(SmartmailError):
    """Some SNS-delivered feedback was not applied; failing the invocation makes Lambda retry."""

    exit_code = 1


def state_from_env() -> DynamoState:
    """The DynamoDB state named by $SMARTMAIL_STATE (`dynamodb://TABLE[?region=R]`)."""
    url = os.environ.get(STATE_ENV, "")
    if not is_dynamodb_url(url):
        raise ConfigError(
            f"${STATE_ENV} must name the DynamoDB state table (dynamodb://TABLE) for a Lambda "
            f"handler; it is {url!r}"
        )
    found = _STATES.get(url)
    if found is None:
        found = _STATES[url] = open_state(url)
    return found


EXPECTED_WORKERS_ENV = "SMARTMAIL_EXPECTED_WORKERS"
ACCOUNT_RATE_ENV = "SMARTMAIL_ACCOUNT_RATE"


def expected_workers_from_env() -> int:
    """How many senders run at once: $SMARTMAIL_EXPECTED_WORKERS, which the template sets to
    the sender's reserved concurrency (1 when unset). A sender's `CampaignConfig` takes it as
    `expected_workers`, so without a rate of its own each takes 1/N of the account's."""
    workers = os.environ.get(EXPECTED_WORKERS_ENV) or "1"
    try:
        count = int(workers)
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigError(f"{EXPECTED_WORKERS_ENV} ({workers!r}) must be a whole number above 0")
    return count


def rate_from_env() -> float | None:
    """This function's share of the account's SES rate: $SMARTMAIL_ACCOUNT_RATE divided by
    $SMARTMAIL_EXPECTED_WORKERS (the reserved concurrency the template sets), so that all the
    senders together never exceed the quota. None when the rate is not set (then the
    account's rate is asked of SES and divided by `expected_workers_from_env()`)."""
    rate = os.environ.get(ACCOUNT_RATE_ENV)
    if not rate:
        return None
    workers = expected_workers_from_env()
    try:
        share = float(rate) / workers
    except ValueError:
        raise ConfigError(
            f"{ACCOUNT_RATE_ENV} ({rate!r}) must be a number and "
            f"{EXPECTED_WORKERS_ENV} ({workers!r}) a whole number above 0"
        ) from None
    if share <= 0:
        raise ConfigError(f"{ACCOUNT_RATE_ENV} ({rate!r}) must be above 0")
    return share


def feedback_handler(event: Mapping[str, Any], context: Any = None) -> dict[str, Any]:
    """SES feedback from SNS or SQS into the suppression list and the ledger's deliveries."""
    records = event.get("Records")
    if not isinstance(records, list) or not records:
        raise ConfigError("feedback_handler: the event has no Records (expected SNS or SQS)")
    state = state_from_env()
    sns = [r for r in records if isinstance(r, Mapping) and r.get("EventSource") == "aws:sns"]
    if sns:
        if len(sns) != len(records):
            raise ConfigError("feedback_handler: a batch mixing SNS and other records")
        as_sqs = [_sns_as_sqs(r) for r in sns]
        results = handle_sqs_records(as_sqs, state.feedback)
        _log(results, "sns")
        failed = [r for r in results if not r.ok]
        if failed:
            raise FeedbackFailed(
                "; ".join(f"message {r.message_id} not applied: {r.error}" for r in failed)
            )
        return {"applied": len(results)}
    results = handle_sqs_records(records, state.feedback)
    _log(results, "sqs")
    return batch_item_failures(results)


def _sns_as_sqs(record: Mapping[str, Any]) -> dict[str, Any]:
    """An SNS record as the SQS record `handle_sqs_records` reads: the envelope is the body."""
    envelope = record.get("Sns")
    if not isinstance(envelope, Mapping):
        return {"messageId": "?", "body": None}
    return {"messageId": str(envelope.get("MessageId", "?")), "body": json.dumps(envelope)}


def _log(results: list[RecordResult], source: str) -> None:
    suppressed = sum(r.applied.suppressed for r in results if r.applied)
    duplicates = sum(1 for r in results if r.applied and not r.applied.recorded)
    for r in results:
        if not r.ok:
            kind = "malformed" if r.malformed else "not applied"
            log.error("feedback %s (%s): %s", kind, r.message_id, r.error)
    log.info(
        "feedback from %s: %d records, %d applied, %d already applied, %d newly suppressed",
        source,
        len(results),
        sum(1 for r in results if r.ok),
        duplicates,
        suppressed,
    )
