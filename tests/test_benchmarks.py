"""The benchmark scripts still run: each main() with a tiny N. No speed is asserted here.

The figures in docs/benchmarks.md come from these scripts at full size; these tests only
make sure the scripts cannot rot (an API change would break them here first), and that
what they measure is real: every message reached the SMTP sink, every row was dry-run.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks import (
    bench_cli,
    bench_dryrun,
    bench_rate,
    bench_ses,
    bench_ses_api,
    bench_smtp,
    cpu_per_thread,
    run_all,
)
from smartmail.state_dynamodb import DynamoState, StateUrl
from tests import test_dynamo_state as stories


def test_bench_smtp_delivers_every_message_and_reports_rates() -> None:
    result = bench_smtp.main(["--messages", "200", "--workers", "2", "--rounds", "1"])
    assert result["smartmail_delivered"] == [200]
    assert result["bare_rate"] > 0 and result["smartmail_rate"] > 0
    assert result["ratio"] > 0
    assert result["smartmail_cpu_ms"] > 0


def test_bench_dryrun_validates_every_row_and_reports_rate_and_rss() -> None:
    result = bench_dryrun.main(["--rows", "2000"])
    assert result["valid"] == 2000
    assert result["rows_per_second"] > 0
    assert result["peak_rss_mb"] > 1


def test_bench_ses_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The script points boto3 at its own moto server through the environment: restore it after.
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "unset")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    argv = ["bench_ses.py", "--messages", "20", "--workers", "2", "--profile-messages", "10"]
    monkeypatch.setattr("sys.argv", argv)
    bench_ses.main()
    out = capsys.readouterr().out
    assert "ses://, 2 workers: 20 in" in out
    assert "| ses:// to moto, 2 workers | 20 |" in out


@pytest.mark.slow
def test_bench_cli_counts_every_message_at_the_sink() -> None:
    result = bench_cli.main(["--messages", "150", "--workers", "2", "--rounds", "1", "--ceiling"])
    (size,) = result["sizes"]
    for name in ("bare", "ledger", "no-state", "ideal", "ideal+ledger"):
        assert size[name]["rate"] > 0 and size[name]["cpu_ms"] > 0
    for name in ("ledger", "no-state"):  # start-up, pre-flight, exit: part of the whole run
        assert 0 < size[name]["outside_send_pass_s"] < 150 / size[name]["rate"]


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--pin needs two CPUs")
def test_bench_cli_pinned_sends_every_message_and_gives_the_cpus_back() -> None:
    before = os.sched_getaffinity(0)
    result = bench_cli.main(["--messages", "150", "--workers", "2", "--rounds", "1", "--pin"])
    (size,) = result["sizes"]
    assert result["pinned"] is True
    for name in ("bare", "ledger", "no-state"):
        assert size[name]["rate"] > 0 and size[name]["cpu_ms"] > 0
    assert os.sched_getaffinity(0) == before  # the rest of `make bench` is not pinned


def test_the_ideal_sender_marks_every_row_before_sending_it_and_records_it_sent(
    tmp_path: Path,
) -> None:
    """The ceiling of target 1 is only a ceiling if it does the work it claims: every row sent
    once (counted at the sink) and recorded `sent` in its own durable ledger."""
    csv_path, template = bench_smtp.write_campaign(tmp_path, 60)
    message = tmp_path / "message.eml"
    message.write_bytes(b"Subject: hello\r\n\r\nhello\r\n")
    db = tmp_path / "ideal.db"
    sink = bench_smtp.SinkProcess()
    cmd = [
        sys.executable, str(bench_cli.IDEAL), str(sink.port), str(csv_path), str(template),
        str(template.with_suffix(".html")), str(message), "3", "--ledger", str(db),
    ]  # fmt: skip
    try:
        before = sink.count()
        subprocess.run(cmd, check=True, timeout=60)
        assert sink.count() - before == 60
    finally:
        sink.stop()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT status, count(DISTINCT recipient) FROM d GROUP BY 1").fetchall()
    assert rows == [("sent", 60)]


@pytest.mark.slow
def test_bench_ses_api_sends_every_message_once_to_the_local_endpoint() -> None:
    result = bench_ses_api.main(["--messages", "60", "--workers", "2", "--rounds", "1"])
    assert result["bare_rate"] > 0 and result["smartmail_rate"] > 0
    assert result["smartmail_peak_rss_mb"] > 1


@pytest.mark.slow
def test_bench_rate_delivers_each_row_once_through_throttling_servers() -> None:
    argv = ["--messages", "40", "--limit", "20", "--precise", "30", "--rate", "30", "--burst", "2"]
    result = bench_rate.main(argv)
    for key in ("smtp_rate_above", "smtp_no_rate", "ses_rate_above", "precision"):
        assert result[key]["exactly_once"], key
        assert result[key]["failed"] == 0, key
    assert result["smtp_no_rate"]["throttled"] > 0  # the server did push back


def test_run_all_table_marks_each_target() -> None:
    rows = [("figure", "1", "bare 2", "0.50", ">= 0.90", False), ("other", "3", "", "", "", None)]
    text = run_all.table(rows)
    assert "| NO " in text and "figure" in text and text.count("\n") == 3


def test_the_startup_benchmark_runs_each_command() -> None:
    from benchmarks import bench_startup

    result = bench_startup.main(["--repeat", "1"])
    assert set(result) == {"baseline", "help", "dry_run"}
    assert all(seconds > 0 for seconds in result.values())


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_the_startup_benchmark_counts_instructions_the_load_does_not_move() -> None:
    from benchmarks.bench_startup import instructions

    nothing = instructions([sys.executable, "-S", "-c", "pass"])
    imports = instructions([sys.executable, "-S", "-c", "import json"])
    assert 0 < nothing < imports  # importing a module is work the count sees


def test_cpu_per_thread_sends_every_row_and_accounts_each_thread() -> None:
    result = cpu_per_thread.main(["--messages", "40", "--rounds", "1"])
    ledger, no_state = result["ledger"], result["no-state"]
    assert ledger["smartmail-send"] > 0 and ledger["pre-flight"] > 0
    assert ledger["ledger writer"] > 0 and no_state["ledger writer"] == 0
    assert ledger["whole process"] >= ledger["main thread"]


def test_bench_workers_sends_every_row_once_with_one_and_two_worker_processes() -> None:
    from benchmarks import bench_workers

    result = bench_workers.main(["--messages", "40", "--processes", "1,2", "--threads", "2"])
    for k in ("1", "2"):
        run = result["processes"][k]
        # At the endpoint: 40 messages, 40 recipients, none twice; the ledger agreed.
        assert run["delivered"] == [{"accepted": 40, "distinct": 40, "duplicates": 0}]
        assert run["ledger"] == [
            {"sent": 40, "pending": 0, "in_doubt": 0, "in_flight": 0, "failed": 0}
        ]
        assert run["rate"] > 0 and run["cpu_ms"] > 0
    rows = run_all.worker_rows(result)
    assert [r[0].split(",")[0] for r in rows] == ["smartmail worker x1", "smartmail worker x2"]
    assert rows[1][5] is (result["processes"]["2"]["ratio"] > 1.0)  # the target is judged


class _StandInClient:
    """The AWS stand-in's DynamoDB, in process, behind the calls smartmail makes on boto3."""

    def __init__(self) -> None:
        from benchmarks.aws_endpoint import Dynamo

        self.dynamo = Dynamo()

    def __getattr__(self, name: str) -> Any:
        from botocore.exceptions import ClientError

        from benchmarks.aws_endpoint import AwsError

        operation = "".join(word.title() for word in name.split("_"))

        def call(**request: Any) -> Any:
            try:
                return self.dynamo.handle(operation, json.loads(json.dumps(request)))
            except AwsError as exc:
                code = exc.code.rpartition("#")[2]
                error: Any = {"Error": {"Code": code, "Message": exc.message}, **exc.extra}
                raise ClientError(error, operation) from None

        return call


