"""Adversarial checks of the scale-out path (DynamoDB ledger, SQS jobs, Lambda handlers),
each written to fail on the code before its fix. moto in-process; nothing leaves the machine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from smartmail import (
    MessageTemplate,
    RecipientSource,
    SendOptions,
    SourceSpec,
    aws_lambda,
    preflight,
    send_campaign,
)
from smartmail.errors import ConfigError
from smartmail.events import consume, handle_sqs_records
from smartmail.message import OutgoingMessage
from smartmail.report import Outcome
from smartmail.sources import Row
from smartmail.state_dynamodb import DynamoState, open_state
from smartmail.workqueue import enqueue_campaign

from .aws_helpers import REGION, ses_backend
from .conftest import TEMPLATE, SmtpServer, write
from .dynamo_helpers import atomic_moto, lambda_state
from .test_aws_lambda import sqs_event_from_queue
from .test_events import bounce
from .test_preflight_edges import COPIED, copied_campaign
from .test_preflight_edges import transport as smtp_transport
from .test_state_parity import state_url
from .test_workqueue import URL as WQ_URL
from .test_workqueue import (
    LambdaContext,
    aws,
    config,
    make_queue,
    receive_all,
    sqs_event,
    upload_event,
)

__all__ = ["atomic_moto", "aws", "state_url"]
URL = f"dynamodb://review-state?region={REGION}"


@pytest.fixture
def state(
    aws_env: None, atomic_moto: None, monkeypatch: pytest.MonkeyPatch
) -> Iterator[DynamoState]:
    with lambda_state(URL, monkeypatch) as found:
        yield found


def message(address: str, number: int = 2) -> OutgoingMessage:
    row = Row(number, {"email": address})
    return OutgoingMessage("n@acme.example", [address], b"x", f"<{number}@a>", address, row)


def delivery(state: DynamoState, campaign: str, address: str) -> dict[str, Any]:
    item = state.table.call(
        "get_item",
        Key={"pk": {"S": f"D#{campaign}"}, "sk": {"S": address}},
        ConsistentRead=True,
    ).get("Item", {})
    return {k: next(iter(v.values())) for k, v in item.items()}


# --- SES feedback: a hostile body must not take its batch down with it --------------------------

# Valid JSON that Python's decoder cannot read: it raises RecursionError, not ValueError.
NESTED = "[" * 100_000 + "]" * 100_000


def test_a_deeply_nested_body_is_one_malformed_record_not_a_failed_batch(
    state: DynamoState,
) -> None:
    """One record nobody can parse must fail alone: before, RecursionError escaped
    `handle_sqs_records`, the handler raised, and every record of the SQS batch came back
    (and after maxReceiveCount went to the dead-letter queue with it, their bounces unapplied)."""
    event = sqs_event_from_queue(
        [json.dumps(bounce("m-1", ["gone@example.org"])), NESTED, json.dumps({"Message": NESTED})]
    )
    bad = sorted(r["messageId"] for r in event["Records"] if r["body"].count("[") > 1000)
    result = aws_lambda.feedback_handler(event, None)
    assert sorted(f["itemIdentifier"] for f in result["batchItemFailures"]) == bad
    assert state.suppressions.reason("gone@example.org") == "bounce"


def test_smartmail_events_reports_a_deeply_nested_message_and_goes_on(state: DynamoState) -> None:
    sqs = boto3.client("sqs", region_name=REGION)
    url = sqs.create_queue(QueueName="raw-feedback")["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody=NESTED)
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(bounce("m-2", ["b@example.org"])))
    summary = consume(url, state.feedback, wait_seconds=0)
    assert len(summary.malformed) == 1 and summary.deleted == 1
    assert state.suppressions.reason("b@example.org") == "bounce"


def test_an_unexpected_error_applying_one_record_fails_that_record_only(
    state: DynamoState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug or an unforeseen botocore error while applying one notification is that
    record's failure (it stays on the queue); the rest of the batch is applied."""
    store = state.feedback
    real = store.suppress

    def flaky(address: str, reason: str, detail: str) -> bool:
        if address == "bad@example.org":
            raise KeyError("surprise")
        return real(address, reason, detail)

    monkeypatch.setattr(store, "suppress", flaky)
    records = [
        {"messageId": "1", "body": json.dumps(bounce("m-3", ["bad@example.org"]))},
        {"messageId": "2", "body": json.dumps(bounce("m-4", ["good@example.org"]))},
    ]
    results = handle_sqs_records(records, store)
    assert [r.ok for r in results] == [False, True]
    assert "KeyError" in results[0].error
    assert state.suppressions.reason("good@example.org") == "bounce"


