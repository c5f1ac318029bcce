"""The Lambda feedback handler and `smartmail events` on the DynamoDB state: SES bounces and
complaints, in real-shaped SNS and SQS Lambda events, suppress their recipients and mark the
deliveries a DynamoDB ledger recorded; the next campaign skips them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from smartmail import aws_lambda
from smartmail.errors import ConfigError
from smartmail.events import apply, consume, parse
from smartmail.message import OutgoingMessage
from smartmail.report import Outcome
from smartmail.sources import Row
from smartmail.state_dynamodb import DynamoState

from .aws_helpers import ACCOUNT_ID, REGION
from .dynamo_helpers import atomic_moto, lambda_state
from .test_events import bounce, complaint, delivery

__all__ = ["atomic_moto"]
URL = f"dynamodb://feedback-state?region={REGION}"
TOPIC = f"arn:aws:sns:{REGION}:{ACCOUNT_ID}:ses-notifications"


@pytest.fixture
def state(
    aws_env: None, atomic_moto: None, monkeypatch: pytest.MonkeyPatch
) -> Iterator[DynamoState]:
    with lambda_state(URL, monkeypatch) as found:
        yield found


def sent(state: DynamoState, campaign: str, address: str, provider_id: str) -> None:
    """A delivery the DynamoDB ledger recorded as sent, with SES's message id."""
    row = Row(2, {"email": address})
    ledger = state.ledger(campaign)
    ledger.sending(OutgoingMessage("n@acme.example", [address], b"x", "<1@a>", address, row))
    ledger.record(Outcome(row=row, recipient=address, status="sent", message_id=provider_id))


def sns_event(*messages: dict[str, Any]) -> dict[str, Any]:
    """What SNS hands a subscribed Lambda function (one record per notification)."""
    return {
        "Records": [
            {
                "EventSource": "aws:sns",
                "EventVersion": "1.0",
                "EventSubscriptionArn": f"{TOPIC}:2bcfbf39-05c3-41de-beaa-fcfcc21c8f55",
                "Sns": {
                    "Type": "Notification",
                    "MessageId": f"95df01b4-ee98-5cb9-9903-4c221d41eb{i:02d}",
                    "TopicArn": TOPIC,
                    "Subject": None,
                    "Message": json.dumps(message),
                    "Timestamp": "2026-11-23T10:00:03.000Z",
                    "SignatureVersion": "1",
                    "Signature": "EXAMPLEpH+DcEwjAPg8O9mY8dReBSwksfg2S7WKQcikcNKWLQjwu6A4Vb==",
                    "SigningCertUrl": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0000000000000000000000.pem",
                    "UnsubscribeUrl": f"https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn={TOPIC}:2bcfbf39",
                    "MessageAttributes": {},
                },
            }
            for i, message in enumerate(messages)
        ]
    }


def sqs_event_from_queue(bodies: list[str]) -> dict[str, Any]:
    """An SQS Lambda event built from what moto's SNS -> SQS subscription really delivered."""
    sns = boto3.client("sns", region_name=REGION)
    sqs = boto3.client("sqs", region_name=REGION)
    topic = sns.create_topic(Name="ses-notifications")["TopicArn"]
    url = sqs.create_queue(QueueName="ses-feedback")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn)
    for body in bodies:
        sns.publish(TopicArn=topic, Message=body)
    got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, AttributeNames=["All"])
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
            for m in got["Messages"]
        ]
    }


def test_an_sns_bounce_suppresses_marks_the_delivery_and_the_next_send_skips(
    state: DynamoState,
) -> None:
    sent(state, "spring", "gone@example.org", "ses-msg-1")
    event = sns_event(bounce("ses-msg-1", ["gone@example.org"]))
    assert aws_lambda.feedback_handler(event, None) == {"applied": 1}
    entry = state.suppressions.get("gone@example.org")
    assert entry is not None and entry.reason == "bounce"
    assert entry.detail == "General: smtp; 550 5.1.1 user unknown"
    [status] = state.statuses("spring")
    assert (status.sent, status.bounced) == (1, 1)
    # The same notification again (SNS delivers at least once): nothing changes.
    assert aws_lambda.feedback_handler(event, None) == {"applied": 1}
    assert len(state.suppressions) == 1
    nxt = state.ledger("summer")
    assert nxt.skip_reason("gone@example.org", Row(2, {})) == "suppressed: bounce"


