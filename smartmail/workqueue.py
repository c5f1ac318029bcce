"""The send queue: `enqueue_campaign` puts a campaign on SQS as jobs; `run_worker` and the
Lambda sender take them off and send them through the same pipeline as `send`.

    state = open_state("dynamodb://smartmail-state")
    result = enqueue_campaign(config, queue_url, state, template_bucket="uploads")
    run_worker(queue_url, state, idle_exit=60)          # on as many machines as needed

Why it is safe to run many workers on one queue, and to enqueue twice:

- **Sending.** SQS delivers a job at least once, maybe to two workers at once. Each row is
  claimed in the DynamoDB ledger (a conditional write) before it is sent, so only one worker
  ever sends it; a re-delivered job finds its rows `sent` and skips them.
- **Queueing.** After each SendMessageBatch call, `enqueue` records the recipients it queued
  (one `Q#<campaign>` item per job, holding their ledger keys). A re-run queues only rows
  neither queued nor in the ledger; a crash between the call and the record queues those rows
  twice at worst, which the claims then make harmless.
- **Deleting.** A worker deletes a job only after every row's outcome is in the ledger. A job
  whose run stopped (provider unreachable, the ledger failing, a stop request) is left on the
  queue and comes back after its visibility timeout; its sent rows are then skipped. So is a
  job with rows another live worker holds (`sending`, lease not run out: a twin delivery),
  since that worker may still give them back as pending; rows in doubt (lease over) count as
  done. A job that cannot be run at all (malformed, template missing or no longer rendering
  its rows) raises: it comes back too, and after the queue's maxReceiveCount it is in the
  dead-letter queue. Rows refused by the provider are `failed` in the ledger, as with
  `send`, and the job is done: `smartmail retry` re-drives them.

The state must be a DynamoDB table (`dynamodb://…`): the SQLite ledger keeps one run per
campaign with a lock, which is the opposite of many workers sharing one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from botocore.exceptions import BotoCoreError, ClientError

from . import aws
from .campaign import (
    EXIT_INCOMPLETE,
    CampaignRun,
    Hooks,
    NothingToSendError,
    Secrets,
    template_hash,
)
from .config import CampaignConfig, RunOptions
from .dynamo import n, s, text
from .dynamo_ledger import HELD
from .errors import EXIT_STOPPED, ConfigError, PreflightError, SmartmailError
from .files import readable
from .jobs import MAX_MESSAGE_BYTES, ROWS_PER_JOB, Bundle, Job, JobError, TemplateRef, pack
from .ledger import CampaignRecord, recipient_key
from .sources import Row

if TYPE_CHECKING:
    from .engine import SendOptions
    from .sources import RecipientSource
    from .state_dynamodb import DynamoState
    from .templates import MessageTemplate
    from .transports.base import Transport

log = logging.getLogger("smartmail.workqueue")

INLINE_TEMPLATE_BYTES = 64 * 1024
"""A bundle up to this size is kept in the campaign's record (DynamoDB items hold 400 KB)."""
BATCH_ENTRIES = 10
SEND_ATTEMPTS = 5
LONG_POLL_SECONDS = 20
# How long a worker keeps a campaign's stored settings before reading them again: a campaign
# enqueued again with new settings (unsubscribe URL, tags, configuration set) reaches running
# workers and warm Lambdas within this, at the cost of one read per campaign per period.
CONFIG_TTL = 60.0
QUEUED_PK = "Q#"


class QueueError(SmartmailError):
    """The queue refused or lost part of a batch after retries; what was queued is recorded."""

    exit_code = 5


def require_dynamodb(state: Any) -> DynamoState:
    """The shared state workers need, or a one-line error saying why SQLite will not do."""
    from .state_dynamodb import DynamoState

    if not isinstance(state, DynamoState):
        raise ConfigError(
            f"--state {state}: queue workers share one ledger; give --state dynamodb://TABLE "
            "(the SQLite ledger allows one run per campaign at a time)"
        )
    return state


