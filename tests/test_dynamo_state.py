"""The DynamoDB state (`--state dynamodb://TABLE`) keeps the SQLite ledger's promises across
workers: a conditional claim before the first attempt, `sent` never re-sent, a dead worker's
claims in doubt after their lease, status/retry/suppress reading the same table.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from smartmail import MessageTemplate, RecipientSource, SendOptions, SourceSpec, send_campaign
from smartmail.dynamo import StateUrl, is_dynamodb_url
from smartmail.errors import ConfigError
from smartmail.ledger import CampaignRecord
from smartmail.message import OutgoingMessage
from smartmail.report import Outcome
from smartmail.sources import Row
from smartmail.state_dynamodb import ClaimLost, DynamoState, open_state
from smartmail.suppression import import_csv
from smartmail.transports import TransportOptions, get_transport

from .aws_helpers import REGION
from .conftest import make_csv
from .dynamo_helpers import atomic_moto, serialise_moto_item_writes
from .test_ledger_processes import slow_server

__all__ = ["atomic_moto", "slow_server"]
TABLE = "smartmail-state"
URL = f"dynamodb://{TABLE}?region={REGION}&lease=60"


class Clock:
    """Wall time the test moves: leases expire without sleeping."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state(aws_env: None, atomic_moto: None, clock: Clock) -> Iterator[DynamoState]:
    with mock_aws():
        yield DynamoState(StateUrl.parse(URL), clock=clock)


def message(address: str, number: int = 2) -> OutgoingMessage:
    row = Row(number, {"email": address, "name": "Ann"})
    return OutgoingMessage(
        sender="news@acme.example",
        recipients=[address],
        data=b"Subject: hi\r\n\r\nhello\r\n",
        message_id=f"<{number}.{address}@acme.example>",
        recipient=address,
        row=row,
    )


def outcome(msg: OutgoingMessage, status: Any, **kw: Any) -> Outcome:
    return Outcome(row=msg.row, recipient=msg.recipient, status=status, **kw)


# --- the URL and the table ----------------------------------------------------------------


def test_state_url_parses_and_refuses_with_one_line() -> None:
    url = StateUrl.parse("dynamodb://mail-state?region=eu-west-1&lease=120&retention_days=30")
    assert (url.table, url.region, url.lease_seconds, url.retention_days) == (
        "mail-state",
        "eu-west-1",
        120,
        30,
    )
    assert str(url) == "dynamodb://mail-state?region=eu-west-1"
    assert is_dynamodb_url("dynamodb://t1x") and not is_dynamodb_url("/var/state.db")
    for bad, words in [
        ("sqlite:///x.db", "expected dynamodb://TABLE"),
        ("dynamodb://a", "not a DynamoDB table name"),
        ("dynamodb://table/extra", "expected dynamodb://TABLE"),
        ("dynamodb://table?region=mars", "not an AWS region"),
        ("dynamodb://table?lease=-5", "lease must be a positive"),
        ("dynamodb://table?regoin=eu-west-1", "unknown option 'regoin'"),
    ]:
        with pytest.raises(ConfigError, match=words) as err:
            StateUrl.parse(bad)
        assert "\n" not in str(err.value)


def test_the_table_is_created_on_first_use_with_ttl_and_reused(state: DynamoState) -> None:
    client = boto3.client("dynamodb", region_name=REGION)
    assert TABLE not in client.list_tables()["TableNames"]
    state.suppressions.add("a@example.org", "manual")
    table = client.describe_table(TableName=TABLE)["Table"]
    assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert [i["IndexName"] for i in table["GlobalSecondaryIndexes"]] == ["gsi1"]
    ttl = client.describe_time_to_live(TableName=TABLE)["TimeToLiveDescription"]
    assert ttl == {"TimeToLiveStatus": "ENABLED", "AttributeName": "expires_at"}
    again = open_state(URL)  # another process: finds the table, keeps what is in it
    assert again.suppressions.reason("A@Example.org") == "manual"


