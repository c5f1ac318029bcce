"""Pre-flight decides, the send pass does exactly that: snapshot, full MIME, suppressed copies.

Real files, the real SQLite ledger and suppression list, a real SMTP server (aiosmtpd) and moto
for S3. Fault injection (an unexpected exception in one row) is the only thing patched.
"""

from __future__ import annotations

import csv
import json
import os
import stat
import tempfile
from collections.abc import Sequence
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import boto3
import pytest
from click.testing import CliRunner
from moto import mock_aws

from smartmail import (
    MessageTemplate,
    RecipientSource,
    RetryPolicy,
    SendOptions,
    SourceSpec,
    build,
    engine,
    preflight,
    send_campaign,
)
from smartmail import cli as cli_module
from smartmail.cli import cli
from smartmail.engine import NullJournal
from smartmail.errors import SourceError
from smartmail.ledger import Ledger, LedgerError
from smartmail.sources import Snapshot
from smartmail.state import connect
from smartmail.suppression import SuppressionList
from smartmail.transports import TransportOptions, get_transport

from .aws_recorder import RECORDER
from .conftest import SmtpServer, make_csv, write
from .unprivileged import unprivileged

NO_WAIT = RetryPolicy(max_retries=1, initial=0.0, maximum=0.0, jitter=0.0)


def transport(server: SmtpServer) -> Any:
    return get_transport(server.url, TransportOptions(smtp_security="none"))


def failed_rows(path: Path) -> dict[str, str]:
    with path.open(newline="") as fh:
        return {row["email"]: row["error"] for row in csv.DictReader(fh)}


def recipients(server: SmtpServer) -> list[str]:
    return sorted(a for r in server.handler.received for a in r.rcpt_tos)


# --- the snapshot --------------------------------------------------------------------------


def test_snapshot_is_private_and_removed_at_the_end(tmp_path: Path) -> None:
    path = make_csv(tmp_path / "r.csv", 3)
    source = RecipientSource(SourceSpec(str(path)))
    with source.snapshot() as snap:
        assert isinstance(snap, Snapshot)
        copy = snap.path
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600
        assert stat.S_IMODE(copy.parent.stat().st_mode) == 0o700
        assert copy.read_bytes() == path.read_bytes()
        assert snap.name == str(path)  # errors and reports name the user's file
        assert [r.values["email"] for r, _ in snap.rows()] == [
            f"user{i}@example.org" for i in range(3)
        ]
    assert not copy.exists() and not copy.parent.exists()
    with pytest.raises(SourceError, match="already closed"):
        list(snap.rows())


def test_a_copy_left_by_a_killed_run_is_removed_by_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    path = make_csv(tmp_path / "r.csv", 2)
    # What a SIGKILLed run leaves: a copy nobody holds, from more than a minute ago.
    killed = private / "smartmail-snapshot-killed"
    killed.mkdir(mode=0o700)
    (killed / "recipients.csv").write_text("email\nsecret@example.org\n")
    os.utime(killed, (1_000_000_000, 1_000_000_000))
    live = RecipientSource(SourceSpec(str(path))).snapshot()
    assert isinstance(live, Snapshot)
    os.utime(live.path.parent, (1_000_000_000, 1_000_000_000))  # old, but its run is alive
    with RecipientSource(SourceSpec(str(path))).snapshot() as other:
        assert not killed.exists()
        assert live.path.exists() and len(list(live.rows())) == 2
        assert len(list(other.rows())) == 2
    live.close()
    assert not list(private.iterdir())


