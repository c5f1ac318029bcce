"""The send queue: `enqueue` puts a campaign on SQS, workers (`smartmail worker` processes and
the Lambda sender) send it through SES with the shared DynamoDB ledger. Offline: moto for
SQS, S3, SES, SNS and DynamoDB; Lambda events shaped as Lambda delivers them.
"""

from __future__ import annotations

import dataclasses
import email
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from email import policy
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from smartmail import aws_lambda
from smartmail.config import CampaignConfig
from smartmail.errors import ConfigError, PreflightError, SmartmailError
from smartmail.jobs import MAX_MESSAGE_BYTES, Bundle, Job, JobError, TemplateRef, pack
from smartmail.report import Status
from smartmail.sources import Row
from smartmail.state_dynamodb import open_state
from smartmail.state_store import SqliteState
from smartmail.workqueue import enqueue_campaign, queued_keys, run_worker

from .aws_helpers import REGION, ses_backend, verify_sender
from .conftest import TEMPLATE, free_port, make_csv, write
from .dynamo_helpers import atomic_moto, serialise_moto_item_writes
from .test_aws_lambda import sns_event
from .test_events import bounce

__all__ = ["atomic_moto"]
URL = f"dynamodb://queue-state?region={REGION}"


@pytest.fixture
def aws(aws_env: None, atomic_moto: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("SMARTMAIL_STATE", URL)
    aws_lambda._STATES.clear()
    aws_lambda._WORKERS.clear()
    with mock_aws():
        verify_sender()
        yield
    for worker in aws_lambda._WORKERS.values():
        worker.close()
    aws_lambda._WORKERS.clear()
    aws_lambda._STATES.clear()


def make_queue(name: str = "send", *, visibility: int = 30, dlq: bool = False) -> str:
    sqs: Any = boto3.client("sqs", region_name=REGION)
    attributes: dict[str, Any] = {"VisibilityTimeout": str(visibility)}
    if dlq:
        dead = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=dead, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        attributes["RedrivePolicy"] = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": 3})
    return str(sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"])


def depth(url: str) -> tuple[int, int]:
    attrs = boto3.client("sqs", region_name=REGION).get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(
        attrs["ApproximateNumberOfMessagesNotVisible"]
    )


def config(tmp_path: Path, csv: Path, **kw: Any) -> CampaignConfig:
    template = tmp_path / "msg.txt"
    if not template.exists():
        write(template, TEMPLATE)
    return CampaignConfig(
        template=str(template),
        source=str(csv),
        transport=f"ses://{REGION}",
        rate=1000,
        retry_wait=0,
        **kw,
    )


def sent_per_recipient() -> Counter[str]:
    return Counter(m.destinations[0] for m in ses_backend().sent_messages)


def receive_all(url: str) -> list[dict[str, Any]]:
    """Every message on the queue, made visible again at once (VisibilityTimeout 0)."""
    sqs: Any = boto3.client("sqs", region_name=REGION)
    found: dict[str, dict[str, Any]] = {}
    for _ in range(20):
        got = sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0, AttributeNames=["All"]
        ).get("Messages", [])
        new = [m for m in got if m["MessageId"] not in found]
        if not new and got:
            break
        if not got:
            break
        found.update({m["MessageId"]: m for m in new})
    return list(found.values())


def sqs_event(messages: list[dict[str, Any]], url: str) -> dict[str, Any]:
    """The event an SQS event source mapping hands the sender function."""
    arn = f"arn:aws:sqs:{REGION}:123456789012:{url.rsplit('/', 1)[-1]}"
    return {
        "Records": [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": m.get("Attributes", {}),
                "messageAttributes": {},
                "md5OfBody": m["MD5OfBody"],
                "eventSource": "aws:sqs",
                "eventSourceARN": arn,
                "awsRegion": REGION,
            }
            for m in messages
        ]
    }


class LambdaContext:
    def __init__(self, millis: int = 120_000) -> None:
        self.millis = millis

    def get_remaining_time_in_millis(self) -> int:
        return self.millis


# --- the job format ------------------------------------------------------------------------


def test_jobs_hold_a_few_rows_each_and_never_exceed_what_sqs_takes() -> None:
    ref = TemplateRef("ab" * 32)
    rows = [Row(i + 2, {"email": f"u{i}@example.org", "note": "x" * 30_000}) for i in range(25)]
    jobs = pack("c", ref, ["email", "note"], rows, rows_per_job=10)
    assert [r.number for j in jobs for r in j.rows] == [r.number for r in rows]  # all, in order
    assert all(len(j.to_json().encode()) <= MAX_MESSAGE_BYTES for j in jobs)
    assert max(len(j.rows) for j in jobs) < 10  # 10 such rows would be 300 KB: split
    again = Job.from_json(jobs[0].to_json())
    assert again == jobs[0]
    huge = [Row(7, {"email": "u@example.org", "note": "x" * 300_000})]
    with pytest.raises(ConfigError, match="row 7: too large for one queue message"):
        pack("c", ref, ["email", "note"], huge)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("not json", "not JSON"),
        ('{"v": 2, "campaign": "c"}', "version 2"),
        ('{"v": 1, "campaign": "c"}', "malformed"),
        (
            '{"v": 1, "campaign": "c", "template": {"sha256": "x"}, "columns": [], "rows": []}',
            "no rows",
        ),
    ],
)
def test_a_message_that_is_not_a_job_is_refused_in_one_line(body: str, problem: str) -> None:
    with pytest.raises(JobError, match=problem):
        Job.from_json(body)


# --- enqueue and worker, in process ----------------------------------------------------------


def test_enqueue_then_worker_sends_every_row_once_and_empties_the_queue(
    aws: None, tmp_path: Path
) -> None:
    url = make_queue()
    state = open_state(URL)
    cfg = config(tmp_path, make_csv(tmp_path / "r.csv", 23), campaign="spring")
    seen: list[tuple[int, int]] = []
    first = enqueue_campaign(cfg, url, state, progress=lambda d, t: seen.append((d, t)))
    assert (first.rows, first.queued_rows, first.jobs) == (23, 23, 3)
    assert seen[-1] == (23, 23)
    assert depth(url) == (3, 0)
    # Idempotent: the same campaign again queues nothing new.
    again = enqueue_campaign(cfg, url, state)
    assert (again.queued_rows, again.already_queued, again.jobs) == (0, 23, 0)
    assert depth(url) == (3, 0)

    lines: list[str] = []
    summary = run_worker(
        url, state, idle_exit=0.5, wait_seconds=0, on_job=lambda _, line: lines.append(line)
    )
    assert (summary.jobs, summary.done, summary.sent) == (3, 3, 23)
    assert sent_per_recipient() == Counter(f"user{i}@example.org" for i in range(23))
    assert depth(url) == (0, 0)
    [status] = state.statuses("spring")
    assert (status.sent, status.pending, status.in_doubt) == (23, 0, 0)
    assert lines[0] == "job spring:2-11: 10 sent, 0 failed, 0 skipped"
    # The campaign record still holds the template reference (a job run did not replace it).
    record = state.load("spring")
    assert (
        record is not None and record.settings["queue_template"]["sha256"] == first.template.sha256
    )


def test_rows_added_to_the_list_later_are_the_only_ones_queued_next_time(
    aws: None, tmp_path: Path
) -> None:
    url = make_queue()
    state = open_state(URL)
    enqueue_campaign(config(tmp_path, make_csv(tmp_path / "r.csv", 5), campaign="c"), url, state)
    run_worker(url, state, idle_exit=0.2, wait_seconds=0)
    result = enqueue_campaign(
        config(tmp_path, make_csv(tmp_path / "r.csv", 8), campaign="c"), url, state
    )
    assert (result.queued_rows, result.skip_reasons) == (3, {"already sent": 5})
    assert len(queued_keys(state, "c")) == 8


