"""`--state dynamodb://TABLE` on the commands users run: send, dry-run, retry, status, suppress
and events keep their promises against the shared table, and two `send` processes of one
campaign at once send each recipient exactly once (claims, not a campaign lock)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from click.testing import CliRunner
from moto import mock_aws

from smartmail import MessageTemplate, RecipientSource, SendOptions, SourceSpec, send_campaign
from smartmail.cli import cli
from smartmail.dynamo_ledger import DynamoLedger
from smartmail.errors import AlreadyClaimedError
from smartmail.message import OutgoingMessage
from smartmail.report import Outcome
from smartmail.sources import Row
from smartmail.state_dynamodb import DynamoState, open_state
from smartmail.terminal import printable
from smartmail.transports import TransportOptions, get_transport

from .aws_helpers import REGION, StubPlan, verify_sender
from .conftest import SmtpServer, make_csv, run_main
from .dynamo_helpers import atomic_moto, serialise_moto_item_writes
from .test_events import Feed, bounce

__all__ = ["atomic_moto"]
URL = f"dynamodb://cli-state?region={REGION}"


@pytest.fixture
def ddb(aws_env: None, atomic_moto: None) -> Iterator[str]:
    with mock_aws():
        yield URL


def send_args(csv_path: Path, template: Path, transport: str, *extra: str) -> list[str]:
    return [
        "send", str(csv_path), "-t", str(template), "--transport", transport,
        "--smtp-security", "none", "--yes", "--progress", "none", "--campaign", "spring",
        "--failed-csv", str(csv_path.with_suffix(".failed.csv")), *extra,
    ]  # fmt: skip


def outbox_send(csv_path: Path, template: Path, outbox: Path, state: str) -> list[str]:
    return send_args(csv_path, template, f"file://{outbox}", "--state", state)


def status_of(url: str, campaign: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code, out, err = run_main(["status", campaign, "--state", url, "--json"], capsys)
    assert code == 0, err
    [found] = json.loads(out)
    assert isinstance(found, dict)
    return found


def per_recipient(outbox: Path) -> Counter[str]:
    return Counter(p.name.split("-", 1)[1].rsplit("-", 1)[0] for p in outbox.glob("*.eml"))


# --- send, re-run, status, retry ------------------------------------------------------------------


def test_send_then_rerun_sends_nothing_twice_and_status_reads_the_table(
    ddb: str,
    tmp_path: Path,
    template_file: Path,
    smtp_server: SmtpServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    csv_path = make_csv(tmp_path / "list.csv", 6)
    smtp_server.handler.reject_rcpt = {"user4@example.org"}
    args = send_args(csv_path, template_file, smtp_server.url, "--state", ddb)
    code, out, err = run_main(args, capsys)
    assert code == 1, err  # one row refused for good
    assert len(smtp_server.handler.received) == 5

    code, out, err = run_main(args, capsys)
    assert code == 0, err
    assert len(smtp_server.handler.received) == 5, "a re-run sends nothing twice"
    assert "already sent: 5" in out

    status = status_of(ddb, "spring", capsys)
    assert (status["sent"], status["failed"], status["in_doubt"]) == (5, 1, 0)
    code, out, _ = run_main(["status", "--state", ddb], capsys)
    assert code == 0 and "spring" in out and f"campaigns in {URL}" in out

    # retry reads the campaign's settings and rows from the table, and sends the failed row.
    smtp_server.handler.reject_rcpt = set()
    code, out, err = run_main(["retry", "spring", "--state", ddb, "--yes"], capsys)
    assert code == 0, err
    got = [r.rcpt_tos for r in smtp_server.handler.received]
    assert got.count(["user4@example.org"]) == 1 and len(got) == 6
    status = status_of(ddb, "spring", capsys)
    assert (status["sent"], status["failed"]) == (6, 0)
    code, out, _ = run_main(["retry", "spring", "--state", ddb, "--yes"], capsys)
    assert code == 0 and "nothing to retry" in out


def test_a_campaign_whose_id_holds_controls_is_named_back_in_the_table_as_status_shows_it(
    ddb: str,
    tmp_path: Path,
    template_file: Path,
    smtp_server: SmtpServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    csv_path = make_csv(tmp_path / "ev\x1b[31mil\u202e\u200bx000.csv", 2)
    smtp_server.handler.reject_rcpt = {"user1@example.org"}
    args = send_args(csv_path, template_file, smtp_server.url, "--state", ddb)
    args.remove("--campaign")
    args.remove("spring")  # the id derived from the file's name
    assert run_main(args, capsys)[0] == 1
    code, out, _ = run_main(["status", "--state", ddb], capsys)
    assert code == 0 and "ev\\x1b[31mil\\u202e\\u200bx000-" in out
    [raw] = [c.campaign for c in open_state(ddb).statuses()]
    shown = printable(raw)
    assert shown in out
    assert status_of(ddb, shown, capsys)["campaign"] == raw
    smtp_server.handler.reject_rcpt = set()
    code, out, err = run_main(["retry", shown, "--state", ddb, "--yes"], capsys)
    assert code == 0, err
    assert len(smtp_server.handler.received) == 2
    assert status_of(ddb, shown, capsys)["sent"] == 2


def test_dry_run_reads_the_table_and_state_env_may_hold_the_url(
    ddb: str,
    tmp_path: Path,
    template_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SMARTMAIL_STATE", ddb)
    csv_path = make_csv(tmp_path / "list.csv", 3)
    outbox = tmp_path / "outbox"
    code, _, err = run_main(
        send_args(csv_path, template_file, f"file://{outbox}", "--limit", "2"), capsys
    )
    assert code == 0, err
    assert sorted(per_recipient(outbox)) == ["user0@example.org", "user1@example.org"]
    code, out, _ = run_main(
        ["dry-run", str(csv_path), "-t", str(template_file), "--campaign", "spring"], capsys
    )
    assert code == 0
    assert "already sent" in out  # the rows the table holds
    default_file = Path(os.environ["XDG_STATE_HOME"]) / "smartmail" / "smartmail.db"
    assert not default_file.exists(), "$SMARTMAIL_STATE named the table; no SQLite file made"
    assert open_state(ddb).statuses("spring")[0].sent == 2


def test_a_dead_workers_claim_is_in_doubt_shown_by_status_and_sent_only_by_retry_in_doubt(
    ddb: str,
    tmp_path: Path,
    template_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"{ddb}&lease=1"
    csv_path = make_csv(tmp_path / "list.csv", 3)
    outbox = tmp_path / "outbox"
    # A worker claimed user1 and died before its outcome: a lease of one second runs out.
    dead = open_state(url).ledger("spring")
    dead.acquire()
    row = Row(3, {"email": "user1@example.org", "name": "User 1", "code": "C00001"})
    dead.sending(_message("user1@example.org", row))
    time.sleep(1.2)

    code, out, err = run_main(outbox_send(csv_path, template_file, outbox, url), capsys)
    assert code == 0, err
    assert sorted(per_recipient(outbox)) == ["user0@example.org", "user2@example.org"]
    status = status_of(url, "spring", capsys)
    assert (status["sent"], status["in_doubt"], status["in_flight"]) == (2, 1, 0)
    code, out, _ = run_main(["status", "--state", url], capsys)
    assert code == 0 and "spring" in out and "(running)" not in out

    code, out, err = run_main(outbox_send(csv_path, template_file, outbox, url), capsys)
    assert code == 0, err
    assert len(per_recipient(outbox)) == 2, "a plain re-run never sends an in-doubt row"

    code, out, err = run_main(["retry", "spring", "--in-doubt", "--state", url, "--yes"], capsys)
    assert code == 0, err
    assert per_recipient(outbox) == Counter(f"user{i}@example.org" for i in range(3))
    status = status_of(url, "spring", capsys)
    assert (status["sent"], status["in_doubt"]) == (3, 0)


def _message(address: str, row: Row) -> OutgoingMessage:
    return OutgoingMessage(
        sender="news@acme.example",
        recipients=[address],
        data=b"Subject: hi\r\n\r\nhello\r\n",
        message_id=f"<{row.number}.{address}@acme.example>",
        recipient=address,
        row=row,
    )


# --- suppression list and feedback ----------------------------------------------------------------


def test_suppress_commands_work_unchanged_against_the_table(
    ddb: str,
    tmp_path: Path,
    template_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def suppress(*args: str) -> Any:
        return CliRunner().invoke(cli, ["suppress", *args, "--state", ddb], catch_exceptions=False)

    added = suppress("add", "User1@Example.org", "nobody@example.org", "--detail", "by phone")
    assert added.exit_code == 0 and "suppressed 2 address(es); 0 already" in added.output
    again = suppress("add", "user1@example.org", "--reason", "complaint")
    assert "suppressed 0 address(es); 1 already" in again.output
    listed = json.loads(suppress("list", "--json").output)
    assert {(e["address"], e["reason"], e["detail"]) for e in listed} == {
        ("user1@example.org", "manual", "by phone"),
        ("nobody@example.org", "manual", "by phone"),
    }
    imported = tmp_path / "more.csv"
    imported.write_text("email,reason\nuser2@example.org,unsubscribe\nbad-address,manual\n")
    result = suppress("import", str(imported))
    assert result.exit_code == 1 and "1 newly suppressed" in result.output
    exported = tmp_path / "out.csv"
    assert suppress("export", str(exported)).exit_code == 0
    assert exported.read_text().splitlines()[0] == "email,reason,detail,created_at"
    assert len(exported.read_text().splitlines()) == 4

    outbox = tmp_path / "outbox"
    csv_path = make_csv(tmp_path / "list.csv", 3)
    code, _, err = run_main(outbox_send(csv_path, template_file, outbox, ddb), capsys)
    assert code == 0, err
    assert sorted(per_recipient(outbox)) == ["user0@example.org"]

    removed = suppress("remove", "user1@example.org", "stranger@example.org")
    assert "removed 1 address(es); 1 were not on the list" in removed.output
    assert {e["address"] for e in json.loads(suppress("list", "--json").output)} == {
        "nobody@example.org",
        "user2@example.org",
    }


def test_events_apply_bounces_to_the_table(ddb: str, capsys: pytest.CaptureFixture[str]) -> None:
    sns = boto3.client("sns", region_name=REGION)
    sqs = boto3.client("sqs", region_name=REGION)
    topic = sns.create_topic(Name="ses-feedback")["TopicArn"]
    queue = sqs.create_queue(QueueName="ses-feedback")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn)
    feed = Feed(sns, sqs, topic, queue, queue)
    state = open_state(ddb)
    ledger = state.ledger("spring")
    row = Row(2, {"email": "ann@example.org"})
    ledger.sending(_message("ann@example.org", row))
    ledger.record(Outcome(row=row, recipient="ann@example.org", status="sent", message_id="m-1"))
    feed.publish(bounce("m-1", ["ann@example.org"]))

    code, out, err = run_main(
        ["events", "--queue", queue, "--state", ddb, "--wait-seconds", "0", "--json"], capsys
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["suppressed_added"] == 1 and summary["deleted"] == 1
    assert state.suppressions.reason("ann@example.org") == "bounce"
    assert state.statuses("spring")[0].bounced == 1


# --- claims: another worker won the row -----------------------------------------------------------


@pytest.mark.parametrize(
    ("winner_outcome", "reason"), [(None, "already being sent"), ("sent", "already sent")]
)
def test_a_lost_claim_skips_the_row_and_sends_nothing(
    ddb: str,
    tmp_path: Path,
    template_file: Path,
    caplog: pytest.LogCaptureFixture,
    winner_outcome: str | None,
    reason: str,
) -> None:
    """Between this worker's check and its claim, another worker claims (or sends) user1:
    the row is skipped, not failed, with no traceback, and this worker sends it not."""
    state = open_state(ddb)
    other = state.ledger("spring")
    mine = state.ledger("spring")
    original = DynamoLedger.skip_reasons
    checks: Counter[str] = Counter()

    def checked_then_raced(self: DynamoLedger, items: list[tuple[str, Row]]) -> list[str | None]:
        verdicts = original(self, items)
        for recipient, row in items:
            if self is mine:
                checks[recipient] += 1
            # The send pass's check (pre-flight's is the first) passes; then the other wins.
            if self is mine and recipient == "user1@example.org" and checks[recipient] == 2:
                other.sending(_message(recipient, row))
                if winner_outcome:
                    won = Outcome(row=row, recipient=recipient, status="sent", message_id="x")
                    other.record(won)
        return verdicts

    csv_path = make_csv(tmp_path / "list.csv", 3)
    outbox = tmp_path / "outbox"
    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.DEBUG, "smartmail"):
        mp.setattr(DynamoLedger, "skip_reasons", checked_then_raced)
        summary = send_campaign(
            RecipientSource(SourceSpec(str(csv_path))),
            MessageTemplate.load(template_file),
            get_transport(f"file://{outbox}", TransportOptions()),
            options=SendOptions(workers=2, campaign="spring"),
            journal=mine,
        )
    assert (summary.sent, summary.failed, summary.skipped) == (2, 0, 1)
    assert summary.skip_reasons == {reason: 1}
    assert sorted(per_recipient(outbox)) == ["user0@example.org", "user2@example.org"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    [status] = state.statuses("spring")
    assert status.failed == 0 and status.skipped == 0, "the winner's row is left as it is"
    assert isinstance(_claim_lost(state), AlreadyClaimedError)


def _claim_lost(state: DynamoState) -> BaseException:
    """ClaimLost is the transport-agnostic AlreadyClaimedError the engine catches."""
    ledger = state.ledger("spring")
    row = Row(3, {"email": "user1@example.org"})
    try:
        ledger.sending(_message("user1@example.org", row))
    except Exception as exc:
        return exc
    raise AssertionError("the claim should have been lost")


# --- errors: one line, exit 2, nothing sent -------------------------------------------------------


def test_no_credentials_is_one_line_exit_2_and_nothing_sent(
    aws_env: None,
    tmp_path: Path,
    template_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    csv_path = make_csv(tmp_path / "list.csv", 2)
    outbox = tmp_path / "outbox"
    code, _, err = run_main(outbox_send(csv_path, template_file, outbox, URL), capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "no AWS credentials found" in lines[0]
    assert "nothing was sent" in lines[0]
    assert not list(outbox.glob("*.eml"))
    for command in (["status"], ["suppress", "list"]):
        code, _, err = run_main([*command, "--state", URL], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1


def test_a_bad_state_url_is_one_line_exit_2(
    tmp_path: Path, template_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv_path = make_csv(tmp_path / "list.csv", 2)
    code, _, err = run_main(
        send_args(csv_path, template_file, f"file://{tmp_path}/o", "--state", "dynamodb://x"),
        capsys,
    )
    assert code == 2 and "is not a DynamoDB table name" in err
    assert len(err.strip().splitlines()) == 1


# --- rate across workers --------------------------------------------------------------------------


@pytest.mark.usefixtures("aws_env")
@mock_aws
def test_expected_workers_share_the_account_rate_and_a_throttle_slows_not_fails(
    tmp_path: Path,
    template_file: Path,
    capsys: pytest.CaptureFixture[str],
    stub_ses: StubPlan,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from smartmail import RetryPolicy
    from smartmail import retry as retry_module

    monkeypatch.setattr(retry_module, "RetryPolicy", _no_wait(RetryPolicy))
    from moto.ses import models as ses_models

    verify_sender()
    # moto's account sends 1/s; a real one out of the sandbox, say 40/s, shared by 4 workers.
    real_init = ses_models.SESQuota.__init__

    def account_of_40(quota: Any, sent: int) -> None:
        real_init(quota, sent)
        quota.max_send_rate = 40

    monkeypatch.setattr(ses_models.SESQuota, "__init__", account_of_40)
    account = boto3.client("ses", region_name=REGION).get_send_quota()["MaxSendRate"]
    assert account == 40
    stub_ses.error("Throttling", "Maximum sending rate exceeded.").ok("a").ok("b").ok("c")
    report = tmp_path / "report.json"
    args = [
        "send", str(make_csv(tmp_path / "r.csv", 3)), "-t", str(template_file),
        "--transport", f"ses://{REGION}", "--yes", "--progress", "none", "--workers", "1",
        "--expected-workers", "4", "--report", str(report), "--no-state",
    ]  # fmt: skip
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    got = json.loads(report.read_text())
    assert got["rate_configured"] == pytest.approx(account / 4)
    assert (got["sent"], got["failed"], got["throttles"], got["slowdowns"]) == (3, 0, 1, 1)
    assert got["rate_lowest"] == pytest.approx(account / 8)


def _no_wait(policy: Any) -> Any:
    import functools

    return functools.partial(policy, maximum=0.0, jitter=0.0)


# --- two whole `send` processes of one campaign at once -------------------------------------------


@pytest.mark.slow
def test_two_send_processes_of_one_campaign_send_each_recipient_once(
    aws_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, template_file: Path
) -> None:
    from moto.server import ThreadedMotoServer

    serialise_moto_item_writes(monkeypatch)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="AKIDEXAMPLETESTING00",
            AWS_SECRET_ACCESS_KEY="testing-secret-key",
            AWS_DEFAULT_REGION=REGION,
            AWS_CONFIG_FILE=str(tmp_path / "none"),
            AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
            AWS_EC2_METADATA_DISABLED="true",
            SMARTMAIL_STATE=URL,
        )
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        open_state(URL).ensure()  # both processes find the table made
        # 3 s of sending each (10/s), so the two runs overlap and race for the same rows:
        # their pre-flights both find them new, and each row's claim picks one sender.
        n = 30
        csv_path = make_csv(tmp_path / "list.csv", n)
        outbox = tmp_path / "outbox"

        def start(name: str) -> subprocess.Popen[str]:
            command = [
                sys.executable, "-m", "smartmail", "send", str(csv_path), "-t", str(template_file),
                "--transport", f"file://{outbox}", "--campaign", "spring", "--workers", "4",
                "--rate", "10",
                "--yes", "--progress", "none", "--report", f"{name}.json",
                "--failed-csv", f"{name}.failed.csv",
            ]  # fmt: skip
            return subprocess.Popen(
                command, cwd=tmp_path, env=env, text=True,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip

        procs = [start("one"), start("two")]
        results = [p.communicate(timeout=180) for p in procs]
        for proc, (_out, err) in zip(procs, results, strict=True):
            assert proc.returncode == 0, err
            assert "testing-secret-key" not in _out + err
        assert per_recipient(outbox) == Counter(f"user{i}@example.org" for i in range(n))
        reports = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two")]
        assert sum(r["sent"] for r in reports) == n
        assert all(r["failed"] == 0 for r in reports), "a lost claim is skipped, not failed"
        done = subprocess.run(
            [sys.executable, "-m", "smartmail", "status", "spring", "--json"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        [status] = json.loads(done.stdout)
        assert (status["sent"], status["failed"], status["in_doubt"]) == (n, 0, 0)
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("allowed", "expected"),
    [
        ([], "not authorized to perform: dynamodb:DescribeTable"),
        (["dynamodb:DescribeTable"], "not authorized to perform: dynamodb:CreateTable"),
    ],
    ids=["access-denied", "table-missing-cannot-create"],
)
def test_state_refused_by_iam_is_one_line_exit_2_without_secrets(
    aws_env: None,
    tmp_path: Path,
    template_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    allowed: list[str],
    expected: str,
) -> None:
    """Credentials that may not use the table (or may not create the missing one): nothing is
    sent, one line says why, and the secret key appears nowhere."""
    from moto.core import set_initial_no_auth_action_count

    from .aws_helpers import _fresh_session

    outbox = tmp_path / "outbox"
    csv_path = make_csv(tmp_path / "list.csv", 2)

    @set_initial_no_auth_action_count(3)  # the IAM set-up below
    def scenario() -> tuple[int, str, str]:
        iam = boto3.client("iam", region_name=REGION)
        iam.create_user(UserName="mailer")
        statement = [{"Effect": "Allow", "Action": allowed or ["s3:GetObject"], "Resource": "*"}]
        iam.put_user_policy(
            UserName="mailer",
            PolicyName="state",
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": statement}),
        )
        key = iam.create_access_key(UserName="mailer")["AccessKey"]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        _fresh_session()
        code, out, err = run_main(outbox_send(csv_path, template_file, outbox, URL), capsys)
        return code, out + err, key["SecretAccessKey"]

    with mock_aws():
        code, output, secret = scenario()
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "nothing was sent" in lines[0]
    assert secret not in output
    assert not list(outbox.glob("*.eml"))


def test_status_shows_in_doubt_and_live_claims_side_by_side(
    ddb: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a shared table a dead worker's expired claims and a live worker's claims coexist."""
    dead = open_state(f"{ddb}&lease=1").ledger("spring")
    dead.sending(_message("ann@example.org", Row(2, {"email": "ann@example.org"})))
    time.sleep(1.2)
    live = open_state(ddb).ledger("spring")
    live.sending(_message("bob@example.org", Row(3, {"email": "bob@example.org"})))
    code, out, _ = run_main(["status", "--state", ddb], capsys)
    assert code == 0
    assert "spring (running)" in out and "1 + 1 sending" in out
    status = status_of(ddb, "spring", capsys)
    assert (status["in_doubt"], status["in_flight"], status["running"]) == (1, 1, True)