# --- the claim: a write DynamoDB applied whose answer was lost ----------------------------------


def test_a_claim_applied_but_answered_late_is_still_this_workers_claim(
    state: DynamoState,
) -> None:
    """botocore retries a write whose answer was lost (a reset, a timeout). When the first
    try was applied, the retry's condition fails against our own claim: before, that was
    `ClaimLost` ("already being sent"), the row was skipped unsent, and it stayed `sending`
    under our token until its lease ran out, then reported in doubt though never sent."""
    ledger = state.ledger("c")
    ledger.acquire()
    armed = {"claim": True}

    def lose_the_first_answer(**kw: Any) -> int | None:
        body = kw.get("request_dict", {}).get("body", b"")
        if armed["claim"] and b"ConditionExpression" in body and b":sending" in body:
            armed["claim"] = False
            return 0  # retry at once, as after a lost answer
        return None

    state.table.client.meta.events.register_first(
        "needs-retry.dynamodb.UpdateItem", lose_the_first_answer
    )
    msg = message("ana@example.org")
    ledger.sending(msg)  # must not raise ClaimLost: the claim is ours
    assert not armed["claim"]
    ledger.record(Outcome(row=msg.row, recipient=msg.recipient, status="sent", message_id="p-1"))
    assert delivery(state, "c", "ana@example.org")["st"] == "sent"


def test_a_claim_another_worker_holds_is_still_lost(state: DynamoState) -> None:
    first, second = state.ledger("c"), state.ledger("c")
    first.sending(message("ana@example.org"))
    with pytest.raises(Exception, match="already being sent"):
        second.sending(message("ana@example.org"))


def test_a_claim_lost_to_an_expired_lease_is_in_doubt_not_held(state: DynamoState) -> None:
    """A worker whose claim fails on a row `sending` under a lease that ran out skips it as
    in doubt (its worker is gone), not as held by a live one: only "held" keeps a queue job
    from being done, so a dead worker's row must never look held."""
    from smartmail.dynamo_ledger import HELD, ClaimLost, DynamoLedger

    dead = DynamoLedger(state.table, "c", clock=lambda: 1_000.0)  # its lease ended long ago
    dead.sending(message("ana@example.org"))
    with pytest.raises(ClaimLost) as lost:
        state.ledger("c").sending(message("ana@example.org"))
    assert lost.value.skip_reason.startswith("in doubt (smartmail retry c --in-doubt")
    assert state.ledger("c").skip_reason("ana@example.org", message("ana@example.org").row) == (
        lost.value.skip_reason
    )
    state.ledger("c").sending(message("bob@example.org"))
    with pytest.raises(ClaimLost) as live:
        state.ledger("c").sending(message("bob@example.org"))
    assert live.value.skip_reason == HELD


# --- suppressed Cc/Bcc addresses on the DynamoDB ledger ------------------------------------------


