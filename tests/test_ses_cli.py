"""The SES features as users run them: `smartmail send` and `smartmail quota`.

One test runs the real command in a subprocess against a moto server on 127.0.0.1 (recipients
in moto S3, messages read back from the server's /moto-api/data.json); the others call the
CLI entry point in process under moto's `mock_aws`, with Stubber where SES must misbehave.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws
from moto.server import ThreadedMotoServer

from smartmail import RetryPolicy, aws, cli
from smartmail import retry as retry_module
from smartmail.quota import sender_identity

from .aws_helpers import REGION, StubPlan, parse, ses_backend, verify_sender
from .conftest import make_csv

pytestmark = pytest.mark.usefixtures("aws_env", "in_tmp_folder")


@pytest.fixture
def in_tmp_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`send` writes SOURCE.failed.csv into the current folder: keep it out of the repository."""
    monkeypatch.chdir(tmp_path)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run `smartmail ARGS` in process; return (exit code, stdout, stderr with lines joined)."""
    code: int | str | None = 0
    try:
        cli.main(args)
    except SystemExit as exited:
        code = exited.code
    out, err = capsys.readouterr()
    return (code if isinstance(code, int) else 1), out, " ".join(err.split())


def send_args(csv_path: Path, template: Path, *extra: str) -> list[str]:
    return [
        "send", str(csv_path), "-t", str(template), "--transport", f"ses://{REGION}",
        "--yes", "--progress", "none", *extra,
    ]  # fmt: skip


@pytest.fixture
def no_retry_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's retry policy, with every wait (and its jitter) at zero."""
    # The pipeline imports RetryPolicy from smartmail.retry when a campaign runs.
    monkeypatch.setattr(
        retry_module, "RetryPolicy", functools.partial(RetryPolicy, maximum=0.0, jitter=0.0)
    )


# --- the whole command, in a subprocess, against a moto server ----------------------------------


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.mark.slow
def test_send_from_s3_through_ses_as_a_subprocess(
    moto_endpoint: str, tmp_path: Path, template_file: Path
) -> None:
    s3 = boto3.client("s3", region_name=REGION, endpoint_url=moto_endpoint)
    s3.create_bucket(Bucket="lists")
    s3.put_object(
        Bucket="lists",
        Key="spring/recipients.csv",
        Body=make_csv(tmp_path / "r.csv", 5).read_bytes(),
    )
    verify_sender(endpoint_url=moto_endpoint)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=moto_endpoint,
        AWS_ACCESS_KEY_ID="AKIDEXAMPLETESTING00",
        AWS_SECRET_ACCESS_KEY="testing-secret-key",
        AWS_DEFAULT_REGION=REGION,
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    command = [
        sys.executable, "-m", "smartmail", "send", "s3://lists/spring/recipients.csv",
        "-t", str(template_file), "--transport", f"ses://{REGION}", "--rate", "50",
        "--tag", "wave=1", "--report", "report.json", "--yes",
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["sent"], report["failed"], report["transport"]) == (5, 0, "ses://us-east-1")
    assert report["rate_configured"] == 50.0

    with urllib.request.urlopen(f"{moto_endpoint}/moto-api/data.json", timeout=10) as answer:
        state = json.load(answer)
    sent = {m["destinations"][0]: m for m in state["ses"]["RawMessage"]}
    assert sorted(sent) == [f"user{i}@example.org" for i in range(5)]
    mime = parse(sent["user3@example.org"]["raw_data"])
    assert mime["Subject"] == "Hello User 3"
    assert mime["From"] == "Acme <news@acme.example>"
    body = mime.get_body(("plain",))
    assert body is not None and "your code is C00003" in body.get_content()