def test_snapshot_errors_name_the_original_file_and_row(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_bytes(b"email,name\nann@x.org,Ann\nbad@x.org,\xff\n")
    with (
        RecipientSource(SourceSpec(str(path))).snapshot() as snap,
        pytest.raises(SourceError) as err,
    ):
        list(snap.rows())
    # The user's file, not the private copy, and the cell that holds the bad byte.
    assert str(err.value).startswith(f"{path}, row 3, column 'name': bytes that are not valid")


def test_unreadable_list_is_one_line() -> None:
    def body(folder: Path) -> None:
        path = make_csv(folder / "r.csv", 2)
        path.chmod(0)
        with pytest.raises(SourceError, match="cannot read: Permission denied"):
            RecipientSource(SourceSpec(str(path))).snapshot()

    unprivileged(body)


def test_no_room_for_the_snapshot_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_csv(tmp_path / "r.csv", 2)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-dir"))
    with pytest.raises(SourceError) as err:
        RecipientSource(SourceSpec(str(path))).snapshot()
    assert str(path) in str(err.value) and "TMPDIR" in str(err.value)


def test_file_edited_after_preflight_changes_nothing(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    """The user edits the list while the confirmation prompt waits: a recipient removed, one
    added, one changed. The run sends exactly what pre-flight checked, to whom it decided."""
    path = make_csv(tmp_path / "r.csv", 4)
    template = MessageTemplate.load(template_file)
    options = SendOptions(workers=2)
    with RecipientSource(SourceSpec(str(path))).snapshot() as snap:
        checked = preflight(snap, template, options, keep_rendered=1 << 20)
        write(path, "email,name,code\nuser0@example.org,X,X\nnew@example.org,New,N\n")
        summary = send_campaign(
            snap, template, transport(smtp_server), options=options, checked=checked
        )
    assert summary.sent == 4 and summary.rows == 4
    assert recipients(smtp_server) == [f"user{i}@example.org" for i in range(4)]
    first = smtp_server.handler.by_recipient()["user0@example.org"][0].message
    assert str(first["Subject"]) == "Hello User 0"  # not the edited "X"


def test_send_pass_refuses_another_copy_than_preflight_checked(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    path = make_csv(tmp_path / "r.csv", 3)
    template = MessageTemplate.load(template_file)
    source = RecipientSource(SourceSpec(str(path)))
    with source.snapshot() as snap:
        checked = preflight(snap, template, SendOptions())
    write(path, "email,name,code\nother@example.org,O,O\n")
    with pytest.raises(SourceError, match="not reading the snapshot pre-flight checked"):
        send_campaign(source, template, transport(smtp_server), checked=checked)
    assert smtp_server.handler.received == []


def test_cli_send_ignores_an_edit_made_while_the_prompt_waits(
    tmp_path: Path, template_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_csv(tmp_path / "r.csv", 3)
    outbox = tmp_path / "outbox"
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    asked: list[int] = []

    def confirm_while_editing(*args: Any) -> bool:
        # What a user does at the prompt: remove user1 from the list, then say yes.
        asked.append(1)
        write(path, "email,name,code\nuser0@example.org,User 0,C0\nuser2@example.org,User 2,C2\n")
        return True

    real_hooks = cli_module._hooks

    def hooks_with_prompt(kw: Any = None) -> Any:
        hooks = real_hooks(kw)
        hooks.confirm = confirm_while_editing  # as on a terminal
        return hooks

    monkeypatch.setattr(cli_module, "_hooks", hooks_with_prompt)
    result = CliRunner().invoke(
        cli,
        ["send", str(path), "-t", str(template_file), "--transport", f"file://{outbox}",
         "--no-state", "--progress", "none", "--failed-csv", str(tmp_path / "f.csv")],
    )  # fmt: skip
    assert asked and result.exit_code == 0, result.output
    sent = sorted(p.name.split("-")[1] for p in outbox.glob("*.eml"))
    assert sent == [f"user{i}@example.org" for i in range(3)]
    # The private copy was made, and is gone once the command ends.
    assert not list(private.iterdir())


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def test_s3_list_is_downloaded_once_and_kept(
    aws_env: None, tmp_path: Path, template_file: Path
) -> None:
    body = "email,name,code\n" + "".join(f"user{i}@example.org,U{i},C{i}\n" for i in range(5))
    outbox = tmp_path / "outbox"
    with mock_aws():
        setup = boto3.client("s3")
        setup.create_bucket(Bucket="lists")
        setup.put_object(Bucket="lists", Key="june.csv", Body=body.encode())
        before = RECORDER.calls[("s3", "GetObject")]
        source = RecipientSource(SourceSpec("s3://lists/june.csv"))  # smartmail's own client
        template = MessageTemplate.load(template_file)
        with source.snapshot() as snap:
            checked = preflight(snap, template, SendOptions())
            # The object is replaced mid-run: the run goes on with what it checked.
            setup.put_object(Bucket="lists", Key="june.csv", Body=b"email\nx@example.org\n")
            summary = send_campaign(
                snap, template, get_transport(f"file://{outbox}"), checked=checked
            )
        fetched = RECORDER.calls[("s3", "GetObject")] - before
    assert fetched == 1
    assert summary.sent == 5
    assert len(list(outbox.glob("*.eml"))) == 5


def test_library_send_campaign_reads_s3_once(
    aws_env: None, tmp_path: Path, template_file: Path
) -> None:
    with mock_aws():
        setup = boto3.client("s3")
        setup.create_bucket(Bucket="lists")
        setup.put_object(Bucket="lists", Key="r.csv", Body=b"email,name,code\na@x.org,A,1\n")
        before = RECORDER.calls[("s3", "GetObject")]
        summary = send_campaign(
            RecipientSource(SourceSpec("s3://lists/r.csv")),
            MessageTemplate.load(template_file),
            get_transport(f"file://{tmp_path / 'out'}"),
        )
        assert RECORDER.calls[("s3", "GetObject")] - before == 1
    assert summary.sent == 1


# --- pre-flight builds the whole message ---------------------------------------------------

ATTACHING = """\
From: Acme <news@acme.example>
To: {{ email }}
Subject: Your invoice
Attachment: {{ invoice }}

Attached.
"""


def invoices(tmp_path: Path, n: int) -> tuple[Path, Path]:
    lines = ["email,invoice"]
    for i in range(n):
        (tmp_path / f"inv{i}.pdf").write_bytes(f"invoice {i}".encode())
        lines.append(f"user{i}@example.org,inv{i}.pdf")
    return write(tmp_path / "r.csv", "\n".join(lines) + "\n"), write(tmp_path / "t.txt", ATTACHING)


def attachment_of(server: SmtpServer, address: str) -> bytes:
    msg = server.handler.by_recipient()[address][0].message
    part = next(msg.iter_attachments())
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload


def test_attachment_removed_after_preflight_is_sent_as_checked(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    path, template_path = invoices(tmp_path, 3)
    template = MessageTemplate.load(template_path)
    with RecipientSource(SourceSpec(str(path))).snapshot() as snap:
        checked = preflight(snap, template, SendOptions(), keep_rendered=1 << 20)
        (tmp_path / "inv1.pdf").unlink()
        summary = send_campaign(snap, template, transport(smtp_server), checked=checked)
    assert summary.sent == 3 and summary.failed == 0
    assert attachment_of(smtp_server, "user1@example.org") == b"invoice 1"


def test_attachment_removed_past_the_cache_fails_that_row_only(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    path, template_path = invoices(tmp_path, 3)
    template = MessageTemplate.load(template_path)
    with RecipientSource(SourceSpec(str(path))).snapshot() as snap:
        checked = preflight(snap, template, SendOptions(), keep_rendered=0)
        assert not checked.kept
        (tmp_path / "inv1.pdf").unlink()
        options = SendOptions(failed_csv=tmp_path / "failed.csv")
        summary = send_campaign(
            snap, template, transport(smtp_server), options=options, checked=checked
        )
    assert (summary.sent, summary.failed) == (2, 1)
    assert recipients(smtp_server) == ["user0@example.org", "user2@example.org"]
    assert failed_rows(tmp_path / "failed.csv") == {
        "user1@example.org": f"render: attachment not found: inv1.pdf (in {tmp_path})"
    }


def test_unreadable_attachment_is_found_by_preflight() -> None:
    def body(folder: Path) -> None:
        path, template_path = invoices(folder, 2)
        (folder / "inv1.pdf").chmod(0)
        checked = preflight(
            RecipientSource(SourceSpec(str(path))),
            MessageTemplate.load(template_path),
            SendOptions(),
        )
        assert checked.valid == 1 and checked.invalid == 1
        problem = str(checked.problems[0])
        assert "row 3" in problem and "Permission denied" in problem

    unprivileged(body)


def test_a_message_that_cannot_be_built_is_invalid_at_preflight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, template_file: Path
) -> None:
    from smartmail.message import check_buildable as real

    def faulty(rendered: Any, *args: Any) -> Any:
        if rendered.recipient == "user1@example.org":
            raise UnicodeEncodeError("ascii", "é", 0, 1, "cannot encode")
        return real(rendered, *args)

    monkeypatch.setattr(engine, "check_buildable", faulty)
    path = make_csv(tmp_path / "r.csv", 3)
    source = RecipientSource(SourceSpec(str(path)))
    checked = preflight(source, MessageTemplate.load(template_file), SendOptions())
    assert (checked.valid, checked.invalid) == (2, 1)
    assert checked.skipped[3].startswith("invalid: the message cannot be encoded")
    aborting = preflight(
        source, MessageTemplate.load(template_file), SendOptions(on_invalid="abort")
    )
    assert not aborting.ok


@pytest.mark.parametrize(
    "template_text",
    [
        "From: a@acme.example\nTo: {{ email }}\nSubject: Hi\n\nHello {{ name }}\n",
        "From: a@acme.example\nTo: {{ email }}\nSubject: Hi {{ name }}\n\nHello\n",
    ],
    ids=["body", "header"],
)
def test_a_value_that_cannot_be_encoded_is_found_by_preflight_not_the_send_pass(
    smtp_server: SmtpServer, tmp_path: Path, template_text: str
) -> None:
    """UTF-7 decodes `+2AA-` to a lone surrogate, which no message can carry. Pre-flight
    finds it (the row is invalid, the run does not crash), so the send pass fails nothing."""
    path = write(
        tmp_path / "r.csv",
        "email,name\nuser0@example.org,Ann\nuser1@example.org,Bob+2AA-\nuser2@example.org,Cy\n",
    )
    template = MessageTemplate(template_text)
    with RecipientSource(SourceSpec(str(path), encoding="utf-7")).snapshot() as snap:
        checked = preflight(snap, template, SendOptions(), keep_rendered=1 << 20)
        assert (checked.valid, checked.invalid) == (2, 1)
        assert "row 3" in str(checked.problems[0])
        assert "cannot be encoded" in checked.skipped[3]
        summary = send_campaign(
            snap, template, transport(smtp_server), checked=checked, retry=NO_WAIT
        )
    assert (summary.sent, summary.failed, summary.skipped) == (2, 0, 1)
    assert recipients(smtp_server) == ["user0@example.org", "user2@example.org"]


def test_kept_messages_count_their_own_attachments_against_the_budget(tmp_path: Path) -> None:
    """Pre-flight keeps what it checked within a memory budget: a per-row attachment (an
    invoice each) counts against it, or 10,000 invoices of 1 MB would all be held at once. A
    file attached to every row is held once, and counted once."""
    lines = ["email,invoice"]
    for i in range(20):
        (tmp_path / f"inv{i}.pdf").write_bytes(os.urandom(100_000))
        lines.append(f"user{i}@example.org,inv{i}.pdf")
    path = write(tmp_path / "r.csv", "\n".join(lines) + "\n")
    template = MessageTemplate.load(write(tmp_path / "t.txt", ATTACHING))
    budget = 500_000
    checked = preflight(
        RecipientSource(SourceSpec(str(path))), template, SendOptions(), keep_rendered=budget
    )
    assert checked.valid == 20
    held = {id(p): len(p) for r in checked.kept.values() for p in r.attachment_parts or ()}
    assert 0 < len(checked.kept) < 20
    assert sum(held.values()) <= budget + 140_000  # at most one message over

    shared = write(
        tmp_path / "shared.csv",
        "email,invoice\n" + "".join(f"user{i}@example.org,inv0.pdf\n" for i in range(20)),
    )
    checked = preflight(
        RecipientSource(SourceSpec(str(shared))), template, SendOptions(), keep_rendered=budget
    )
    assert len(checked.kept) == 20


def test_kept_messages_count_their_rows_values_against_the_budget(tmp_path: Path) -> None:
    """A kept message holds its row: 2,000 rows with a 100 KB column the template never uses
    were all kept against a 32 MB budget (a 216 MB pre-flight)."""
    path = write(
        tmp_path / "r.csv",
        "email,note\n" + "".join(f"user{i}@example.org,{'n' * 100_000}\n" for i in range(200)),
    )
    template = MessageTemplate.load(
        write(tmp_path / "t.txt", "From: a@acme.example\nTo: {{ email }}\nSubject: s\n\nHi\n")
    )
    budget = 2_000_000
    checked = preflight(
        RecipientSource(SourceSpec(str(path))), template, SendOptions(), keep_rendered=budget
    )
    assert checked.valid == 200
    held = sum(len(v) for r in checked.kept.values() for v in r.row.values.values())
    assert 0 < len(checked.kept) < 200
    assert held <= budget + 101_000  # at most one message over


def test_unexpected_error_in_the_send_pass_fails_that_row_and_the_run_goes_on(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_csv(tmp_path / "r.csv", 5)
    template = MessageTemplate.load(template_file)
    real = build
    with RecipientSource(SourceSpec(str(path))).snapshot() as snap:
        checked = preflight(snap, template, SendOptions(), keep_rendered=0)

        def faulty(rendered: Any, **kw: Any) -> Any:
            if rendered.recipient == "user2@example.org":
                raise RuntimeError("a bug")
            return real(rendered, **kw)

        monkeypatch.setattr(engine, "build", faulty)
        options = SendOptions(failed_csv=tmp_path / "failed.csv")
        summary = send_campaign(
            snap, template, transport(smtp_server), options=options, checked=checked, retry=NO_WAIT
        )
    assert (summary.sent, summary.failed) == (4, 1)
    assert failed_rows(tmp_path / "failed.csv") == {
        "user2@example.org": "internal error: RuntimeError: a bug"
    }
    assert "user2@example.org" not in recipients(smtp_server)


def test_send_pass_renders_nothing_again_and_builds_each_message_once(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_csv(tmp_path / "r.csv", 20)
    template = MessageTemplate.load(template_file)
    calls: list[int] = []
    real = build

    def counting(rendered: Any, **kw: Any) -> Any:
        calls.append(rendered.row.number)
        return real(rendered, **kw)

    renders: list[int] = []
    real_render = template.render

    def counting_render(row: Any, *a: Any, **kw: Any) -> Any:
        renders.append(row.number)
        return real_render(row, *a, **kw)

    monkeypatch.setattr(engine, "build", counting)
    monkeypatch.setattr(template, "render", counting_render)
    with RecipientSource(SourceSpec(str(path))).snapshot() as snap:
        checked = preflight(snap, template, SendOptions(), keep_rendered=1 << 20)
        # Checked and kept rendered; built only when sent, once, with the Date of sending.
        assert len(renders) == 20 and not calls and len(checked.kept) == 20
        summary = send_campaign(snap, template, transport(smtp_server), checked=checked)
    assert summary.sent == 20 and sorted(calls) == list(range(2, 22)) and len(renders) == 20
    assert not checked.kept  # handed over, not kept for the whole run
    ids = {r.message["Message-ID"] for r in smtp_server.handler.received}
    assert len(ids) == 20


def test_a_message_checked_by_preflight_is_dated_when_it_is_sent(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A confirmation prompt can wait for hours: the Date is the sending time, not pre-flight's."""
    import types

    from smartmail import message as message_module

    path = make_csv(tmp_path / "r.csv", 2)
    template = MessageTemplate.load(template_file)
    with RecipientSource(SourceSpec(str(path))).snapshot() as snap:
        checked = preflight(snap, template, SendOptions(), keep_rendered=1 << 20)
        later = 4_102_444_800.0  # 2100-01-01T00:00:00Z
        monkeypatch.setattr(message_module, "time", types.SimpleNamespace(time=lambda: later))
        summary = send_campaign(snap, template, transport(smtp_server), checked=checked)
    assert summary.sent == 2
    dates = {r.message["Date"] for r in smtp_server.handler.received}
    assert dates == {"Fri, 01 Jan 2100 00:00:00 +0000"}


# --- every envelope address honours the suppression list -----------------------------------

COPIED = """\
From: Acme <news@acme.example>
To: {{ email }}
Cc: {{ manager }}, "Smith, John" <john@acme.example>
Bcc: archive@acme.example
Subject: Report for {{ email }}

Hello.
"""


def copied_campaign(tmp_path: Path) -> tuple[Path, Path, Path]:
    csv_path = write(
        tmp_path / "r.csv",
        "email,manager\n"
        "ann@example.org,boss@acme.example\n"
        "bob@example.org,gone@acme.example\n"
        "carl@example.org,boss@acme.example\n"
        "dora@example.org,boss@acme.example\n",
    )
    db = tmp_path / "state.db"
    conn = connect(db)
    SuppressionList(conn).add("Gone@ACME.example", "bounce")
    SuppressionList(conn).add("archive@acme.example", "manual")
    SuppressionList(conn).add("dora@example.org", "complaint")
    conn.close()
    return csv_path, write(tmp_path / "t.txt", COPIED), db


def test_suppressed_copies_are_left_out_and_the_rest_is_sent(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    csv_path, template_path, db = copied_campaign(tmp_path)
    template = MessageTemplate.load(template_path)
    with Ledger(db, "report") as ledger:
        ledger.acquire()
        with RecipientSource(SourceSpec(str(csv_path))).snapshot() as snap:
            checked = preflight(snap, template, SendOptions(), journal=ledger, keep_rendered=1)
            summary = send_campaign(
                snap, template, transport(smtp_server), journal=ledger, checked=checked
            )
    # Pre-flight said so, once per address left out, naming the row.
    assert checked.suppressed_copies == 4  # archive on 3 rows, gone@ on bob's
    notes = [str(p) for p in checked.problems]
    assert any("row 3" in n and "gone@acme.example is suppressed (bounce)" in n for n in notes)
    assert checked.skipped == {5: "suppressed: complaint"}  # dora, the recipient, as before
    assert checked.envelope_recipients == 8  # what SES would count: 3 + 2 + 3
    assert (summary.sent, summary.skipped) == (3, 1)
    assert summary.warnings == [
        "4 suppressed Cc/Bcc address(es) left out of their messages (pre-flight listed them)"
    ]
    by = {r.rcpt_tos[0]: r for r in smtp_server.handler.received}
    assert sorted(by) == ["ann@example.org", "bob@example.org", "carl@example.org"]
    for received in by.values():
        assert "archive@acme.example" not in received.rcpt_tos
        assert "Bcc" not in received.message
    bob = by["bob@example.org"]
    assert sorted(bob.rcpt_tos) == ["bob@example.org", "john@acme.example"]
    cc = getaddresses([str(bob.message["Cc"])])
    assert cc == [("Smith, John", "john@acme.example")]  # the name is still one phrase
    # A Cc is not a campaign delivery: the same manager is copied on every row that names them.
    copied = [r for r in smtp_server.handler.received if "boss@acme.example" in r.rcpt_tos]
    assert len(copied) == 2


def test_a_copy_suppressed_after_preflight_is_left_out_too(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    csv_path, template_path, db = copied_campaign(tmp_path)
    template = MessageTemplate.load(template_path)
    with Ledger(db, "later") as ledger:
        ledger.acquire()
        with RecipientSource(SourceSpec(str(csv_path))).snapshot() as snap:
            checked = preflight(
                snap, template, SendOptions(), journal=ledger, keep_rendered=1 << 20
            )
            assert len(checked.kept) == 3
            # A bounce arrives (smartmail events) while the confirmation prompt waits.
            conn = connect(db)
            SuppressionList(conn).add("boss@acme.example", "bounce")
            conn.close()
            summary = send_campaign(
                snap, template, transport(smtp_server), journal=ledger, checked=checked
            )
    assert summary.sent == 3
    for received in smtp_server.handler.received:
        assert "boss@acme.example" not in received.rcpt_tos
        assert "boss@acme.example" not in str(received.message["Cc"])


def test_recipients_suppressed_after_preflight_are_skipped_however_far_down_the_file(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    """The send pass asks the ledger about rows a few dozen at a time: a bounce that lands
    between pre-flight and the send still stops each affected row, early, mid-file or last."""
    csv_path = make_csv(tmp_path / "r.csv", 70)
    db = tmp_path / "state.db"
    template = MessageTemplate.load(template_file)
    late = ["user3@example.org", "User40@Example.org", "user69@example.org"]
    with Ledger(db, "late-bounces") as ledger:
        ledger.acquire()
        with RecipientSource(SourceSpec(str(csv_path))).snapshot() as snap:
            checked = preflight(snap, template, SendOptions(), journal=ledger, keep_rendered=0)
            assert checked.valid == 70
            conn = connect(db)
            for address in late:
                SuppressionList(conn).add(address, "bounce")
            conn.commit()
            conn.close()
            summary = send_campaign(
                snap, template, transport(smtp_server), journal=ledger, checked=checked
            )
    assert (summary.sent, summary.skipped) == (67, 3)
    got = smtp_server.handler.by_recipient()
    assert len(got) == 67
    for address in late:
        assert address.lower() not in got


def test_a_suppression_list_that_cannot_be_read_stops_the_run(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    csv_path, template_path, _ = copied_campaign(tmp_path)

    class Unreadable(NullJournal):
        """Readable through pre-flight (4 rows), then the disk fails in the send pass."""

        calls = 0

        def suppressed(self, addresses: Sequence[str]) -> dict[str, str]:
            self.calls += 1
            if self.calls > 4:
                raise LedgerError("state.db: cannot read the suppression list (disk I/O error)")
            return {}

    journal = Unreadable()
    with pytest.raises(LedgerError):
        send_campaign(
            RecipientSource(SourceSpec(str(csv_path))),
            MessageTemplate.load(template_path),
            transport(smtp_server),
            journal=journal,
            options=SendOptions(render_cache_chars=0),
        )
    assert journal.calls == 5  # failed in the send pass, not as a row's failure
    assert smtp_server.handler.received == []


def test_dry_run_warns_about_suppressed_copies(tmp_path: Path) -> None:
    csv_path, template_path, db = copied_campaign(tmp_path)
    result = CliRunner().invoke(
        cli,
        ["dry-run", str(csv_path), "-t", str(template_path), "--state", str(db), "--preview", "0"],
    )
    assert result.exit_code == 0, result.output
    assert "row 3: Cc: gone@acme.example is suppressed (bounce)" in result.output
    assert "4 suppressed Cc/Bcc address(es) left out" in result.output


def test_a_message_left_with_no_address_is_skipped(smtp_server: SmtpServer, tmp_path: Path) -> None:
    csv_path = write(tmp_path / "r.csv", "email,team\nann@example.org,team@acme.example\n")
    template_path = write(
        tmp_path / "t.txt",
        "From: a@acme.example\nTo: {{ team }}\nSubject: s\n\nx\n",
    )
    db = tmp_path / "state.db"
    conn = connect(db)
    SuppressionList(conn).add("team@acme.example", "unsubscribe")
    conn.close()
    with Ledger(db, "empty") as ledger:
        ledger.acquire()
        summary = send_campaign(
            RecipientSource(SourceSpec(str(csv_path))),
            MessageTemplate.load(template_path),
            transport(smtp_server),
            journal=ledger,
        )
    assert (summary.sent, summary.skipped) == (0, 1)
    assert smtp_server.handler.received == []


def test_suppression_reasons_of_many_addresses(tmp_path: Path) -> None:
    conn = connect(tmp_path / "s.db")
    suppressions = SuppressionList(conn)
    suppressions.add("a@x.org", "bounce")
    suppressions.add("n2222@x.org", "manual")
    # More addresses than SQLite takes parameters in one statement, in batches.
    wanted = ["A@X.org", "b@x.org", *(f"n{i}@x.org" for i in range(2500))]
    assert suppressions.reasons(wanted) == {"A@X.org": "bounce", "n2222@x.org": "manual"}
    assert suppressions.reasons([]) == {}
    conn.close()


@pytest.mark.parametrize(
    ("subject", "column"),
    [("{{ subject }}", "subject"), ("{{ row['Subject Line'] }}  ", "Subject Line")],
)
def test_a_subject_that_renders_empty_is_reported_before_sending(
    smtp_server: SmtpServer, tmp_path: Path, subject: str, column: str
) -> None:
    """Legal, but rarely meant: pre-flight names the file, row and column, and the row goes."""
    csv_path = write(
        tmp_path / "r.csv",
        f"email,{column}\nann@example.org,Your invoice\nbob@example.org,  \n",
    )
    template_path = write(
        tmp_path / "t.txt", f"From: a@acme.example\nSubject: {subject}\n\nHello.\n"
    )
    expected = f"{csv_path}, row 3, column {column!r}: Subject: renders empty; the message goes"
    total = (
        "1 row(s) render an empty Subject; a message sent for one goes without it "
        "(pre-flight listed them)"
    )
    dry = CliRunner().invoke(
        cli, ["dry-run", str(csv_path), "-t", str(template_path), "--no-state", "--preview", "0"]
    )
    assert dry.exit_code == 0, dry.output
    assert expected in dry.output and total in dry.output
    report = tmp_path / "report.json"
    sent = CliRunner().invoke(
        cli,
        ["send", str(csv_path), "-t", str(template_path), "--transport", smtp_server.url,
         "--smtp-security", "none", "--no-state", "--yes", "--progress", "none",
         "--report", str(report)],
    )  # fmt: skip
    assert sent.exit_code == 0, sent.output
    assert expected in sent.output and "render an empty Subject" in sent.output  # the table
    assert total in json.loads(report.read_text())["warnings"]
    by = {r.rcpt_tos[0]: r.message for r in smtp_server.handler.received}
    assert by["ann@example.org"]["Subject"] == "Your invoice"
    assert "Subject" not in by["bob@example.org"]


def test_send_counts_suppressed_copies_in_its_summary_and_report(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    """As dry-run does: the rows went, so only the summary's warnings can say it."""
    csv_path, template_path, db = copied_campaign(tmp_path)
    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        cli,
        ["send", str(csv_path), "-t", str(template_path), "--transport", smtp_server.url,
         "--smtp-security", "none", "--state", str(db), "--yes", "--progress", "none",
         "--report", str(report)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "row 3: Cc: gone@acme.example is suppressed (bounce)" in result.output
    assert json.loads(report.read_text())["warnings"] == [
        "4 suppressed Cc/Bcc address(es) left out of their messages (pre-flight listed them)"
    ]


def test_a_subject_left_blank_in_the_template_is_no_warning_on_every_row(tmp_path: Path) -> None:
    """The template must give a Subject, so a blank fixed one is how a message without one
    (an email-to-SMS gateway's) is written: meant, and the same for every row. A warning on
    each row, naming no column, would say nothing new and push the rows that are really
    wrong out of the 20 problems shown."""
    lines = [f"u{n}@example.org" for n in range(24)] + ["not-an-address"]
    csv_path = write(tmp_path / "r.csv", "email\n" + "\n".join(lines) + "\n")
    template_path = write(tmp_path / "t.txt", "From: a@acme.example\nSubject:\n\nHello.\n")
    dry = CliRunner().invoke(
        cli, ["dry-run", str(csv_path), "-t", str(template_path), "--no-state", "--preview", "0"]
    )
    assert "row 26" in dry.output and "not-an-address" in dry.output, dry.output
    assert "renders empty" not in dry.output and "without a Subject" not in dry.output
