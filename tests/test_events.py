"""SES feedback through a moto SNS topic and SQS queues, applied by `smartmail events`.

The SES messages are written here in the documented shapes (/work/shared/ses-notifications.md):
moto's own SES feedback is not realistic.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from click.testing import CliRunner
from moto import mock_aws

from smartmail import aws
from smartmail.cli import cli
from smartmail.errors import ConfigError
from smartmail.events import (
    MalformedMessage,
    apply,
    batch_item_failures,
    consume,
    handle_sqs_records,
    parse,
    region_from_queue_url,
)
from smartmail.state import connect
from smartmail.suppression import SuppressionList

ALLOWED_SQS_OPERATIONS = {
    "ReceiveMessage",
    "DeleteMessage",
    "DeleteMessageBatch",
    "ChangeMessageVisibility",
    "GetQueueAttributes",
}


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SQS"):
        monkeypatch.delenv(name, raising=False)
    with mock_aws():
        yield


@dataclass
class Feed:
    """An SNS topic with two SQS queues subscribed: SNS-wrapped and raw delivery."""

    sns: Any
    sqs: Any
    topic: str
    wrapped: str
    raw: str

    def queue(self, raw: bool) -> str:
        return self.raw if raw else self.wrapped

    def publish(self, message: dict[str, Any]) -> None:
        self.sns.publish(TopicArn=self.topic, Message=json.dumps(message))

    def bodies(self, url: str) -> list[tuple[str, str]]:
        """What is on the queue now (made visible at once again), as (message id, body)."""
        got = self.sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0, VisibilityTimeout=0
        )
        return [(m["MessageId"], m["Body"]) for m in got.get("Messages", [])]


@pytest.fixture
def feed(aws_env: None) -> Feed:
    sns = boto3.client("sns", region_name="us-east-1")
    sqs = boto3.client("sqs", region_name="us-east-1")
    topic = sns.create_topic(Name="ses-feedback")["TopicArn"]
    urls = {}
    for name, raw in (("wrapped", False), ("raw", True)):
        url = sqs.create_queue(QueueName=f"ses-feedback-{name}")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        attributes = {"RawMessageDelivery": "true"} if raw else {}
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn, Attributes=attributes)
        urls[name] = url
    return Feed(sns, sqs, topic, urls["wrapped"], urls["raw"])


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


# --- documented SES shapes ------------------------------------------------------------------


def _mail(message_id: str, destination: list[str]) -> dict[str, Any]:
    return {
        "timestamp": "2026-11-23T10:00:00.000Z",
        "messageId": message_id,
        "source": "news@acme.example",
        "sourceArn": "arn:aws:ses:us-east-1:123456789012:identity/acme.example",
        "sendingAccountId": "123456789012",
        "destination": destination,
        "headersTruncated": False,
        "commonHeaders": {"from": ["news@acme.example"], "to": destination, "subject": "Hi"},
        "tags": {"campaign": ["spring"]},
        "someFieldSesAddsLater": {"nested": [1, 2, 3]},
    }


def bounce(
    message_id: str,
    recipients: list[str],
    bounce_type: str = "Permanent",
    sub_type: str = "General",
    key: str = "notificationType",
    feedback_id: str | None = None,
) -> dict[str, Any]:
    return {
        key: "Bounce",
        "mail": _mail(message_id, recipients),
        "bounce": {
            "bounceType": bounce_type,
            "bounceSubType": sub_type,
            "bouncedRecipients": [
                {
                    "emailAddress": r,
                    "action": "failed",
                    "status": "5.1.1",
                    "diagnosticCode": "smtp; 550 5.1.1 user unknown",
                }
                for r in recipients
            ],
            "timestamp": "2026-11-23T10:00:01.000Z",
            "feedbackId": feedback_id or f"fb-bounce-{message_id}",
            "reportingMTA": "dsn; a1-2.smtp-out.amazonses.com",
        },
    }


def complaint(
    message_id: str, recipients: list[str], key: str = "notificationType"
) -> dict[str, Any]:
    return {
        key: "Complaint",
        "mail": _mail(message_id, recipients),
        "complaint": {
            "complainedRecipients": [{"emailAddress": r} for r in recipients],
            "timestamp": "2026-11-23T10:05:00.000Z",
            "feedbackId": f"fb-complaint-{message_id}",
            "complaintSubType": None,
            "userAgent": "ExampleCorp Feedback Loop (V0.01)",
            "complaintFeedbackType": "abuse",
            "arrivalDate": "2026-11-23T10:04:00.000Z",
        },
    }


def delivery(
    message_id: str, recipients: list[str], key: str = "notificationType"
) -> dict[str, Any]:
    return {
        key: "Delivery",
        "mail": _mail(message_id, recipients),
        "delivery": {
            "timestamp": "2026-11-23T10:00:02.000Z",
            "processingTimeMillis": 546,
            "recipients": recipients,
            "smtpResponse": "250 ok:  Message 64111812 accepted",
            "reportingMTA": "a8-70.smtp-out.amazonses.com",
            "remoteMtaIp": "127.0.2.0",
        },
    }


def other_event(event_type: str, message_id: str, recipient: str) -> dict[str, Any]:
    detail: dict[str, Any] = {
        "Send": ("send", {}),
        "Open": ("open", {"ipAddress": "192.0.2.1", "timestamp": "2026-11-23T11:00:00.000Z"}),
        "Click": ("click", {"link": "https://acme.example/x", "timestamp": "2026-11-23T11:01Z"}),
        "Reject": ("reject", {"reason": "Bad content"}),
        "DeliveryDelay": (
            "deliveryDelay",
            {
                "delayType": "MailboxFull",
                "delayedRecipients": [{"emailAddress": recipient, "status": "4.2.2"}],
                "timestamp": "2026-11-23T11:02:00.000Z",
            },
        ),
    }
    name, body = detail[event_type]
    return {"eventType": event_type, "mail": _mail(message_id, [recipient]), name: body}


def add_delivery(db: Path, recipient: str, provider_id: str, campaign: str = "spring") -> None:
    conn = connect(db)
    conn.execute("INSERT OR IGNORE INTO campaigns(id, source) VALUES (?, 'r.csv')", (campaign,))
    conn.execute(
        "INSERT INTO deliveries(campaign, recipient, status, provider_id) VALUES (?, ?, 'sent', ?)",
        (campaign, recipient, provider_id),
    )
    conn.close()


def feedback_of(db: Path) -> dict[str, str | None]:
    conn = connect(db)
    rows = conn.execute("SELECT recipient, feedback FROM deliveries").fetchall()
    conn.close()
    return {r[0]: r[1] for r in rows}


def suppressed(db: Path) -> dict[str, tuple[str, str]]:
    conn = connect(db)
    out = {s.address: (s.reason, s.detail) for s in SuppressionList(conn)}
    conn.close()
    return out


def event_count(db: Path) -> int:
    conn = connect(db)
    count = int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
    conn.close()
    return count


def run_events(state: Path, queue: str, *extra: str) -> Any:
    args = ["events", "--queue", queue, "--state", str(state), "--wait-seconds", "0", *extra]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


# --- end to end through the CLI ---------------------------------------------------------------


@pytest.mark.parametrize("raw", [False, True], ids=["sns-wrapped", "raw-delivery"])
@pytest.mark.parametrize("key", ["notificationType", "eventType"])
def test_bounces_and_complaints_suppress_and_deliveries_are_marked(
    feed: Feed, state: Path, raw: bool, key: str
) -> None:
    for recipient, provider_id in (
        ("ann@example.org", "m-ann"),
        ("bob@example.org", "m-bob"),
        ("dan@example.org", "m-dan"),
        ("eve@example.org", "m-eve"),
    ):
        add_delivery(state, recipient, provider_id)
    # One permanent bounce listing two recipients (cat was a Cc of ann's message).
    feed.publish(bounce("m-ann", ["ann@example.org", "Cat@Example.org"], key=key))
    feed.publish(complaint("m-bob", ["bob@example.org"], key=key))
    feed.publish(bounce("m-dan", ["dan@example.org"], "Transient", "MailboxFull", key=key))
    feed.publish(delivery("m-eve", ["eve@example.org"], key=key))

    result = run_events(state, feed.queue(raw))

    assert result.exit_code == 0, result.output
    assert suppressed(state) == {
        "ann@example.org": ("bounce", "General: smtp; 550 5.1.1 user unknown"),
        "cat@example.org": ("bounce", "General: smtp; 550 5.1.1 user unknown"),
        "bob@example.org": ("complaint", "abuse"),
    }
    assert feedback_of(state) == {
        "ann@example.org": "bounced",
        "bob@example.org": "complained",
        "dan@example.org": "soft-bounced",
        "eve@example.org": "delivered",
    }
    assert "suppressed (new)" in result.output and "received" in result.output
    assert feed.bodies(feed.queue(raw)) == [], "applied messages must be deleted"
    # The other queue got the same notifications and still holds them all.
    assert len(feed.bodies(feed.queue(not raw))) == 4


def test_event_publishing_types_are_recorded_without_error(feed: Feed, state: Path) -> None:
    add_delivery(state, "ann@example.org", "m-ann")
    for kind in ("Send", "Open", "Click", "Reject", "DeliveryDelay"):
        feed.publish(other_event(kind, "m-ann", "ann@example.org"))
    feed.publish(
        {
            "eventType": "Rendering Failure",
            "mail": _mail("m-x", ["x@example.org"]),
            "failure": {"errorMessage": "Attribute 'name' is not present"},
        }
    )

    result = run_events(state, feed.raw, "--json")

    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["received"] == 6
    assert summary["applied"] == {
        "Click": 1,
        "DeliveryDelay": 1,
        "Open": 1,
        "Reject": 1,
        "Rendering Failure": 1,
        "Send": 1,
    }
    assert summary["suppressed_added"] == 0 and summary["malformed"] == []
    assert suppressed(state) == {}
    assert feedback_of(state) == {"ann@example.org": None}
    assert event_count(state) == 6


def test_malformed_messages_stay_on_the_queue_and_exit_1(feed: Feed, state: Path) -> None:
    feed.publish(bounce("m-ann", ["ann@example.org"]))
    feed.publish({"hello": "not an SES notification"})
    junk_id = feed.sqs.send_message(QueueUrl=feed.wrapped, MessageBody="{not json")["MessageId"]
    feed.sqs.send_message(
        QueueUrl=feed.wrapped,
        MessageBody=json.dumps(
            {
                "Type": "Notification",
                "TopicArn": feed.topic,
                "MessageId": "x",
                "Message": {"notificationType": "Bounce"},
            }
        ),
    )

    result = run_events(state, feed.wrapped, "--visibility-timeout", "0")

    assert result.exit_code == 1
    assert junk_id in result.output
    assert "malformed" in result.output and "left on the queue" in result.output
    assert suppressed(state) == {
        "ann@example.org": ("bounce", "General: smtp; 550 5.1.1 user unknown")
    }
    left = feed.bodies(feed.wrapped)
    assert len(left) == 3, "every malformed message is still receivable"
    assert junk_id in {mid for mid, _ in left}
    assert not any("m-ann" in body for _, body in left), "the good one was deleted"


def test_redelivered_message_is_applied_once(feed: Feed, state: Path) -> None:
    add_delivery(state, "ann@example.org", "m-ann")
    feed.publish(bounce("m-ann", ["ann@example.org"]))
    body = feed.bodies(feed.raw)[0][1]
    assert run_events(state, feed.raw).exit_code == 0
    events_before = event_count(state)

    # SQS is at-least-once: the very same body can arrive again.
    feed.sqs.send_message(QueueUrl=feed.raw, MessageBody=body)
    result = run_events(state, feed.raw, "--json")

    summary = json.loads(result.output)
    assert result.exit_code == 0
    assert summary["received"] == 1 and summary["applied"] == {} and summary["duplicates"] == 1
    assert summary["suppressed_added"] == 0 and summary["deleted"] == 1
    assert event_count(state) == events_before == 1
    assert feed.bodies(feed.raw) == []


def test_max_messages_bounds_the_run(feed: Feed, state: Path) -> None:
    for i in range(13):
        feed.publish(delivery(f"m-{i}", [f"user{i}@example.org"]))

    result = run_events(state, feed.raw, "--max-messages", "11", "--json")

    assert json.loads(result.output)["received"] == 11
    assert len(feed.bodies(feed.raw)) == 2


def test_only_the_permitted_sqs_operations_are_called(feed: Feed, state: Path) -> None:
    calls: list[str] = []

    def hook(client: Any) -> None:
        client.meta.events.register("before-call.*.*", lambda model, **_: calls.append(model.name))

    feed.publish(bounce("m-ann", ["ann@example.org"]))
    feed.sqs.send_message(QueueUrl=feed.raw, MessageBody="junk")
    aws.CLIENT_HOOKS.append(hook)
    try:
        run_events(state, feed.raw, "--visibility-timeout", "0")
    finally:
        aws.CLIENT_HOOKS.remove(hook)
    assert calls, "the hook saw the calls"
    assert set(calls) <= ALLOWED_SQS_OPERATIONS, calls


# --- the core, from Python ----------------------------------------------------------------------


def test_consume_from_python_reports_problems(feed: Feed, state: Path) -> None:
    feed.publish(complaint("m-bob", ["bob@example.org"], key="eventType"))
    feed.sqs.send_message(QueueUrl=feed.wrapped, MessageBody="[]")
    problems: list[str] = []
    conn = connect(state)

    summary = consume(
        feed.wrapped, conn, wait_seconds=0, visibility_timeout=0, on_problem=problems.append
    )

    assert summary.received == 2 and summary.applied == {"Complaint": 1}
    assert summary.suppressed == 1 and not summary.ok
    assert len(summary.malformed) == 1 and len(problems) == 1
    assert SuppressionList(conn).reason("BOB@example.org") == "complaint"


def test_lambda_style_records_report_batch_item_failures(state: Path) -> None:
    conn = connect(state)
    records = [
        {"messageId": "good", "body": json.dumps(bounce("m-1", ["a@example.org"]))},
        {"messageId": "bad", "body": "{"},
        {"messageId": "odd", "body": json.dumps({"notificationType": "Bounce", "mail": {}})},
    ]
    results = handle_sqs_records(records, conn)
    assert [r.ok for r in results] == [True, False, False]
    assert batch_item_failures(results) == {
        "batchItemFailures": [{"itemIdentifier": "bad"}, {"itemIdentifier": "odd"}]
    }
    assert SuppressionList(conn).reason("a@example.org") == "bounce"


def test_later_feedback_never_downgrades_a_delivery(state: Path) -> None:
    add_delivery(state, "ann@example.org", "m-ann")
    conn = connect(state)
    apply(conn, parse(json.dumps(complaint("m-ann", ["ann@example.org"]))))
    apply(conn, parse(json.dumps(delivery("m-ann", ["ann@example.org"]))))
    assert feedback_of(state) == {"ann@example.org": "complained"}


def test_same_bounce_in_both_formats_counts_once(state: Path) -> None:
    conn = connect(state)
    first = apply(conn, parse(json.dumps(bounce("m-1", ["a@example.org"]))))
    second = apply(conn, parse(json.dumps(bounce("m-1", ["a@example.org"], key="eventType"))))
    assert (first.recorded, first.suppressed) == (1, 1)
    assert (second.recorded, second.duplicates, second.suppressed) == (0, 1, 0)


def test_applying_is_one_transaction(state: Path) -> None:
    conn = connect(state)
    conn.execute("DROP TABLE deliveries")  # the delivery update will fail mid-way
    with pytest.raises(sqlite3.OperationalError):
        apply(conn, parse(json.dumps(bounce("m-1", ["a@example.org"]))))
    assert SuppressionList(conn).reason("a@example.org") is None
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0


@pytest.mark.parametrize(
    "body, reason",
    [
        ("", "not JSON"),
        ('{"Type": "SubscriptionConfirmation", "TopicArn": "t", "Message": "x"}', "SNS"),
        ('{"notificationType": "Bounce", "mail": {"messageId": "m"}}', "bounce"),
        (
            '{"notificationType": "Complaint", "mail": {"messageId": "m"}, "complaint": '
            '{"complainedRecipients": []}}',
            "complainedRecipients",
        ),
        (
            '{"notificationType": "Delivery", "mail": {"messageId": "m"}, "delivery": '
            '{"recipients": "a@b.org"}}',
            "recipients",
        ),
        ('{"mail": {"messageId": "m"}}', "notificationType"),
    ],
)
def test_unreadable_shapes_are_malformed(body: str, reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        parse(body)


def test_an_unknown_event_type_is_recorded(state: Path) -> None:
    conn = connect(state)
    body = json.dumps({"eventType": "SomethingNew", "somethingNew": {"x": 1}})
    applied = apply(conn, parse(body))
    assert applied.recorded == 1 and applied.suppressed == 0
    assert conn.execute("SELECT type FROM events").fetchone()[0] == "SomethingNew"


def test_ses_topic_validation_message_is_not_an_error() -> None:
    text = "Successfully validated SNS topic for Amazon SES event publishing."
    envelope = {"Type": "Notification", "TopicArn": "arn:t", "MessageId": "1", "Message": text}
    assert parse(json.dumps(envelope)).type == "SnsTopicValidation"
    assert parse(text).recipients == ()


def test_region_comes_from_the_queue_url() -> None:
    assert region_from_queue_url("https://sqs.eu-west-1.amazonaws.com/1/q") == "eu-west-1"
    assert region_from_queue_url("https://ap-south-1.queue.amazonaws.com/1/q") == "ap-south-1"
    assert region_from_queue_url("http://localhost:4566/000000000000/q") is None


def test_missing_queue_is_a_configuration_error(aws_env: None, state: Path) -> None:
    url = "https://sqs.us-east-1.amazonaws.com/123456789012/no-such-queue"
    with pytest.raises(ConfigError, match=r"no-such-queue.*ReceiveMessage"):
        run_events(state, url)


def test_queue_must_be_a_url(state: Path) -> None:
    with pytest.raises(ConfigError, match="queue URL"):
        run_events(state, "ses-feedback")


@pytest.mark.slow
def test_installed_command_against_a_moto_server(tmp_path: Path) -> None:
    """The real `smartmail events` process: exit status 1 and one line per malformed message."""
    from moto.server import ThreadedMotoServer

    from .conftest import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "SMARTMAIL_STATE": str(tmp_path / "state.db"),
        }
        env.pop("AWS_PROFILE", None)
        sqs = boto3.client(
            "sqs",
            region_name="us-east-1",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        url = sqs.create_queue(QueueName="feedback")["QueueUrl"]
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps(bounce("m-1", ["a@example.org"])))
        junk = sqs.send_message(QueueUrl=url, MessageBody="<html>")["MessageId"]
        exe = Path(sys.executable).with_name("smartmail")
        done = subprocess.run(
            [
                str(exe),
                "events",
                "--queue",
                url,
                "--wait-seconds",
                "0",
                "--visibility-timeout",
                "0",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 1, done.stderr
        problem_lines = [line for line in done.stderr.splitlines() if junk in line]
        assert len(problem_lines) == 1 and "malformed" in problem_lines[0]
        assert SuppressionList(connect(tmp_path / "state.db")).reason("a@example.org") == "bounce"
        left = sqs.receive_message(QueueUrl=url, VisibilityTimeout=0, WaitTimeSeconds=0)
        assert [m["MessageId"] for m in left.get("Messages", [])] == [junk]
    finally:
        server.stop()