def test_expected_workers_is_stored_with_the_campaign_and_checked() -> None:
    from smartmail.config import CampaignConfig
    from smartmail.errors import ConfigError

    config = CampaignConfig(template="t.txt", expected_workers=4)
    assert CampaignConfig.from_dict(config.to_dict()).expected_workers == 4
    older = {k: v for k, v in config.to_dict().items() if k != "expected_workers"}
    assert CampaignConfig.from_dict(older).expected_workers == 1  # stored before it existed
    with pytest.raises(ConfigError, match="--expected-workers"):
        CampaignConfig(template="t.txt", expected_workers=0).check()


def test_a_lambda_sender_reads_its_expected_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    from smartmail import aws_lambda
    from smartmail.errors import ConfigError

    monkeypatch.delenv("SMARTMAIL_EXPECTED_WORKERS", raising=False)
    assert aws_lambda.expected_workers_from_env() == 1
    monkeypatch.setenv("SMARTMAIL_EXPECTED_WORKERS", "5")
    assert aws_lambda.expected_workers_from_env() == 5
    for bad in ("0", "two"):
        monkeypatch.setenv("SMARTMAIL_EXPECTED_WORKERS", bad)
        with pytest.raises(ConfigError, match="SMARTMAIL_EXPECTED_WORKERS"):
            aws_lambda.expected_workers_from_env()