# --- enqueue --------------------------------------------------------------------------------


@dataclass
class EnqueueResult:
    """What `enqueue_campaign` did: the summary `smartmail enqueue` prints."""

    campaign: str
    source: str
    template: TemplateRef
    rows: int = 0
    valid: int = 0
    already_queued: int = 0
    queued_rows: int = 0
    jobs: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)
    elapsed_seconds: float = 0.0

    @property
    def skipped(self) -> int:
        return sum(self.skip_reasons.values())


class _Pipeline(CampaignRun):
    """The campaign pipeline's steps (template, source, campaign id, transport) for enqueue,
    without its send pass."""


def enqueue_campaign(
    config: CampaignConfig,
    queue_url: str,
    state: Any,
    *,
    template_bucket: str | None = None,
    rows_per_job: int = ROWS_PER_JOB,
    source: RecipientSource | None = None,
    warn: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    sqs: Any = None,
    s3: Any = None,
) -> EnqueueResult:
    """Pre-flight the whole list as `send` does, store the campaign and its template once,
    then queue the rows not queued or sent before, `rows_per_job` to a job.

    Raises a SmartmailError with nothing queued when pre-flight fails. `progress(queued, total)`
    is called after each batch of jobs.
    """
    from .engine import SendOptions, preflight

    started = time.monotonic()
    dstate = require_dynamodb(state)
    if not 1 <= rows_per_job <= 1000:
        raise ConfigError("--rows-per-job must be between 1 and 1000")
    config.check()
    if config.on_duplicate == "all":
        raise ConfigError("--on-duplicate all cannot be queued: the ledger keeps one per address")
    pipeline = _Pipeline(config, hooks=Hooks(warn=warn, s3_client=s3), source=source)
    with readable(config.template):
        template = pipeline._template()
    if source is None:
        with readable(config.source):
            source = pipeline._source()
    campaign = pipeline._campaign_id(source, template)
    pipeline.campaign = campaign
    transport = pipeline._transport()
    transport_url = str(transport.url)
    allow_utf8 = transport.allow_utf8_local
    transport.close()
    tags = {**config.tags}
    tags.setdefault("campaign", campaign)
    options = SendOptions(
        on_invalid=config.on_invalid,
        on_malformed=config.on_malformed,
        on_duplicate=config.on_duplicate,
        campaign=campaign,
        tags=tags,
    )
    options.check()
    snap = source.snapshot()
    attached: dict[str, Path] = {}  # what the rows attach, as pre-flight resolved it
    try:
        ledger = dstate.ledger(campaign)
        with readable(snap.name):
            checked = preflight(
                snap,
                template,
                options,
                allow_utf8_local=allow_utf8,
                journal=ledger,
                keep_rendered=options.render_cache_chars,
                attachments=attached,
            )
        if not checked.ok:
            exc = PreflightError(checked.fatal, checked.fatal_count)
            exc.args = (str(exc).replace("nothing was sent", "nothing was queued"),)
            raise exc
        for problem in checked.problems[:20]:
            if warn:
                warn(str(problem))
        # A row a worker gave back (pending) may have no job left (deleted by hand, or by a
        # worker older than the rule that keeps a job whose rows another worker holds):
        # queue it again (a second copy is harmless).
        queued_before = queued_keys(dstate, campaign) - given_back_keys(dstate, campaign)
        rows: list[tuple[Row, str]] = []
        result = EnqueueResult(campaign, snap.name, TemplateRef(""), rows=checked.rows)
        for reason in checked.skipped.values():
            result.skip_reasons[reason] = result.skip_reasons.get(reason, 0) + 1
        for row, _ragged in snap.rows():
            if row.number in checked.skipped:
                continue
            # The message as pre-flight checked it: rendered again only past pre-flight's
            # keep budget (for its recipient; the bundle takes the files as pre-flight found
            # them, `attached`).
            rendered = checked.kept.pop(row.number, None)
            if rendered is None:
                try:
                    rendered = template.render(
                        row, snap.to_column, source_name=snap.name, allow_utf8_local=allow_utf8
                    )
                except SmartmailError as exc:
                    raise ConfigError(
                        f"{exc} (it changed since pre-flight checked it); nothing was queued"
                    ) from None
            key = recipient_key(rendered.recipient)
            if key in queued_before:
                result.already_queued += 1
                continue
            rows.append((row, key))
        result.valid = checked.valid
        if checked.valid == 0 and checked.skipped:
            try:
                pipeline._refuse_if_nothing_to_send(checked, options, transport_url)
            except NothingToSendError as exc:
                exc.args = (str(exc).replace("nothing was sent", "nothing was queued"),)
                raise
        bundle = _bundle(config, template, attached)
        ref = _store_bundle(bundle, template_bucket, s3)
        result.template = ref
        settings = dataclasses.replace(
            config.resolved(), campaign=campaign, to_column=snap.to_column
        ).to_dict()
        settings["queue_template"] = ref.to_dict()
        if ref.s3 is None:
            settings["queue_template"]["inline"] = bundle.data
        where = config.source or snap.name
        ledger.begin(
            CampaignRecord(campaign, where, template_hash(template), transport_url, settings)
        )
        columns = list(getattr(snap, "columns", []) or [])
        jobs = pack(campaign, ref, columns, [r for r, _ in rows], rows_per_job=rows_per_job)
        keys = {r.number: k for r, k in rows}
        _send_jobs(dstate, queue_url, jobs, keys, result, sqs, progress)
    finally:
        with contextlib.suppress(Exception):
            snap.close()
    result.elapsed_seconds = time.monotonic() - started
    return result


