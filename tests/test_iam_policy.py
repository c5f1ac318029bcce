"""IAMpolicy.json allows exactly what smartmail calls, scoped by resource, and nothing with `*`.

Three checks back each other up:
- every AWS code path of smartmail is run here under moto and each operation its clients make
  (recorded through `smartmail.aws.CLIENT_HOOKS`) must be allowed by the policy;
- the session-wide recorder (tests/aws_recorder.py) does the same for every test in the run,
  so a new AWS call added anywhere fails the run if the policy lacks its line;
- a static scan of smartmail/ for boto3 client method names catches calls no test reaches.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import boto3
import botocore.session
import pytest
from botocore import xform_name
from moto import mock_aws

from smartmail import (
    MessageTemplate,
    RecipientSource,
    RetryPolicy,
    SendOptions,
    SourceSpec,
    aws,
    send_campaign,
)
from smartmail.events import apply, parse
from smartmail.quota import fetch_send_quota, sender_identity
from smartmail.state_dynamodb import open_state
from smartmail.transports import TransportOptions, get_transport

from .aws_helpers import REGION, verify_sender
from .aws_recorder import RECORDER, OperationRecorder
from .conftest import make_csv
from .iam import allowed_actions, as_list, load_policy, not_allowed, statements

SMARTMAIL = Path(__file__).resolve().parents[1] / "smartmail"
SERVICES = ("s3", "ses", "sesv2", "sqs", "sns", "dynamodb")
STATE_CALLS = {
    ("dynamodb", "DescribeTable"),
    ("dynamodb", "CreateTable"),
    ("dynamodb", "UpdateTimeToLive"),
    ("dynamodb", "GetItem"),
    ("dynamodb", "BatchGetItem"),
    ("dynamodb", "PutItem"),
    ("dynamodb", "UpdateItem"),
    ("dynamodb", "DeleteItem"),
    ("dynamodb", "Query"),
}


def test_policy_is_valid_least_privilege_json() -> None:
    policy = load_policy()
    assert policy["Version"] == "2012-10-17"
    for statement in statements(policy):
        assert statement["Effect"] == "Allow"
        for action in as_list(statement["Action"]):
            assert re.fullmatch(r"[a-z0-9]+:[A-Za-z]+", action), action  # no '*' anywhere
        resources = as_list(statement["Resource"])
        if as_list(statement["Action"]) == ["ses:GetSendQuota"]:
            assert resources == ["*"]  # GetSendQuota has no resource-level permissions
        else:
            assert all(r.startswith("arn:aws:") and "*" not in r.rstrip("*") for r in resources)
    assert allowed_actions(policy) == {
        "ses:SendEmail",
        "ses:SendRawEmail",
        "ses:GetSendQuota",
        "ses:GetEmailIdentity",
        "s3:GetObject",
        "s3:PutObject",
        "sqs:SendMessage",
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:GetQueueAttributes",
        *(f"{service}:{operation}" for service, operation in STATE_CALLS),
    }


def test_policy_scopes_sending_to_the_sender_and_reads_to_one_prefix() -> None:
    by_sid = {s["Sid"]: s for s in statements(load_policy())}
    send = by_sid["SendAsTheVerifiedSender"]
    assert send["Condition"]["StringLike"]["ses:FromAddress"] == "*@SENDER_DOMAIN"
    assert "arn:aws:ses:REGION:ACCOUNT_ID:identity/SENDER_DOMAIN" in send["Resource"]
    assert by_sid["ReadTheRecipientLists"]["Resource"] == "arn:aws:s3:::BUCKET/PREFIX*"
    assert by_sid["ConsumeSesEventsFromTheQueue"]["Resource"] == (
        "arn:aws:sqs:REGION:ACCOUNT_ID:QUEUE"
    )
    table = "arn:aws:dynamodb:REGION:ACCOUNT_ID:table/STATE_TABLE"
    assert by_sid["KeepTheSharedStateInDynamoDB"]["Resource"] == [table, f"{table}/index/gsi1"]
    assert by_sid["CreateTheStateTableOnFirstUse"]["Resource"] == table


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> OperationRecorder:
    local = OperationRecorder()
    monkeypatch.setattr(aws, "CLIENT_HOOKS", [*aws.CLIENT_HOOKS, local.watch])
    return local


@mock_aws
@pytest.mark.usefixtures("aws_env")
def test_every_aws_call_smartmail_makes_is_allowed_by_the_policy(
    recorder: OperationRecorder, tmp_path: Path, template_file: Path
) -> None:
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="lists")
    s3.put_object(Bucket="lists", Key="r.csv", Body=make_csv(tmp_path / "r.csv", 2).read_bytes())
    verify_sender()

    transport = get_transport(f"ses://{REGION}", TransportOptions(configuration_set="cs"))
    summary = send_campaign(  # S3 source (read twice) and the SES API send
        RecipientSource(SourceSpec("s3://lists/r.csv")),
        MessageTemplate.load(template_file),
        transport,
        options=SendOptions(workers=1),
        retry=RetryPolicy(max_retries=0),
    )
    assert summary.sent == 2
    assert transport.default_rate() == 1.0  # the quota, through the transport
    fetch_send_quota(REGION)
    assert sender_identity(REGION, "news@acme.example").verified
    smtp = get_transport("ses+smtp://us-east-1", TransportOptions())
    assert smtp.default_rate() == 1.0

    assert set(recorder.calls) == {
        ("s3", "GetObject"),
        ("ses", "SendEmail"),
        ("ses", "GetSendQuota"),
        ("ses", "GetEmailIdentity"),
    }
    assert not_allowed(recorder.calls) == []


@mock_aws
@pytest.mark.usefixtures("aws_env")
def test_every_call_of_the_dynamodb_state_is_allowed_by_the_policy(
    recorder: OperationRecorder, tmp_path: Path, template_file: Path
) -> None:
    """Every code path of `--state dynamodb://`: table creation, claims, outcomes, status,
    retry, suppression, SES feedback."""
    state = open_state(f"dynamodb://STATE_TABLE?region={REGION}")
    ledger = state.ledger("c")
    ledger.acquire()  # creates the table
    ledger.begin(None)
    summary = send_campaign(
        RecipientSource(SourceSpec(str(make_csv(tmp_path / "r.csv", 2)))),
        MessageTemplate.load(template_file),
        get_transport(f"file://{tmp_path / 'out'}", TransportOptions()),
        options=SendOptions(workers=1, campaign="c"),
        journal=ledger,
    )
    assert summary.sent == 2
    assert [s.sent for s in state.statuses()] == [2]
    assert state.load("c") is not None and state.retry_rows("c", "failed") == []
    state.suppressions.add("x@example.org", "manual")
    assert [e.address for e in state.suppressions] == ["x@example.org"]
    assert state.suppressions.remove("x@example.org")
    bounce = {
        "notificationType": "Bounce",
        "mail": {"messageId": "m-1", "destination": ["user0@example.org"]},
        "bounce": {
            "bounceType": "Permanent",
            "feedbackId": "f-1",
            "bouncedRecipients": [{"emailAddress": "user0@example.org"}],
        },
    }
    assert apply(state.feedback, parse(json.dumps(bounce))).suppressed == 1
    assert set(recorder.calls) == STATE_CALLS
    assert not_allowed(recorder.calls) == []


def test_a_call_without_a_policy_line_is_caught() -> None:
    calls = [("ses", "SendEmail"), ("ses", "ListIdentities"), ("sqs", "PurgeQueue")]
    assert not_allowed(calls) == [
        "ses ListIdentities needs ses:ListIdentities",
        "sqs PurgeQueue needs sqs:PurgeQueue",
    ]
    policy = copy.deepcopy(load_policy())
    for statement in statements(policy):
        statement["Action"] = [a for a in as_list(statement["Action"]) if a != "ses:GetSendQuota"]
    assert not_allowed([("ses", "GetSendQuota")], policy) == [
        "ses GetSendQuota needs ses:GetSendQuota"
    ]


@mock_aws
@pytest.mark.usefixtures("aws_env")
def test_only_smartmails_own_clients_are_recorded(recorder: OperationRecorder) -> None:
    assert RECORDER.watch in aws.CLIENT_HOOKS  # the session-wide check is really installed
    boto3.client("sqs", region_name=REGION).create_queue(QueueName="set-up-only")
    assert ("sqs", "CreateQueue") not in RECORDER.calls
    aws.client("sqs", region=REGION).list_queues()
    assert recorder.calls[("sqs", "ListQueues")] == 1
    RECORDER.calls.pop(("sqs", "ListQueues"))  # made on purpose; not smartmail's own call


def _operations() -> dict[str, set[tuple[str, str]]]:
    session = botocore.session.get_session()
    names: dict[str, set[tuple[str, str]]] = {}
    for service in SERVICES:
        model = session.get_service_model(service)
        for operation in model.operation_names:
            names.setdefault(xform_name(operation), set()).add((model.signing_name, operation))
    return names


def test_every_client_method_named_in_the_code_is_allowed_by_the_policy() -> None:
    operations = _operations()
    found: dict[str, Any] = {}
    for path in sorted(SMARTMAIL.rglob("*.py")):
        code = path.read_text(encoding="utf-8")
        # Direct calls (client.get_object(...)) and operations named by string for a wrapper
        # that calls them (table.call("update_item", ...), _sqs_call(sqs, "receive_message")).
        named = r'\.?call\(\s*(?:\w+,\s*)?"([a-z_][a-z0-9_]*)"|\.([a-z_][a-z0-9_]*)\('
        for match in re.finditer(named, code):
            name = match.group(1) or match.group(2)
            if name in operations:
                found[name] = path.relative_to(SMARTMAIL.parent)
    assert {"get_object", "send_email", "get_send_quota", "get_email_identity"} <= set(found)
    assert {"update_item", "batch_get_item", "query", "receive_message"} <= set(found)
    refused = {
        name: str(where)
        for name, where in found.items()
        if all(not_allowed([call]) for call in operations[name])
    }
    assert refused == {}


@mock_aws
@pytest.mark.usefixtures("aws_env")
def test_every_call_of_the_send_queue_is_allowed_by_the_policy(
    recorder: OperationRecorder, tmp_path: Path, template_file: Path
) -> None:
    """`enqueue` with a template bucket, and a worker slow enough to extend a job's visibility."""
    from smartmail.config import CampaignConfig
    from smartmail.workqueue import enqueue_campaign, run_worker

    verify_sender()
    boto3.client("s3", region_name=REGION).create_bucket(Bucket="TEMPLATE_BUCKET")
    url = boto3.client("sqs", region_name=REGION).create_queue(QueueName="SEND_QUEUE")["QueueUrl"]
    state = open_state(f"dynamodb://STATE_TABLE?region={REGION}")
    config = CampaignConfig(
        template=str(template_file),
        source=str(make_csv(tmp_path / "r.csv", 3)),
        transport=f"ses://{REGION}",
        rate=2,  # three rows take a second: the heartbeat (every 0.5 s) extends the job
        campaign="c",
    )
    assert enqueue_campaign(config, url, state, template_bucket="TEMPLATE_BUCKET").jobs == 1
    summary = run_worker(url, state, max_jobs=1, wait_seconds=0, visibility=1)
    assert summary.sent == 3
    queue_calls = {c for c in recorder.calls if c[0] in ("sqs", "s3")}
    assert queue_calls == {
        ("s3", "PutObject"),
        ("s3", "GetObject"),
        ("sqs", "SendMessageBatch"),
        ("sqs", "ReceiveMessage"),
        ("sqs", "ChangeMessageVisibility"),
        ("sqs", "DeleteMessage"),
    }
    assert not_allowed(recorder.calls) == []