def test_a_table_that_is_not_a_state_table_is_refused(aws_env: None) -> None:
    with mock_aws():
        boto3.client("dynamodb", region_name=REGION).create_table(
            TableName="other",
            BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        )
        with pytest.raises(ConfigError, match="not a smartmail state table"):
            open_state(f"dynamodb://other?region={REGION}").ledger("c").acquire()


# --- claims -----------------------------------------------------------------------------------


def test_only_one_of_two_workers_claims_a_recipient_and_sent_is_never_resent(
    state: DynamoState,
) -> None:
    one, two = state.ledger("news"), state.ledger("news")
    msg = message("ann@example.org")
    assert one.skip_reason("ann@example.org", msg.row) is None
    assert two.skip_reason("ann@example.org", msg.row) is None  # both got the same job
    one.sending(msg)
    with pytest.raises(ClaimLost, match="already being sent"):
        two.sending(msg)
    assert two.skip_reason("ann@example.org", msg.row) == "already being sent"
    one.record(outcome(msg, "sent", message_id="ses-1"))
    for resend in (None, "failed", "in-doubt"):
        late = state.ledger("news", resend=resend)
        assert late.skip_reason("ann@example.org", msg.row) == "already sent"
        with pytest.raises(ClaimLost, match="already sent"):
            late.sending(msg)
    # The loser's outcome (the engine reports the lost claim as a failure) changes nothing.
    two.record(outcome(msg, "failed", reason="internal error: ClaimLost"))
    two.record(outcome(msg, "skipped", reason="already being sent"))
    [status] = state.statuses("news")
    assert (status.sent, status.failed, status.skipped, status.addresses) == (1, 0, 0, 1)


def test_a_dead_workers_claim_is_in_doubt_after_its_lease_and_only_retry_in_doubt_resends(
    state: DynamoState, clock: Clock
) -> None:
    dead = state.ledger("news")
    msg = message("bob@example.org", 7)
    dead.sending(msg)  # ... and the worker is killed here
    [status] = state.statuses("news")
    assert status.running and (status.in_flight, status.in_doubt) == (1, 0)
    clock.now += 61  # past the 60 s lease of URL
    [status] = state.statuses("news")
    assert not status.running and (status.in_flight, status.in_doubt) == (0, 1)
    redelivered = state.ledger("news")
    reason = redelivered.skip_reason("bob@example.org", msg.row)
    assert reason is not None and reason.startswith("in doubt")
    assert "smartmail retry news --in-doubt" in reason
    with pytest.raises(ClaimLost):
        redelivered.sending(msg)
    assert state.retry_rows("news", "failed") == []
    assert state.retry_rows("news", "in-doubt") == [msg.row]
    retry = state.ledger("news", resend="in-doubt")
    assert retry.skip_reason("bob@example.org", msg.row) is None
    retry.sending(msg)
    # The dead worker comes back to life late: its outcome cannot undo the retry's claim.
    dead.record(outcome(msg, "unsent", reason="interrupted"))
    assert retry.skip_reason("bob@example.org", msg.row) == "already being sent"
    retry.record(outcome(msg, "sent", message_id="ses-2"))
    [status] = state.statuses("news")
    assert (status.sent, status.in_doubt) == (1, 0)


def test_failed_rows_wait_for_retry_and_unsent_rows_go_back_to_pending(
    state: DynamoState,
) -> None:
    ledger = state.ledger("news")
    failed, stopped = message("carol@example.org", 2), message("dan@example.org", 3)
    for msg in (failed, stopped):
        ledger.sending(msg)
    ledger.record(outcome(failed, "failed", reason="permanent: 550 no such user"))
    ledger.record(outcome(stopped, "unsent", reason="interrupted"))
    rerun = state.ledger("news")
    assert rerun.skip_reason("carol@example.org", failed.row) == (
        "failed before (smartmail retry news sends it again)"
    )
    assert rerun.skip_reason("dan@example.org", stopped.row) is None
    rerun.sending(stopped)
    [status] = state.statuses("news")
    assert (status.failed, status.pending, status.in_flight) == (1, 0, 1)
    assert state.retry_rows("news", "failed") == [failed.row]
    retry = state.ledger("news", resend="failed")
    assert retry.skip_reason("carol@example.org", failed.row) is None
    retry.sending(failed)
    retry.record(outcome(failed, "sent", message_id="ses-3"))
    assert state.retry_rows("news", "failed") == []


