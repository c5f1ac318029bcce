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

`send_handler` is the SQS-triggered sender: each record is a job (`smartmail.jobs`), run by
the same `Worker` as `smartmail worker`; it returns `batchItemFailures` naming only the jobs
that must come back (could not be run, stopped before every row had its outcome, or with
rows another live worker holds), so one bad job never re-sends its neighbours, and a poison
job reaches the dead-letter queue after the queue's maxReceiveCount.

`upload_handler` takes the S3 "Object Created" event (EventBridge) for
`incoming/<folder>/<name>.csv` and enqueues it with the settings in
`incoming/<folder>/campaign.json` (docs/scale-out.md, "The upload convention").

Logs are plain `logging` records, written as JSON by the Lambda runtime when the function's
LoggingConfig says `LogFormat: JSON` (deploy/template.yaml does): no logging library needed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

from botocore.exceptions import BotoCoreError, ClientError

from . import aws
from .errors import ConfigError, SmartmailError
from .events import RecordResult, batch_item_failures, handle_sqs_records
from .state import STATE_ENV
from .state_dynamodb import DynamoState, is_dynamodb_url, open_state

if TYPE_CHECKING:
    from .config import CampaignConfig
    from .workqueue import EnqueueResult, Worker

log = logging.getLogger("smartmail.aws_lambda")
log.setLevel(os.environ.get("SMARTMAIL_LOG_LEVEL", "INFO"))

# One state per container (Lambda reuses it across invocations): the table is checked once.
_STATES: dict[str, DynamoState] = {}
_WORKERS: dict[str, Worker] = {}
QUEUE_ENV = "SMARTMAIL_QUEUE_URL"
UPLOAD_BUCKET_ENV = "SMARTMAIL_UPLOAD_BUCKET"
UPLOAD_PREFIX = "incoming/"
UPLOAD_SETTINGS = "campaign.json"
STOP_BEFORE_TIMEOUT_MS = 15_000
"""A job is not started with less time than this left: it would be cut off mid-send."""


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


# --- the SQS sender ------------------------------------------------------------------------


def worker_from_env() -> Worker:
    """One `Worker` per container: campaigns and templates loaded once, reused across jobs."""
    from .campaign import Secrets
    from .workqueue import Worker

    state = state_from_env()
    found = _WORKERS.get(str(state))
    if found is None:
        secrets = Secrets(smtp_password=os.environ.get("SMARTMAIL_SMTP_PASSWORD"))
        found = _WORKERS[str(state)] = Worker(
            state,
            rate=rate_from_env(),
            expected_workers=expected_workers_from_env(),
            secrets=secrets,
            # Without a configuration set SES publishes no bounce or complaint: a campaign
            # enqueued without one is sent through the stack's.
            configuration_set=os.environ.get("SMARTMAIL_CONFIGURATION_SET"),
        )
    return found


def send_handler(event: Mapping[str, Any], context: Any = None) -> dict[str, Any]:
    """Run each SQS record's job; report the ones that must come back as partial failures."""
    records = event.get("Records")
    if not isinstance(records, list):
        raise ConfigError("send_handler: the event has no Records (expected SQS)")
    worker = worker_from_env()
    failures: list[str] = []
    with _stop_before_timeout(worker, context):
        _run_records(worker, records, context, failures)
    return {"batchItemFailures": [{"itemIdentifier": m} for m in failures]}


@contextlib.contextmanager
def _stop_before_timeout(worker: Worker, context: Any) -> Iterator[None]:
    """Stop the job in hand `STOP_BEFORE_TIMEOUT_MS` before the function times out: its rows
    not yet handed to the provider stay unsent (pending) and the job comes back, where a
    function killed mid-job would leave every row it had claimed in doubt."""
    worker.abort.clear()
    left = _time_left_ms(context)
    timer: threading.Timer | None = None
    if left != float("inf"):
        timer = threading.Timer(max(left - STOP_BEFORE_TIMEOUT_MS, 0) / 1000, worker.abort.set)
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()
        worker.abort.clear()