def held_by_a(state: Any, campaign: str, number: int = 2, *, clock: Any = None) -> Any:
    """Worker A, holding a twin of the job, claims row `number` (user{number - 2}) in the
    ledger: a second DynamoDB ledger of the campaign, as another machine's would be."""
    from smartmail.dynamo_ledger import DynamoLedger
    from smartmail.message import OutgoingMessage

    address = f"user{number - 2}@example.org"
    a = DynamoLedger(state.table, campaign, **({"clock": clock} if clock else {}))
    a.sending(
        OutgoingMessage(
            sender="news@acme.example",
            recipients=[address],
            data=b"Subject: hi\r\n\r\nhello\r\n",
            message_id=f"<{number}.{address}>",
            recipient=address,
            row=Row(number, {"email": address, "name": "A"}),
        )
    )
    return a


def test_a_claim_is_renewed_after_a_long_wait_only_while_it_is_still_ours(aws: None) -> None:
    """`keep_claim` after a wait past half the lease renews the lease; once the lease ran
    out and `retry --in-doubt` took the row over, it raises `ClaimLost` ("already being
    sent"), so the first worker does not send it too."""
    from smartmail.dynamo_ledger import HELD, ClaimLost, DynamoLedger
    from smartmail.message import OutgoingMessage

    state = open_state(URL)
    now = [1_000_000.0]
    a = held_by_a(state, "renew", clock=lambda: now[0])
    lease = a.lease

    def lease_until() -> float:
        item = state.table.call(
            "get_item",
            Key={"pk": {"S": "D#renew"}, "sk": {"S": "user0@example.org"}},
            ConsistentRead=True,
        )["Item"]
        return float(item["lease_until"]["N"])

    key = lease_until()
    now[0] += lease * 0.4
    a.keep_claim()  # under half the lease: nothing written
    assert lease_until() == key
    now[0] += lease * 0.2
    a.keep_claim()
    assert lease_until() == now[0] + lease
    now[0] += lease * 1.5  # a's wait outlasted the renewed lease: in doubt
    b = DynamoLedger(state.table, "renew", resend="in-doubt", clock=lambda: now[0])
    address = "user0@example.org"
    b.sending(
        OutgoingMessage(
            sender="news@acme.example",
            recipients=[address],
            data=b"Subject: hi\r\n\r\nhello\r\n",
            message_id=f"<b.{address}>",
            recipient=address,
            row=Row(2, {"email": address, "name": "A"}),
        )
    )
    with pytest.raises(ClaimLost) as lost:
        a.keep_claim()
    assert lost.value.skip_reason == HELD
    assert lease_until() == now[0] + lease  # b's lease, untouched


