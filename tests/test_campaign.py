"""The campaign pipeline as a library caller (and the queue workers to come) uses it:
`CampaignConfig`, `run_campaign`, hooks instead of a terminal. Real SMTP, files and SQLite."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from moto import mock_aws

import smartmail
from smartmail import (
    CampaignConfig,
    Hooks,
    Plan,
    RunOptions,
    Secrets,
    load_config,
    run_campaign,
)
from smartmail.campaign import CONFIG_VERSION, DeclinedError, NothingToSendError
from smartmail.errors import ConfigError, LockedError
from smartmail.ledger import Ledger
from smartmail.quota import QuotaError

from .aws_helpers import REGION, ses_backend, verify_sender
from .conftest import SMTP_PASSWORD, SMTP_USER, SmtpServer, make_csv, write


def smtp_config(server: SmtpServer, csv: Path, template: Path, **extra: object) -> CampaignConfig:
    return CampaignConfig(
        template=str(template),
        source=str(csv),
        transport=server.url,
        smtp_security="none",
        retry_wait=0.0,
        **extra,  # type: ignore[arg-type]
    )


def deliveries(db: Path, campaign: str) -> dict[str, int]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT status, count(*) FROM deliveries WHERE campaign = ? GROUP BY status",
            (campaign,),
        )
        return dict(rows.fetchall())
    finally:
        conn.close()


def test_config_round_trips_through_json_with_a_version_and_no_secret() -> None:
    config = CampaignConfig(
        template="t.txt",
        source="r.csv",
        transport="smtp://mail.example:587",
        smtp_user="mailer",
        tags={"wave": "1"},
        rate=12.5,
        attachments_dir="files",
    )
    data = json.loads(json.dumps(config.to_dict()))
    assert data["version"] == CONFIG_VERSION
    assert not [k for k in data if "password" in k or "secret" in k]
    assert CampaignConfig.from_dict(data) == config
    with pytest.raises(ConfigError, match="newer smartmail"):
        CampaignConfig.from_dict({**data, "version": CONFIG_VERSION + 1})
    with pytest.raises(ConfigError, match="--on-invalid must be one of"):
        CampaignConfig(template="t", on_invalid="ignore").check()


def test_settings_stored_before_the_config_existed_are_migrated() -> None:
    old = {  # what `send` stored: its Click keyword arguments, filtered by name
        "template_path": "/srv/t.txt",
        "html_template": None,
        "transport_url": "smtp://mail.example:25",
        "smtp_security": "none",
        "tags": ["wave=2", "team=ops"],
        "workers": 8,
        "rate": None,
        "to_column": "Mail",
        "allow_partial": True,
    }
    config = CampaignConfig.from_dict(old, campaign="spring")
    assert (config.template, config.transport, config.campaign) == (
        "/srv/t.txt",
        "smtp://mail.example:25",
        "spring",
    )
    assert (config.tags, config.workers, config.to_column, config.allow_partial) == (
        {"wave": "2", "team": "ops"},
        8,
        "Mail",
        True,
    )
    assert config.version == CONFIG_VERSION


def test_run_campaign_sends_stores_its_config_and_retry_reuses_it(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    csv = make_csv(tmp_path / "r.csv", 4)
    db = tmp_path / "state.db"
    smtp_server.handler.reject_rcpt = {"user2@example.org"}
    options = RunOptions(state_path=str(db), failed_csv=str(tmp_path / "f.csv"))
    result = run_campaign(
        smtp_config(smtp_server, csv, template_file, campaign="lib", max_retries=0), options
    )
    assert (result.summary.sent, result.summary.failed, result.exit_code) == (3, 1, 1)
    assert result.plan is not None and (result.plan.messages, result.plan.recipients) == (4, 4)
    stored = load_config(db, "lib")
    assert stored.template == str(template_file) and stored.source == str(csv)
    assert stored.max_retries == 0 and stored.version == CONFIG_VERSION

    smtp_server.handler.reject_rcpt = set()
    again = run_campaign(stored, RunOptions(state_path=str(db), resend="failed"))
    assert (again.summary.sent, again.summary.rows, again.exit_code) == (1, 1, 0)
    assert deliveries(db, "lib") == {"sent": 4}
    nothing = run_campaign(stored, RunOptions(state_path=str(db), resend="failed"))
    assert nothing.note == "nothing to retry: campaign lib has no failed rows"
    assert len(smtp_server.handler.received) == 4


def test_a_retry_of_a_campaign_stored_in_the_old_settings_format(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    csv = make_csv(tmp_path / "r.csv", 3)
    db = tmp_path / "state.db"
    smtp_server.handler.reject_rcpt = {"user0@example.org"}
    options = RunOptions(state_path=str(db), failed_csv=str(tmp_path / "f.csv"))
    run_campaign(
        smtp_config(smtp_server, csv, template_file, campaign="old", max_retries=0), options
    )
    old_settings = {
        "template_path": str(template_file),
        "transport_url": smtp_server.url,
        "smtp_security": "none",
        "tags": [],
        "to_column": "email",
        "retry_wait": 0.0,
    }
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE campaigns SET settings = ?", (json.dumps(old_settings),))
    conn.close()
    smtp_server.handler.reject_rcpt = set()
    result = run_campaign(load_config(db, "old"), RunOptions(state_path=str(db), resend="failed"))
    assert (result.summary.sent, result.exit_code) == (1, 0)
    assert deliveries(db, "old") == {"sent": 3}


def test_the_confirm_hook_sees_the_plan_and_declining_sends_nothing(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    template = write(
        tmp_path / "t.txt",
        "From: a@acme.example\nTo: {{ email }}\nCc: boss@acme.example, audit@acme.example\n"
        "Subject: hi\n\nHello\n",
    )
    csv = make_csv(tmp_path / "r.csv", 3)
    db = tmp_path / "state.db"
    seen: list[Plan] = []

    def decline(plan: Plan) -> bool:
        seen.append(plan)
        return False

    config = smtp_config(smtp_server, csv, template, campaign="ask")
    with pytest.raises(DeclinedError, match="nothing was sent") as declined:
        run_campaign(config, RunOptions(state_path=str(db)), Hooks(confirm=decline))
    assert declined.value.exit_code == 2
    assert (seen[0].messages, seen[0].recipients) == (3, 9)  # To + 2 Cc each: what SES counts
    assert not smtp_server.handler.received and deliveries(db, "ask") == {}
    with Ledger(db, "ask") as ledger:
        ledger.acquire()  # the lock was released

    warnings: list[str] = []
    result = run_campaign(
        config, RunOptions(state_path=str(db)), Hooks(confirm=lambda p: True, warn=warnings.append)
    )
    assert result.summary.sent == 3 and len(smtp_server.handler.received) == 3


def test_a_locked_campaign_raises_before_anything_is_sent(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    db = tmp_path / "state.db"
    holder = Ledger(db, "busy")
    holder.acquire()
    try:
        config = smtp_config(
            smtp_server, make_csv(tmp_path / "r.csv", 2), template_file, campaign="busy"
        )
        with pytest.raises(LockedError):
            run_campaign(config, RunOptions(state_path=str(db)))
    finally:
        holder.close()
    assert not smtp_server.handler.received


def test_another_ctrl_c_as_rows_go_back_to_pending_still_closes_the_ledger(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A library caller's Ctrl-C stops the send pass (as it marks its third batch); another
    # lands as the rows marked ahead go back to pending. Before, that skipped closing the
    # ledger: the campaign stayed locked by this process and outcomes queued were not
    # committed, so the sent rows could end in doubt.
    real_mark, real_release, marks = Ledger.mark, Ledger.release_ahead, []

    def mark(self: Ledger, messages: Any) -> None:
        real_mark(self, messages)
        marks.append(1)
        if len(marks) == 3:
            raise KeyboardInterrupt

    def release_ahead(self: Ledger, *args: Any) -> None:
        real_release(self, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(Ledger, "mark", mark)
    monkeypatch.setattr(Ledger, "release_ahead", release_ahead)
    n, db = 20, tmp_path / "state.db"
    csv = make_csv(tmp_path / "r.csv", n)
    config = smtp_config(smtp_server, csv, template_file, workers=4, campaign="ctrl-c")
    with pytest.raises(KeyboardInterrupt):
        run_campaign(config, RunOptions(state_path=str(db)))
    first = deliveries(db, "ctrl-c")
    got = len(smtp_server.handler.received)
    assert first.get("sent") == got < n and "sending" not in first, first
    # Not locked by the run that was interrupted: the next run sends the rest, nobody twice.
    monkeypatch.setattr(Ledger, "release_ahead", real_release)
    monkeypatch.setattr(Ledger, "mark", real_mark)
    again = run_campaign(config, RunOptions(state_path=str(db)))
    assert again.summary.sent == n - got and deliveries(db, "ctrl-c") == {"sent": n}
    assert len(smtp_server.handler.received) == n


def test_another_ctrl_c_as_the_transport_closes_before_sending_still_unlocks_the_campaign(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A library caller's Ctrl-C at the prompt; another lands as the clean-up before the first
    # message closes the transport. Before, that skipped closing the ledger: this process kept
    # the campaign locked, so `status` said it was running and the next run was refused.
    from smartmail.transports.smtp import SmtpTransport

    from .test_ledger import run_cli

    real_close = SmtpTransport.close

    def close(self: SmtpTransport) -> None:
        real_close(self)
        raise KeyboardInterrupt

    def confirm(plan: Plan) -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr(SmtpTransport, "close", close)
    db = tmp_path / "state.db"
    config = smtp_config(
        smtp_server, make_csv(tmp_path / "r.csv", 3), template_file, campaign="prompt"
    )
    with pytest.raises(KeyboardInterrupt):
        run_campaign(config, RunOptions(state_path=str(db)), Hooks(confirm=confirm))
    monkeypatch.setattr(SmtpTransport, "close", real_close)
    code, out = run_cli(["status", "prompt", "--state", str(db), "--json"])
    assert code == 0 and json.loads(out)[0]["running"] is False, out
    again = run_campaign(config, RunOptions(state_path=str(db)))
    assert again.summary.sent == 3 and deliveries(db, "prompt") == {"sent": 3}


def test_every_row_skipped_is_an_error_with_the_counts(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    csv = write(tmp_path / "r.csv", "email,name,code\nnope,A,1\nalso-bad,B,2\n")
    config = smtp_config(smtp_server, csv, template_file)
    report = tmp_path / "report.json"
    with pytest.raises(NothingToSendError, match="every row was skipped") as raised:
        run_campaign(config, RunOptions(state_path=str(tmp_path / "s.db"), report_path=str(report)))
    assert raised.value.exit_code == 2
    assert json.loads(report.read_text())["skipped"] == 2  # cron's report says what happened
    assert (raised.value.summary.skipped, raised.value.summary.sent) == (2, 0)
    assert not smtp_server.handler.received


@mock_aws
@pytest.mark.usefixtures("aws_env")
def test_the_ses_quota_plan_counts_envelope_recipients_not_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    verify_sender()
    ses_backend().sent_message_count = 195  # 5 of 200 left
    template = write(
        tmp_path / "t.txt",
        "From: news@acme.example\nTo: {{ email }}\nBcc: archive@acme.example\n"
        "Subject: hi\n\nHello\n",
    )
    config = CampaignConfig(
        template=str(template),
        source=str(make_csv(tmp_path / "r.csv", 3)),
        transport=f"ses://{REGION}",
        rate=50,
    )
    state = RunOptions(state_path=str(tmp_path / "s.db"))
    with pytest.raises(QuotaError, match=r"3 messages to 6 recipients .* only 5 of the SES"):
        run_campaign(config, state)
    assert ses_backend().sent_messages == []
    warnings: list[str] = []
    result = run_campaign(
        CampaignConfig(**{**config.to_dict(), "allow_partial": True}),
        state,
        Hooks(warn=warnings.append),
    )
    assert result.plan is not None and (result.plan.messages, result.plan.recipients) == (2, 4)
    assert (result.summary.sent, result.summary.unsent) == (2, 1)
    assert any("sending 2 of 3 now" in w for w in warnings)


def test_the_library_does_not_load_click_and_imports_lazily() -> None:
    assert "run_campaign" in dir(smartmail) and smartmail.run_campaign is run_campaign
    with pytest.raises(AttributeError):
        _ = smartmail.no_such_name


def test_rows_from_elsewhere_go_through_the_same_pipeline(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    """What a queue worker does: the campaign's config, a job's rows instead of the file."""
    from smartmail.campaigns import LedgerSource
    from smartmail.sources import Row

    rows = [Row(7, {"email": "ann@example.org", "name": "Ann", "code": "C7"}),
            Row(9, {"email": "bob@example.org", "name": "Bob", "code": "C9"})]  # fmt: skip
    db = tmp_path / "state.db"
    config = CampaignConfig(
        template=str(template_file),
        source="s3://lists/spring.csv",  # names the campaign's list; never read here
        transport=smtp_server.url,
        smtp_security="none",
        campaign="spring",
    )
    result = run_campaign(
        config,
        RunOptions(state_path=str(db), failed_csv=str(tmp_path / "f.csv")),
        source=LedgerSource("job-1", rows, "email"),
    )
    assert (result.summary.sent, result.exit_code) == (2, 0)
    assert sorted(smtp_server.handler.by_recipient()) == ["ann@example.org", "bob@example.org"]
    assert load_config(db, "spring").source == "s3://lists/spring.csv"
    assert deliveries(db, "spring") == {"sent": 2}


def test_a_problem_in_the_send_pass_is_exit_5_unless_not_one_message_was_attempted() -> None:
    from smartmail.campaign import CampaignResult
    from smartmail.ratelimit import Unlimited
    from smartmail.report import Metrics, Outcome, Summary
    from smartmail.sources import Row

    def result(*statuses: str) -> CampaignResult:
        metrics = Metrics(len(statuses))
        for n, status in enumerate(statuses):
            metrics.record(Outcome(Row(n + 2, {}), f"u{n}@x.org", status))  # type: ignore[arg-type]
        summary = Summary.build(
            metrics, Unlimited().stats(), campaign="c", transport="t", source="s"
        )
        return CampaignResult(summary=summary, error="the file changed during the run")

    assert result("sent", "unsent").exit_code == 5
    assert result("failed", "unsent").exit_code == 5  # attempted: it may have reached the server
    assert result("skipped", "unsent").exit_code == 2 and result("unsent").nothing_sent


def test_a_report_not_written_after_an_interruption_is_exit_5_once_something_was_sent() -> None:
    from smartmail.campaign import CampaignResult
    from smartmail.ratelimit import Unlimited
    from smartmail.report import Metrics, Outcome, Summary
    from smartmail.sources import Row

    def result(*statuses: str) -> CampaignResult:
        metrics = Metrics(len(statuses))
        for n, status in enumerate(statuses):
            metrics.record(Outcome(Row(n + 2, {}), f"u{n}@x.org", status))  # type: ignore[arg-type]
        summary = Summary.build(
            metrics, Unlimited().stats(), campaign="c", transport="t", source="s", interrupted=True
        )
        return CampaignResult(summary=summary, report_error="--report r.json: cannot write")

    # "Interrupted, re-run" would hide that the report a script reads next is not this run's.
    assert result("sent", "unsent").exit_code == 5
    assert result("unsent").exit_code == 130  # nothing sent: the interruption says it all


def test_a_report_not_written_after_a_stop_is_exit_5_once_something_was_sent() -> None:
    from smartmail.campaign import CampaignResult
    from smartmail.ratelimit import Unlimited
    from smartmail.report import Metrics, Outcome, Summary
    from smartmail.sources import Row

    def result(*statuses: str) -> CampaignResult:
        metrics = Metrics(len(statuses))
        for n, status in enumerate(statuses):
            metrics.record(Outcome(Row(n + 2, {}), f"u{n}@x.org", status))  # type: ignore[arg-type]
        summary = Summary.build(
            metrics, Unlimited().stats(), campaign="c", transport="t", source="s",
            stopped="the server refuses the sender",
        )  # fmt: skip
        return CampaignResult(summary=summary, report_error="--report r.json: cannot write")

    # As over 130: "stopped, the next run sends the rest" would hide the missing report.
    assert result("sent", "unsent").exit_code == 5
    assert result("failed", "unsent").exit_code == 5
    assert result("unsent").exit_code == 4  # nothing sent: the stop says it all


def test_the_smtp_password_is_given_per_run_and_never_shown_or_stored(
    tls_smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    from smartmail import Secrets

    from .conftest import SMTP_PASSWORD, SMTP_USER

    assert tls_smtp_server.ca_file is not None
    secrets = Secrets(smtp_password=SMTP_PASSWORD)
    assert SMTP_PASSWORD not in repr(secrets)
    db = tmp_path / "state.db"
    config = CampaignConfig(
        template=str(template_file),
        source=str(make_csv(tmp_path / "r.csv", 2)),
        transport=tls_smtp_server.url,
        smtp_user=SMTP_USER,
        smtp_ca_file=tls_smtp_server.ca_file,
    )
    options = RunOptions(state_path=str(db), failed_csv=str(tmp_path / "f.csv"))
    result = run_campaign(config, options, secrets=secrets)
    assert (result.summary.sent, result.exit_code) == (2, 0)
    assert SMTP_PASSWORD.encode() not in db.read_bytes()
    assert SMTP_PASSWORD not in json.dumps(load_config(db, result.summary.campaign).to_dict())


def _asking() -> tuple[list[Plan], Callable[[Plan], bool]]:
    """A confirm hook that says yes, and the plans it was asked about."""
    asked: list[Plan] = []

    def confirm(plan: Plan) -> bool:
        asked.append(plan)
        return True

    return asked, confirm


def test_a_refused_login_is_said_before_the_prompt_and_nothing_is_sent(
    tls_smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    """The operator is not asked to confirm a run that cannot log in: the prompt would take
    a "yes" and the run would then stop at its first connection."""
    from smartmail.errors import StopRunError

    asked, confirm = _asking()
    config = CampaignConfig(
        template=str(template_file),
        source=str(make_csv(tmp_path / "r.csv", 3)),
        transport=tls_smtp_server.url,
        smtp_user=SMTP_USER,
        smtp_ca_file=tls_smtp_server.ca_file,
        campaign="login",
    )
    db = tmp_path / "state.db"
    with pytest.raises(StopRunError, match="refused the login") as stopped:
        run_campaign(
            config,
            RunOptions(state_path=str(db)),
            Hooks(confirm=confirm),
            secrets=Secrets(smtp_password="wrong"),
        )
    assert stopped.value.exit_code == 4 and "wrong" not in str(stopped.value)
    assert asked == [] and not tls_smtp_server.handler.received
    assert deliveries(db, "login") == {}
    result = run_campaign(  # the lock was released; with the right password it goes
        config,
        RunOptions(state_path=str(db)),
        Hooks(confirm=confirm),
        secrets=Secrets(smtp_password=SMTP_PASSWORD),
    )
    assert len(asked) == 1 and result.summary.sent == 3
    assert len(tls_smtp_server.handler.received) == 3


def test_no_server_is_said_before_the_prompt(tmp_path: Path, template_file: Path) -> None:
    from smartmail.errors import StopRunError

    from .conftest import free_port

    asked, confirm = _asking()
    config = CampaignConfig(
        template=str(template_file),
        source=str(make_csv(tmp_path / "r.csv", 2)),
        transport=f"smtp://127.0.0.1:{free_port()}",
        smtp_security="none",
        campaign="nobody",
    )
    with pytest.raises(StopRunError, match="cannot connect") as stopped:
        run_campaign(
            config,
            RunOptions(state_path=str(tmp_path / "s.db")),
            Hooks(confirm=confirm),
        )
    assert stopped.value.exit_code == 4 and asked == []


def test_the_connection_made_before_the_prompt_is_the_one_that_sends(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    """Checking the login costs no second connection (nor a second login)."""
    config = smtp_config(
        smtp_server, make_csv(tmp_path / "r.csv", 5), template_file, workers=1, campaign="one"
    )
    result = run_campaign(
        config, RunOptions(state_path=str(tmp_path / "s.db")), Hooks(confirm=lambda p: True)
    )
    assert result.summary.sent == 5 and smtp_server.handler.connections == 1


def test_a_connection_dropped_while_the_prompt_waited_is_replaced_without_a_retry(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow answer at the prompt: the server may have closed the checked connection. It is
    asked (NOOP) and, gone, replaced by a new one: no message fails or is retried for it."""
    from smartmail.transports.smtp import SmtpTransport

    monkeypatch.setattr(SmtpTransport, "SPARE_FRESH", 0.0)
    smtp_server.handler.noop_reply = "421 4.4.2 idle for too long, closing"
    config = smtp_config(
        smtp_server, make_csv(tmp_path / "r.csv", 4), template_file, workers=1, campaign="idle"
    )
    result = run_campaign(
        config, RunOptions(state_path=str(tmp_path / "s.db")), Hooks(confirm=lambda p: True)
    )
    assert result.summary.sent == 4 and result.summary.retries == 0
    assert smtp_server.handler.connections == 2 and len(smtp_server.handler.received) == 4