def test_suppressed_copies_are_left_out_with_the_dynamodb_ledger_too(
    state: DynamoState, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    """The SQLite ledger leaves a suppressed Cc/Bcc out of the message (README); the
    DynamoDB ledger had no `suppressed()`, so workers, Lambda senders and `send --state
    dynamodb://` mailed addresses that had bounced or complained."""
    csv_path, template_path, _db = copied_campaign(tmp_path)
    for address, reason in (
        ("Gone@ACME.example", "bounce"),
        ("archive@acme.example", "manual"),
        ("dora@example.org", "complaint"),
    ):
        state.suppressions.add(address, reason)
    template = MessageTemplate.load(template_path)
    ledger = state.ledger("report")
    ledger.acquire()
    with RecipientSource(SourceSpec(str(csv_path))).snapshot() as snap:
        checked = preflight(snap, template, SendOptions(), journal=ledger, keep_rendered=1)
        summary = send_campaign(
            snap, template, smtp_transport(smtp_server), journal=ledger, checked=checked
        )
    assert checked.suppressed_copies == 4
    assert (summary.sent, summary.skipped) == (3, 1)
    by = {r.rcpt_tos[0]: r for r in smtp_server.handler.received}
    assert sorted(by) == ["ann@example.org", "bob@example.org", "carl@example.org"]
    for received in by.values():
        assert "archive@acme.example" not in received.rcpt_tos
        assert "Bcc" not in received.message
    assert sorted(by["bob@example.org"].rcpt_tos) == ["bob@example.org", "john@acme.example"]


def test_a_lambda_sender_leaves_a_suppressed_cc_out(aws: None, tmp_path: Path) -> None:
    """The same through the queue: enqueue, then the sender function; the Cc that
    complained after the campaign was queued never receives a copy."""
    url = make_queue()
    csv_path = write(
        tmp_path / "r.csv",
        "email,manager\nann@example.org,boss@acme.example\nbob@example.org,gone@acme.example\n",
    )
    write(tmp_path / "msg.txt", COPIED)
    state = open_state(WQ_URL)
    enqueue_campaign(config(tmp_path, csv_path, campaign="cc"), url, state)
    state.suppressions.add("GONE@acme.example", "complaint")
    event = sqs_event(receive_all(url), url)
    assert aws_lambda.send_handler(event, LambdaContext()) == {"batchItemFailures": []}
    sent = {m.destinations[0]: set(m.destinations) for m in ses_backend().sent_messages}
    assert set(sent) == {"ann@example.org", "bob@example.org"}
    assert "gone@acme.example" not in sent["bob@example.org"]
    assert "boss@acme.example" in sent["ann@example.org"]


# --- uploads: the deployment's configuration set carries the feedback -----------------------


@pytest.mark.parametrize("chosen", [None, "", "another-set"])
def test_an_upload_cannot_send_outside_the_stacks_configuration_set(
    aws: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chosen: str | None
) -> None:
    """Bounces and complaints reach the feedback function only through the stack's
    configuration set (its event destination). An upload that set `configuration_set` to
    null or "" had its campaign sent without one: the sender role allows that, and no
    bounce or complaint of that campaign was ever suppressed."""
    monkeypatch.setenv("SMARTMAIL_QUEUE_URL", make_queue())
    monkeypatch.setenv("SMARTMAIL_CONFIGURATION_SET", "smartmail")
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="uploads")
    body = json.dumps({"template": "msg.txt", "configuration_set": chosen}).encode()
    s3.put_object(Bucket="uploads", Key="incoming/x/campaign.json", Body=body)
    s3.put_object(Bucket="uploads", Key="incoming/x/msg.txt", Body=TEMPLATE.encode())
    s3.put_object(
        Bucket="uploads", Key="incoming/x/list.csv", Body=b"email,name,code\na@example.org,A,1\n"
    )
    with pytest.raises(ConfigError, match="configuration_set is set by the deployment"):
        aws_lambda.upload_handler(upload_event("uploads", "incoming/x/list.csv"))


# --- IAMpolicy.json: the feedback queue ---------------------------------------------------------