def test_a_renewal_the_state_refuses_leaves_a_running_claim_to_be_sent(
    aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renewal write that fails (DynamoDB throttling past botocore's retries) while the
    claim's lease still runs: the row is provably still this worker's, so it is sent, not
    counted failed ("internal error: LedgerError") and left for a manual `retry`. Past the
    lease nothing can be told, and the renewal error stands."""
    from smartmail.dynamo import StateError
    from smartmail.ledger import LedgerError

    state = open_state(URL)
    now = [1_000_000.0]
    a = held_by_a(state, "renew", clock=lambda: now[0])
    real = state.table.call
    refused: list[str] = []

    def throttled(operation: str, **request: Any) -> Any:
        if "SET lease_until" in str(request.get("UpdateExpression", "")):
            refused.append(operation)
            raise StateError("DynamoDB UpdateItem: ThrottlingException Rate exceeded")
        return real(operation, **request)

    monkeypatch.setattr(state.table, "call", throttled)
    now[0] += a.lease * 0.6
    a.keep_claim()
    assert refused == ["update_item"]
    monkeypatch.setattr(state.table, "call", real)
    a.keep_claim()  # tried again at the next wait, and written
    monkeypatch.setattr(state.table, "call", throttled)
    now[0] += a.lease * 1.1
    with pytest.raises(LedgerError):
        a.keep_claim()


def test_a_retry_of_a_queued_campaign_whose_template_file_is_gone_sends_the_queued_one(
    aws: None, tmp_path: Path
) -> None:
    """`retry` of a queued campaign on a machine without the template (the upload function's
    temporary folder): it sends from the bundle the workers send from, unpacked into a
    private folder that is removed when the run ends."""
    import tempfile

    from smartmail.campaign import CampaignRun, load_config
    from smartmail.config import RunOptions
    from smartmail.dynamo_ledger import DynamoLedger
    from smartmail.report import Outcome

    url = make_queue()
    state = open_state(URL)
    enqueue_campaign(config(tmp_path, make_csv(tmp_path / "r.csv", 2), campaign="gone"), url, state)
    row = Row(2, {"email": "user0@example.org", "name": "User 0", "code": "C00000"})
    DynamoLedger(state.table, "gone").record(
        Outcome(row=row, recipient="user0@example.org", status="failed", reason="refused")
    )
    (tmp_path / "msg.txt").unlink()
    scratch = set(Path(tempfile.gettempdir()).glob("smartmail-retry-*"))
    options = RunOptions(state_path=URL, resend="failed", failed_csv=str(tmp_path / "f.csv"))
    result = CampaignRun(load_config(URL, "gone"), options).run()
    assert (result.error, result.summary.sent) == (None, 1)
    [sent] = ses_backend().sent_messages
    assert "your code is C00000." in sent.raw_data
    assert set(Path(tempfile.gettempdir()).glob("smartmail-retry-*")) == scratch


def gives_back(a: Any, number: int = 2, status: Status = "unsent") -> None:
    """Worker A stops (second SIGTERM, the Lambda's timeout, abort) before sending the row
    (`unsent`: back to pending), or sends it (`sent`)."""
    from smartmail.report import Outcome

    address = f"user{number - 2}@example.org"
    row = Row(number, {"email": address, "name": "A"})
    a.record(Outcome(row=row, recipient=address, status=status, reason="stopped", message_id="m"))


@pytest.mark.parametrize("runner", ["worker", "lambda"])
def test_a_twin_delivery_leaves_the_job_while_another_worker_holds_a_row(
    aws: None, tmp_path: Path, runner: str
) -> None:
    """SQS hands one job to two workers at once. B skips the row A holds claimed ("already
    being sent"); before, B counted the job done and deleted it, so when A then stopped and
    gave the row back (pending), no job was left for it. Now B leaves the job (the Lambda
    reports it in batchItemFailures); the redelivery sends the row A gave back."""
    url = make_queue(visibility=1)
    state = open_state(URL)
    enqueue_campaign(config(tmp_path, make_csv(tmp_path / "r.csv", 3), campaign="twin"), url, state)
    a = held_by_a(state, "twin")
    lines: list[str] = []
    if runner == "worker":
        first = run_worker(
            url, state, max_jobs=1, wait_seconds=0, on_job=lambda _, line: lines.append(line)
        )
        assert (first.done, first.left, first.sent, first.skipped) == (0, 1, 2, 1)
        assert lines == ["job twin:2-4 left for redelivery: 1 row held by another worker"]
        assert sum(depth(url)) == 1  # not deleted
    else:
        [message] = receive_all(url)
        event = sqs_event([message], url)
        failed = aws_lambda.send_handler(event, LambdaContext())
        assert failed == {"batchItemFailures": [{"itemIdentifier": message["MessageId"]}]}
    gives_back(a)  # A stops before sending user0: pending, and only this job can send it
    if runner == "worker":
        time.sleep(1.1)  # the job's visibility timeout
        again = run_worker(url, state, idle_exit=0.5, wait_seconds=0)
        assert (again.done, again.left, again.sent, again.skipped) == (1, 0, 1, 2)
        assert depth(url) == (0, 0)
    else:
        assert aws_lambda.send_handler(event, LambdaContext()) == {"batchItemFailures": []}
    assert sent_per_recipient() == Counter(f"user{i}@example.org" for i in range(3))
    [status] = state.statuses("twin")
    assert (status.sent, status.pending, status.in_doubt) == (3, 0, 0)


def test_a_twin_delivery_whose_other_worker_finishes_is_done_on_redelivery(
    aws: None, tmp_path: Path
) -> None:
    """The usual twin: A sends the row it holds. B's copy costs one more receive, then finds
    every row sent and is deleted; no row is sent twice."""
    url = make_queue(visibility=1)
    state = open_state(URL)
    enqueue_campaign(config(tmp_path, make_csv(tmp_path / "r.csv", 3), campaign="twin"), url, state)
    a = held_by_a(state, "twin", 3)
    first = run_worker(url, state, max_jobs=1, wait_seconds=0)
    assert (first.done, first.left, first.sent) == (0, 1, 2)
    gives_back(a, 3, "sent")
    time.sleep(1.1)
    lines: list[str] = []
    again = run_worker(
        url, state, idle_exit=0.5, wait_seconds=0, on_job=lambda _, line: lines.append(line)
    )
    assert (again.done, again.left, again.sent, again.skipped) == (1, 0, 0, 3)
    assert lines == ["job twin:2-4: 0 sent, 0 failed, 3 skipped"]
    assert depth(url) == (0, 0)
    # user1 was A's to send (it recorded it sent); B sent the other two, each once.
    assert sent_per_recipient() == Counter(["user0@example.org", "user2@example.org"])
    [status] = state.statuses("twin")
    assert (status.sent, status.pending) == (3, 0)


def test_a_row_in_doubt_after_its_lease_ran_out_does_not_keep_the_job(
    aws: None, tmp_path: Path
) -> None:
    """A worker that died holding a row leaves it `sending`; once its lease ran out the row
    is in doubt, an outcome (for `retry --in-doubt`), not "held": the job is done and
    deleted, so a crashed worker's rows never push a job into the dead-letter queue."""
    url = make_queue(visibility=1)
    state = open_state(URL)
    enqueue_campaign(config(tmp_path, make_csv(tmp_path / "r.csv", 3), campaign="twin"), url, state)
    held_by_a(state, "twin", clock=lambda: time.time() - 3600)  # its 900 s lease is over
    lines: list[str] = []
    summary = run_worker(
        url, state, idle_exit=0.5, wait_seconds=0, on_job=lambda _, line: lines.append(line)
    )
    assert (summary.done, summary.left, summary.sent, summary.skipped) == (1, 0, 2, 1)
    assert lines == ["job twin:2-4: 2 sent, 0 failed, 1 skipped"]
    assert depth(url) == (0, 0)
    assert sent_per_recipient() == Counter(["user1@example.org", "user2@example.org"])
    [status] = state.statuses("twin")
    assert (status.sent, status.in_doubt) == (2, 1)


def test_a_claim_race_lost_to_a_live_worker_leaves_the_job_too(
    aws: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B read the row as pending, then A claimed it first: B's claim fails (`ClaimLost`,
    "already being sent"), which holds the job back just as the skip found on reading."""
    from smartmail.dynamo_ledger import DynamoLedger
    from smartmail.workqueue import Worker

    url = make_queue()
    state = open_state(URL)
    enqueue_campaign(config(tmp_path, make_csv(tmp_path / "r.csv", 2), campaign="twin"), url, state)
    [message] = receive_all(url)
    held_by_a(state, "twin")
    monkeypatch.setattr(DynamoLedger, "skip_reasons", lambda self, items: [None] * len(items))
    b = Worker(state)
    try:
        outcome = b.run_job(message["Body"])
    finally:
        b.close()
    assert (outcome.done, outcome.sent, outcome.skipped) == (False, 1, 1)
    assert outcome.reason == "1 row held by another worker"


def test_a_row_given_back_after_its_job_was_deleted_is_queued_again(
    aws: None, tmp_path: Path
) -> None:
    """A row left pending with no job for it (its job was deleted by hand, or by a worker
    older than the rule above): `enqueue` again queues that row."""
    url = make_queue()
    state = open_state(URL)
    cfg = config(tmp_path, make_csv(tmp_path / "r.csv", 2), campaign="twin")
    enqueue_campaign(cfg, url, state)
    [message] = receive_all(url)
    a = held_by_a(state, "twin")
    event = sqs_event([message], url)
    assert aws_lambda.send_handler(event, LambdaContext())["batchItemFailures"]
    boto3.client("sqs", region_name=REGION).delete_message(
        QueueUrl=url, ReceiptHandle=message["ReceiptHandle"]
    )
    gives_back(a)
    again = enqueue_campaign(cfg, url, state)
    assert again.queued_rows == 1
    run_worker(url, state, idle_exit=0.5, wait_seconds=0)
    assert sent_per_recipient() == Counter(["user0@example.org", "user1@example.org"])
    [status] = state.statuses("twin")
    assert (status.sent, status.pending) == (2, 0)


def test_a_running_worker_picks_up_settings_a_new_enqueue_changed(
    aws: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker (or a warm Lambda) keeps a campaign's settings only for a while: enqueued again
    with a new unsubscribe URL, the next rows carry the new one, not the cached one."""
    from smartmail import workqueue
    from smartmail.workqueue import Worker

    url = make_queue()
    state = open_state(URL)
    old = "https://old.example/u?e={{ email|urlencode }}"
    new = "https://new.example/u?e={{ email|urlencode }}"
    enqueue_campaign(
        config(tmp_path, make_csv(tmp_path / "r.csv", 2), campaign="c", unsubscribe_url=old),
        url,
        state,
    )
    worker = Worker(state)
    try:
        [first] = receive_all(url)
        assert worker.run_job(first["Body"]).sent == 2
        sqs: Any = boto3.client("sqs", region_name=REGION)
        sqs.delete_message(QueueUrl=url, ReceiptHandle=first["ReceiptHandle"])
        enqueue_campaign(
            config(tmp_path, make_csv(tmp_path / "r.csv", 3), campaign="c", unsubscribe_url=new),
            url,
            state,
        )
        [second] = receive_all(url)
        monkeypatch.setattr(workqueue, "CONFIG_TTL", 0.0)  # the worker's period has passed
        assert worker.run_job(second["Body"]).sent == 1
    finally:
        worker.close()
    raw = {m.destinations[0]: m.raw_data for m in ses_backend().sent_messages}
    assert "old.example" in raw["user0@example.org"]
    assert "new.example" in raw["user2@example.org"]
    assert "old.example" not in raw["user2@example.org"]


def test_a_preflight_problem_queues_nothing(aws: None, tmp_path: Path) -> None:
    url = make_queue()
    csv = write(tmp_path / "r.csv", "email,name,code\nok@example.org,A,1\nbad-address,B,2\n")
    with pytest.raises(PreflightError, match=r"r.csv.*row 3.*nothing was queued"):
        enqueue_campaign(config(tmp_path, csv, on_invalid="abort"), url, open_state(URL))
    ragged = write(tmp_path / "g.csv", "email,name,code\nok@example.org,A\n")
    with pytest.raises(SmartmailError, match="nothing was queued"):
        enqueue_campaign(config(tmp_path, ragged), url, open_state(URL))
    assert depth(url) == (0, 0)


def test_enqueue_needs_the_shared_state(aws: None, tmp_path: Path) -> None:
    url = make_queue()
    with pytest.raises(ConfigError, match="dynamodb://TABLE"):
        enqueue_campaign(
            config(tmp_path, make_csv(tmp_path / "r.csv", 2)), url, SqliteState(tmp_path / "s.db")
        )


def test_a_template_bucket_keeps_the_template_once_content_addressed(
    aws: None, tmp_path: Path
) -> None:
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="uploads")
    url = make_queue()
    state = open_state(URL)
    result = enqueue_campaign(
        config(tmp_path, make_csv(tmp_path / "r.csv", 12), campaign="c"),
        url,
        state,
        template_bucket="uploads",
    )
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="uploads")["Contents"]]
    assert keys == [f"templates/{result.template.sha256}.json"]
    bodies = [m["Body"] for m in receive_all(url)]
    assert len(bodies) == 2 and all("Hello" not in b for b in bodies)  # never per job
    assert all(json.loads(b)["template"]["s3"] == result.template.s3 for b in bodies)
    summary = run_worker(url, state, idle_exit=0.2, wait_seconds=0)
    assert summary.sent == 12


def test_the_template_bundle_holds_only_the_attachments_the_rows_name(
    aws: None, tmp_path: Path
) -> None:
    """Attachments resolve in the template's folder, but only the files the rows attach go
    into the bundle (kept in the state table or S3): never the list itself, a secrets file
    or anything else that happens to sit beside the template."""
    folder = tmp_path / "mail"
    folder.mkdir()
    template = write(
        folder / "msg.txt", TEMPLATE.replace("Subject:", "Attachment: {{ code }}.txt\nSubject:")
    )
    for i in range(2):
        write(folder / f"C{i:05d}.txt", f"the attachment of user {i}\n")
    write(folder / "unused.txt", "nobody attaches this\n")
    write(folder / ".env", "SMARTMAIL_SMTP_PASSWORD=hunter2\n")
    csv = make_csv(folder / "r.csv", 2)
    url = make_queue()
    state = open_state(URL)
    cfg = CampaignConfig(
        template=str(template),
        source=str(csv),
        transport=f"ses://{REGION}",
        rate=1000,
        retry_wait=0,
        campaign="att",
    )
    enqueue_campaign(cfg, url, state)
    record = state.load("att")
    assert record is not None
    bundle = record.settings["queue_template"]["inline"]
    assert sorted(bundle["attachments"]) == ["C00000.txt", "C00001.txt"]
    assert "hunter2" not in json.dumps(record.settings)
    summary = run_worker(url, state, idle_exit=0.5, wait_seconds=0)
    assert summary.sent == 2
    raw = {m.destinations[0]: m.raw_data for m in ses_backend().sent_messages}
    assert "C00001.txt" in raw["user1@example.org"]


def _linked_attachments(tmp_path: Path, attachment: str) -> CampaignConfig:
    """A template folder whose `linked` is a symbolic link to its folder `data/2026`, and a
    template attaching `attachment` (a Jinja2 path) to each of two rows (C00000, C00001)."""
    folder = tmp_path / "mail"
    (folder / "data" / "2026").mkdir(parents=True)
    for i in range(2):
        write(folder / "data" / "2026" / f"C{i:05d}.txt", f"the attachment of user {i}\n")
    (folder / "linked").symlink_to(folder / "data" / "2026", target_is_directory=True)
    header = f"Attachment: {attachment}\nSubject:"
    template = write(folder / "msg.txt", TEMPLATE.replace("Subject:", header))
    return CampaignConfig(
        template=str(template),
        source=str(make_csv(tmp_path / "r.csv", 2)),
        transport=f"ses://{REGION}",
        rate=1000,
        retry_wait=0,
        campaign="linked",
    )


def test_attachments_reached_through_a_linked_folder_reach_the_worker(
    aws: None, tmp_path: Path
) -> None:
    # The rows name linked/C00000.txt: the bundle held only data/2026/C00000.txt (the walk
    # did not enter the link), so the worker, rendering the same rows, found no such file.
    url = make_queue()
    state = open_state(URL)
    enqueue_campaign(_linked_attachments(tmp_path, "linked/{{ code }}.txt"), url, state)
    record = state.load("linked")
    assert record is not None
    bundle = record.settings["queue_template"]["inline"]
    assert sorted(bundle["attachments"]) == ["linked/C00000.txt", "linked/C00001.txt"]
    summary = run_worker(url, state, idle_exit=0.5, wait_seconds=0)
    assert (summary.sent, summary.failed) == (2, 0)
    for message in ses_backend().sent_messages:
        msg = email.message_from_string(message.raw_data, policy=policy.default)
        (attachment,) = list(msg.iter_attachments())
        i = message.destinations[0].removeprefix("user").split("@")[0]
        assert attachment.get_filename() == f"C0000{i}.txt"  # the name the path gives it
        assert attachment.get_payload(decode=True) == f"the attachment of user {i}\n".encode()


def test_a_linked_folder_leading_out_of_the_template_folder_stays_refused(
    aws: None, tmp_path: Path
) -> None:
    outside = tmp_path / "secrets"
    outside.mkdir()
    write(outside / "C00000.txt", "SMARTMAIL_SMTP_PASSWORD=hunter2\n")
    cfg = _linked_attachments(tmp_path, "out/{{ code }}.txt")
    (Path(cfg.template).parent / "out").symlink_to(outside, target_is_directory=True)
    url = make_queue()
    with pytest.raises(PreflightError) as caught:
        enqueue_campaign(dataclasses.replace(cfg, on_invalid="abort"), url, open_state(URL))
    (line,) = str(caught.value).splitlines()
    assert "'out/C00000.txt' leads outside" in line and "nothing was queued" in line
    assert depth(url) == (0, 0)


def test_a_linked_folder_turned_outward_after_preflight_is_refused_in_one_line(
    tmp_path: Path,
) -> None:
    # Pre-flight resolved linked/C00000.txt inside the folder; the link is then pointed at
    # a folder outside it before the bundle is read: refused, never bundled.
    cfg = _linked_attachments(tmp_path, "linked/{{ code }}.txt")
    folder = Path(cfg.template).parent
    checked = {"linked/C00000.txt": (folder / "linked" / "C00000.txt").resolve()}
    outside = tmp_path / "secrets"
    outside.mkdir()
    write(outside / "C00000.txt", "SMARTMAIL_SMTP_PASSWORD=hunter2\n")
    (folder / "linked").unlink()
    (folder / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ConfigError) as caught:
        Bundle.collect(cfg.template, None, folder, only=checked)
    (line,) = str(caught.value).splitlines()
    assert "'linked/C00000.txt' leads outside" in line and "nothing was queued" in line


def _swap_link_after_preflight(
    monkeypatch: pytest.MonkeyPatch, folder: Path, target: Path, *, keep: bool
) -> None:
    """Point `folder/linked` at `target` the moment pre-flight returns; without `keep`,
    pre-flight keeps no message (a list past its budget), so enqueue renders every row again."""
    import smartmail.engine

    real = smartmail.engine.preflight

    def preflight(*args: Any, **kwargs: Any) -> Any:
        if not keep:
            kwargs["keep_rendered"] = 0
        checked = real(*args, **kwargs)
        (folder / "linked").unlink()
        (folder / "linked").symlink_to(target, target_is_directory=True)
        return checked

    monkeypatch.setattr(smartmail.engine, "preflight", preflight)


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "past-the-budget"])
@pytest.mark.parametrize("where", ["inside", "outside"])
@pytest.mark.parametrize("attachment", ["linked/{{ code }}.txt", "linked/C00000.txt"])
def test_a_link_turned_after_preflight_queues_nothing_pre_flight_did_not_check(
    aws: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    keep: bool,
    attachment: str,
) -> None:
    # Enqueue rendered every row a second time after pre-flight and bundled what that found:
    # a link turned in between put a file pre-flight never checked in the bundle (inside the
    # folder), or stopped with a raw row error that did not say nothing was queued (outside).
    # Then only for rows pre-flight kept: one rendered again still bundled the new file.
    cfg = _linked_attachments(tmp_path, attachment)
    folder = Path(cfg.template).parent
    target = folder / "data" / "2027" if where == "inside" else tmp_path / "secrets"
    target.mkdir()
    for i in range(2):
        write(target / f"C{i:05d}.txt", f"NOT CHECKED {i}\n")
    _swap_link_after_preflight(monkeypatch, folder, target, keep=keep)
    url = make_queue()
    with pytest.raises(ConfigError) as caught:
        enqueue_campaign(cfg, url, open_state(URL))
    (line,) = str(caught.value).splitlines()
    assert "nothing was queued" in line
    assert "elsewhere than when it was checked" in line or "changed since pre-flight" in line
    assert depth(url) == (0, 0)