@pytest.fixture
def clock() -> stories.Clock:
    return stories.Clock()


@pytest.fixture
def stand_in_state(clock: stories.Clock) -> DynamoState:
    from smartmail.dynamo import TABLE_SCHEMA

    client = _StandInClient()
    client.create_table(TableName=stories.TABLE, BillingMode="PAY_PER_REQUEST", **TABLE_SCHEMA)
    return DynamoState(StateUrl.parse(stories.URL), client=client, clock=clock)


@pytest.mark.parametrize(
    "story",
    [
        stories.test_only_one_of_two_workers_claims_a_recipient_and_sent_is_never_resent,
        stories.test_a_dead_workers_claim_is_in_doubt_after_its_lease_and_only_retry_in_doubt_resends,
        stories.test_failed_rows_wait_for_retry_and_unsent_rows_go_back_to_pending,
        stories.test_campaign_records_round_trip_for_retry,
    ],
)
def test_the_aws_stand_in_tells_the_ledger_stories_moto_tells(
    story: Callable[..., None], stand_in_state: DynamoState, clock: stories.Clock
) -> None:
    """The benchmark's DynamoDB answers smartmail's own expressions as moto does."""
    kwargs: dict[str, Any] = {"state": stand_in_state}
    if "clock" in inspect.signature(story).parameters:
        kwargs["clock"] = clock
    story(**kwargs)


@pytest.mark.parametrize(
    ("field", "expression"),
    [
        ("ConditionExpression", "NOT attribute_exists(pk)"),
        ("ConditionExpression", "begins_with(st, :v)"),
        ("ConditionExpression", "st BETWEEN :v AND :v"),
        ("UpdateExpression", "ADD attempts :v"),
        ("UpdateExpression", "SET tags.a = :v"),
        ("UpdateExpression", "SET items = list_append(items, :v)"),
    ],
)
def test_the_aws_stand_in_refuses_an_expression_it_does_not_implement(
    field: str, expression: str
) -> None:
    from benchmarks.aws_endpoint import Dynamo, Refused
    from smartmail.dynamo import TABLE_SCHEMA

    dynamo = Dynamo()
    dynamo.handle("CreateTable", {"TableName": "t", **TABLE_SCHEMA})
    request: dict[str, Any] = {
        "TableName": "t",
        "Key": {"pk": {"S": "a"}, "sk": {"S": "b"}},
        "UpdateExpression": "SET st = :v",
        "ExpressionAttributeValues": {":v": {"S": "x"}},
        field: expression,
    }
    with pytest.raises(Refused):
        dynamo.handle("UpdateItem", request)
    # ... and so does it for a placeholder given but never used (as DynamoDB does).
    request = {
        **request,
        "UpdateExpression": "SET st = :v",
        "ExpressionAttributeNames": {"#x": "y"},
    }
    request.pop("ConditionExpression", None)
    with pytest.raises(Refused, match="unused"):
        dynamo.handle("UpdateItem", request)