def _run_records(worker: Worker, records: list[Any], context: Any, failures: list[str]) -> None:
    for record in records:
        if not isinstance(record, Mapping):
            continue
        message_id = str(record.get("messageId", "?"))
        if _time_left_ms(context) < STOP_BEFORE_TIMEOUT_MS or worker.abort.is_set():
            log.warning("job %s not started: the function is about to time out", message_id)
            failures.append(message_id)
            continue
        received = (record.get("attributes") or {}).get("ApproximateReceiveCount", "?")
        try:
            outcome = worker.run_job(str(record.get("body", "")))
        except SmartmailError as exc:
            log.error("job %s (receive %s) not run: %s", message_id, received, exc)
            failures.append(message_id)
            continue
        except Exception:
            log.exception("job %s (receive %s): unexpected error", message_id, received)
            failures.append(message_id)
            continue
        if not outcome.done:
            log.warning("job %s left for redelivery: %s", outcome.job_id, outcome.reason)
            failures.append(message_id)
        else:
            log.info(
                "job %s: %d sent, %d failed, %d skipped",
                outcome.job_id,
                outcome.sent,
                outcome.failed,
                outcome.skipped,
            )


def _time_left_ms(context: Any) -> float:
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    return float(remaining()) if callable(remaining) else float("inf")


# --- the S3 upload trigger -----------------------------------------------------------------


def upload_handler(event: Mapping[str, Any], context: Any = None) -> dict[str, Any]:
    """Enqueue a CSV uploaded as incoming/<folder>/<name>.csv, with the settings and template
    found beside it (incoming/<folder>/campaign.json). Anything else is ignored."""
    from .workqueue import enqueue_campaign

    bucket, key = _uploaded_object(event)
    if not key.startswith(UPLOAD_PREFIX) or not key.lower().endswith(".csv"):
        log.info("s3://%s/%s: not a list under %s*.csv; ignored", bucket, key, UPLOAD_PREFIX)
        return {"ignored": key}
    queue_url = os.environ.get(QUEUE_ENV, "")
    if not queue_url:
        raise ConfigError(f"${QUEUE_ENV} must name the send queue for upload_handler")
    folder = key.rsplit("/", 1)[0] + "/"
    s3 = aws.client("s3")
    state = state_from_env()
    with tempfile.TemporaryDirectory(prefix="smartmail-upload-") as scratch:
        config, rows_per_job = upload_config(s3, bucket, folder, key, Path(scratch))
        _refuse_a_campaign_of_another_list(state, config)
        result = enqueue_campaign(
            config,
            queue_url,
            state,
            template_bucket=os.environ.get(UPLOAD_BUCKET_ENV) or bucket,
            rows_per_job=rows_per_job,
            warn=lambda line: log.warning("s3://%s/%s: %s", bucket, key, line),
            s3=s3,
        )
    _log_enqueued(result, bucket, key)
    return {
        "campaign": result.campaign,
        "queued": result.queued_rows,
        "jobs": result.jobs,
        "already_queued": result.already_queued,
        "skipped": result.skipped,
    }


def _refuse_a_campaign_of_another_list(state: Any, config: CampaignConfig) -> None:
    """An upload may continue its own campaign, never take over one another list started:
    that would rewrite the stored settings the queued jobs of that campaign are sent with."""
    if not config.campaign:
        return
    record = state.load(config.campaign)
    if record is not None and record.source and record.source != config.source:
        raise ConfigError(
            f"{config.source}: campaign {config.campaign!r} belongs to {record.source}; "
            "give this list a campaign name of its own"
        )


