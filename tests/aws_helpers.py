"""Shared set-up for the AWS tests: hermetic fake credentials, moto's SES state, stubbed clients.

Fixtures here are imported by name into the test modules that use them.
"""

from __future__ import annotations

import email
import email.policy
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from smartmail import aws

REGION = "us-east-1"
SENDER_DOMAIN = "acme.example"
ACCOUNT_ID = "123456789012"


def _fresh_session() -> None:
    """smartmail keeps one boto3 Session per thread; start each test from a new one."""
    if hasattr(aws._local, "session"):
        del aws._local.session


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Fake credentials and a region, and nothing from the machine's own AWS set-up."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLETESTING00")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    _fresh_session()
    yield
    _fresh_session()


def verify_sender(domain: str = SENDER_DOMAIN, **client_kw: Any) -> None:
    """moto refuses unverified senders, like SES: verify the domain first (test set-up client)."""
    boto3.client("sesv2", region_name=REGION, **client_kw).create_email_identity(
        EmailIdentity=domain
    )


def ses_backend() -> Any:
    from moto.ses.models import ses_backends

    return ses_backends[ACCOUNT_ID][REGION]


def parse(raw: str | bytes) -> EmailMessage:
    data = raw.encode("utf-8") if isinstance(raw, str) else raw
    msg = email.message_from_bytes(data, policy=email.policy.SMTP)
    assert isinstance(msg, EmailMessage)
    return msg


@dataclass
class StubPlan:
    """What every sesv2 client smartmail makes will answer, in order, through botocore's Stubber."""

    answers: list[tuple[str, ...]] = field(default_factory=list)
    stubbers: list[Stubber] = field(default_factory=list)
    params: list[dict[str, Any]] = field(default_factory=list)

    def ok(self, message_id: str) -> StubPlan:
        self.answers.append(("ok", message_id))
        return self

    def error(self, code: str, message: str, status: int = 400) -> StubPlan:
        self.answers.append(("error", code, message, str(status)))
        return self

    def hook(self, client: Any) -> None:
        if client.meta.service_model.service_name != "sesv2":
            return
        client.meta.events.register("before-parameter-build.sesv2.SendEmail", self._capture)
        stubber = Stubber(client)
        for answer in self.answers:
            if answer[0] == "ok":
                stubber.add_response("send_email", {"MessageId": answer[1]})
            else:
                stubber.add_client_error(
                    "send_email",
                    service_error_code=answer[1],
                    service_message=answer[2],
                    http_status_code=int(answer[3]),
                )
        stubber.activate()
        self.stubbers.append(stubber)

    def _capture(self, params: dict[str, Any], **_: Any) -> None:
        self.params.append(dict(params))


@pytest.fixture
def stub_ses(monkeypatch: pytest.MonkeyPatch) -> StubPlan:
    """Answer SES v2 SendEmail from a plan instead of the network, on the real clients."""
    plan = StubPlan()
    monkeypatch.setattr(aws, "CLIENT_HOOKS", [*aws.CLIENT_HOOKS, plan.hook])
    return plan


@pytest.fixture
def capture_ses(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record the SendEmail parameters smartmail builds, while the call still goes to moto."""
    seen: list[dict[str, Any]] = []

    def capture(params: dict[str, Any], **_: Any) -> None:
        seen.append(dict(params))

    def hook(client: Any) -> None:
        client.meta.events.register("before-parameter-build.sesv2.SendEmail", capture)

    monkeypatch.setattr(aws, "CLIENT_HOOKS", [*aws.CLIENT_HOOKS, hook])
    return seen
