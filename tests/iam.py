"""IAMpolicy.json as the tests see it: which actions it allows, and which AWS calls it would refuse.

An AWS API operation maps to the IAM action `<signing name>:<operation>` (SES v1 and v2 both
sign as `ses`), except for the few S3 and SQS batch operations IAM names differently.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

POLICY_PATH = Path(__file__).resolve().parents[1] / "IAMpolicy.json"

# Operations whose IAM action is not simply their own name.
_RENAMED = {
    ("s3", "HeadObject"): "s3:GetObject",
    ("s3", "ListObjectsV2"): "s3:ListBucket",
    ("s3", "HeadBucket"): "s3:ListBucket",
    # SQS batch calls are authorised by the single-message action.
    ("sqs", "DeleteMessageBatch"): "sqs:DeleteMessage",
    ("sqs", "ChangeMessageVisibilityBatch"): "sqs:ChangeMessageVisibility",
    ("sqs", "SendMessageBatch"): "sqs:SendMessage",
}


def load_policy(path: Path = POLICY_PATH) -> dict[str, Any]:
    policy: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return policy


def statements(policy: dict[str, Any]) -> list[dict[str, Any]]:
    found = policy["Statement"]
    return found if isinstance(found, list) else [found]


def as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def allowed_actions(policy: dict[str, Any] | None = None) -> set[str]:
    policy = policy or load_policy()
    actions: set[str] = set()
    for statement in statements(policy):
        if statement.get("Effect") == "Allow":
            actions.update(as_list(statement.get("Action", [])))
    return actions


def action_for(signing_name: str, operation: str) -> str:
    return _RENAMED.get((signing_name, operation), f"{signing_name}:{operation}")


def not_allowed(
    calls: Iterable[tuple[str, str]], policy: dict[str, Any] | None = None
) -> list[str]:
    """The calls (signing name, operation) the policy does not allow, as readable lines."""
    allowed = allowed_actions(policy)
    return sorted(
        f"{service} {operation} needs {action_for(service, operation)}"
        for service, operation in set(calls)
        if action_for(service, operation) not in allowed
    )