def queued_keys(state: DynamoState, campaign: str) -> set[str]:
    """The ledger keys of every recipient queued for `campaign` so far."""
    state.table.ensure()
    found: set[str] = set()
    for item in state.table.query(
        KeyConditionExpression="pk = :p",
        ExpressionAttributeValues={":p": s(QUEUED_PK + campaign)},
        ProjectionExpression="recipients",
    ):
        found.update(item.get("recipients", {}).get("SS", []))
    return found


def given_back_keys(state: DynamoState, campaign: str) -> set[str]:
    """The ledger keys of `campaign`'s rows a worker claimed and then gave back unsent."""
    return {
        text(item, "sk")
        for item in state.table.query(
            KeyConditionExpression="pk = :p",
            FilterExpression="st = :pending",
            ExpressionAttributeValues={":p": s("D#" + campaign), ":pending": s("pending")},
            ProjectionExpression="sk",
        )
    }


def _bundle(
    config: CampaignConfig, template: MessageTemplate, attached: Mapping[str, Path]
) -> Bundle:
    """What a worker needs: the template and its HTML part as pre-flight loaded and checked
    them (not as the files are now), and, when the template can name attachments, the files
    of the attachments folder that the rows attach (`attached`: the paths as the rows give
    them, and the files pre-flight resolved them to): never the rest of a folder that may
    hold the list itself or a secret."""
    t = Path(config.template)
    html: Path | None = None
    if template.html_text is not None:
        html = Path(template.html_name) if template.html_name else t.with_suffix(".html")
    attachments: str | None = config.attachments_dir
    if attachments is None and any(h.lower() == "attachment" for h in template.header_names):
        attachments = str(t.parent)
    return Bundle.collect(
        t, html, attachments, only=attached, texts=(template.text, template.html_text)
    )


