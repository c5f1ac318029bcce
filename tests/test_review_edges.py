"""Edges a hostile-input review found after issue 7: each test is a way a user or an attacker
broke a README promise, tried with the real CLI, an aiosmtpd server, real files and SQLite.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from smartmail.cli import main
from smartmail.errors import EXIT_STOPPED, EXIT_USAGE

from .conftest import SmtpServer, free_port, write
from .test_ledger import run_cli, send_args

NO_TO = "From: Acme <news@acme.example>\nSubject: Hello {{ name }}\n\nHi {{ name }}\n"


@pytest.mark.parametrize("evil", ["\x01", "\x07", "\x7f", "\x9b", "\x1bc", "\x00"])
def test_a_control_character_in_the_recipient_column_never_reaches_the_server(
    smtp_server: SmtpServer, tmp_path: Path, evil: str
) -> None:
    """Without a To: header the recipient column is the To: and the envelope; a non-ASCII
    local part (SMTPUTF8) must not smuggle a control character into either."""
    template = write(tmp_path / "t.txt", NO_TO)
    rows = f"email,name\nzoë{evil}x@example.org,Zoë\nann@example.org,Ann\n"
    csv = write(tmp_path / "r.csv", rows)
    code, out = run_cli(send_args(csv, template, smtp_server, tmp_path / "s.db"))
    received = smtp_server.handler.received
    assert [r.rcpt_tos for r in received] == [["ann@example.org"]]
    assert code == 0  # an invalid row is skipped and reported; the others go
    (line,) = [line for line in out.splitlines() if "row 2, column 'email'" in line]
    assert "invalid local part" in line and line.isprintable()


def test_debug_keeps_the_documented_exit_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--debug adds a traceback; it must not turn "nothing was sent" (2) into 1."""
    monkeypatch.setenv("SMARTMAIL_SMTP_PASSWORD", "hunter2-SECRET")
    monkeypatch.setenv("SMARTMAIL_DEBUG", "")  # --debug sets it; restored after the test
    template = write(tmp_path / "t.txt", NO_TO)
    csv = write(tmp_path / "r.csv", "email,name\nann@example.org,Ann\n")
    args = ["send", str(csv), "-t", str(template), "--yes", "--state", str(tmp_path / "s.db")]
    bad_url = "smpt://mailer:hunter2-SECRET@mail.example.org"
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--transport", bad_url, "--debug"])
    assert exit_info.value.code == EXIT_USAGE
    out, err = capsys.readouterr()
    assert "Traceback" in err and "unknown transport" in err
    assert "hunter2" not in out + err


@pytest.mark.parametrize("what", ["a CSV file", "/dev/null"])
def test_a_state_path_that_is_not_a_database_is_one_line_and_nothing_is_sent(
    smtp_server: SmtpServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str
) -> None:
    template = write(tmp_path / "t.txt", NO_TO)
    csv = write(tmp_path / "r.csv", "email,name\nann@example.org,Ann\n")
    state = csv if what == "a CSV file" else Path(what)  # `--state r.csv`: a slip of the hand
    args = send_args(csv, template, smtp_server, tmp_path / "s.db")
    args[args.index("--state") + 1] = str(state)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert str(state) in line and "state database" in line
    assert smtp_server.handler.received == []
    assert csv.read_text() == "email,name\nann@example.org,Ann\n"