def test_a_connection_that_stopped_answering_at_the_prompt_costs_seconds_not_the_timeout(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its NOOP is never answered: the worker waited out the whole --timeout (30 s by
    default) before it gave the connection up."""
    import time

    from smartmail.transports.smtp import SmtpTransport

    monkeypatch.setattr(SmtpTransport, "SPARE_FRESH", 0.0)
    monkeypatch.setattr(SmtpTransport, "NOOP_TIMEOUT", 0.3)
    smtp_server.handler.noop_reply = "never"
    config = smtp_config(
        smtp_server,
        make_csv(tmp_path / "r.csv", 3),
        template_file,
        workers=1,
        campaign="mute",
        timeout=60.0,
    )
    began = time.monotonic()
    result = run_campaign(
        config, RunOptions(state_path=str(tmp_path / "s.db")), Hooks(confirm=lambda p: True)
    )
    assert time.monotonic() - began < 20  # not the whole --timeout (60 s here)
    assert result.summary.sent == 3 and result.summary.retries == 0
    assert smtp_server.handler.connections == 2


def test_a_wal_removed_while_the_prompt_waits_stops_the_run_before_it_sends(
    tmp_path: Path, template_file: Path
) -> None:
    """The -wal's identity was first taken at the first commit: one removed at the prompt
    (a cleanup job) went unseen, and a crash later would have sent the rows again."""
    db = tmp_path / "state.db"
    config = CampaignConfig(
        template=str(template_file),
        source=str(make_csv(tmp_path / "r.csv", 6)),
        transport=f"file://{tmp_path / 'outbox'}",
        campaign="wal",
    )

    def remove_the_wal(plan: Plan) -> bool:
        Path(f"{db}-wal").unlink()
        return True

    options = RunOptions(state_path=str(db), failed_csv=str(tmp_path / "f.csv"))
    result = run_campaign(config, options, Hooks(confirm=remove_the_wal))
    assert result.exit_code == 2 and result.error is not None  # 2: not one was attempted
    assert "its -wal file was removed or replaced" in result.error
    assert result.summary.sent == 0 and not list((tmp_path / "outbox").glob("*.eml"))
