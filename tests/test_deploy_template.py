"""deploy/template.yaml: the SAM transform succeeds offline (no credentials, no network), and
the deployed pieces keep the promises docs/scale-out.md makes: timeouts consistent with the
visibility timeout and the ledger's lease, the dead-letter queue after 3 receives, the alarms,
the table the code would create, least-privilege roles consistent with IAMpolicy.json.
(`make lint` runs cfn-lint on the same file.)
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from cfnlint.decode import cfn_yaml
from samtranslator.translator.transform import transform

from smartmail import aws_lambda
from smartmail.dynamo import DEFAULT_LEASE_SECONDS, TABLE_SCHEMA, TTL_ATTRIBUTE

from .iam import allowed_actions, as_list

TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "template.yaml"
PARAMETERS = {
    "SenderDomain": "acme.example",
    "AlertEmail": "ops@acme.example",
}
LEDGER_CALLS = {
    "dynamodb:DescribeTable",
    "dynamodb:GetItem",
    "dynamodb:BatchGetItem",
    "dynamodb:UpdateItem",
}


class NoManagedPolicies:
    """The translator's managed-policy loader asks IAM; the template needs no lookup."""

    def load(self) -> dict[str, str]:
        raise AssertionError("the template must not need IAM managed-policy lookups")


@pytest.fixture(scope="module")
def source() -> dict[str, Any]:
    # cfn-lint's loader reads the short forms (!Ref, !Sub, !GetAtt) and the YAML anchors.
    template: dict[str, Any] = json.loads(json.dumps(cfn_yaml.load(str(TEMPLATE))))
    return template


@pytest.fixture(scope="module")
def resources(source: dict[str, Any]) -> dict[str, Any]:
    """The transformed template, as CloudFormation would receive it after `sam package`."""
    mp = pytest.MonkeyPatch()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        mp.delenv(name, raising=False)
    mp.setenv("AWS_DEFAULT_REGION", "eu-west-1")  # a fake region: no call is made with it
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    try:
        packaged = copy.deepcopy(source)
        packaged["Globals"]["Function"]["CodeUri"] = "s3://artifacts-bucket/smartmail.zip"
        out = transform(packaged, dict(PARAMETERS), NoManagedPolicies())
    finally:
        mp.undo()
    found: dict[str, Any] = out["Resources"]
    return found


def of_type(resources: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {k: v["Properties"] for k, v in resources.items() if v["Type"] == kind}


def test_the_functions_point_at_the_package_handlers_on_python_3_12(
    resources: dict[str, Any],
) -> None:
    functions = of_type(resources, "AWS::Lambda::Function")
    assert {name: f["Handler"] for name, f in functions.items()} == {
        "SenderFunction": "smartmail.aws_lambda.send_handler",
        "UploadFunction": "smartmail.aws_lambda.upload_handler",
        "FeedbackFunction": "smartmail.aws_lambda.feedback_handler",
    }
    assert {f["Runtime"] for f in functions.values()} == {"python3.12"}
    assert all("ReservedConcurrentExecutions" in f for f in functions.values())
    assert callable(aws_lambda.feedback_handler)
    for f in functions.values():
        env = f["Environment"]["Variables"]
        assert env["SMARTMAIL_STATE"] == {"Fn::Sub": "dynamodb://${StateTable}"}
        assert f["LoggingConfig"]["LogFormat"] == "JSON"


def test_timeouts_fit_the_visibility_timeout_and_the_ledger_lease(
    resources: dict[str, Any],
) -> None:
    sender = resources["SenderFunction"]["Properties"]
    queue = resources["SendQueue"]["Properties"]
    assert queue["VisibilityTimeout"] >= 6 * sender["Timeout"]
    # A claim must outlive any invocation, or a slow live worker would look dead (in doubt).
    assert sender["Timeout"] < DEFAULT_LEASE_SECONDS
    assert queue["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": ["SendDeadLetterQueue", "Arn"]},
        "maxReceiveCount": 3,
    }
    [mapping] = of_type(resources, "AWS::Lambda::EventSourceMapping").values()
    assert mapping["EventSourceArn"] == {"Fn::GetAtt": ["SendQueue", "Arn"]}
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    # Rate sharing: no more senders than the rate was divided by.
    assert mapping["ScalingConfig"]["MaximumConcurrency"] == {"Ref": "SenderConcurrency"}
    assert sender["ReservedConcurrentExecutions"] == {"Ref": "SenderConcurrency"}
    env = sender["Environment"]["Variables"]
    assert env["SMARTMAIL_EXPECTED_WORKERS"] == {"Ref": "SenderConcurrency"}
    assert env["SMARTMAIL_ACCOUNT_RATE"] == {"Ref": "MaxSendRate"}