def test_a_later_delivery_event_never_downgrades_a_complaint(state: DynamoState) -> None:
    sent(state, "spring", "angry@example.org", "ses-msg-2")
    aws_lambda.feedback_handler(sns_event(complaint("ses-msg-2", ["angry@example.org"])), None)
    aws_lambda.feedback_handler(sns_event(delivery("ses-msg-2", ["angry@example.org"])), None)
    [status] = state.statuses("spring")
    assert (status.complained, status.delivered) == (1, 0)
    assert state.suppressions.reason("angry@example.org") == "complaint"


def test_an_sns_record_that_cannot_be_read_fails_the_invocation_for_retry_and_dlq(
    state: DynamoState,
) -> None:
    event = sns_event({"notificationType": "Bounce", "mail": {"messageId": "m"}})
    with pytest.raises(aws_lambda.FeedbackFailed, match="no 'bounce' object"):
        aws_lambda.feedback_handler(event, None)


def test_sqs_batch_reports_only_the_bad_record_and_applies_the_rest(state: DynamoState) -> None:
    event = sqs_event_from_queue(
        [
            json.dumps(bounce("m-1", ["one@example.org"])),
            json.dumps(complaint("m-2", ["two@example.org"])),
            json.dumps(bounce("m-3", ["soft@example.org"], bounce_type="Transient")),
            "{not json",
        ]
    )
    bad = next(r["messageId"] for r in event["Records"] if "{not json" in r["body"])
    result = aws_lambda.feedback_handler(event, None)
    assert result == {"batchItemFailures": [{"itemIdentifier": bad}]}
    assert {e.address: e.reason for e in state.suppressions} == {
        "one@example.org": "bounce",
        "two@example.org": "complaint",
    }


def test_smartmail_events_applies_a_queue_to_the_dynamodb_state(state: DynamoState) -> None:
    """`smartmail events --state dynamodb://…` runs `consume` with the state's feedback store."""
    sqs = boto3.client("sqs", region_name=REGION)
    url = sqs.create_queue(QueueName="raw-feedback")["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(bounce("m-9", ["b@example.org"])))
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(bounce("m-9", ["b@example.org"])))
    summary = consume(url, state.feedback, wait_seconds=0)
    assert (summary.received, summary.suppressed, summary.duplicates, summary.deleted) == (
        2,
        1,
        1,
        2,
    )
    assert state.suppressions.reason("b@example.org") == "bounce"


def test_a_consumer_dying_before_keeping_the_event_still_suppresses_on_redelivery(
    state: DynamoState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No transaction in DynamoDB: the event is kept last, so a crash before it re-applies."""
    fb = parse(json.dumps(bounce("m-5", ["late@example.org"])))
    store = state.feedback

    def crash(*_: Any) -> bool:
        raise RuntimeError("killed")

    with monkeypatch.context() as m:
        m.setattr(store, "suppress", crash)
        with pytest.raises(RuntimeError):
            apply(store, fb)
    assert state.suppressions.reason("late@example.org") is None
    assert apply(store, fb).suppressed == 1
    assert apply(store, fb).duplicates == 1


def test_the_handler_needs_a_dynamodb_state(aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    aws_lambda._STATES.clear()
    monkeypatch.setenv("SMARTMAIL_STATE", "/tmp/state.db")
    with pytest.raises(ConfigError, match="dynamodb://TABLE"):
        aws_lambda.feedback_handler(sns_event(bounce("m", ["x@example.org"])), None)
    monkeypatch.setenv("SMARTMAIL_STATE", URL)
    with pytest.raises(ConfigError, match="no Records"):
        aws_lambda.feedback_handler({"detail-type": "Object Created"}, None)


def test_each_sender_takes_its_share_of_the_account_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SMARTMAIL_ACCOUNT_RATE", raising=False)
    assert aws_lambda.rate_from_env() is None
    monkeypatch.setenv("SMARTMAIL_ACCOUNT_RATE", "14")
    monkeypatch.setenv("SMARTMAIL_EXPECTED_WORKERS", "4")
    assert aws_lambda.rate_from_env() == 3.5  # 4 senders x 3.5/s = the account's 14/s
    monkeypatch.setenv("SMARTMAIL_EXPECTED_WORKERS", "0")
    with pytest.raises(ConfigError, match="SMARTMAIL_EXPECTED_WORKERS"):
        aws_lambda.rate_from_env()