def _store_bundle(bundle: Bundle, bucket: str | None, s3: Any) -> TemplateRef:
    """S3 under templates/SHA256.json when a bucket is given, else inline if small enough."""
    sha = bundle.sha256
    body = bundle.text.encode()
    if bucket:
        key = f"templates/{sha}.json"
        client = s3 or aws.client("s3")
        try:
            client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json")
        except (ClientError, BotoCoreError) as exc:
            raise ConfigError(
                f"s3://{bucket}/{key}: cannot store the template ({exc}); nothing was queued"
            ) from None
        return TemplateRef(sha, f"s3://{bucket}/{key}")
    if len(body) > INLINE_TEMPLATE_BYTES:
        raise ConfigError(
            f"the template and its attachments are {len(body) // 1024} KB, too large to keep "
            f"in the state table (up to {INLINE_TEMPLATE_BYTES // 1024} KB); give "
            "--template-bucket BUCKET; nothing was queued"
        )
    return TemplateRef(sha)


def _send_jobs(
    state: DynamoState,
    queue_url: str,
    jobs: list[Job],
    keys: dict[int, str],
    result: EnqueueResult,
    sqs: Any,
    progress: Callable[[int, int], None] | None,
) -> None:
    """SendMessageBatch, 10 entries and 256 KB a call; failed entries retried with backoff;
    each queued job recorded as queued right after its call."""
    client = sqs or aws.client("sqs")
    total = sum(len(j.rows) for j in jobs)
    for batch in _batches(jobs):
        pending = {str(i): job for i, job in enumerate(batch)}
        last_error = ""
        refused = False
        for attempt in range(SEND_ATTEMPTS):
            if attempt:
                time.sleep(min(0.2 * 2**attempt, 5.0))
            entries = [{"Id": i, "MessageBody": job.to_json()} for i, job in pending.items()]
            try:
                answer = client.send_message_batch(QueueUrl=queue_url, Entries=entries)
            except (ClientError, BotoCoreError) as exc:
                last_error = str(exc)
                if isinstance(exc, ClientError) and not _retryable(exc):
                    break
                continue
            for ok in answer.get("Successful", []):
                job = pending.pop(ok["Id"])
                _mark_queued(state, job, keys)
                result.jobs += 1
                result.queued_rows += len(job.rows)
            for bad in answer.get("Failed", []):
                last_error = f"{bad.get('Code')}: {bad.get('Message', '')}"
                # The request's own fault (too large, refused characters): sending it again
                # cannot help.
                refused = refused or bool(bad.get("SenderFault"))
            if not pending or refused:
                break
        if pending:
            raise QueueError(
                f"{queue_url}: {len(pending)} job(s) could not be queued ({last_error}); "
                f"{result.queued_rows} row(s) were queued and recorded; run enqueue again to "
                "queue the rest"
            )
        if progress is not None:
            progress(result.queued_rows, total)


def _retryable(exc: ClientError) -> bool:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return status >= 500 or "Throttl" in code or "RequestThrottled" in code