@mock_aws
def test_a_proof_to_an_address_ses_cannot_send_to_is_refused_with_nothing_sent(
    tmp_path: Path, template_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    verify_sender()
    args = send_args(make_csv(tmp_path / "r.csv", 2), template_file, "--rate", "50")
    code, _, err = run_cli([*args, "--test-to", "jörg@example.org"], capsys)
    assert code == 2
    assert "--test-to" in err and "non-ASCII local part" in err and "SMTPUTF8" in err
    assert ses_backend().sent_messages == []


# --- the 24-hour quota --------------------------------------------------------------------------


@mock_aws
def test_a_run_larger_than_the_quota_left_is_refused_with_nothing_sent(
    tmp_path: Path, template_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    verify_sender()
    ses_backend().sent_message_count = 197
    code, _, err = run_cli(
        send_args(make_csv(tmp_path / "r.csv", 5), template_file, "--rate", "50"), capsys
    )
    assert code == 2
    assert "5 messages to send but only 3 of the SES 24-hour quota of 200 are left" in err
    assert "--allow-partial" in err
    assert ses_backend().sent_messages == []


@mock_aws
def test_allow_partial_sends_what_fits_and_leaves_the_rest(
    tmp_path: Path, template_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    verify_sender()
    ses_backend().sent_message_count = 197
    args = send_args(make_csv(tmp_path / "r.csv", 5), template_file, "--rate", "50")
    code, _, err = run_cli(
        [*args, "--allow-partial", "--report", str(tmp_path / "rep.json")], capsys
    )
    assert code == 0
    assert "sending 3 of 5 now" in err
    report = json.loads((tmp_path / "rep.json").read_text())
    assert (report["sent"], report["unsent"]) == (3, 2)
    sent = sorted(m.destinations[0] for m in ses_backend().sent_messages)
    assert sent == ["user0@example.org", "user1@example.org", "user2@example.org"]


@mock_aws
def test_a_used_up_quota_stops_before_sending_with_exit_4(
    tmp_path: Path, template_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    verify_sender()
    ses_backend().sent_message_count = 200
    args = send_args(make_csv(tmp_path / "r.csv", 2), template_file, "--rate", "50")
    code, _, err = run_cli([*args, "--allow-partial"], capsys)
    assert code == 4
    assert "used up" in err
    assert ses_backend().sent_messages == []


@mock_aws
def test_without_rate_the_run_goes_at_the_accounts_max_send_rate(
    tmp_path: Path, template_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    verify_sender()
    args = send_args(make_csv(tmp_path / "r.csv", 2), template_file)
    code, _, _ = run_cli([*args, "--report", str(tmp_path / "rep.json")], capsys)
    assert code == 0
    report = json.loads((tmp_path / "rep.json").read_text())
    assert (report["sent"], report["rate_configured"]) == (2, 1.0)


# --- errors as the user sees them ---------------------------------------------------------------


@mock_aws
def test_unverified_sender_stops_the_run_with_exit_4(
    tmp_path: Path, template_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = send_args(make_csv(tmp_path / "r.csv", 3), template_file, "--rate", "50")
    code, _, _ = run_cli([*args, "--report", str(tmp_path / "rep.json")], capsys)
    assert code == 4
    report = json.loads((tmp_path / "rep.json").read_text())
    assert (report["sent"], report["failed"], report["unsent"]) == (0, 0, 3)
    assert "news@acme.example" in report["stopped"]
    assert ses_backend().sent_messages == []


@mock_aws
@pytest.mark.usefixtures("no_retry_waits")
def test_throttles_and_the_adapted_rate_show_in_the_summary_and_report(
    tmp_path: Path, template_file: Path, capsys: pytest.CaptureFixture[str], stub_ses: StubPlan
) -> None:
    stub_ses.error("Throttling", "Maximum sending rate exceeded.").ok("a").ok("b")
    args = send_args(
        make_csv(tmp_path / "r.csv", 2), template_file, "--rate", "50", "--workers", "1"
    )
    code, out, _ = run_cli([*args, "--report", str(tmp_path / "rep.json")], capsys)
    assert code == 0
    report = json.loads((tmp_path / "rep.json").read_text())
    assert (report["sent"], report["retries"], report["throttles"], report["slowdowns"]) == (
        2,
        1,
        1,
        1,
    )
    assert report["rate_lowest"] == 25.0
    assert "throttled" in out and "lowest 25.00/s" in out


@mock_aws
def test_daily_quota_mid_run_exits_4_and_lists_the_unsent_rows_for_later(
    tmp_path: Path, template_file: Path, capsys: pytest.CaptureFixture[str], stub_ses: StubPlan
) -> None:
    stub_ses.ok("a").error("Throttling", "Daily message quota exceeded.")
    args = send_args(
        make_csv(tmp_path / "r.csv", 4), template_file, "--rate", "50", "--workers", "1"
    )
    failed_csv = tmp_path / "left.csv"
    code, _, _ = run_cli([*args, "--failed-csv", str(failed_csv)], capsys)
    assert code == 4
    with failed_csv.open(newline="") as fh:
        left = list(csv.DictReader(fh))
    assert [r["email"] for r in left] == [
        "user1@example.org",
        "user2@example.org",
        "user3@example.org",
    ]
    assert all("Daily message quota exceeded" in r["error"] for r in left)


# --- smartmail quota ----------------------------------------------------------------------------


@mock_aws
def test_quota_command_shows_limits_usage_identity_and_sandbox(
    capsys: pytest.CaptureFixture[str],
) -> None:
    verify_sender()
    ses_backend().sent_message_count = 12
    code, out, err = run_cli(
        ["quota", "--transport", f"ses://{REGION}", "--from", "news@acme.example"], capsys
    )
    assert code == 0
    for expected in ("us-east-1", "1 msg/s", "200", "12", "188", "verified (identity acme.example"):
        assert expected in out
    assert "sandboxed" in err


@mock_aws
def test_quota_command_json_and_an_unverified_sender_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = [
        "quota",
        "--transport",
        "ses+smtp://us-east-1:465",
        "--from",
        "x@other.example",
        "--json",
    ]
    code, out, _ = run_cli(args, capsys)
    assert code == 2
    data: dict[str, Any] = json.loads(out)
    assert data["quota"]["remaining"] == 200 and data["sandboxed"] is True
    assert data["identity"] == {
        "sender": "x@other.example", "identity": None, "verified": False, "status": "NOT_FOUND",
    }  # fmt: skip
    assert any("not verified" in w for w in data["warnings"])


def test_quota_command_refuses_a_non_ses_transport(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["quota", "--transport", "smtp://localhost:587"], capsys)
    assert code == 2 and "not an SES transport" in err


def identity_answers(monkeypatch: pytest.MonkeyPatch, answers: dict[str, str | None]) -> None:
    """SES v2 GetEmailIdentity answers per identity (None: not found), on smartmail's client."""

    def hook(client: Any) -> None:
        if client.meta.service_model.service_name != "sesv2":
            return
        stubber = Stubber(client)
        for identity, status in answers.items():
            params = {"EmailIdentity": identity}
            if status is None:
                stubber.add_client_error(
                    "get_email_identity", "NotFoundException", http_status_code=404,
                    expected_params=params,
                )  # fmt: skip
            else:
                answer = {
                    "VerificationStatus": status,
                    "VerifiedForSendingStatus": status == "SUCCESS",
                }
                stubber.add_response("get_email_identity", answer, expected_params=params)
        stubber.activate()

    monkeypatch.setattr(aws, "CLIENT_HOOKS", [*aws.CLIENT_HOOKS, hook])


@pytest.mark.parametrize(
    ("answers", "verified", "via"),
    [
        ({"news@acme.example": "PENDING", "acme.example": "SUCCESS"}, True, "acme.example"),
        ({"news@acme.example": "SUCCESS"}, True, "news@acme.example"),
        ({"news@acme.example": "PENDING", "acme.example": None}, False, "news@acme.example"),
        ({"news@acme.example": None, "acme.example": "FAILED"}, False, "acme.example"),
    ],
)
def test_sender_is_verified_by_its_address_or_its_domain(
    monkeypatch: pytest.MonkeyPatch, answers: dict[str, str | None], verified: bool, via: str
) -> None:
    identity_answers(monkeypatch, answers)
    status = sender_identity(REGION, "news@acme.example")
    assert (status.verified, status.identity) == (verified, via)
