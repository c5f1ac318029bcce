"""The benchmark scripts still run: each main() with a tiny N. No speed is asserted here.

The figures in docs/benchmarks.md come from these scripts at full size; these tests only
make sure the scripts cannot rot (an API change would break them here first), and that
what they measure is real: every message reached the SMTP sink, every row was dry-run.
"""

from __future__ import annotations

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
    result = bench_cli.main(["--messages", "150", "--workers", "2", "--rounds", "1"])
    (size,) = result["sizes"]
    for name in ("bare", "ledger", "no-state"):
        assert size[name]["rate"] > 0 and size[name]["cpu_ms"] > 0


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


def test_cpu_per_thread_sends_every_row_and_accounts_each_thread() -> None:
    result = cpu_per_thread.main(["--messages", "40", "--rounds", "1"])
    ledger, no_state = result["ledger"], result["no-state"]
    assert ledger["smartmail-send"] > 0 and ledger["pre-flight"] > 0
    assert ledger["ledger writer"] > 0 and no_state["ledger writer"] == 0
    assert ledger["whole process"] >= ledger["main thread"]