def _batches(jobs: list[Job]) -> Iterator[list[Job]]:
    """Up to 10 jobs whose bodies together stay within SQS's 256 KB a call."""
    batch: list[Job] = []
    size = 0
    for job in jobs:
        length = len(job.to_json().encode())
        if batch and (len(batch) == BATCH_ENTRIES or size + length > MAX_MESSAGE_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(job)
        size += length
    if batch:
        yield batch


def _mark_queued(state: DynamoState, job: Job, keys: dict[int, str]) -> None:
    recipients = sorted({keys[r.number] for r in job.rows})
    digest = hashlib.sha256("\n".join(recipients).encode()).hexdigest()[:16]
    now = time.time()
    state.table.call(
        "put_item",
        Item={
            "pk": s(QUEUED_PK + job.campaign),
            "sk": s(f"{job.id}#{digest}"),
            "recipients": {"SS": recipients},
            "queued_at": n(now),
            "expires_at": state.table.expires(now),
        },
    )


# --- the worker -----------------------------------------------------------------------------


@dataclass
class JobOutcome:
    """What running one job did. `done`: every row has its outcome; delete the job."""

    job_id: str
    campaign: str
    rows: int
    sent: int = 0
    failed: int = 0
    skipped: int = 0
    done: bool = True
    reason: str = ""
    code: int = 0
    """For a job left because its run stopped, the exit code `send` gives such a run: 4 (the
    provider or the quota stopped it), 5 (the ledger or an internal problem); else 0."""


class _LedgerOfJob:
    """The campaign's ledger for a job run: the record stays as `enqueue` stored it (a job run
    must not overwrite the campaign's template reference with its temporary paths)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def begin(self, record: CampaignRecord | None = None) -> None:
        self._inner.begin(None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _KeptTransport:
    """A transport a worker keeps across jobs: each job's run "closes" it, which does nothing;
    the worker closes the real one when it stops. Making an SES client (parsing botocore's
    service model) per job cost a worker ~10 ms a message, most of its CPU."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        return None

    def really_close(self) -> None:
        self._transport.close()


class _JobRun(CampaignRun):
    """The campaign pipeline over a job's rows, with the shared DynamoDB ledger."""

    def __init__(
        self, state: DynamoState, transports: dict[str, _KeptTransport], *args: Any, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._state = state
        self._transports = transports

    def _transport(self) -> Transport:
        key = json.dumps(self.config.to_dict(), sort_keys=True, default=str)
        kept = self._transports.get(key)
        if kept is None:
            kept = self._transports[key] = _KeptTransport(super()._transport())
        return cast("Transport", kept)

    def _plan(self, checked: Any, send_options: SendOptions, transport: Transport) -> Any:
        """The pipeline's plan, but a job the 24-hour quota would refuse is planned again on
        a fresh reading: the kept transport read the quota once, maybe hours ago, and a
        stale "used up" must not refuse every job this worker takes from then on. Only a
        refusal costs a second GetSendQuota (SES allows about one a second)."""
        from .quota import QuotaError, QuotaExhaustedError

        try:
            return super()._plan(checked, send_options, transport)
        except (QuotaError, QuotaExhaustedError):
            forget = getattr(transport, "forget_quota", None)
            if forget is None:
                raise
            forget()
            return super()._plan(checked, send_options, transport)

    def _open_ledger(self, send_options: SendOptions) -> Any:
        assert self.campaign is not None
        ledger: Any = _LedgerOfJob(self._state.ledger(self.campaign))
        self.ledger = ledger
        ledger.acquire()
        return ledger


class Worker:
    """Runs jobs: loads each campaign once (config and template bundle), then sends a job's
    rows with the campaign pipeline. Shared by `run_worker` and the Lambda sender."""

    def __init__(
        self,
        state: Any,
        *,
        rate: float | None = None,
        expected_workers: int | None = None,
        secrets: Secrets | None = None,
        s3: Any = None,
        workdir: str | Path | None = None,
        abort: threading.Event | None = None,
        configuration_set: str | None = None,
    ) -> None:
        self.state = require_dynamodb(state)
        self.rate = rate
        # The SES configuration set for campaigns that name none (the Lambda sender: the
        # stack's, whose event destination carries bounces and complaints to be suppressed).
        self.configuration_set = configuration_set or None
        self.expected_workers = expected_workers
        self.secrets = secrets or Secrets()
        self._s3 = s3
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="smartmail-worker-"))
        self.abort = abort or threading.Event()
        self._configs: dict[tuple[str, str], tuple[float, CampaignConfig]] = {}
        self._transports: dict[str, _KeptTransport] = {}

    def close(self) -> None:
        transports, self._transports = list(self._transports.values()), {}
        for kept in transports:
            with contextlib.suppress(Exception):
                kept.really_close()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def run_job(self, body: str) -> JobOutcome:
        """Send one job's rows. Raises SmartmailError when the job cannot be run at all."""
        job = Job.from_json(body)
        config = self.campaign_config(job)
        from .campaigns import LedgerSource

        source = LedgerSource(config.source or job.campaign, job.rows, config.to_column)
        scratch = self.workdir / f"run-{uuid.uuid4().hex}"
        scratch.mkdir()
        options = RunOptions(failed_csv=str(scratch / "failed.csv"))
        outcome = JobOutcome(job.id, job.campaign, len(job.rows))
        try:
            run = _JobRun(
                self.state,
                self._transports,
                config,
                options,
                Hooks(stop=self.abort, warn=lambda line: log.warning("%s: %s", job.id, line)),
                secrets=self.secrets,
                source=source,
            )
            try:
                result = run.run()
            except NothingToSendError as exc:
                outcome.skipped = exc.summary.skipped
                outcome.reason = str(exc)
                return outcome
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        summary = result.summary
        outcome.sent, outcome.failed, outcome.skipped = (
            summary.sent,
            summary.failed,
            summary.skipped,
        )
        if result.error or summary.stopped or summary.interrupted or summary.unsent:
            outcome.done = False
            outcome.reason = result.error or summary.stopped or "stopped before every row was sent"
            if result.error:
                outcome.code = EXIT_INCOMPLETE
            elif summary.stopped:
                outcome.code = EXIT_STOPPED
        elif held := summary.skip_reasons.get(HELD, 0):
            # A twin delivery: another worker is sending these rows and may still give them
            # back (pending) if it stops. Deleting the job now would leave them to no job.
            outcome.done = False
            outcome.reason = f"{held} row{'s' if held != 1 else ''} held by another worker"
        return outcome

    def campaign_config(self, job: Job) -> CampaignConfig:
        """The campaign's stored config, its paths pointing at the unpacked template bundle;
        read again once it is `CONFIG_TTL` old, so settings changed by a new `enqueue` apply."""
        cache_key = (job.campaign, job.template.sha256)
        found = self._configs.get(cache_key)
        if found is not None and time.monotonic() - found[0] < CONFIG_TTL:
            return found[1]
        record = self.state.load(job.campaign)
        if record is None:
            raise JobError(f"a job of campaign {job.campaign!r}, which the state table lacks")
        settings = dict(record.settings)
        stored = settings.pop("queue_template", None) or {}
        bundle = self._bundle(job, stored)
        paths = bundle.unpack(self.workdir / "templates" / bundle.sha256)
        config = CampaignConfig.from_dict(settings, campaign=job.campaign)
        config = dataclasses.replace(
            config,
            template=str(paths["template"]),
            html_template=paths["html_template"],
            attachments_dir=paths["attachments_dir"],
            # Enqueue validated every row: one that fails now is a poison job, not a skip.
            on_invalid="abort",
            on_malformed="abort",
            on_duplicate="once",
            rate=self.rate if self.rate is not None else config.rate,
            expected_workers=self.expected_workers or config.expected_workers,
            configuration_set=config.configuration_set or self.configuration_set,
        )
        self._configs[cache_key] = (time.monotonic(), config)
        return config

    def _bundle(self, job: Job, stored: dict[str, Any]) -> Bundle:
        return load_bundle(job.campaign, job.template, stored, self._s3)


