"""The benchmark scripts still run: each main() with a tiny N. No speed is asserted here.

The figures in docs/benchmarks.md come from these scripts at full size; these tests only
make sure the scripts cannot rot (an API change would break them here first), and that
what they measure is real: every message reached the SMTP sink, every row was dry-run.
"""

from __future__ import annotations

import pytest

from benchmarks import bench_dryrun, bench_ses, bench_smtp


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