def test_the_template_is_queued_as_pre_flight_checked_it(
    aws: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bundle read the template (and an HTML part beside it) from disk again after
    # pre-flight: an edit in between reached every recipient unchecked.
    import smartmail.engine

    cfg = _linked_attachments(tmp_path, "linked/{{ code }}.txt")
    template = Path(cfg.template)
    real = smartmail.engine.preflight

    def preflight(*args: Any, **kwargs: Any) -> Any:
        checked = real(*args, **kwargs)
        template.write_text(TEMPLATE.replace("Subject: Hello", "Subject: NOT CHECKED"))
        template.with_suffix(".html").write_text("<p>NOT CHECKED {{ no_such_column }}</p>")
        return checked

    monkeypatch.setattr(smartmail.engine, "preflight", preflight)
    url = make_queue()
    state = open_state(URL)
    enqueue_campaign(cfg, url, state)
    summary = run_worker(url, state, idle_exit=0.5, wait_seconds=0)
    assert (summary.sent, summary.failed) == (2, 0)
    for message in ses_backend().sent_messages:
        assert "NOT CHECKED" not in message.raw_data
        assert "text/html" not in message.raw_data


def test_the_bundle_limit_counts_what_the_bundle_stores_and_says_what_is_too_big(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The refusal blamed "the attachments folder" (only the files rows attach are bundled);
    # a file named in two spellings is stored, and counted, once for each.
    import smartmail.jobs

    cfg = _linked_attachments(tmp_path, "linked/{{ code }}.txt")
    folder = Path(cfg.template).parent
    one = (folder / "data" / "2026" / "C00000.txt").resolve()
    size = len(one.read_bytes())
    monkeypatch.setattr(smartmail.jobs, "MAX_BUNDLE_BYTES", 2 * size)
    spellings = {"linked/C00000.txt": one, "data/2026/C00000.txt": one}
    files = Bundle.collect(cfg.template, None, folder, only=spellings).data["attachments"]
    assert sorted(files) == sorted(spellings)
    three = {**spellings, "linked/C00001.txt": (folder / "linked" / "C00001.txt").resolve()}
    with pytest.raises(ConfigError) as caught:
        Bundle.collect(cfg.template, None, folder, only=three)
    (line,) = str(caught.value).splitlines()
    assert "the files the rows attach come to more than" in line
    assert "nothing was queued" in line and "folder holds" not in line


def test_entries_the_queue_fails_are_sent_again_and_only_accepted_jobs_count_as_queued(
    aws: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SendMessageBatch answers 200 with some entries failed (SQS's own trouble): those
    entries, and only those, are sent again."""
    from botocore.stub import ANY, Stubber

    from smartmail import workqueue

    monkeypatch.setattr("smartmail.workqueue.time.sleep", lambda _: None)
    url = "https://sqs.us-east-1.amazonaws.com/123456789012/send"
    sqs = boto3.client("sqs", region_name=REGION)
    stub = Stubber(sqs)
    fail = {"Id": "1", "SenderFault": False, "Code": "InternalError", "Message": "try again"}
    ok = [{"Id": i, "MessageId": f"m{i}", "MD5OfMessageBody": "x"} for i in ("0", "1", "2")]
    stub.add_response(
        "send_message_batch",
        {"Successful": [ok[0], ok[2]], "Failed": [fail]},
        {"QueueUrl": url, "Entries": ANY},
    )
    stub.add_response(
        "send_message_batch",
        {"Successful": [ok[1]], "Failed": []},
        {"QueueUrl": url, "Entries": ANY},
    )
    state = open_state(URL)
    cfg = config(tmp_path, make_csv(tmp_path / "r.csv", 6), campaign="c")
    with stub:
        result = enqueue_campaign(cfg, url, state, rows_per_job=2, sqs=sqs)
        stub.assert_no_pending_responses()
    assert (result.jobs, result.queued_rows) == (3, 6)
    assert len(queued_keys(state, "c")) == 6

    # A refusal that is the request's own fault is not sent again: the command says what
    # was queued, and a re-run queues the rest.
    stub = Stubber(sqs)
    refused = {"Id": "0", "SenderFault": True, "Code": "InvalidMessageContents", "Message": "no"}
    stub.add_response(
        "send_message_batch",
        {"Successful": [], "Failed": [refused]},
        {"QueueUrl": url, "Entries": ANY},
    )
    more = config(tmp_path, make_csv(tmp_path / "r.csv", 8), campaign="c")
    with stub, pytest.raises(workqueue.QueueError, match=r"1 job.*InvalidMessageContents.*0 row"):
        enqueue_campaign(more, url, state, rows_per_job=2, sqs=sqs)
    assert len(queued_keys(state, "c")) == 6


def test_the_enqueue_command_prints_a_summary_and_queues_nothing_twice(
    aws: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from .test_ses_cli import run_cli

    url = make_queue()
    csv = make_csv(tmp_path / "r.csv", 12)
    write(tmp_path / "msg.txt", TEMPLATE)
    args = [
        "enqueue", str(csv), "-t", str(tmp_path / "msg.txt"), "--transport", f"ses://{REGION}",
        "--queue", url, "--state", URL, "--campaign", "cli", "--rows-per-job", "5",
    ]  # fmt: skip
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "queued 12 of 12 row(s)" in err
    assert "queued (rows)" in out and "jobs" in out
    assert depth(url) == (3, 0)
    code, out, _ = run_cli(args, capsys)
    assert code == 0 and "nothing new to queue (campaign cli)" in out
    assert depth(url) == (3, 0)
    # The default (SQLite) state cannot be shared by workers: refused, nothing queued.
    monkeypatch.delenv("SMARTMAIL_STATE")
    code, _, err = run_cli([a for a in args if a not in ("--state", URL)], capsys)
    assert code == 2 and "give --state dynamodb://TABLE" in err
    assert depth(url) == (3, 0)


# --- the Lambda sender -------------------------------------------------------------------------


def test_the_same_job_twice_in_one_event_sends_each_row_once(aws: None, tmp_path: Path) -> None:
    url = make_queue()
    enqueue_campaign(
        config(tmp_path, make_csv(tmp_path / "r.csv", 4), campaign="c"), url, open_state(URL)
    )
    [message] = receive_all(url)
    event = sqs_event([message, {**message, "MessageId": "copy-of-the-same-job"}], url)
    assert aws_lambda.send_handler(event, LambdaContext()) == {"batchItemFailures": []}
    assert sent_per_recipient() == Counter(f"user{i}@example.org" for i in range(4))


def test_one_transient_failure_in_ten_jobs_reports_only_that_job(aws: None, tmp_path: Path) -> None:
    url = make_queue()
    state = open_state(URL)
    enqueue_campaign(
        config(tmp_path, make_csv(tmp_path / "a.csv", 9), campaign="a"),
        url,
        state,
        rows_per_job=1,
    )
    # Campaign b's SMTP server is down: its job stops with its row unsent, to come back later.
    down = config(tmp_path, make_csv(tmp_path / "b.csv", 1, domain="b.example"), campaign="b")
    down.transport = f"smtp://127.0.0.1:{free_port()}"
    down.smtp_security, down.max_retries, down.timeout = "none", 0, 2.0
    enqueue_campaign(down, url, state)
    messages = receive_all(url)
    assert len(messages) == 10
    bad = next(m["MessageId"] for m in messages if json.loads(m["Body"])["campaign"] == "b")

    result = aws_lambda.send_handler(sqs_event(messages, url), LambdaContext())
    assert result == {"batchItemFailures": [{"itemIdentifier": bad}]}
    assert sent_per_recipient() == Counter(f"user{i}@example.org" for i in range(9))
    [b] = state.statuses("b")
    assert (b.sent, b.pending, b.failed) == (0, 1, 0)  # unsent, not failed: it comes back


def test_a_poison_job_lands_in_the_dead_letter_queue_after_three_receives(
    aws: None, tmp_path: Path
) -> None:
    url = make_queue(visibility=1, dlq=True)
    state = open_state(URL)
    result = enqueue_campaign(
        config(tmp_path, make_csv(tmp_path / "r.csv", 2), campaign="c"), url, state
    )
    # A job whose row the template cannot render (no `name` or `code` column).
    poison = Job("c", result.template, ["email"], [Row(9, {"email": "p@example.org"})])
    sqs: Any = boto3.client("sqs", region_name=REGION)
    sqs.send_message(QueueUrl=url, MessageBody=poison.to_json())

    receives: Counter[str] = Counter()
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and depth(url) != (0, 0):
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, AttributeNames=["All"]).get(
            "Messages", []
        )
        if not got:
            time.sleep(0.3)
            continue
        failed = aws_lambda.send_handler(sqs_event(got, url), LambdaContext())
        reported = {f["itemIdentifier"] for f in failed["batchItemFailures"]}
        for m in got:  # what the event source mapping does with the answer
            receives[m["Body"]] += 1
            if m["MessageId"] not in reported:
                sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    assert receives[poison.to_json()] == 3
    dlq = sqs.get_queue_url(QueueName="send-dlq")["QueueUrl"]
    # SQS (moto) moves it there on the next receive once it is visible again: the poller
    # makes one, as the event source mapping would. (Under load the loop above can end on its
    # deadline before that receive: seen once in CI.)
    assert not sqs.receive_message(QueueUrl=url, WaitTimeSeconds=2).get("Messages")
    [dead] = sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10, WaitTimeSeconds=2)[
        "Messages"
    ]
    assert dead["Body"] == poison.to_json()
    assert sent_per_recipient() == Counter(["user0@example.org", "user1@example.org"])


def test_a_job_is_not_started_when_the_function_is_about_to_time_out(
    aws: None, tmp_path: Path
) -> None:
    url = make_queue()
    enqueue_campaign(
        config(tmp_path, make_csv(tmp_path / "r.csv", 2), campaign="c"), url, open_state(URL)
    )
    [message] = receive_all(url)
    result = aws_lambda.send_handler(sqs_event([message], url), LambdaContext(millis=5_000))
    assert result == {"batchItemFailures": [{"itemIdentifier": message["MessageId"]}]}
    assert sent_per_recipient() == Counter()


class RunningLambdaContext:
    """A context whose remaining time runs down with the clock, as Lambda's does."""

    def __init__(self, millis: int) -> None:
        self.until = time.monotonic() + millis / 1000

    def get_remaining_time_in_millis(self) -> int:
        return int((self.until - time.monotonic()) * 1000)


def test_a_job_still_running_near_the_timeout_stops_and_comes_back_with_nothing_in_doubt(
    aws: None, tmp_path: Path
) -> None:
    """A slow job (a small rate share) must not be cut off by the function's timeout, which
    would leave every row it had claimed in doubt: it stops before, its unsent rows go back
    to pending and the job is reported for redelivery, where it sends the rest once."""
    url = make_queue()
    state = open_state(URL)
    cfg = config(tmp_path, make_csv(tmp_path / "r.csv", 6), campaign="slow", workers=2)
    cfg.rate = 2  # 6 rows take 2.5 s or more; the function "times out" 0.3 s in
    enqueue_campaign(cfg, url, state, rows_per_job=6)
    [message] = receive_all(url)
    event = sqs_event([message], url)
    context = RunningLambdaContext(aws_lambda.STOP_BEFORE_TIMEOUT_MS + 300)
    result = aws_lambda.send_handler(event, context)
    assert result == {"batchItemFailures": [{"itemIdentifier": message["MessageId"]}]}
    [status] = state.statuses("slow")
    assert (status.in_doubt, status.in_flight) == (0, 0)
    assert status.sent < 6 and status.sent + status.pending == 6
    assert aws_lambda.send_handler(event, LambdaContext()) == {"batchItemFailures": []}
    assert sent_per_recipient() == Counter(f"user{i}@example.org" for i in range(6))


# --- the S3 upload trigger and SES feedback ------------------------------------------------------


def upload_event(bucket: str, key: str) -> dict[str, Any]:
    """What EventBridge delivers for an S3 "Object Created" notification."""
    return {
        "version": "0",
        "id": "17793124-05d4-b198-2fde-7ededc63b103",
        "detail-type": "Object Created",
        "source": "aws.s3",
        "account": "123456789012",
        "time": "2026-11-23T10:00:00Z",
        "region": REGION,
        "resources": [f"arn:aws:s3:::{bucket}"],
        "detail": {
            "version": "0",
            "bucket": {"name": bucket},
            "object": {"key": key, "size": 120, "etag": "b1946ac92492d2347c6235b4d2611184"},
            "request-id": "N4N7GDK58NMKJ12R",
            "requester": "123456789012",
            "reason": "PutObject",
        },
    }


def test_an_upload_is_enqueued_and_a_bounce_keeps_the_address_out_of_the_next_one(
    aws: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = make_queue()
    monkeypatch.setenv("SMARTMAIL_QUEUE_URL", url)
    monkeypatch.setenv("SMARTMAIL_UPLOAD_BUCKET", "uploads")
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="uploads")
    for folder in ("spring", "summer"):
        settings = {"template": "msg.txt", "campaign": folder, "rate": 1000, "retry_wait": 0}
        s3.put_object(Bucket="uploads", Key=f"incoming/{folder}/msg.txt", Body=TEMPLATE.encode())
        s3.put_object(
            Bucket="uploads",
            Key=f"incoming/{folder}/campaign.json",
            Body=json.dumps(settings).encode(),
        )
    s3.put_object(
        Bucket="uploads",
        Key="incoming/spring/list.csv",
        Body=make_csv(tmp_path / "a.csv", 4).read_bytes(),
    )
    ignored = aws_lambda.upload_handler(upload_event("uploads", "incoming/spring/msg.txt"))
    assert ignored == {"ignored": "incoming/spring/msg.txt"}
    done = aws_lambda.upload_handler(upload_event("uploads", "incoming/spring/list.csv"))
    assert (done["campaign"], done["queued"], done["jobs"]) == ("spring", 4, 1)
    state = aws_lambda.state_from_env()
    run_worker(url, state, idle_exit=0.2, wait_seconds=0)
    assert sum(sent_per_recipient().values()) == 4

    # SES says user2 bounced (SNS -> the feedback function): the next upload skips it.
    provider_id = next(
        m.id for m in ses_backend().sent_messages if m.destinations[0] == "user2@example.org"
    )
    aws_lambda.feedback_handler(sns_event(bounce(provider_id, ["user2@example.org"])), None)
    s3.put_object(
        Bucket="uploads",
        Key="incoming/summer/list.csv",
        Body=make_csv(tmp_path / "b.csv", 6).read_bytes(),
    )
    nxt = aws_lambda.upload_handler(upload_event("uploads", "incoming/summer/list.csv"))
    assert (nxt["campaign"], nxt["queued"], nxt["skipped"]) == ("summer", 5, 1)
    bodies = [json.loads(m["Body"]) for m in receive_all(url)]
    queued = {r[1]["email"] for b in bodies for r in b["rows"]}
    assert "user2@example.org" not in queued and len(queued) == 5


def test_an_upload_cannot_choose_the_transport_or_take_over_another_lists_campaign(
    aws: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = make_queue()
    monkeypatch.setenv("SMARTMAIL_QUEUE_URL", url)
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="uploads")

    def upload(folder: str, **settings: Any) -> dict[str, Any]:
        body = json.dumps({"template": "msg.txt", "rate": 1000, **settings}).encode()
        s3.put_object(Bucket="uploads", Key=f"incoming/{folder}/campaign.json", Body=body)
        s3.put_object(Bucket="uploads", Key=f"incoming/{folder}/msg.txt", Body=TEMPLATE.encode())
        csv = make_csv(tmp_path / f"{folder}.csv", 2).read_bytes()
        s3.put_object(Bucket="uploads", Key=f"incoming/{folder}/list.csv", Body=csv)
        return aws_lambda.upload_handler(upload_event("uploads", f"incoming/{folder}/list.csv"))

    with pytest.raises(ConfigError, match="transport is set by the deployment"):
        upload("evil", transport="smtp://mail.evil.example:25")
    assert upload("weekly", campaign="weekly")["queued"] == 2
    with pytest.raises(ConfigError, match=r"belongs to s3://uploads/incoming/weekly/list\.csv"):
        upload("other", campaign="weekly")
    # The stored settings are still the weekly list's own; re-uploading it is allowed.
    record = aws_lambda.state_from_env().load("weekly")
    assert record is not None and record.source == "s3://uploads/incoming/weekly/list.csv"
    assert upload("weekly", campaign="weekly")["already_queued"] == 2


def test_upload_settings_may_not_reach_outside_their_folder(
    aws: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMARTMAIL_QUEUE_URL", make_queue())
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="uploads")
    s3.put_object(
        Bucket="uploads",
        Key="incoming/x/campaign.json",
        Body=json.dumps({"template": "../../secret/msg.txt"}).encode(),
    )
    s3.put_object(Bucket="uploads", Key="incoming/x/list.csv", Body=b"email\na@example.org\n")
    with pytest.raises(ConfigError, match="must be a file name in the same folder"):
        aws_lambda.upload_handler(upload_event("uploads", "incoming/x/list.csv"))


@pytest.mark.parametrize(
    "settings",
    [{"rows_per_job": "ten"}, {"rate": "fast"}, {"tags": "wave"}, {"workers": [2]}],
)
def test_upload_settings_of_the_wrong_type_are_refused_in_one_line(
    aws: None, monkeypatch: pytest.MonkeyPatch, settings: dict[str, Any]
) -> None:
    monkeypatch.setenv("SMARTMAIL_QUEUE_URL", make_queue())
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="uploads")
    body = json.dumps({"template": "msg.txt", **settings}).encode()
    s3.put_object(Bucket="uploads", Key="incoming/x/campaign.json", Body=body)
    s3.put_object(Bucket="uploads", Key="incoming/x/msg.txt", Body=TEMPLATE.encode())
    s3.put_object(Bucket="uploads", Key="incoming/x/list.csv", Body=b"email\na@example.org\n")
    with pytest.raises(ConfigError, match=r"s3://uploads/incoming/x/campaign.json: ") as got:
        aws_lambda.upload_handler(upload_event("uploads", "incoming/x/list.csv"))
    assert "\n" not in str(got.value)
    assert sent_per_recipient() == Counter()


def test_each_function_makes_only_calls_its_role_in_the_template_allows(
    aws: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The calls each handler really makes, recorded, against its own role in
    deploy/template.yaml: none refused when deployed, and none granted that is never made."""
    from cfnlint.decode import cfn_yaml

    from .aws_recorder import RECORDER
    from .iam import action_for, as_list

    deploy = Path(__file__).resolve().parents[1] / "deploy" / "template.yaml"
    template = json.loads(json.dumps(cfn_yaml.load(str(deploy))))

    def granted(role: str) -> set[str]:
        policies = template["Resources"][role]["Properties"]["Policies"]
        return {
            action
            for p in policies
            for st in p["PolicyDocument"]["Statement"]
            for action in as_list(st["Action"])
            if not action.startswith("logs:")
        }

    def made(run: Any) -> set[str]:
        before = Counter(RECORDER.calls)
        run()
        return {action_for(*call) for call in RECORDER.calls - before}

    url = make_queue()
    monkeypatch.setenv("SMARTMAIL_QUEUE_URL", url)
    monkeypatch.setenv("SMARTMAIL_UPLOAD_BUCKET", "uploads")
    monkeypatch.setenv("SMARTMAIL_ACCOUNT_RATE", "1000")
    open_state(URL).ensure()  # the stack creates the table; the functions never do
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="uploads")
    settings = {"template": "msg.txt", "campaign": "roles", "retry_wait": 0}
    s3.put_object(Bucket="uploads", Key="incoming/r/msg.txt", Body=TEMPLATE.encode())
    s3.put_object(Bucket="uploads", Key="incoming/r/campaign.json", Body=json.dumps(settings))
    listed = make_csv(tmp_path / "a.csv", 3).read_bytes()
    s3.put_object(Bucket="uploads", Key="incoming/r/list.csv", Body=listed)
    event = upload_event("uploads", "incoming/r/list.csv")
    upload = made(lambda: aws_lambda.upload_handler(event))
    jobs = sqs_event(receive_all(url), url)
    send = made(lambda: aws_lambda.send_handler(jobs, LambdaContext()))
    assert sum(sent_per_recipient().values()) == 3
    provider_id = ses_backend().sent_messages[0].id
    bounced = sns_event(bounce(provider_id, [ses_backend().sent_messages[0].destinations[0]]))
    feedback = made(lambda: aws_lambda.feedback_handler(bounced, None))
    # Granted and never made by the code, each for a reason outside it: the first call of a
    # cold container (the table was checked above), what Lambda itself does with the role
    # (the SQS event source, the feedback function's dead-letter queue), and SendRawEmail,
    # which SES may check for a raw message.
    not_made_here = {
        "UploadRole": {"dynamodb:DescribeTable"},
        "SenderRole": {
            "dynamodb:DescribeTable",
            "ses:SendRawEmail",
            "sqs:ReceiveMessage",
            "sqs:DeleteMessage",
            "sqs:ChangeMessageVisibility",
            "sqs:GetQueueAttributes",
        },
        "FeedbackRole": {"dynamodb:DescribeTable", "sqs:SendMessage"},
    }
    for role, calls in (("UploadRole", upload), ("SenderRole", send), ("FeedbackRole", feedback)):
        assert calls <= granted(role), f"{role} lacks {sorted(calls - granted(role))}"
        extra = granted(role) - calls - not_made_here[role]
        assert not extra, f"{role} is granted {sorted(extra)}, which it never uses"
    # The ledger claims and records with UpdateItem: the sender is never granted whole-item
    # writes (PutItem could replace any delivery, suppression or campaign record).
    assert "dynamodb:PutItem" not in send | granted("SenderRole")


# --- three `smartmail worker` processes on one queue ----------------------------------------------


@pytest.fixture
def moto_server(aws_env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    serialise_moto_item_writes(monkeypatch)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    # moto's backends live in this process, whichever server serves them: start empty.
    reset = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    urllib.request.urlopen(reset, timeout=10).close()
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.mark.slow
def test_three_worker_processes_share_one_queue_and_send_every_row_once(
    moto_server: str, tmp_path: Path
) -> None:
    verify_sender(endpoint_url=moto_server)
    url = make_queue(visibility=2)
    state = open_state(URL)
    rows = 60
    cfg = config(tmp_path, make_csv(tmp_path / "r.csv", rows), campaign="big")
    result = enqueue_campaign(cfg, url, state, rows_per_job=5)
    assert result.jobs == 12
    # SQS delivers at least once: put a second copy of four jobs on the queue.
    sqs = boto3.client("sqs", region_name=REGION)
    for message in receive_all(url)[:4]:
        sqs.send_message(QueueUrl=url, MessageBody=message["Body"])

    env = {k: v for k, v in os.environ.items() if k != "SMARTMAIL_STATE"}
    command = [
        sys.executable, "-m", "smartmail", "worker", "--queue", url, "--state", URL,
        "--idle-exit", "3", "--visibility-timeout", "2",
    ]  # fmt: skip
    procs = [
        subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=150))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
        assert "worker:" in out
    with urllib.request.urlopen(f"{moto_server}/moto-api/data.json", timeout=10) as answer:
        data = json.load(answer)
    sent = Counter(m["destinations"][0] for m in data["ses"]["RawMessage"])
    assert sent == Counter(f"user{i}@example.org" for i in range(rows))  # each exactly once
    assert depth(url) == (0, 0)
    [status] = state.statuses("big")
    assert (status.sent, status.addresses, status.in_doubt, status.pending) == (rows, rows, 0, 0)
    taken = sum(int(out.split("worker: ")[1].split(" job")[0]) for out, _ in outputs)
    # 12 jobs and the 4 copies, each taken at least once. Once more is SQS's right: a
    # heartbeat a loaded machine delays past the 2 s visibility hands a job to another
    # worker, which finds its rows sent (each row once, above) and deletes it.
    assert taken >= 16


@pytest.mark.slow
def test_sigterm_finishes_the_job_in_hand_and_leaves_the_rest_on_the_queue(
    moto_server: str, tmp_path: Path
) -> None:
    verify_sender(endpoint_url=moto_server)
    url = make_queue(visibility=30)
    state = open_state(URL)
    cfg = config(tmp_path, make_csv(tmp_path / "r.csv", 6), campaign="term")
    cfg.rate = 1  # a job of 3 rows takes two seconds
    enqueue_campaign(cfg, url, state, rows_per_job=3)
    env = {k: v for k, v in os.environ.items() if k != "SMARTMAIL_STATE"}
    command = [sys.executable, "-m", "smartmail", "worker", "--queue", url, "--state", URL]
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not ses_sent(moto_server):
            time.sleep(0.05)
        assert ses_sent(moto_server), "the worker never started sending"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "finishing the job in hand" in err
    assert "1 job(s) taken, 1 done" in out
    assert sorted(ses_sent(moto_server)) == [
        "user0@example.org",
        "user1@example.org",
        "user2@example.org",
    ]
    assert depth(url) == (1, 0)  # the other job, untouched, for the next worker
    [status] = state.statuses("term")
    assert (status.sent, status.in_doubt, status.in_flight) == (3, 0, 0)


def ses_sent(endpoint: str) -> list[str]:
    with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=10) as answer:
        data = json.load(answer)
    return [m["destinations"][0] for m in data["ses"]["RawMessage"]]


@pytest.mark.slow
def test_a_worker_killed_mid_job_leaves_it_to_the_next_and_at_most_its_row_in_flight(
    moto_server: str, tmp_path: Path
) -> None:
    """SIGKILL: no clean-up at all. The job is not deleted, so it comes back when its
    visibility runs out; the next worker sends what was not sent, and the row the dead worker
    was sending is held back (being sent, then in doubt), never sent twice. While that row's
    lease runs it looks held by a live worker, so the job is left for redelivery; once the
    lease ran out it is in doubt and the job is done (a 4 s lease here, 900 s by default
    against 3 receives of 720 s in the stack)."""
    verify_sender(endpoint_url=moto_server)
    url = make_queue(visibility=2)
    state_url = URL + "&lease=4"
    state = open_state(state_url)
    cfg = config(tmp_path, make_csv(tmp_path / "r.csv", 6), campaign="crash", workers=1)
    cfg.rate = 2
    enqueue_campaign(cfg, url, state, rows_per_job=6)
    env = {k: v for k, v in os.environ.items() if k != "SMARTMAIL_STATE"}
    command = [sys.executable, "-m", "smartmail", "worker", "--queue", url, "--state", state_url]
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(ses_sent(moto_server)) < 2:
            time.sleep(0.05)
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = ses_sent(moto_server)
    assert 2 <= len(before) < 6, "the worker was not killed mid-job"
    assert depth(url) == (0, 1)  # still held by the dead worker

    lines: list[str] = []
    summary = run_worker(
        url, state, idle_exit=10, wait_seconds=1, on_job=lambda _, line: lines.append(line)
    )
    assert summary.done == 1 and summary.left == summary.jobs - 1 <= 3, lines
    assert all(line.endswith("1 row held by another worker") for line in lines[:-1]), lines
    sent = Counter(ses_sent(moto_server))
    assert max(sent.values()) == 1  # nobody twice
    [status] = state.statuses("crash")
    held = status.in_flight + status.in_doubt  # claimed by the dead worker, outcome unknown
    assert status.sent + held == 6 and held <= 1  # at most the row it was sending
    # That row may or may not have reached SES before the kill: that is what "in doubt" means.
    assert status.sent <= len(sent) <= status.sent + held
    assert depth(url) == (0, 0)


def test_a_worker_on_a_queue_that_does_not_exist_says_so_in_one_line(aws: None) -> None:
    url = f"https://sqs.{REGION}.amazonaws.com/123456789012/no-such-queue"
    with pytest.raises(ConfigError, match="no-such-queue: cannot read the queue"):
        run_worker(url, open_state(URL), max_jobs=1, wait_seconds=0)


def test_a_worker_whose_provider_is_down_leaves_the_job_and_exits_4(
    aws: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A job that stopped because its SMTP server cannot be reached is left on the queue, as
    `send` leaves the rows unsent, and the worker says so by its exit status, as `send` does
    (4): a supervisor (systemd, cron mail) learns of the outage now, not from the
    dead-letter queue's alarm 3 receives later."""
    from .test_ses_cli import run_cli

    url = make_queue(visibility=1)
    state = open_state(URL)
    down = config(tmp_path, make_csv(tmp_path / "b.csv", 2, domain="b.example"), campaign="b")
    down.transport = f"smtp://127.0.0.1:{free_port()}"
    down.smtp_security, down.max_retries, down.timeout = "none", 0, 2.0
    enqueue_campaign(down, url, state)
    summary = run_worker(url, state, max_jobs=1, wait_seconds=0)
    assert (summary.done, summary.left, summary.sent, summary.code) == (0, 1, 0, 4)
    [b] = state.statuses("b")
    assert (b.sent, b.pending, b.failed) == (0, 2, 0)  # unsent, to be sent when it is back
    time.sleep(1.1)  # the job is visible again
    code, out, err = run_cli(["worker", "--queue", url, "--state", URL, "--max-jobs", "1"], capsys)
    assert code == 4, err
    assert "left for redelivery" in err and "1 left for redelivery" in out
    assert depth(url) == (0, 1)  # not deleted: in flight until its visibility runs out


def test_a_worker_whose_jobs_all_went_exits_0(
    aws: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from .test_ses_cli import run_cli

    verify_sender()
    url = make_queue()
    state = open_state(URL)
    enqueue_campaign(config(tmp_path, make_csv(tmp_path / "a.csv", 3), campaign="a"), url, state)
    code, out, err = run_cli(["worker", "--queue", url, "--state", URL, "--max-jobs", "1"], capsys)
    assert code == 0, err
    assert "1 done, 0 left for redelivery" in out and depth(url) == (0, 0)


@pytest.mark.slow
def test_a_job_a_worker_cannot_run_is_reported_once_on_stderr(
    moto_server: str, tmp_path: Path
) -> None:
    """A cron job mails stderr: each failure one line, not a log record and the line again."""
    url = make_queue()
    boto3.client("sqs", region_name=REGION).send_message(QueueUrl=url, MessageBody="not json")
    env = {k: v for k, v in os.environ.items() if k not in ("SMARTMAIL_STATE", "SMARTMAIL_DEBUG")}
    command = [
        sys.executable, "-m", "smartmail", "worker", "--queue", url, "--state", URL,
        "--max-jobs", "1",
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("not run:") == 1, done.stderr
    assert "not JSON" in done.stderr and "ERROR" not in done.stderr
    assert "1 could not be run" in done.stdout