def load_bundle(campaign: str, ref: TemplateRef, stored: dict[str, Any], s3: Any = None) -> Bundle:
    """The template bundle `ref` names: from S3, or inline in the campaign's record
    (`stored`, its `queue_template`), checked against its hash."""
    if ref.s3:
        parts = urlsplit(ref.s3)
        client = s3 or aws.client("s3")
        try:
            got = client.get_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"))
            text = got["Body"].read().decode("utf-8")
        except (ClientError, BotoCoreError) as exc:
            raise ConfigError(f"{ref.s3}: cannot read the template bundle ({exc})") from None
        return Bundle.from_text(text, ref.sha256)
    if stored.get("sha256") != ref.sha256 or "inline" not in stored:
        raise JobError(
            f"campaign {campaign}: the template was changed after this job was queued "
            "(give enqueue --template-bucket to keep every version)"
        )
    return Bundle.from_text(Bundle(stored["inline"]).text, ref.sha256)


def stored_template(
    config: CampaignConfig, settings: dict[str, Any], folder: Path, s3: Any = None
) -> CampaignConfig | None:
    """For `retry` of a queued campaign whose template file is not where `enqueue` read it
    (the upload function's temporary folder, another machine): `config` with its template,
    HTML part and attachments unpacked under `folder` from the bundle the workers send
    from. None when the campaign was not queued, or its record does not say where the
    bundle is (queued by an older smartmail, in S3)."""
    stored = settings.get("queue_template")
    if not isinstance(stored, dict) or not stored.get("sha256"):
        return None
    if "inline" not in stored and not stored.get("s3"):
        return None
    ref = TemplateRef(str(stored["sha256"]), stored.get("s3") or None)
    bundle = load_bundle(config.campaign or "", ref, stored, s3)
    paths = bundle.unpack(folder)
    return dataclasses.replace(
        config,
        template=str(paths["template"]),
        html_template=paths["html_template"],
        attachments_dir=paths["attachments_dir"],
    )


