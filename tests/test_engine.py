"""The engine end to end against a real SMTP server: retries, failures, stops, limits, counts."""

from __future__ import annotations

import csv
import threading
import time
from pathlib import Path

import pytest

from smartmail import (
    MessageTemplate,
    RecipientSource,
    RetryPolicy,
    SendOptions,
    SourceSpec,
    Summary,
    TokenBucket,
    send_campaign,
)
from smartmail.errors import PreflightError
from smartmail.transports import TransportOptions, get_transport

from .conftest import SMTP_USER, SmtpServer, make_csv, write

NO_WAIT = RetryPolicy(max_retries=3, initial=0.0, maximum=0.0, jitter=0.0)


def run(
    server: SmtpServer,
    csv_path: Path,
    template: Path,
    *,
    retry: RetryPolicy = NO_WAIT,
    transport_options: TransportOptions | None = None,
    stop: threading.Event | None = None,
    rate: float | None = None,
    **options: object,
) -> Summary:
    opts = SendOptions(**options)  # type: ignore[arg-type]
    return send_campaign(
        RecipientSource(SourceSpec(str(csv_path))),
        MessageTemplate.load(template),
        get_transport(server.url, transport_options or TransportOptions(smtp_security="none")),
        options=opts,
        retry=retry,
        stop=stop,
        limiter=TokenBucket(rate) if rate else None,
    )


def adds_up(s: Summary) -> bool:
    return s.sent + s.failed + s.skipped + s.unsent == s.rows