def upload_config(
    s3: Any, bucket: str, folder: str, key: str, scratch: Path
) -> tuple[CampaignConfig, int]:
    """The campaign's config from `folder`campaign.json, its template files downloaded into
    `scratch`. Template names are relative to the folder and may not leave it."""
    from .campaign import CampaignConfig

    where = f"s3://{bucket}/{folder}{UPLOAD_SETTINGS}"
    try:
        raw = s3.get_object(Bucket=bucket, Key=folder + UPLOAD_SETTINGS)["Body"].read()
        settings = json.loads(raw)
    except (ClientError, BotoCoreError) as exc:
        raise ConfigError(f"{where}: cannot read the campaign settings ({exc})") from None
    except ValueError as exc:
        raise ConfigError(f"{where}: not JSON ({exc})") from None
    if not isinstance(settings, dict) or not settings.get("template"):
        raise ConfigError(f'{where}: a JSON object naming at least "template" is needed')
    if settings.get("attachments_dir"):
        raise ConfigError(
            f"{where}: attachments are not taken from uploads; use `smartmail enqueue`"
        )
    try:
        rows_per_job = int(settings.pop("rows_per_job", 10))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: rows_per_job must be a whole number ({exc})") from None
    for name in ("template", "html_template"):
        if settings.get(name):
            settings[name] = str(_download(s3, bucket, folder, str(settings[name]), scratch))
    settings["source"] = f"s3://{bucket}/{key}"
    # Whoever may upload chooses a list and its message, not where mail goes: the transport
    # is the deployment's, and an upload naming another one is refused.
    deployed = os.environ.get("SMARTMAIL_TRANSPORT") or _ses_here()
    if settings.setdefault("transport", deployed) != deployed:
        raise ConfigError(
            f"{where}: transport is set by the deployment ({deployed}); remove it from the upload"
        )
    # Bounces and complaints reach the feedback function only through the deployment's
    # configuration set: a campaign sent without it (null, "") would never be suppressed,
    # and the sender's role refuses any other set.
    stack_set = os.environ.get("SMARTMAIL_CONFIGURATION_SET")
    if stack_set and settings.setdefault("configuration_set", stack_set) != stack_set:
        raise ConfigError(
            f"{where}: configuration_set is set by the deployment ({stack_set}); "
            "remove it from the upload"
        )
    settings.setdefault("version", 1)
    try:
        # Uploaded JSON is untrusted: a value of the wrong type is this file's fault, said so
        # in one line, never a traceback after the list was half read.
        config = CampaignConfig.from_dict(settings)
        config.check()
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{where}: a setting has the wrong type ({exc})") from None
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return config, rows_per_job


def _download(s3: Any, bucket: str, folder: str, name: str, scratch: Path) -> Path:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or len(rel.parts) != 1:
        raise ConfigError(
            f"s3://{bucket}/{folder}{UPLOAD_SETTINGS}: {name!r} must be a file name in the "
            "same folder"
        )
    target = scratch / rel.name
    try:
        body = s3.get_object(Bucket=bucket, Key=folder + name)["Body"].read()
    except (ClientError, BotoCoreError) as exc:
        raise ConfigError(f"s3://{bucket}/{folder}{name}: cannot read it ({exc})") from None
    target.write_bytes(body)
    return target


def _ses_here() -> str:
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""
    return f"ses://{region}" if region else "ses://"


def _uploaded_object(event: Mapping[str, Any]) -> tuple[str, str]:
    """Bucket and key of an EventBridge "Object Created" event (or an S3 notification)."""
    detail = event.get("detail")
    try:
        if isinstance(detail, Mapping):
            return str(detail["bucket"]["name"]), str(detail["object"]["key"])
        record = event["Records"][0]["s3"]
        return str(record["bucket"]["name"]), unquote_plus(str(record["object"]["key"]))
    except (KeyError, IndexError, TypeError):
        raise ConfigError("upload_handler: not an S3 Object Created event") from None


def _log_enqueued(result: EnqueueResult, bucket: str, key: str) -> None:
    log.info(
        "s3://%s/%s: campaign %s, %d row(s) queued in %d job(s), %d already queued, %d skipped",
        bucket,
        key,
        result.campaign,
        result.queued_rows,
        result.jobs,
        result.already_queued,
        result.skipped,
    )