@dataclass
class WorkerSummary:
    """What `run_worker` did, for its final line."""

    jobs: int = 0
    done: int = 0
    left: int = 0
    failed_jobs: int = 0
    sent: int = 0
    failed: int = 0
    skipped: int = 0
    stopped: str | None = None
    code: int = 0
    """The worst code of the jobs that stopped (5 over 4; 4 also for a job the SES quota or a
    paused account refused), for the worker's exit status: a supervisor learns that the
    provider or the state is failing, not only the dead-letter queue's alarm, later."""


class _Heartbeat:
    """Keeps a job invisible to other workers while this one works on it."""

    def __init__(self, sqs: Any, queue_url: str, receipt: str, visibility: int) -> None:
        self._sqs, self._url, self._receipt, self._vis = sqs, queue_url, receipt, visibility
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="smartmail-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(5)

    def _run(self) -> None:
        interval = max(self._vis / 3, 0.5)
        while not self._done.wait(interval):
            try:
                self._sqs.change_message_visibility(
                    QueueUrl=self._url, ReceiptHandle=self._receipt, VisibilityTimeout=self._vis
                )
            except (ClientError, BotoCoreError) as exc:
                log.warning("could not extend the job's visibility: %s", exc)


def run_worker(
    queue_url: str,
    state: Any,
    *,
    max_jobs: int | None = None,
    idle_exit: float | None = None,
    visibility: int | None = None,
    rate: float | None = None,
    secrets: Secrets | None = None,
    stop: threading.Event | None = None,
    abort: threading.Event | None = None,
    on_job: Callable[[JobOutcome | None, str], None] | None = None,
    wait_seconds: int = LONG_POLL_SECONDS,
    sqs: Any = None,
    s3: Any = None,
) -> WorkerSummary:
    """Take jobs off the queue until `max_jobs` were taken, the queue was empty for
    `idle_exit` seconds, or `stop` is set (the job in hand is finished first).

    `abort` stops the job in hand too: rows in flight finish, the rest stay unsent and the
    job is left for another worker. `on_job(outcome, line)` after each job (outcome None
    when the job could not be run); given it, a job that could not be run is reported there
    only, not logged as an error too.
    """
    client = sqs or aws.client("sqs")
    stop = stop or threading.Event()
    if visibility is None:
        try:
            attrs = client.get_queue_attributes(
                QueueUrl=queue_url, AttributeNames=["VisibilityTimeout"]
            )
        except (ClientError, BotoCoreError) as exc:
            raise ConfigError(f"{queue_url}: cannot read the queue ({exc})") from None
        visibility = int(attrs["Attributes"]["VisibilityTimeout"])
    worker = Worker(state, rate=rate, secrets=secrets, s3=s3, abort=abort)
    summary = WorkerSummary()
    idle_since = time.monotonic()
    failures = 0
    try:
        while not stop.is_set() and (max_jobs is None or summary.jobs < max_jobs):
            wait = wait_seconds
            if idle_exit is not None:
                left = idle_exit - (time.monotonic() - idle_since)
                if left <= 0:
                    summary.stopped = f"idle for {idle_exit:g} s"
                    break
                wait = max(0, min(wait, int(left + 0.999)))
            try:
                got = client.receive_message(
                    QueueUrl=queue_url,
                    MaxNumberOfMessages=1,
                    WaitTimeSeconds=wait,
                    VisibilityTimeout=visibility,
                    AttributeNames=["ApproximateReceiveCount"],
                )
            except (ClientError, BotoCoreError) as exc:
                # The queue gone or forbidden is for a person to fix; anything else (the
                # network, throttling past botocore's own retries) is waited out.
                if isinstance(exc, ClientError) and not _retryable(exc):
                    raise ConfigError(f"{queue_url}: cannot receive jobs ({exc})") from None
                failures += 1
                log.warning("receiving from the queue failed (%s); trying again", exc)
                stop.wait(min(2.0**failures, 30.0))
                continue
            failures = 0
            messages = got.get("Messages", [])
            if not messages:
                if wait == 0:
                    stop.wait(0.1)  # no long poll to wait in: do not spin
                continue
            message = messages[0]
            if stop.is_set():
                # Stopping: give the job straight back for another worker.
                client.change_message_visibility(
                    QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
                )
                break
            summary.jobs += 1
            _one(client, queue_url, worker, message, visibility, summary, on_job)
            idle_since = time.monotonic()
    finally:
        worker.close()
    if stop.is_set() and summary.stopped is None:
        summary.stopped = "stop requested"
    return summary