def test_the_policy_grants_on_the_feedback_queue_only_what_smartmail_events_calls(
    state: DynamoState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`smartmail events` receives and deletes, nothing else; the policy also allowed it to
    change visibility and read attributes of that queue."""
    from smartmail import aws

    from .aws_recorder import OperationRecorder
    from .iam import action_for, as_list, load_policy, statements

    local = OperationRecorder()
    monkeypatch.setattr(aws, "CLIENT_HOOKS", [*aws.CLIENT_HOOKS, local.watch])
    sqs = boto3.client("sqs", region_name=REGION)
    url = sqs.create_queue(QueueName="ses-feedback")["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(bounce("m-7", ["x@example.org"])))
    sqs.send_message(QueueUrl=url, MessageBody="{not json")
    consume(url, state.feedback, wait_seconds=0, visibility_timeout=30)
    made = {action_for(*call) for call in local.calls if call[0] == "sqs"}
    [granted] = [
        set(as_list(st["Action"]))
        for st in statements(load_policy())
        if st["Sid"] == "ConsumeSesEventsFromTheQueue"
    ]
    assert granted == made == {"sqs:ReceiveMessage", "sqs:DeleteMessage"}


# --- the Lambda sender: feedback flows only through the stack's configuration set ----------------


def test_a_campaign_enqueued_without_a_configuration_set_is_sent_through_the_stacks(
    aws: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`smartmail enqueue` without --configuration-set, sent by the stack's sender
    function: SES publishes bounces and complaints only for messages sent through a
    configuration set with an event destination, so without the stack's set no bounce of
    that campaign ever reached the feedback function, and none was suppressed."""
    from smartmail import aws as smartmail_aws

    sets: list[str | None] = []

    def watch(client: Any) -> None:
        def note(params: dict[str, Any], **_: Any) -> None:
            sets.append(params.get("ConfigurationSetName"))

        client.meta.events.register("provide-client-params.sesv2.SendEmail", note)

    monkeypatch.setattr(smartmail_aws, "CLIENT_HOOKS", [*smartmail_aws.CLIENT_HOOKS, watch])
    monkeypatch.setenv("SMARTMAIL_CONFIGURATION_SET", "smartmail")
    boto3.client("sesv2", region_name=REGION).create_configuration_set(
        ConfigurationSetName="smartmail"
    )
    url = make_queue()
    csv_path = write(tmp_path / "r.csv", "email,name,code\na@example.org,A,1\n")
    enqueue_campaign(config(tmp_path, csv_path, campaign="cli"), url, open_state(WQ_URL))
    event = sqs_event(receive_all(url), url)
    assert aws_lambda.send_handler(event, LambdaContext()) == {"batchItemFailures": []}
    assert sets == ["smartmail"]


# --- a failed row of an uploaded campaign can be re-driven ---------------------------------------


def test_smartmail_retry_re_sends_a_failed_row_of_an_uploaded_campaign(
    aws: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload function stored the template path it had downloaded to, a temporary
    folder gone when it returned; `smartmail retry CAMPAIGN` then could not read the
    template, so a failed row of an uploaded campaign could not be re-driven. The template
    bundle the workers send from is in S3 (or the record): retry now uses it."""
    url = make_queue()
    monkeypatch.setenv("SMARTMAIL_QUEUE_URL", url)
    monkeypatch.setenv("SMARTMAIL_UPLOAD_BUCKET", "uploads")
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="uploads")
    settings = {"template": "msg.txt", "campaign": "up", "rate": 1000, "retry_wait": 0}
    s3.put_object(Bucket="uploads", Key="incoming/up/msg.txt", Body=TEMPLATE.encode())
    s3.put_object(Bucket="uploads", Key="incoming/up/campaign.json", Body=json.dumps(settings))
    listed = write(
        tmp_path / "r.csv", "email,name,code\nann@example.org,Ann,1\nbo@example.org,Bo,2\n"
    )
    s3.put_object(Bucket="uploads", Key="incoming/up/list.csv", Body=listed.read_bytes())
    aws_lambda.upload_handler(upload_event("uploads", "incoming/up/list.csv"))
    state = aws_lambda.state_from_env()
    # A worker claims bo's row and SES refuses it for good: `failed`, the job done.
    row = Row(3, {"email": "bo@example.org", "name": "Bo", "code": "2"})
    ledger = state.ledger("up")
    ledger.sending(OutgoingMessage("n@acme.example", [], b"x", "<1@a>", "bo@example.org", row))
    ledger.record(Outcome(row=row, recipient="bo@example.org", status="failed", reason="refused"))

    from smartmail.campaign import load_config, run_campaign
    from smartmail.config import RunOptions

    result = run_campaign(
        load_config(WQ_URL, "up"),
        RunOptions(resend="failed", state_path=WQ_URL, failed_csv=str(tmp_path / "f.csv")),
    )
    assert (result.summary.sent, result.summary.failed, result.error) == (1, 0, None)
    [sent] = ses_backend().sent_messages
    assert sent.destinations[0] == "bo@example.org"
    assert "Hi Bo, your code is 2." in sent.raw_data


# --- a claim whose lease ran out while its worker waited for a rate slot -------------------------


@pytest.mark.parametrize("taken_over", [True, False])
def test_a_worker_whose_lease_ran_out_while_it_waited_for_its_slot_does_not_send(
    state: DynamoState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, taken_over: bool
) -> None:
    """A worker claims a row, then waits for its rate slot (up to workers / rate seconds,
    longer after throttling), then sends. When the lease ran out during that wait, the row
    showed as in doubt and `retry --in-doubt` could take it over and send it; the first
    worker then sent it too. Now a worker that waited long renews its claim before it
    sends, and finding it taken, skips the row (or, not taken, sends it under the renewed
    lease)."""
    from smartmail import ratelimit
    from smartmail.campaign import run_campaign
    from smartmail.config import CampaignConfig, RunOptions
    from smartmail.dynamo_ledger import DynamoLedger

    now = [1_000_000.0]

    def clock() -> float:
        return now[0]

    monkeypatch.setattr(
        DynamoState,
        "ledger",
        lambda self, campaign, *, resend=None: DynamoLedger(
            self.table, campaign, resend=resend, clock=clock
        ),
    )
    row = Row(2, {"email": "ana@example.org", "name": "Ana", "code": "1"})
    taken: list[str] = []

    class SlowBucket(ratelimit.TokenBucket):
        def acquire(self) -> float:
            if not taken:
                now[0] += 3600  # the wait outlasts the lease (60 s here)
                taken.append("waited")
                if not taken_over:
                    return 0.0
                other = DynamoLedger(state.table, "lease", resend="in-doubt", clock=clock)
                other.sending(message("ana@example.org"))
                other.record(
                    Outcome(row=row, recipient="ana@example.org", status="sent", message_id="x")
                )
                taken.append("by retry --in-doubt")
            return 0.0

    monkeypatch.setattr(ratelimit, "TokenBucket", SlowBucket)
    csv_path = write(tmp_path / "r.csv", "email,name,code\nana@example.org,Ana,1\n")
    write(tmp_path / "msg.txt", TEMPLATE)
    outbox = tmp_path / "outbox"
    config = CampaignConfig(
        template=str(tmp_path / "msg.txt"),
        source=str(csv_path),
        transport=f"file://{outbox}",
        campaign="lease",
        rate=1,
        workers=1,
        retry_wait=0,
    )
    url = f"dynamodb://review-state?region={REGION}&lease=60"
    result = run_campaign(config, RunOptions(state_path=url, failed_csv=str(tmp_path / "f.csv")))
    assert taken
    if not taken_over:
        assert (result.summary.sent, result.summary.skipped) == (1, 0)
        assert delivery(state, "lease", "ana@example.org")["st"] == "sent"
        return
    assert (sorted(outbox.iterdir()) if outbox.exists() else []) == []
    assert (result.summary.sent, result.summary.skipped) == (0, 1)


# --- a worker kept across jobs reads the 24-hour quota again before refusing a job --------------


def test_a_warm_worker_does_not_refuse_every_job_on_a_quota_it_read_hours_ago(
    aws: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker (a warm Lambda container) keeps its SES transport across jobs, and the
    transport read the quota once. After one job found the 24-hour quota used up, every
    later job of that worker was refused on the same stale answer, however long after the
    quota had freed: each burnt a receive and went to the dead-letter queue unsent."""
    from smartmail import quota
    from smartmail.quota import QuotaExhaustedError, SendQuota
    from smartmail.workqueue import Worker

    used_up, free = SendQuota(200, 14, 200), SendQuota(200, 14, 0)
    answers = [used_up, used_up, free]  # the first job reads it twice before refusing
    monkeypatch.setattr(quota, "fetch_send_quota", lambda region: answers.pop(0))
    url = make_queue()
    csv_path = write(tmp_path / "r.csv", "email,name,code\na@example.org,A,1\nb@example.org,B,2\n")
    state = open_state(WQ_URL)
    enqueue_campaign(config(tmp_path, csv_path, campaign="q"), url, state, rows_per_job=1)
    first, second = sorted((m["Body"] for m in receive_all(url)), key=len)
    worker = Worker(state, rate=1000)
    try:
        with pytest.raises(QuotaExhaustedError):
            worker.run_job(first)
        # Hours later, the rolling 24 hours have freed the quota.
        outcome = worker.run_job(second)
    finally:
        worker.close()
    assert (outcome.done, outcome.sent) == (True, 1)
    assert answers == []


# --- the same keys in both states: case, IDNA, the root dot -------------------------------------


def test_both_states_key_case_and_idna_spellings_of_one_address_alike(state_url: str) -> None:
    """Refuted, kept as a guard: the DynamoDB ledger and suppression list key an address
    as the SQLite ones do (lower case, IDNA domain, one root dot dropped), for the row's
    recipient, its Cc (`suppressed`, new to the DynamoDB ledger) and SES feedback."""
    from smartmail.events import apply, parse
    from smartmail.state_store import open_state

    state = open_state(state_url)
    state.suppressions.add("Ann@Bücher.Example.", "manual")
    ledger = state.ledger("idna")
    ledger.acquire()
    row = Row(2, {"email": "x"})
    assert ledger.skip_reason("ann@xn--bcher-kva.example", row) == "suppressed: manual"
    assert ledger.skip_reason("ANN@BÜCHER.example", row) == "suppressed: manual"
    cc = ["ann@xn--bcher-kva.example", "ANN@bücher.example", "bo@example.org"]
    assert ledger.suppressed(cc) == {cc[0]: "manual", cc[1]: "manual"}
    sent = message("Cy@Bücher.Example", 3)
    ledger.sending(sent)
    ledger.record(Outcome(sent.row, sent.recipient, "sent", message_id="ses-cy"))
    ledger.close()  # the SQLite ledger commits in groups: what it holds, on disk
    feedback = bounce("ses-cy", ["cy@xn--bcher-kva.example"])
    applied = apply(state.feedback, parse(json.dumps(feedback)))
    assert (applied.suppressed, applied.deliveries) == (1, 1)
    assert state.ledger("next").skip_reason("CY@bücher.example", row) == "suppressed: bounce"
    state.close()
