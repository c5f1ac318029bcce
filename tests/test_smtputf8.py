"""SMTPUTF8 follows what is actually sent: the envelope as it leaves (after suppressed copies
are left out, or the --test-to address in place of the message's own) and every address header
written, since a non-ASCII local part can only go raw, in UTF-8. Real aiosmtpd servers, with
SMTPUTF8 (`smtp_server`) and without (`ascii_smtp_server`), and a real SQLite state."""

from __future__ import annotations

import sqlite3
from email import message_from_bytes, policy
from pathlib import Path

import pytest

from smartmail import CampaignConfig, RunOptions, run_campaign
from smartmail.campaign import Hooks, Plan
from smartmail.cli import main

from .conftest import Received, SmtpServer, run_main, smtp_send, write

UTF8_LOCAL = "ännchen@example.org"


def header(received: Received, name: str) -> str | None:
    value = message_from_bytes(received.data, policy=policy.SMTPUTF8)[name]
    return None if value is None else str(value)


def test_a_non_ascii_local_part_in_reply_to_alone_sends_the_message_as_smtputf8(
    smtp_server: SmtpServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    template = write(
        tmp_path / "t.txt",
        "From: Acme <news@acme.example>\nTo: {{ email }}\nReply-To: {{ reply }}\n"
        "Subject: Hi\n\nHello\n",
    )
    csv = write(tmp_path / "r.csv", f"email,reply\nann@example.org,{UTF8_LOCAL}\n")
    code, _, err = run_main(smtp_send(csv, template, smtp_server, tmp_path), capsys)
    assert code == 0, err
    [got] = smtp_server.handler.received
    assert got.rcpt_tos == ["ann@example.org"]
    assert "SMTPUTF8" in got.mail_options
    assert header(got, "Reply-To") == UTF8_LOCAL


def test_without_smtputf8_on_the_server_such_a_row_fails_saying_why(
    ascii_smtp_server: SmtpServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    template = write(
        tmp_path / "t.txt", "From: news@acme.example\nReply-To: {{ reply }}\nSubject: Hi\n\nHi\n"
    )
    csv = write(tmp_path / "r.csv", f"email,reply\nann@example.org,{UTF8_LOCAL}\n")
    code, _, _ = run_main(smtp_send(csv, template, ascii_smtp_server, tmp_path), capsys)
    assert code == 1 and not ascii_smtp_server.handler.received
    failed = (tmp_path / "f.csv").read_text(encoding="utf-8")
    assert "SMTPUTF8" in failed and "does not offer" in failed


def test_a_cc_suppressed_after_pre_flight_leaves_smtputf8_on_for_a_utf8_reply_to(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    """The Cc, the envelope's only non-ASCII local part, is suppressed while the confirmation
    waits; the message still carries Reply-To: ännchen@..., so it must still go as SMTPUTF8."""
    template = write(
        tmp_path / "t.txt",
        "From: news@acme.example\nTo: {{ email }}\nCc: {{ cc }}\nReply-To: {{ reply }}\n"
        "Subject: Hi\n\nHello\n",
    )
    csv = write(
        tmp_path / "r.csv", f"email,cc,reply\nann@example.org,zoë@example.org,{UTF8_LOCAL}\n"
    )
    state_db = tmp_path / "state.db"

    def suppress_the_cc(plan: Plan) -> bool:
        main(["suppress", "add", "zoë@example.org", "--state", str(state_db)])
        return True

    config = CampaignConfig(
        template=str(template),
        source=str(csv),
        transport=smtp_server.url,
        smtp_security="none",
        retry_wait=0,
    )
    options = RunOptions(state_path=str(state_db), failed_csv=str(tmp_path / "f.csv"))
    result = run_campaign(config, options, Hooks(confirm=suppress_the_cc))
    assert result.exit_code == 0, result.summary
    [got] = smtp_server.handler.received
    assert got.rcpt_tos == ["ann@example.org"]
    assert "SMTPUTF8" in got.mail_options
    assert header(got, "Cc") is None and header(got, "Reply-To") == UTF8_LOCAL
    with sqlite3.connect(state_db) as db:
        assert [s for (s,) in db.execute("SELECT status FROM deliveries")] == ["sent"]


def test_a_proof_to_a_utf8_address_goes_as_smtputf8(
    smtp_server: SmtpServer,
    tmp_path: Path,
    template_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    csv = write(tmp_path / "r.csv", "email,name,code\nann@example.org,Ann,C1\n")
    args = smtp_send(csv, template_file, smtp_server, tmp_path, "--test-to", "tëst@example.org")
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    [got] = smtp_server.handler.received
    assert got.rcpt_tos == ["tëst@example.org"]
    assert "SMTPUTF8" in got.mail_options


def test_a_proof_of_a_message_whose_only_utf8_address_is_a_bcc_needs_no_smtputf8(
    ascii_smtp_server: SmtpServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The Bcc is in the message's own envelope, not in its headers, and a proof does not go
    to it: sent to an ASCII test address, it is plain 7-bit mail any server takes."""
    template = write(
        tmp_path / "t.txt",
        "From: news@acme.example\nTo: {{ email }}\nBcc: {{ bcc }}\nSubject: Hi\n\nHello\n",
    )
    csv = write(tmp_path / "r.csv", f"email,bcc\nann@example.org,{UTF8_LOCAL}\n")
    args = smtp_send(csv, template, ascii_smtp_server, tmp_path, "--test-to", "me@example.org")
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    [got] = ascii_smtp_server.handler.received
    assert got.rcpt_tos == ["me@example.org"]
    assert "SMTPUTF8" not in got.mail_options and got.data.isascii()