def _one(
    client: Any,
    queue_url: str,
    worker: Worker,
    message: dict[str, Any],
    visibility: int,
    summary: WorkerSummary,
    on_job: Callable[[JobOutcome | None, str], None] | None,
) -> None:
    receipt = message["ReceiptHandle"]
    received = message.get("Attributes", {}).get("ApproximateReceiveCount", "?")
    try:
        with _Heartbeat(client, queue_url, receipt, visibility):
            outcome = worker.run_job(message.get("Body", ""))
    except Exception as exc:
        # Left on the queue either way: it comes back, and after maxReceiveCount it is in
        # the dead-letter queue. A bug in one job must not end the worker.
        summary.failed_jobs += 1
        from .quota import QuotaError

        if isinstance(exc, QuotaError) or getattr(exc, "exit_code", None) == EXIT_STOPPED:
            # The 24-hour quota used up (or too little of it left for the job), sending paused.
            summary.code = max(summary.code, EXIT_STOPPED)
        line = f"job {message.get('MessageId')} (receive {received}) not run: {exc}"
        if on_job:
            # The caller reports the line (the CLI prints it): an error record too would put
            # every failure on stderr twice. Kept for --debug, with a bug's traceback.
            log.debug("%s", line, exc_info=not isinstance(exc, SmartmailError))
        elif isinstance(exc, SmartmailError):
            log.error("%s", line)
        else:
            log.exception("%s", line)
        if on_job:
            on_job(None, line)
        return
    summary.sent += outcome.sent
    summary.failed += outcome.failed
    summary.skipped += outcome.skipped
    if outcome.done:
        line = (
            f"job {outcome.job_id}: {outcome.sent} sent, {outcome.failed} failed, "
            f"{outcome.skipped} skipped"
        )
        try:
            client.delete_message(QueueUrl=queue_url, ReceiptHandle=receipt)
        except (ClientError, BotoCoreError) as exc:
            # Harmless: the job comes back and finds every row in the ledger.
            line += f" (not deleted: {exc}; it will come back and be skipped)"
        summary.done += 1
    else:
        summary.left += 1
        summary.code = max(summary.code, outcome.code)
        line = f"job {outcome.job_id} left for redelivery: {outcome.reason}"
    log.info("%s", line)
    if on_job:
        on_job(outcome, line)