def test_connections_are_kept_and_reused(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    csv_path = make_csv(tmp_path / "r.csv", 60)
    summary = run(smtp_server, csv_path, template_file, workers=3)
    assert summary.sent == 60
    assert smtp_server.handler.connections <= 3


def test_connection_reopened_after_n_messages(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    csv_path = make_csv(tmp_path / "r.csv", 20)
    options = TransportOptions(smtp_security="none", messages_per_connection=5)
    summary = run(smtp_server, csv_path, template_file, workers=1, transport_options=options)
    assert summary.sent == 20 and smtp_server.handler.connections == 4


def test_transient_4xx_is_retried_and_then_sent(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    smtp_server.handler.temp_fail_every = 4
    csv_path = make_csv(tmp_path / "r.csv", 30)
    # Every 4th DATA fails whoever sends it: with 2 workers one row can, rarely, draw the 4th
    # slot on each of 4 attempts. Enough retries make that as good as impossible.
    retry = RetryPolicy(max_retries=10, initial=0.0, maximum=0.0, jitter=0.0)
    summary = run(smtp_server, csv_path, template_file, workers=2, retry=retry)
    assert summary.sent == 30 and summary.failed == 0
    assert summary.retries >= 5
    assert all(len(v) == 1 for v in smtp_server.handler.by_recipient().values())


def test_transient_failure_gives_up_after_max_retries(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    smtp_server.handler.temp_fail_first = 10**6
    csv_path = make_csv(tmp_path / "r.csv", 2)
    summary = run(smtp_server, csv_path, template_file, workers=1)
    assert summary.failed == 2 and summary.sent == 0
    assert smtp_server.handler.data_commands == 2 * 4  # first try + 3 retries each
    assert any("451" in reason for reason in summary.failure_reasons) or summary.failure_reasons


def test_permanent_5xx_fails_the_row_without_retry(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    smtp_server.handler.reject_rcpt = {"user3@example.org", "user5@example.org"}
    csv_path = make_csv(tmp_path / "r.csv", 10)
    failed_csv = tmp_path / "failed.csv"
    summary = run(smtp_server, csv_path, template_file, workers=2, failed_csv=failed_csv)
    assert (summary.sent, summary.failed, summary.retries) == (8, 2, 0)
    with open(failed_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["email"] for r in rows) == ["user3@example.org", "user5@example.org"]
    assert all("550" in r["error"] and r["code"].startswith("C") for r in rows)
    # The failed-rows CSV feeds straight back into a send once the problem is fixed.
    smtp_server.handler.reject_rcpt = set()
    again = run(smtp_server, failed_csv, template_file, failed_csv=tmp_path / "f2.csv")
    assert again.sent == 2


def test_backoff_waits_grow_exponentially(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    smtp_server.handler.temp_fail_first = 3
    waits: list[float] = []
    policy = RetryPolicy(max_retries=3, initial=1.0, maximum=30.0, jitter=0.0, sleep=waits.append)
    csv_path = make_csv(tmp_path / "r.csv", 1)
    summary = run(smtp_server, csv_path, template_file, workers=1, retry=policy)
    assert summary.sent == 1 and summary.retries == 3
    assert waits == [1.0, 2.0, 4.0]


def test_bad_login_stops_the_run_and_leaves_rows_unsent(
    tls_smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    csv_path = make_csv(tmp_path / "r.csv", 10)
    options = TransportOptions(
        smtp_user=SMTP_USER, smtp_password="wrong", ca_file=tls_smtp_server.ca_file
    )
    summary = run(tls_smtp_server, csv_path, template_file, workers=2, transport_options=options)
    assert summary.sent == 0 and summary.failed == 0 and summary.unsent == 10
    assert summary.stopped and "refused the login" in summary.stopped
    assert "wrong" not in summary.to_json()


def test_untrusted_certificate_stops_the_run(
    tls_smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    csv_path = make_csv(tmp_path / "r.csv", 3)
    options = TransportOptions(smtp_user=SMTP_USER, smtp_password="x")  # system CAs only
    summary = run(tls_smtp_server, csv_path, template_file, transport_options=options)
    assert summary.unsent == 3 and summary.stopped and "certificate" in summary.stopped
    assert tls_smtp_server.handler.received == []


def test_stop_event_lets_in_flight_finish_and_counts_add_up(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    csv_path = make_csv(tmp_path / "r.csv", 200)
    stop = threading.Event()

    def stopper() -> None:
        deadline = time.monotonic() + 20
        while len(smtp_server.handler.received) < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()

    thread = threading.Thread(target=stopper)
    thread.start()
    failed_csv = tmp_path / "rest.csv"
    summary = run(
        smtp_server, csv_path, template_file, workers=4, stop=stop, rate=100, failed_csv=failed_csv
    )
    thread.join()
    assert summary.interrupted and adds_up(summary)
    assert 10 <= summary.sent < 200 and summary.failed == 0
    assert summary.sent == len(smtp_server.handler.received)
    with open(failed_csv, newline="") as fh:
        rest = [r["email"] for r in csv.DictReader(fh)]
    got = set(smtp_server.handler.by_recipient())
    assert len(rest) == summary.unsent and not got & set(rest)
    assert got | set(rest) == {f"user{i}@example.org" for i in range(200)}


def test_limit_and_test_to(smtp_server: SmtpServer, tmp_path: Path, template_file: Path) -> None:
    csv_path = make_csv(tmp_path / "r.csv", 10)
    limited = run(smtp_server, csv_path, template_file, limit=3)
    assert (limited.sent, limited.unsent) == (3, 7) and adds_up(limited)
    smtp_server.handler.received.clear()
    proof = run(smtp_server, csv_path, template_file, test_to="me@acme.example")
    assert proof.sent == 1 and proof.test_to == "me@acme.example"
    (only,) = smtp_server.handler.received
    assert only.rcpt_tos == ["me@acme.example"]
    assert only.message["To"].addresses[0].addr_spec == "user0@example.org"


def test_invalid_rows_skipped_duplicates_once(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    csv_path = write(
        tmp_path / "r.csv",
        "email,name,code\na@x.org,A,1\nbroken,B,2\nA@x.org,A2,3\nc@x.org,C\nd@x.org,D,4\n",
    )
    with pytest.raises(PreflightError, match="ragged"):
        run(smtp_server, csv_path, template_file)
    assert smtp_server.handler.received == [], "nothing is sent when pre-flight fails"
    summary = run(smtp_server, csv_path, template_file, on_malformed="skip")
    assert (summary.sent, summary.skipped) == (2, 3) and adds_up(summary)
    assert set(smtp_server.handler.by_recipient()) == {"a@x.org", "d@x.org"}


def test_rows_past_the_render_cache_are_rendered_again_correctly(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    csv_path = make_csv(tmp_path / "r.csv", 12)
    summary = run(smtp_server, csv_path, template_file, workers=3, render_cache_chars=200)
    assert summary.sent == 12
    for address, (received,) in smtp_server.handler.by_recipient().items():
        number = int(address.removeprefix("user").split("@")[0])
        assert f"your code is C{number:05d}" in received.message.get_content()
        assert received.message["Subject"] == f"Hello User {number}"