@pytest.mark.parametrize(
    "url",
    [
        "smtp://127.0.0.1:{port}/?password=hunter2-SECRET",
        "smtp://127.0.0.1:{port}/hunter2-SECRET",
        "smtp://127.0.0.1:{port}#hunter2-SECRET",
        "ses+smtp://eu-west-1/hunter2-SECRET?endpoint=127.0.0.1:{port}",
        "ses+smtp://eu-west-1?endpoint=127.0.0.1:{port}#hunter2-SECRET",
    ],
)
def test_an_smtp_url_with_more_than_a_host_is_refused_and_never_stored(
    smtp_server: SmtpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    """A password typed into the URL's path or query (as other tools take it) is not
    ignored, sent anyway and kept in the ledger: the URL is refused, nothing is sent."""
    monkeypatch.setenv("SMARTMAIL_SMTP_PASSWORD", "hunter2-SECRET")
    template = write(tmp_path / "t.txt", NO_TO)
    csv = write(tmp_path / "r.csv", "email,name\nann@example.org,Ann\n")
    db = tmp_path / "s.db"
    args = send_args(csv, template, smtp_server, db)
    args[args.index("--transport") + 1] = url.format(port=smtp_server.port)
    if url.startswith("ses+smtp"):
        args[args.index("--smtp-security") + 1] = "tls"  # ses+smtp refuses "none" anyway
    code, out = run_cli([*args, "--smtp-user", "mailer", "--rate", "10"])
    assert code == EXIT_USAGE
    assert "hunter2" not in out
    assert smtp_server.handler.received == []
    if db.exists():
        dump = "\n".join(sqlite3.connect(db).iterdump())
        assert "hunter2" not in dump


def test_a_re_drive_file_never_offers_rows_a_later_run_has_sent(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    """An outage leaves the rows unsent and lists them in the failed-rows CSV; the next cron
    run sends them. The file from the first run must not outlive that: fed back to `send`
    as the README suggests, it would mail every one of them a second time."""
    template = write(tmp_path / "t.txt", NO_TO)
    csv = write(tmp_path / "r.csv", "email,name\na@example.org,A\nb@example.org,B\n")
    db = tmp_path / "s.db"
    failed = tmp_path / "failed.csv"  # where send_args puts it
    dead = SmtpServer("127.0.0.1", free_port(), smtp_server.handler)
    code, _ = run_cli(send_args(csv, template, dead, db, "--max-connect-failures", "1"))
    assert code == EXIT_STOPPED
    assert "a@example.org" in failed.read_text()
    code, _ = run_cli(send_args(csv, template, smtp_server, db))
    assert code == 0
    assert len(smtp_server.handler.received) == 2
    if failed.exists():  # fed back as a new campaign, it must offer nothing to send again
        code, _ = run_cli(send_args(failed, template, smtp_server, db))
        assert len(smtp_server.handler.received) == 2


def test_a_proof_run_leaves_the_re_drive_file_alone(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    template = write(tmp_path / "t.txt", NO_TO)
    csv = write(tmp_path / "r.csv", "email,name\na@example.org,A\n")
    failed = write(tmp_path / "failed.csv", "email,name,error\na@example.org,A,550 no\n")
    db = tmp_path / "s.db"
    code, _ = run_cli(send_args(csv, template, smtp_server, db, "--test-to", "me@acme.example"))
    assert code == 0 and [r.rcpt_tos for r in smtp_server.handler.received] == [["me@acme.example"]]
    assert failed.read_text() == "email,name,error\na@example.org,A,550 no\n"


@pytest.mark.parametrize(
    "token", ["abc>, <https://evil.example/x", "abc>,<mailto:spy@evil.example", "<x>"]
)
def test_a_value_in_the_unsubscribe_url_cannot_add_an_unsubscribe_target(
    smtp_server: SmtpServer, tmp_path: Path, token: str
) -> None:
    """The value fills its slot in the template's one URL; it cannot close the <...> item and
    open another (a mailto: to the attacker, a one-click POST to their site)."""
    template = write(tmp_path / "t.txt", NO_TO)
    rows = f'email,name,token\na@example.org,A,"{token}"\nb@example.org,B,b7\n'
    csv = write(tmp_path / "r.csv", rows)
    url = "https://acme.example/u?t={{ token }}"
    args = send_args(csv, template, smtp_server, tmp_path / "s.db", "--unsubscribe-url", url)
    code, out = run_cli(args)
    assert code == 0
    (message,) = smtp_server.handler.received
    assert message.rcpt_tos == ["b@example.org"]
    assert message.message["List-Unsubscribe"] == "<https://acme.example/u?t=b7>"
    assert "row 2, column 'token'" in out


def test_a_from_that_renders_empty_is_an_invalid_row_not_a_null_sender(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    """`From: {{ sender }}` with an empty value left the header out and sent with MAIL
    FROM:<>, the null sender of a bounce: no From: (RFC 5322 requires one) and no way back."""
    template = write(tmp_path / "t.txt", "From: {{ sender }}\nSubject: Hi\n\nbody\n")
    rows = "email,sender\na@example.org, \nb@example.org,news@acme.example\n"
    csv = write(tmp_path / "r.csv", rows)
    code, out = run_cli(send_args(csv, template, smtp_server, tmp_path / "s.db"))
    assert code == 0
    (message,) = smtp_server.handler.received
    assert (message.mail_from, message.rcpt_tos) == ("news@acme.example", ["b@example.org"])
    (line,) = [line for line in out.splitlines() if "row 2" in line]
    assert "column 'sender'" in line and "From" in line


@pytest.mark.parametrize(
    ("option", "target"),
    [
        ("--report", "r.csv"),
        ("--failed-csv", "r.csv"),
        ("--report", "t.txt"),
        ("--report", "t.html"),
        ("--failed-csv", "s.db"),
    ],
)
def test_an_output_that_is_an_input_is_refused_before_anything_is_sent(
    smtp_server: SmtpServer, tmp_path: Path, option: str, target: str
) -> None:
    """`--report list.csv` (a slip of the hand) overwrote the recipients list with JSON; a
    failed-rows CSV on the list would replace or remove it; the ledger would be destroyed."""
    template = write(tmp_path / "t.txt", NO_TO)
    write(tmp_path / "t.html", "<p>Hi {{ name }}</p>\n")
    csv = write(tmp_path / "r.csv", "email,name\nann@example.org,Ann\n")
    db = tmp_path / "s.db"
    run_cli(send_args(csv, template, smtp_server, db, "--campaign", "first"))
    assert len(smtp_server.handler.received) == 1
    before = {p.name: p.read_bytes() for p in (template, tmp_path / "t.html", csv, db)}
    args = send_args(csv, template, smtp_server, db, option, str(tmp_path / target))
    if option == "--failed-csv":
        index = args.index("--failed-csv")
        del args[index : index + 2]  # send_args gives one; this is the one under test
        args += [option, str(tmp_path / target)]
    code, out = run_cli(args)
    assert code == EXIT_USAGE
    assert target in out and "nothing was sent" in out
    assert len(smtp_server.handler.received) == 1
    assert {p.name: p.read_bytes() for p in (template, tmp_path / "t.html", csv, db)} == before


@pytest.mark.parametrize(
    "option", [("--rate", "nan"), ("--rate", "inf"), ("--timeout", "nan"), ("--retry-wait", "nan")]
)
def test_a_number_that_is_not_a_number_is_a_usage_error(
    smtp_server: SmtpServer, tmp_path: Path, option: tuple[str, str]
) -> None:
    """Click's range check lets NaN through (every comparison with it is false): `--rate nan`
    sent as fast as the server took it, `--timeout nan` stopped the run as an outage."""
    template = write(tmp_path / "t.txt", NO_TO)
    csv = write(tmp_path / "r.csv", "email,name\nann@example.org,Ann\n")
    code, out = run_cli(send_args(csv, template, smtp_server, tmp_path / "s.db", *option))
    assert code == EXIT_USAGE
    assert option[0] in out
    assert smtp_server.handler.received == []