@pytest.mark.parametrize("resend", ["failed", "in-doubt"])
def test_a_retry_that_stops_leaves_the_rows_it_did_not_get_to_for_the_next_retry(
    state: DynamoState, clock: Clock, resend: str
) -> None:
    """They went back to `pending` (a review: Ctrl-C during `retry --in-doubt`), which no
    later `retry` sends."""
    first = state.ledger("news")
    msg = message("erin@example.org", 4)
    first.sending(msg)
    if resend == "failed":
        first.record(outcome(msg, "failed", reason="permanent: 550 no such user"))
    clock.now += 61  # an in-doubt row: its lease ran out
    assert state.retry_rows("news", resend) == [msg.row]  # type: ignore[arg-type]
    retry = state.ledger("news", resend=resend)  # type: ignore[arg-type]
    retry.sending(msg)
    retry.record(outcome(msg, "unsent", reason="interrupted"))
    assert state.retry_rows("news", resend) == [msg.row]  # type: ignore[arg-type]
    [status] = state.statuses("news")
    assert status.pending == 0 and not status.running


def test_a_pending_row_a_stopped_retry_in_doubt_took_goes_back_to_pending(
    state: DynamoState, clock: Clock
) -> None:
    """A row another run put back to `pending` while a `retry --in-doubt` ran (the shared
    ledger lets both run), taken by the retry and not attempted: it was never sent, so it
    is not in doubt (a review: a later `send` skipped it as "may have arrived")."""
    send = state.ledger("news")
    msg = message("fay@example.org", 5)
    send.sending(msg)
    clock.now += 61  # its claim ran out: in doubt, for the retry to list
    assert state.retry_rows("news", "in-doubt") == [msg.row]
    send.record(outcome(msg, "unsent", reason="interrupted"))  # a slow owner puts it back
    retry = state.ledger("news", resend="in-doubt")
    retry.sending(msg)  # the retry takes the row it listed: pending by now
    retry.record(outcome(msg, "unsent", reason="interrupted"))
    assert state.retry_rows("news", "in-doubt") == []
    assert state.ledger("news").skip_reason("fay@example.org", msg.row) is None  # a send sends it