def test_uploads_start_the_enqueue_function_and_ses_feedback_reaches_its_handler(
    resources: dict[str, Any],
) -> None:
    bucket = resources["UploadBucket"]["Properties"]
    assert bucket["NotificationConfiguration"]["EventBridgeConfiguration"] == {
        "EventBridgeEnabled": True
    }
    [rule] = of_type(resources, "AWS::Events::Rule").values()
    assert rule["EventPattern"]["detail-type"] == ["Object Created"]
    assert rule["EventPattern"]["detail"]["bucket"]["name"] == [{"Ref": "UploadBucket"}]
    assert rule["Targets"][0]["Arn"] == {"Fn::GetAtt": ["UploadFunction", "Arn"]}
    assert rule["Targets"][0]["DeadLetterConfig"] == {
        "Arn": {"Fn::GetAtt": ["UploadDeadLetterQueue", "Arn"]}
    }
    subscriptions = of_type(resources, "AWS::SNS::Subscription")
    lambda_subs = [s for s in subscriptions.values() if s["Protocol"] == "lambda"]
    assert lambda_subs == [
        {
            "Protocol": "lambda",
            "Endpoint": {"Fn::GetAtt": ["FeedbackFunction", "Arn"]},
            "TopicArn": {"Ref": "SesNotificationsTopic"},
        }
    ]
    destination = resources["ConfigurationSetEventDestination"]["Properties"]["EventDestination"]
    assert destination["SnsDestination"] == {"TopicARN": {"Ref": "SesNotificationsTopic"}}
    assert {"bounce", "complaint"} <= set(destination["MatchingEventTypes"])


def test_the_state_table_is_the_one_the_code_creates(resources: dict[str, Any]) -> None:
    table = resources["StateTable"]["Properties"]
    assert table["BillingMode"] == "PAY_PER_REQUEST"
    for key in ("AttributeDefinitions", "KeySchema", "GlobalSecondaryIndexes"):
        assert table[key] == TABLE_SCHEMA[key]
    assert table["TimeToLiveSpecification"] == {"AttributeName": TTL_ATTRIBUTE, "Enabled": True}


def test_alarms_on_the_dead_letter_queue_and_sender_errors_mail_the_alert_address(
    resources: dict[str, Any],
) -> None:
    alarms = of_type(resources, "AWS::CloudWatch::Alarm")
    dlq = alarms["SendDeadLetterAlarm"]
    assert dlq["Dimensions"] == [
        {"Name": "QueueName", "Value": {"Fn::GetAtt": ["SendDeadLetterQueue", "QueueName"]}}
    ]
    assert (dlq["Threshold"], dlq["ComparisonOperator"]) == (1, "GreaterThanOrEqualToThreshold")
    watched = {
        a["Dimensions"][0]["Value"]["Fn::GetAtt"][0]
        for a in alarms.values()
        if a["Namespace"] == "AWS/SQS"
    }
    assert watched == {"SendDeadLetterQueue", "FeedbackDeadLetterQueue", "UploadDeadLetterQueue"}
    errors = alarms["SenderErrorsAlarm"]
    assert (errors["Namespace"], errors["MetricName"]) == ("AWS/Lambda", "Errors")
    assert errors["Dimensions"] == [{"Name": "FunctionName", "Value": {"Ref": "SenderFunction"}}]
    assert all(a["AlarmActions"] == [{"Ref": "AlertsTopic"}] for a in alarms.values())
    [mail] = [
        s for s in of_type(resources, "AWS::SNS::Subscription").values() if s["Protocol"] == "email"
    ]
    assert mail == {
        "Protocol": "email",
        "Endpoint": {"Ref": "AlertEmail"},
        "TopicArn": {"Ref": "AlertsTopic"},
    }


def _role_actions(resources: dict[str, Any], role: str) -> dict[str, list[Any]]:
    """Each action the role allows, with the resources it is allowed on."""
    actions: dict[str, list[Any]] = {}
    for policy in resources[role]["Properties"]["Policies"]:
        for statement in policy["PolicyDocument"]["Statement"]:
            assert statement["Effect"] == "Allow"
            for action in as_list(statement["Action"]):
                assert "*" not in action, action
                actions.setdefault(action, []).extend(
                    statement["Resource"]
                    if isinstance(statement["Resource"], list)
                    else [statement["Resource"]]
                )
    return actions


def test_each_function_has_its_own_least_privilege_role(resources: dict[str, Any]) -> None:
    functions = of_type(resources, "AWS::Lambda::Function")
    roles = {name: f["Role"]["Fn::GetAtt"][0] for name, f in functions.items()}
    assert roles == {
        "SenderFunction": "SenderRole",
        "UploadFunction": "UploadRole",
        "FeedbackFunction": "FeedbackRole",
    }
    assert not any(
        r["Properties"].get("ManagedPolicyArns")
        for r in resources.values()
        if r["Type"] == "AWS::IAM::Role"
    )
    policy = allowed_actions()
    for role in roles.values():
        for action, where in _role_actions(resources, role).items():
            if where == ["*"]:
                assert action == "ses:GetSendQuota"  # it has no resource-level permission
            if action.startswith(("dynamodb:", "ses:")):
                assert action in policy, f"{role}: {action} is not in IAMpolicy.json"
    sender = _role_actions(resources, "SenderRole")
    feedback = _role_actions(resources, "FeedbackRole")
    assert set(sender) >= LEDGER_CALLS
    assert "dynamodb:DeleteItem" not in sender and "dynamodb:CreateTable" not in sender
    assert "dynamodb:Query" not in sender  # claims and outcomes are by key
    assert {"dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:Query"} <= set(
        feedback
    )
    assert not any(a.startswith(("ses:", "s3:")) for a in feedback)
    assert "sqs:SendMessage" in _role_actions(resources, "UploadRole")