def test_many_rows_are_checked_in_a_few_reads_with_the_answers_of_one_at_a_time(
    state: DynamoState, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's pre-flight and send pass ask about all their rows at once: 120 rows cross two
    reads of 50, with every reason a row can have, a repeated address and an empty one."""
    dead = state.ledger("news")
    dead.sending(message("user110@example.org", 112))  # ... and that worker dies
    clock.now += 61  # past the 60 s lease: in doubt
    ledger = state.ledger("news")
    sent, failed, busy = (message(f"user{i}@example.org", i + 2) for i in (5, 60, 61))
    for msg in (sent, failed, busy):
        ledger.sending(msg)
    ledger.record(outcome(sent, "sent", message_id="ses-1"))
    ledger.record(outcome(failed, "failed", reason="permanent: 550"))
    state.suppressions.add("User7@Example.org", "bounce")
    items = [(f"user{i}@example.org", Row(i + 2, {})) for i in range(120)]
    items += [("USER5@example.org", Row(200, {})), ("", Row(201, {}))]
    reads: list[int] = []
    get_many = ledger.table.get_many

    def counted(keys: list[Any]) -> Any:
        reads.append(len(keys))
        return get_many(keys)

    monkeypatch.setattr(ledger.table, "get_many", counted)
    reasons = state.ledger("news").skip_reasons(items)
    assert reads == [100, 100, 40]  # 50 rows a read; the repeat is asked once, "" never
    expected: dict[int, str] = {
        5: "already sent",
        60: "failed before (smartmail retry news sends it again)",
        61: "already being sent",
        7: "suppressed: bounce",
        110: "in doubt (smartmail retry news --in-doubt sends it again)",
        120: "already sent",
    }
    assert reasons == [expected.get(i) for i in range(122)]
    retry = state.ledger("news", resend="in-doubt").skip_reasons(items[108:112])
    assert retry == [None, None, None, None]


def test_a_send_whose_answer_was_lost_stays_in_doubt_and_is_never_sent_again(
    state: DynamoState,
) -> None:
    """The provider may hold the message (the connection dropped after DATA): the row must
    stay `sending`, in doubt at once, as the SQLite ledger keeps it, never back to pending
    where a redelivered or duplicate job would send it a second time."""
    ledger = state.ledger("news")
    msg = message("erin@example.org", 4)
    ledger.sending(msg)
    ledger.record(outcome(msg, "in-doubt", reason="in doubt: connection lost after DATA"))
    redelivered = state.ledger("news")
    reason = redelivered.skip_reason("erin@example.org", msg.row)
    assert reason is not None and reason.startswith("in doubt")
    with pytest.raises(ClaimLost):
        redelivered.sending(msg)
    [status] = state.statuses("news")
    assert (status.pending, status.in_doubt, status.in_flight) == (0, 1, 0)
    assert state.retry_rows("news", "in-doubt") == [msg.row]
    retry = state.ledger("news", resend="in-doubt")
    retry.sending(msg)
    retry.record(outcome(msg, "sent", message_id="ses-4"))
    [status] = state.statuses("news")
    assert (status.sent, status.in_doubt) == (1, 0)


def test_campaign_records_round_trip_for_retry(state: DynamoState) -> None:
    ledger = state.ledger("weekly")
    ledger.acquire()
    record = CampaignRecord("weekly", "s3://lists/w.csv", "abc123", "ses://eu-west-1", {"rate": 5})
    ledger.begin(record)
    assert state.load("weekly") == record
    ledger.begin(None)  # a retry notes its run and keeps the settings
    assert state.load("weekly") == record
    assert state.load("nope") is None
    [status] = state.statuses()
    assert status.campaign == "weekly" and status.last_run and status.addresses == 0


def _claim_all(ledger_state: DynamoState, addresses: list[str], wins: list[str]) -> None:
    ledger = ledger_state.ledger("race")
    for i, address in enumerate(addresses):
        try:
            ledger.sending(message(address, i + 2))
        except ClaimLost:
            continue
        wins.append(address)


def test_threads_racing_for_the_same_recipients_never_both_win(state: DynamoState) -> None:
    addresses = [f"user{i}@example.org" for i in range(25)]
    state.ensure()
    wins: list[str] = []
    threads = [
        threading.Thread(target=_claim_all, args=(state, addresses[::step], wins))
        for step in (1, 1, 1, -1, -1, -1)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert Counter(wins) == Counter(addresses)  # each claimed exactly once


def _claim_in_process(endpoint: str, addresses: list[str], out: Any) -> None:
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    from smartmail import aws

    if hasattr(aws._local, "session"):
        del aws._local.session
    wins: list[str] = []
    _claim_all(open_state(URL), addresses, wins)
    out.put(wins)


@pytest.mark.slow
def test_processes_racing_for_the_same_recipients_never_both_win(
    aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moto.server import ThreadedMotoServer

    from .conftest import free_port

    serialise_moto_item_writes(monkeypatch)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        open_state(URL).ensure()
        addresses = [f"user{i}@example.org" for i in range(30)]
        ctx = multiprocessing.get_context("fork")
        out = ctx.Queue()
        procs = [
            ctx.Process(target=_claim_in_process, args=(endpoint, addresses[::step], out))
            for step in (1, -1, 1)
        ]
        for p in procs:
            p.start()
        wins = [w for _ in procs for w in out.get(timeout=120)]
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
        assert Counter(wins) == Counter(addresses)
        [status] = open_state(URL).statuses("race")
        assert status.in_flight == 30
    finally:
        server.stop()


def test_two_engine_runs_of_one_campaign_send_each_recipient_once(
    state: DynamoState, tmp_path: Path, template_file: Path
) -> None:
    """The promise end to end: two runs (two workers with the same job) into one outbox."""
    csv_path = make_csv(tmp_path / "list.csv", 40)
    outbox = tmp_path / "outbox"
    state.ensure()
    summaries = []

    def run() -> None:
        ledger = state.ledger("weekly")
        ledger.acquire()
        summaries.append(
            send_campaign(
                RecipientSource(SourceSpec(str(csv_path))),
                MessageTemplate.load(template_file),
                get_transport(f"file://{outbox}", TransportOptions()),
                options=SendOptions(workers=4, campaign="weekly"),
                journal=ledger,
            )
        )

    runs = [threading.Thread(target=run) for _ in range(2)]
    for t in runs:
        t.start()
    for t in runs:
        t.join(timeout=120)
    per_recipient = Counter(p.name.split("-", 1)[1].rsplit("-", 1)[0] for p in outbox.glob("*.eml"))
    assert len(per_recipient) == 40 and set(per_recipient.values()) == {1}
    assert sum(s.sent for s in summaries) == 40
    [status] = state.statuses("weekly")
    assert (status.sent, status.addresses, status.in_doubt, status.in_flight) == (40, 40, 0, 0)
    again = state.ledger("weekly")
    rerun = send_campaign(
        RecipientSource(SourceSpec(str(csv_path))),
        MessageTemplate.load(template_file),
        get_transport(f"file://{outbox}", TransportOptions()),
        options=SendOptions(workers=2, campaign="weekly"),
        journal=again,
    )
    assert rerun.sent == 0 and rerun.skip_reasons == {"already sent": 40}


# --- suppression ------------------------------------------------------------------------------


def test_suppression_round_trip(state: DynamoState, tmp_path: Path) -> None:
    sup = state.suppressions
    assert sup.add("Zed@Example.org", "bounce", "550 no such user") is True
    assert sup.add("zed@example.org", "manual") is False  # the first reason is kept
    assert sup.add("amy@bücher.example", "complaint") is True
    assert sup.reason("ZED@example.org") == "bounce"
    entry = sup.get("amy@xn--bcher-kva.example")
    assert entry is not None and entry.reason == "complaint" and entry.created_at.endswith("Z")
    with pytest.raises(ValueError, match="reason must be one of"):
        sup.add("x@example.org", "because")
    assert [e.address for e in sup] == ["amy@xn--bcher-kva.example", "zed@example.org"]
    assert len(sup) == 2
    out = io.StringIO()
    assert sup.export_csv(out) == 2
    assert out.getvalue().splitlines()[0] == "email,reason,detail,created_at"
    csv_path = tmp_path / "more.csv"
    csv_path.write_text("email,reason\nnew@example.org,unsubscribe\nzed@example.org,manual\n")
    result = import_csv(sup, str(csv_path))
    assert (result.added, result.already) == (1, 1)
    assert sup.reason("new@example.org") == "unsubscribe"
    assert sup.remove("zed@example.org") is True and sup.remove("zed@example.org") is False
    assert sup.reason("zed@example.org") is None and len(sup) == 2
    ledger = state.ledger("news")
    assert ledger.skip_reason("new@example.org", Row(2, {})) == "suppressed: unsubscribe"


# --- a worker killed mid-job ----------------------------------------------------------------


def _send_in_child(endpoint: str, url: str, csv_path: str, template: str, smtp: str) -> None:
    """A worker: the engine with a DynamoDB ledger, through SMTP (spawned: a fresh process)."""
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    from smartmail import TokenBucket

    send_campaign(
        RecipientSource(SourceSpec(csv_path)),
        MessageTemplate.load(template),
        get_transport(smtp, TransportOptions(smtp_security="none")),
        options=SendOptions(workers=WORKERS, campaign="killed"),
        limiter=TokenBucket(20.0),
        journal=open_state(url).ledger("killed"),
    )


WORKERS = 4


@pytest.mark.slow
def test_a_worker_killed_mid_job_leaves_at_most_its_in_flight_rows_in_doubt(
    aws_env: None, monkeypatch: pytest.MonkeyPatch, slow_server: Any, tmp_path: Path
) -> None:
    """SIGKILL while messages are in flight (the SMTP server holds its 250 back): at most one
    row per worker thread is in doubt; a re-delivered job sends the rest once and skips those;
    only `retry --in-doubt` sends them again."""
    import signal
    import time

    from moto.server import ThreadedMotoServer

    from smartmail.campaigns import LedgerSource

    from .conftest import free_port

    serialise_moto_item_writes(monkeypatch)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        url = f"dynamodb://killed-state?region={REGION}&lease=2"
        state = open_state(url)
        state.ensure()
        n = 30
        csv_path = make_csv(tmp_path / "list.csv", n)
        template = tmp_path / "msg.txt"
        template.write_text("From: a@acme.example\nSubject: Hi {{ name }}\n\nCode {{ code }}\n")
        args = (endpoint, url, str(csv_path), str(template), slow_server.url)
        child = multiprocessing.get_context("spawn").Process(target=_send_in_child, args=args)
        child.start()
        deadline = time.monotonic() + 60
        while len(slow_server.handler.received) < 6 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(slow_server.handler.received) >= 6, "the worker never got going"
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=30)
        time.sleep(2.1)  # past the 2 s lease: the dead worker's claims are now in doubt
        [status] = state.statuses("killed")
        assert 1 <= status.in_doubt <= WORKERS and status.in_flight == 0
        in_doubt = {row.values["email"] for row in state.retry_rows("killed", "in-doubt")}
        assert len(in_doubt) == status.in_doubt

        def send(journal: Any, source: Any) -> Any:
            return send_campaign(
                source,
                MessageTemplate.load(template),
                get_transport(slow_server.url, TransportOptions(smtp_security="none")),
                options=SendOptions(workers=WORKERS, campaign="killed"),
                journal=journal,
            )

        rerun = send(state.ledger("killed"), RecipientSource(SourceSpec(str(csv_path))))
        assert rerun.in_doubt == len(in_doubt)
        got = Counter(a for r in slow_server.handler.received for a in r.rcpt_tos)
        for i in range(n):
            address = f"user{i}@example.org"
            assert got[address] <= 1 if address in in_doubt else got[address] == 1, address
        rows = state.retry_rows("killed", "in-doubt")
        retry = send(state.ledger("killed", resend="in-doubt"), LedgerSource("x", rows, "email"))
        assert retry.sent == len(in_doubt)
        again = Counter(a for r in slow_server.handler.received for a in r.rcpt_tos)
        assert all(again[f"user{i}@example.org"] >= 1 for i in range(n))
        assert {a for a, c in again.items() if c > 1} <= in_doubt
        [status] = state.statuses("killed")
        assert (status.sent, status.in_doubt) == (n, 0)
    finally:
        server.stop()


def test_a_large_import_keeps_the_first_reason_and_counts_right(
    state: DynamoState, tmp_path: Path
) -> None:
    lines = ["email,reason"] + [f"u{i}@example.org,bounce" for i in range(300)]
    lines += ["u5@example.org,manual", "U299@example.org,complaint", "fresh@example.org,manual"]
    csv_path = tmp_path / "big.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    result = import_csv(state.suppressions, str(csv_path))
    assert (result.rows, result.added, result.already) == (303, 301, 2)
    assert state.suppressions.reason("u5@example.org") == "bounce"
    assert state.suppressions.reason("u299@example.org") == "bounce"
    assert len(state.suppressions) == 301


def test_a_duplicate_skipped_while_its_address_is_claimed_leaves_the_claim_to_its_row(
    state: DynamoState,
) -> None:
    # The send pass records a later row with the same address skipped (a duplicate) while a
    # worker holds the first row's claim; the first row's own outcome still lands.
    ledger = state.ledger("dups")
    first, stopped = message("erin@example.org", 2), message("fay@example.org", 4)
    for msg in (first, stopped):
        ledger.sending(msg)
    for again in (message("erin@example.org", 3), message("fay@example.org", 5)):
        ledger.record(outcome(again, "skipped", reason="duplicate recipient"))
    ledger.record(outcome(first, "failed", reason="permanent: 550 no such user"))
    ledger.record(outcome(stopped, "unsent", reason="interrupted"))
    [status] = state.statuses("dups")
    # Not left `sending` (in doubt once the lease runs out): one failed, one pending.
    assert (status.failed, status.pending, status.in_flight) == (1, 1, 0)
