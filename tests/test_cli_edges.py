"""The command line's promises at the edges: truthful exit codes, nothing sent when an output
cannot be written or an input read, no escape sequence from a CSV on the terminal, a second
Ctrl-C that aborts at once, a declined prompt. Real files, SQLite, aiosmtpd and processes."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope, Session

from smartmail import cli as cli_module
from smartmail import events, state, suppression
from smartmail.cli import main

from .conftest import TEMPLATE, SmtpServer, free_port, make_csv, run_main, smtp_send, write
from .unprivileged import unprivileged

HOSTILE_TITLE = "\x1b]0;pwned\x07"
HOSTILE_CLEAR = "\x1b[2J"


def main_exit(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    return 0


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# --- outputs are tested for writing before the first send ---------------------------------------


@pytest.mark.parametrize(
    ("option", "where"),
    [
        ("--report", "file/report.json"),  # under a regular file: cannot exist, even for root
        ("--report", "folder"),  # a folder, not a file
        ("--failed-csv", "missing-dir/failed.csv"),
        ("--state", "file/state.db"),
        ("--state", "folder"),
    ],
)
def test_an_unwritable_output_is_exit_2_with_nothing_sent(
    smtp_server: SmtpServer,
    tmp_path: Path,
    template_file: Path,
    capsys: pytest.CaptureFixture[str],
    option: str,
    where: str,
) -> None:
    write(tmp_path / "file", "a regular file\n")
    (tmp_path / "folder").mkdir()
    csv = make_csv(tmp_path / "r.csv", 3)
    args = smtp_send(csv, template_file, smtp_server, tmp_path, option, str(tmp_path / where))
    code, _, err = run_main(args, capsys)
    assert code == 2
    line = one_error_line(err)
    assert str(tmp_path / where.split("/")[0]) in line
    assert not smtp_server.handler.received


def test_an_unwritable_outbox_is_exit_2_with_nothing_sent(
    tmp_path: Path, template_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "file", "a regular file\n")
    csv = make_csv(tmp_path / "r.csv", 2)
    code, _, err = run_main(
        ["send", str(csv), "-t", str(template_file), "--transport", f"file://{tmp_path}/file/out",
         "--yes", "--state", str(tmp_path / "s.db"), "--failed-csv", str(tmp_path / "f.csv")],
        capsys,
    )  # fmt: skip
    assert code == 2 and "outbox" in one_error_line(err)


def test_a_read_only_folder_for_the_report_is_exit_2(
    smtp_server: SmtpServer, capsys: pytest.CaptureFixture[str]
) -> None:
    def body(folder: Path) -> None:
        locked = folder / "ro"
        locked.mkdir()
        locked.chmod(0o500)
        csv = make_csv(folder / "r.csv", 2)
        template = write(folder / "msg.txt", TEMPLATE)
        args = smtp_send(csv, template, smtp_server, folder, "--report", f"{locked}/r.json")
        code, _, err = run_main(args, capsys)
        assert code == 2 and "--report" in one_error_line(err)

    unprivileged(body)
    assert not smtp_server.handler.received


# --- inputs that cannot be read -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("csv_name", "template_name", "expected"),
    [
        ("folder", "t.txt", "is a folder"),
        ("r.csv", "folder", "cannot read"),
        ("r.csv", "binary", "not valid UTF-8"),
        ("/proc/self/mem", "t.txt", "/proc/self/mem: cannot read"),  # an I/O error on read
        ("r.csv", "/proc/self/mem", "/proc/self/mem: cannot read"),
        ("binary", "t.txt", "not valid utf-8-sig"),
    ],
)
def test_an_unreadable_input_is_one_line_with_exit_2(
    smtp_server: SmtpServer,
    tmp_path: Path,
    template_file: Path,
    capsys: pytest.CaptureFixture[str],
    csv_name: str,
    template_name: str,
    expected: str,
) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "binary").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" * 10)
    make_csv(tmp_path / "r.csv", 2)
    write(tmp_path / "t.txt", template_file.read_text())
    csv = csv_name if csv_name.startswith("/") else str(tmp_path / csv_name)
    template = template_name if template_name.startswith("/") else str(tmp_path / template_name)
    code, _, err = run_main(smtp_send(Path(csv), Path(template), smtp_server, tmp_path), capsys)
    assert code == 2
    assert expected in one_error_line(err)
    assert not smtp_server.handler.received


# --- nothing to send is not success --------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ("From: not an address\nTo: {{ email }}\n", "From"),
        ("From: a@acme.example\nReply-To: broken@\nTo: {{ email }}\n", "Reply-To"),
        ("From: a@acme.example\nTo: {{ email }}\nAttachment: missing.pdf\n", "missing.pdf"),
    ],
)
def test_a_template_wide_problem_is_exit_2_not_every_row_skipped(
    smtp_server: SmtpServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    headers: str,
    expected: str,
) -> None:
    template = write(tmp_path / "t.txt", headers + "Subject: hi\n\nHello {{ name }}\n")
    csv = make_csv(tmp_path / "r.csv", 3)
    code, _, err = run_main(smtp_send(csv, template, smtp_server, tmp_path), capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "nothing was sent" in last and expected in last
    assert not smtp_server.handler.received


def test_every_row_suppressed_says_so_and_exits_2_but_a_finished_campaign_exits_0(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = make_csv(tmp_path / "r.csv", 2)
    args = smtp_send(csv, template_file, smtp_server, tmp_path, "--campaign", "c")
    conn = state.connect(tmp_path / "state.db")
    with events.transaction(conn):
        for i in range(2):
            suppression.SuppressionList(conn).add(f"user{i}@example.org", "complaint")
    conn.close()
    code, out, err = run_main(args, capsys)
    assert code == 2 and "every row was skipped" in err and "suppressed" in out
    assert not smtp_server.handler.received

    csv2 = make_csv(tmp_path / "r2.csv", 2, domain="example.net")
    args2 = smtp_send(csv2, template_file, smtp_server, tmp_path, "--campaign", "d")
    assert run_main(args2, capsys)[0] == 0
    code, out, _ = run_main(args2, capsys)  # the cron line again: nothing new, not a failure
    assert code == 0 and "nothing new to send" in out
    assert len(smtp_server.handler.received) == 2


# --- a problem after sending began --------------------------------------------------------------


def test_a_ledger_failure_mid_run_prints_what_was_sent_and_exits_5(
    tmp_path: Path, template_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "state.db"
    conn = state.connect(db)
    # The state database starts refusing writes once 3 messages are recorded as sent.
    conn.execute(
        "CREATE TRIGGER full BEFORE UPDATE OF status ON deliveries WHEN NEW.status = 'sent' "
        "AND (SELECT count(*) FROM deliveries WHERE status = 'sent') >= 3 "
        "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
    )
    conn.close()
    csv = make_csv(tmp_path / "r.csv", 8)
    outbox = tmp_path / "out"
    code, out, err = run_main(
        ["send", str(csv), "-t", str(template_file), "--transport", f"file://{outbox}",
         "--state", str(db), "--yes", "--progress", "none", "--workers", "1",
         "--campaign", "full", "--failed-csv", str(tmp_path / "f.csv")],
        capsys,
    )  # fmt: skip
    assert code == 5, err
    assert "smartmail summary" in out and "database or disk is full" in err
    sent_files = len(list(outbox.glob("*.eml")))
    assert sent_files >= 3 and "the run stopped after sending began" in err
    conn = sqlite3.connect(db)
    statuses = dict(conn.execute("SELECT status, count(*) FROM deliveries GROUP BY status"))
    conn.close()
    # Every message that left is either recorded sent or left in doubt: none can be sent twice.
    assert statuses.get("sent", 0) + statuses.get("sending", 0) >= sent_files


# --- escape sequences from the CSV never reach the terminal --------------------------------------


def test_escape_sequences_from_csv_values_are_shown_not_obeyed(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = write(
        tmp_path / "r.csv",
        "email,name,code\n"
        f"ann@example.org,Ann{HOSTILE_TITLE},C1\n"
        f"bad{HOSTILE_CLEAR}@example.org,Bob,C2\n"
        f"carl@example.org,Carl,{HOSTILE_CLEAR}\u2028x\n",
    )
    dry = ["dry-run", str(csv), "-t", str(template_file), "--preview", "3", "--no-state"]
    code, out, err = run_main(dry, capsys)
    assert code == 2
    assert "\x1b" not in out + err and "\x07" not in out + err and "\u2028" not in out + err
    assert "\\x1b" in out + err  # shown, so the user can see what the file holds

    code, out, err = run_main([*dry, "--on-invalid", "abort"], capsys)
    assert code == 2 and "\x1b" not in out + err and "\\x1b[2J" in err

    # Ann's name (a control character in a header) makes her row invalid; Carl's body may hold
    # anything, and his refusal is a failure whose report must not carry the escape either.
    smtp_server.handler.reject_rcpt = {"carl@example.org"}
    code, out, err = run_main(smtp_send(csv, template_file, smtp_server, tmp_path), capsys)
    assert code == 1
    assert "\x1b" not in out + err and "\x07" not in out + err


# --- start-up stays light ------------------------------------------------------------------------


def test_help_imports_no_heavy_module() -> None:
    code = (
        "import sys\n"
        "from smartmail.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = ['smartmail.engine', 'rich', 'jinja2', 'boto3', 'tenacity', 'sqlite3']\n"
        "print('loaded:', *[m for m in heavy if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "Usage: smartmail" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "loaded:"


def test_dry_run_loads_only_what_it_uses(tmp_path: Path) -> None:
    """A dry run loads no AWS library, no retry policy, transport or thread pool (it sends
    nothing, so no work queue), no IDNA tables (the domains are ASCII), no `mimetypes` or
    `base64` (there is no attachment), neither the campaign listing nor the
    DynamoDB state code, no rich (its output is plain text), no `logging` (nothing logged)
    and no `email.utils` (the Date header). It reads the ledger (sqlite3) when there is one,
    so a suppressed address shows as skipped; before the first send there is none to read,
    and the dry run neither loads sqlite3 nor creates the state file."""
    csv = make_csv(tmp_path / "list.csv", 10)
    template = write(tmp_path / "t.txt", "From: a@acme.example\nSubject: Hi {{ name }}\n\nHi\n")
    code = (
        "import sys\n"
        "from smartmail.cli import main\n"
        f"try:\n    main(['dry-run', {str(csv)!r}, '-t', {str(template)!r}])\n"
        "except SystemExit as exc:\n    print('exit', exc.code)\n"
        "unused = ['boto3', 'botocore', 'tenacity', 'idna', 'smartmail.retry',\n"
        "          'smartmail.transports', 'smartmail.dynamo', 'smartmail.campaigns',\n"
        "          'concurrent.futures', 'queue', 'rich', 'logging', 'email.utils', 'socket',\n"
        "          'mimetypes', 'base64']\n"
        "print('used:', *[m for m in ['sqlite3', 'smartmail.ledger'] if m in sys.modules])\n"
        "print('loaded:', *[m for m in unused if m in sys.modules])\n"
    )
    state_file = state.default_state_path()  # under this test's own XDG_STATE_HOME

    def dry_run() -> tuple[list[str], str]:
        run = [sys.executable, "-c", code]
        done = subprocess.run(run, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert "Subject: Hi User 0" in done.stdout
        return done.stdout.strip().splitlines(), done.stdout

    lines, _out = dry_run()
    assert lines[-3:] == ["exit 0", "used:", "loaded:"]
    assert not state_file.exists()

    assert main_exit(["suppress", "add", "user3@example.org", "--reason", "bounce"]) == 0
    lines, out = dry_run()
    assert lines[-3:] == ["exit 0", "used: sqlite3 smartmail.ledger", "loaded:"]
    assert re.search(r"│ skipped +│ +1 │\n│   suppressed +│ +1 │", out), out


def test_a_dry_run_refuses_a_state_it_could_not_create(tmp_path: Path) -> None:
    """With no state file yet a dry run reads none, but still finds, as the send would, that
    it could not make one there (one line, exit 2)."""
    csv = make_csv(tmp_path / "list.csv", 2)
    template = write(tmp_path / "t.txt", "From: a@acme.example\nSubject: Hi\n\nHi\n")
    blocker = write(tmp_path / "a-file", "")
    args = ["dry-run", str(csv), "-t", str(template), "--state", str(blocker / "s" / "s.db")]
    assert main_exit(args) == 2
    assert not (blocker / "s").exists()


@pytest.mark.parametrize("debug", [False, True])
def test_a_dry_run_that_logs_sets_logging_up_first(tmp_path: Path, debug: bool) -> None:
    """A dry run loads `logging` only when something logs; that line then has the CLI's
    format, made printable, and a traceback only with --debug."""
    csv = make_csv(tmp_path / "list.csv", 2)
    template = write(tmp_path / "t.txt", "From: a@acme.example\nSubject: Hi {{ name }}\n\nHi\n")
    args = ["dry-run", str(csv), "-t", str(template), "--no-state", *(["--debug"] if debug else [])]
    code = (
        "import sys\n"
        "import smartmail.engine as engine\n"
        "from smartmail.cli import main\n"
        "def boom(*args, **kwargs):\n"
        "    raise RuntimeError('bad \\x1b[2J value')\n"
        "engine.build = boom\n"
        f"try:\n    main({args!r})\n"
        "except SystemExit as exc:\n    print('exit', exc.code)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SMARTMAIL_DEBUG"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "exit 2"  # an internal error stops the run
    logged = [line for line in done.stderr.splitlines() if " ERROR smartmail: " in line]
    assert len(logged) == 2, done.stderr  # one a row, in the CLI's format
    assert logged[0].endswith("ERROR smartmail: row 2: unexpected error building the message")
    assert "\x1b" not in done.stderr and "\\x1b[2J" in done.stderr
    assert ("Traceback" in done.stderr) is debug


@pytest.mark.parametrize(
    ("command", "progress", "exit_code"),
    [("dry-run", None, 2), ("send", "none", 0), ("send", None, 0)],
)
def test_a_dry_run_and_a_send_off_a_terminal_never_load_rich(
    tmp_path: Path, command: str, progress: str | None, exit_code: int
) -> None:
    """rich is for the live display: a dry run, and a send from cron (`--progress none`, or
    the default, which off a terminal is log lines), print their summary, warnings and notes
    without it."""
    csv = write(tmp_path / "list.csv", "email,name\nann@example.org,Ann\nnope,Bob\n")
    template = write(tmp_path / "t.txt", "From: a@acme.example\nSubject: Hi {{ name }}\n\nHi\n")
    args = [command, str(csv), "-t", str(template), "--state", str(tmp_path / "s.db")]
    if command == "send":
        args += ["--transport", f"file://{tmp_path / 'out'}", "--yes"]
        args += ["--progress", progress] if progress else []
    code = (
        "import sys\n"
        "from smartmail.cli import main\n"
        f"try:\n    main({args!r})\n"
        "except SystemExit as exc:\n    print('exit', exc.code)\n"
        "print('loaded:', *sorted(m for m in sys.modules if m.split('.')[0] == 'rich'))\n"
    )
    # As from cron: no terminal, and nothing that says to act as one.
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env
    )
    assert done.returncode == 0, done.stderr
    # The summary table, a warning (row 3 is invalid) and the exit status all came out.
    assert "valid" in done.stdout or "sent" in done.stdout
    assert "│ rows " in done.stdout and "warning: " in done.stderr and "'nope'" in done.stderr
    assert done.stdout.strip().splitlines()[-2:] == [f"exit {exit_code}", "loaded:"]


def test_option_constants_copied_into_the_cli_match_the_library() -> None:
    assert cli_module.STATE_ENV == state.STATE_ENV
    assert cli_module.SQS_MAX_WAIT == events.SQS_MAX_WAIT
    assert cli_module.SQS_MAX_VISIBILITY == events.SQS_MAX_VISIBILITY
    assert cli_module.SUPPRESSION_REASONS == suppression.REASONS


# --- a second Ctrl-C, and a declined prompt, in a real process -----------------------------------


@dataclass
class SlowHandler:
    """Answers the first `fast` DATA commands at once, then holds each reply (up to 30 s)."""

    fast: int
    data_commands: int = 0
    accepted: int = 0
    released: bool = False

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        self.data_commands += 1
        if self.data_commands > self.fast:
            for _ in range(300):
                if self.released:
                    break
                await asyncio.sleep(0.1)
        self.accepted += 1
        return "250 2.0.0 Ok"


@pytest.fixture
def slow_server() -> Iterator[tuple[str, SlowHandler]]:
    handler = SlowHandler(fast=2)
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield f"smtp://127.0.0.1:{controller.port}", handler
    finally:
        handler.released = True
        controller.stop()


def smartmail_command() -> list[str]:
    return [sys.executable, "-m", "smartmail"]


def send_args(csv: Path, template: Path, url: str, db: Path, *extra: str) -> list[str]:
    """`send` to a plain-SMTP test server with a ledger of its own, no prompt, no progress."""
    return [
        "send", str(csv), "-t", str(template), "--transport", url, "--smtp-security", "none",
        "--state", str(db), "--yes", "--progress", "none", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once_and_says_what_was_sent(
    slow_server: tuple[str, SlowHandler], tmp_path: Path, template_file: Path
) -> None:
    url, handler = slow_server
    csv = make_csv(tmp_path / "r.csv", 5)
    db = tmp_path / "state.db"
    proc = subprocess.Popen(
        [*smartmail_command(), *send_args(csv, template_file, url, db, "--workers", "1",
         "--timeout", "60", "--campaign", "slow")],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=tmp_path,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while handler.data_commands < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert handler.data_commands == 3, "the third message should be waiting for its reply"
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None, "the first Ctrl-C waits for the message in flight"
        second = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=15)
        took = time.monotonic() - second
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    # The server would hold the reply for 30 s: the abort does not wait for it.
    assert took < 10, f"the second Ctrl-C took {took:.1f}s to end the run"
    assert "SIGINT again: aborted" in err and "sent 2," in err and "in doubt" in err
    assert "Traceback" not in err
    conn = sqlite3.connect(db)
    statuses = dict(conn.execute("SELECT status, count(*) FROM deliveries GROUP BY status"))
    conn.close()
    assert statuses.get("sent") == 2 and statuses.get("sending") == 1  # in doubt, not re-sent


def in_a_commit(action: str, *, nth: int = 3, only: str = "True", setup: str = "") -> str:
    """A `python -c` script: `smartmail` with the script's arguments, and `action` run on the
    main thread inside the `nth` ledger commit it makes there that `only` accepts (`batch` is
    the commit's statements), after the statements and before the COMMIT, where a signal
    finds the send pass holding the ledger's commit lock. `setup` runs first."""
    body = textwrap.indent(textwrap.dedent(action).strip(), " " * 12)
    return f"""
import os, signal, sys, threading, time
from smartmail import campaign, ledger
{textwrap.dedent(setup).strip()}
real, calls = ledger._apply, []
def apply(conn, batch):
    real(conn, batch)
    if threading.current_thread() is threading.main_thread() and len(calls) < {nth} and {only}:
        calls.append(1)
        if len(calls) == {nth}:
{body}
ledger._apply = apply
from smartmail.cli import main
main(sys.argv[1:])
"""


def send_through(
    script: str, server: SmtpServer, tmp_path: Path, template: Path, *before: str
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`smartmail send` of 40 rows with 4 workers through `script` (`in_a_commit`), which
    takes `before` off its arguments first; the process, and the campaign's ledger."""
    csv, db = make_csv(tmp_path / "r.csv", 40), tmp_path / "state.db"
    args = send_args(csv, template, server.url, db, "--workers", "4", "--campaign", "c")
    done = subprocess.run(
        [sys.executable, "-c", script, *before, *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    return done, db


def recipient_statuses(db: Path) -> dict[str, str]:
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT recipient, status FROM deliveries"))
    finally:
        conn.close()


SIGINT_THEN_SIGTERM = """
os.kill(os.getpid(), signal.SIGINT)
os.kill(os.getpid(), signal.SIGTERM)
"""
WITH_OUTCOMES = "any(op.sql is ledger._SENT_MINE for op in batch)"


@pytest.mark.slow
def test_a_second_signal_inside_a_ledger_commit_still_commits_what_was_sent(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    # The handlers run on the main thread, which holds the ledger's commit lock there: an
    # abort that waited for it there would give up after 3 s with nothing committed.
    script = in_a_commit(SIGINT_THEN_SIGTERM, only=WITH_OUTCOMES)
    done, db = send_through(script, smtp_server, tmp_path, template_file)
    err = done.stderr
    assert done.returncode == 143, err
    assert "SIGTERM again: aborted" in err and "Traceback" not in err
    assert "could not be read in time" not in err
    found = re.search(r"sent (\d+), failed 0, skipped 0, not sent (\d+)", err)
    assert found is not None, err
    statuses = recipient_statuses(db)
    sent = {r for r, status in statuses.items() if status == "sent"}
    # Every outcome the abort reported is committed (and sends that finished meanwhile); at
    # most the rows in flight are in doubt.
    assert len(sent) >= int(found.group(1)) > 0
    assert sent <= set(smtp_server.handler.by_recipient())
    assert list(statuses.values()).count("sending") <= 2 * 4


@pytest.mark.slow
def test_an_abort_as_rows_are_being_marked_leaves_those_rows_pending(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    # The signals land while the send pass commits a batch of marks: the first stops the run
    # (those rows will never be queued for a send), the second aborts. The abort waits for
    # that commit, so it puts the batch back to pending with the other rows marked and not
    # attempted, instead of leaving it in doubt.
    noted = tmp_path / "marked.txt"
    script = in_a_commit(
        """
        with open(noted, "w") as fh:
            fh.write(" ".join(op.key for op in batch if op.sql is ledger._SENDING))
        """
        + SIGINT_THEN_SIGTERM,
        nth=4,
        only="any(op.sql is ledger._SENDING for op in batch)",
        setup="noted = sys.argv.pop(1)",
    )
    done, db = send_through(script, smtp_server, tmp_path, template_file, str(noted))
    assert done.returncode == 143, done.stderr
    assert "SIGTERM again: aborted" in done.stderr, done.stderr
    marked = set(noted.read_text().split())
    assert marked
    statuses = recipient_statuses(db)
    assert {r: statuses.get(r) for r in marked} == {r: "pending" for r in marked}
    assert not marked & set(smtp_server.handler.by_recipient())


@pytest.mark.slow
def test_a_second_signal_as_the_main_thread_joins_a_worker_still_aborts(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    # The signals land as the main thread holds the lock it holds while it notes that a
    # thread it joined has ended (Thread._stop): as the send pass joins its workers.
    script = in_a_commit(
        """
        with threading._shutdown_locks_lock:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handlers run here
                pass
        """
    )
    done, _ = send_through(script, smtp_server, tmp_path, template_file)
    assert done.returncode == 143, done.stderr
    assert "SIGTERM again: aborted" in done.stderr, done.stderr


@pytest.mark.slow
def test_an_abort_during_a_slow_commit_still_says_what_was_sent(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    # The signals land in a commit that a slow disk holds up.
    script = in_a_commit(SIGINT_THEN_SIGTERM + "time.sleep(6)")
    done, _ = send_through(script, smtp_server, tmp_path, template_file)
    assert done.returncode == 143, done.stderr
    assert "could not be read in time" not in done.stderr
    assert re.search(r"SIGTERM again: aborted. sent \d+, failed 0", done.stderr), done.stderr


# `smartmail send ... 2>&1 | tee log` and Ctrl-C: tee dies with it, so stderr is a pipe nobody
# reads when the handler says it is finishing; the signal lands as the send pass commits.
CTRL_C_WITH_STDERR_GONE = in_a_commit(
    """
    r, w = os.pipe()
    os.close(r)
    os.dup2(w, 2)
    os.kill(os.getpid(), signal.SIGINT)
    if again:
        os.kill(os.getpid(), signal.SIGTERM)
    """,
    setup='again = sys.argv.pop(1) == "again"',
)


@pytest.mark.slow
def test_ctrl_c_with_stderr_gone_still_finishes_and_records_every_outcome(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    done, db = send_through(CTRL_C_WITH_STDERR_GONE, smtp_server, tmp_path, template_file, "once")
    # The handler's message cannot be written; the run still stops as a first Ctrl-C does.
    assert done.returncode == 130, done.stdout
    statuses = recipient_statuses(db)
    sent = {r for r, status in statuses.items() if status == "sent"}
    assert sent == set(smtp_server.handler.by_recipient()) and sent
    assert "sending" not in statuses.values(), statuses


@pytest.mark.slow
def test_a_second_signal_with_stderr_gone_still_aborts(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    done, _ = send_through(CTRL_C_WITH_STDERR_GONE, smtp_server, tmp_path, template_file, "again")
    # The abort cannot say what was sent; it still ends the process, with SIGTERM's code,
    # rather than dying on its own and leaving the run to finish as after one signal.
    assert done.returncode == 143, done.stdout
    assert "smartmail summary" not in done.stdout


# `smartmail send ... 2>&1 | logger` with the reader stuck: stderr is a full pipe, so a write
# there blocks for ever. The signals' thread must not be the one that waits on it.
SIGNALS_WITH_STDERR_BLOCKED = in_a_commit(
    textwrap.dedent(
        """
    r, w = os.pipe()  # r stays open and is never read
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"x" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    os.dup2(w, 2)
    """
    )
    + SIGINT_THEN_SIGTERM,
    only=WITH_OUTCOMES,
)


@pytest.mark.slow
def test_a_second_signal_with_stderr_blocked_still_aborts(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    # Before: the first signal's message blocked the signals' thread for ever, so the second
    # was never acted on, and the process hung at the end of the run joining that thread.
    done, db = send_through(SIGNALS_WITH_STDERR_BLOCKED, smtp_server, tmp_path, template_file)
    assert done.returncode == 143, done.stdout
    assert "smartmail summary" not in done.stdout
    statuses = recipient_statuses(db)
    sent = {r for r, status in statuses.items() if status == "sent"}
    assert sent <= set(smtp_server.handler.by_recipient())
    assert list(statuses.values()).count("sending") <= 2 * 4


@pytest.mark.slow
def test_a_signal_that_cannot_be_acted_on_leaves_the_next_one_to_abort(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    # Fault injection: stopping the run fails. Before, that exception ended the signals'
    # thread, every later signal was written to a pipe nobody read, and a second Ctrl-C did
    # nothing: the run sent all 40 rows.
    script = in_a_commit(
        SIGINT_THEN_SIGTERM,
        only=WITH_OUTCOMES,
        setup="""
        def stop(self):
            raise RuntimeError("injected")
        campaign.CampaignRun.stop = stop
        """,
    )
    done, _ = send_through(script, smtp_server, tmp_path, template_file)
    assert done.returncode == 143, done.stderr
    assert "SIGTERM again: aborted" in done.stderr, done.stderr
    assert "RuntimeError: injected" in done.stderr and "Traceback" not in done.stderr
    assert len(smtp_server.handler.received) < 40


@pytest.mark.slow
def test_an_abort_as_the_report_is_written_leaves_the_last_report_and_no_partial_file(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    # The signals land as the report's new file is about to be renamed over the last one.
    # The abort ends the process there: the last report stays whole (f9d40d5), and before,
    # the new file stayed beside it, a hidden .report.json.*.tmp left by each such abort.
    report = tmp_path / "report.json"
    report.write_text('{"campaign": "earlier"}')
    script = in_a_commit(
        "pass",
        only="False",
        setup="""
        report = sys.argv.pop(1)
        sys.argv += ["--report", report]
        real_replace = os.replace
        def replace(src, dst, **kw):
            if str(dst) == report:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(20)  # the abort ends the process meanwhile
            return real_replace(src, dst, **kw)
        os.replace = replace
        """,
    )
    done, _ = send_through(script, smtp_server, tmp_path, template_file, str(report))
    assert done.returncode == 143, done.stderr
    assert "SIGTERM again: aborted" in done.stderr, done.stderr
    assert report.read_text() == '{"campaign": "earlier"}'
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".report")) == []


@pytest.mark.slow
def test_a_ctrl_c_as_the_handlers_are_restored_leaves_none_of_ours_installed(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    # Fault injection: Ctrl-C lands just as the run's SIGINT handler is put back (Python's
    # own, which raises KeyboardInterrupt at the next check). Before, SIGINT was put back
    # first, the KeyboardInterrupt came out of putting SIGTERM's back, and SIGTERM was left
    # on a handler writing to a pipe of the finished run, read by its thread: a program that
    # calls main() (or a later run in it) had SIGTERM taken for that run's second signal.
    script = in_a_commit(
        "pass",
        only="False",
        setup="""
        real_signal = signal.signal
        def put(sig, handler):
            previous = real_signal(sig, handler)
            if sig == signal.SIGINT and handler is signal.default_int_handler:
                os.kill(os.getpid(), signal.SIGINT)
            return previous
        signal.signal = put
        import atexit
        atexit.register(lambda: print("SIGTERM default:", signal.getsignal(15) == 0))
        """,
    )
    done, _ = send_through(script, smtp_server, tmp_path, template_file)
    assert done.returncode == 130, done.stderr
    assert "SIGTERM default: True" in done.stdout, done.stdout


@pytest.mark.slow
def test_a_ctrl_c_after_the_run_ended_does_not_say_nothing_was_sent(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    # The run's handlers are gone once it has ended; a Ctrl-C as the summary is printed is
    # Python's KeyboardInterrupt (click's Abort). Before, that said "Aborted: nothing was
    # sent." after all 40 messages were.
    script = in_a_commit(
        "pass",
        only="False",
        setup="""
        from smartmail import cli
        real_print = cli.print_summary
        def print_summary(summary):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # Python's handler raises here
                pass
            real_print(summary)
        cli.print_summary = print_summary
        """,
    )
    done, db = send_through(script, smtp_server, tmp_path, template_file)
    assert done.returncode == 130, done.stderr
    assert list(recipient_statuses(db).values()) == ["sent"] * 40
    assert "nothing was sent" not in done.stderr, done.stderr
    assert "Interrupted after sending began: `smartmail status`" in done.stderr, done.stderr


@pytest.mark.slow
def test_ctrl_c_while_the_main_thread_holds_the_stop_events_lock_still_stops_the_run(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    # The main thread sets the run's stop event itself on an error path; a handler that set
    # it too, inside that, would wait for a lock its own thread holds: for ever.
    script = in_a_commit(
        """
        with runs[0].stop_event._cond:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        """,
        only=WITH_OUTCOMES,
        setup="""
        runs, real_run = [], campaign.CampaignRun.run
        def run(self):
            runs.append(self)
            return real_run(self)
        campaign.CampaignRun.run = run
        """,
    )
    done, db = send_through(script, smtp_server, tmp_path, template_file)
    assert done.returncode == 130, done.stderr
    assert "SIGINT: finishing the messages in flight" in done.stderr
    statuses = list(recipient_statuses(db).values())
    assert statuses.count("sent") == len(smtp_server.handler.received) < 40
    assert "sending" not in statuses  # a graceful stop leaves nothing in doubt


@pytest.mark.slow
def test_ctrl_c_wakes_rows_waiting_for_their_rate_slot_and_an_abort_leaves_them_pending(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    # At one message a second, three of the four workers hold a row and wait for its slot
    # (up to 3 s ahead). Ctrl-C wakes them: their rows go back to pending, and a second
    # Ctrl-C soon after leaves nothing in doubt, since nothing was in flight.
    csv = make_csv(tmp_path / "r.csv", 12)
    db = tmp_path / "state.db"
    proc = subprocess.Popen(
        [*smartmail_command(), *send_args(csv, template_file, smtp_server.url, db, "--workers",
         "4", "--rate", "1", "--burst", "1", "--campaign", "slow")],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=tmp_path,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while len(smtp_server.handler.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    conn = sqlite3.connect(db)
    statuses = dict(conn.execute("SELECT status, count(*) FROM deliveries GROUP BY status"))
    conn.close()
    assert statuses.get("sent") == len(smtp_server.handler.received) >= 2, statuses
    assert "sending" not in statuses, statuses  # nothing was in flight: nothing in doubt


# Ctrl-C, and in the same commit the disk fails as the send pass marks rows: the ledger could
# not record after sending began (the 5th batch of marks comes after at least two rows ended).
CTRL_C_AND_THE_LEDGER_FAILS = in_a_commit(
    """
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(1000):  # the handler runs here
        pass
    import sqlite3
    raise sqlite3.OperationalError("disk I/O error")
    """,
    nth=5,
    setup='sys.argv += ["--report", sys.argv.pop(1)]',
)

# Ctrl-C as the send pass commits; then the report cannot be written at the end.
CTRL_C_AND_NO_ROOM_FOR_THE_REPORT = in_a_commit(
    "os.kill(os.getpid(), signal.SIGINT)",
    only=WITH_OUTCOMES,
    setup="""
    import errno
    report = sys.argv.pop(1)
    sys.argv += ["--report", report]
    real_replace = os.replace
    def replace(src, dst, **kw):
        if str(dst) == report:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, **kw)
    os.replace = replace
    """,
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "what"),
    [
        (CTRL_C_AND_THE_LEDGER_FAILS, "could not record"),
        (CTRL_C_AND_NO_ROOM_FOR_THE_REPORT, "cannot write the report"),
    ],
    ids=["ledger", "report"],
)
def test_a_ledger_or_report_failure_after_ctrl_c_is_exit_5_not_130(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path, script: str, what: str
) -> None:
    # A cron wrapper that sees 130 takes it for "interrupted: re-run"; it must learn that
    # the ledger or the report failed too. The output still says the run was interrupted.
    report = tmp_path / "report.json"
    done, _ = send_through(script, smtp_server, tmp_path, template_file, str(report))
    assert done.returncode == 5, done.stderr
    assert "SIGINT: finishing the messages in flight" in done.stderr, done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and what in error[0], done.stderr
    assert error[0].endswith("; the run was also interrupted (SIGINT)"), error[0]
    assert "Traceback" not in done.stderr
    assert 0 < len(smtp_server.handler.received) < 40


def test_a_signal_handler_installed_from_c_is_left_to_the_embedding_host(
    smtp_server: SmtpServer,
    tmp_path: Path,
    template_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A host that embeds Python set SIGTERM's handler in C: Python shows it as None and
    # cannot put it back. Before, restoring it raised TypeError out of main() after the run,
    # and SIGINT (put back last) stayed on the run's finished handler: Ctrl-C did nothing.
    real_signal, real_getsignal = signal.signal, signal.getsignal
    before = {sig: real_getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    from_c = {signal.SIGTERM}

    def put(sig: int, handler: Any) -> Any:
        previous = real_signal(sig, handler)
        if sig in from_c:
            from_c.discard(sig)  # Python's now: the host's is gone
            return None
        return previous

    def get(sig: int) -> Any:
        return None if sig in from_c else real_getsignal(sig)

    monkeypatch.setattr(signal, "signal", put)
    monkeypatch.setattr(signal, "getsignal", get)
    csv = make_csv(tmp_path / "r.csv", 3)
    try:
        code, _, err = run_main(smtp_send(csv, template_file, smtp_server, tmp_path), capsys)
        after = {sig: real_getsignal(sig) for sig in before}
    finally:
        for sig, handler in before.items():
            real_signal(sig, handler)
    assert code == 0, err
    assert len(smtp_server.handler.received) == 3
    assert from_c == {signal.SIGTERM}, "the host's SIGTERM handler was replaced"
    assert after == before


LIBRARY_CTRL_C = """
import os, sys
from smartmail import CampaignConfig, RunOptions, run_campaign
csv, template, url, db = sys.argv[1:]
config = CampaignConfig(
    template=template, source=csv, transport=url, smtp_security="none", workers=2,
    campaign="lib", timeout=60,
)
try:
    run_campaign(config, RunOptions(state_path=db))
except KeyboardInterrupt:
    print("interrupted", flush=True)
    os._exit(130)  # as a script would: without waiting for the sends still in flight
"""


@pytest.mark.slow
def test_a_second_ctrl_c_in_a_library_caller_leaves_only_the_rows_in_flight_in_doubt(
    slow_server: tuple[str, SlowHandler], tmp_path: Path, template_file: Path
) -> None:
    # Python's own Ctrl-C (no CLI handlers): the first stops the run and waits for the two
    # sends in flight; the second cuts that wait short. The two rows marked and queued
    # behind them were never attempted: pending, not in doubt.
    url, handler = slow_server
    csv = make_csv(tmp_path / "r.csv", 20)
    db = tmp_path / "state.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", LIBRARY_CTRL_C, str(csv), str(template_file), url, str(db)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=tmp_path,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while handler.data_commands < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert handler.data_commands == 4, "two sent, two waiting for their reply"
        time.sleep(0.3)  # the next two rows marked and queued behind them
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "interrupted" in out, err
    conn = sqlite3.connect(db)
    statuses = dict(conn.execute("SELECT status, count(*) FROM deliveries GROUP BY status"))
    conn.close()
    # Sent 2; in doubt only the 2 in flight; the rows marked behind them, and the one the
    # first Ctrl-C caught being read, pending.
    assert statuses == {"sent": 2, "sending": 2, "pending": 3}, (statuses, err)


def _send_from_a_terminal(
    tmp_path: Path, template_file: Path, url: str, *, answer: bytes
) -> tuple[subprocess.Popen[str], str]:
    """`send` of 2 rows with its stdin on a terminal (so it asks), `answer` typed ahead; the
    process (ended) and its stderr."""
    csv = make_csv(tmp_path / "r.csv", 2)
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            [*smartmail_command(), "send", str(csv), "-t", str(template_file),
             "--transport", url, "--smtp-security", "none",
             "--state", str(tmp_path / "s.db"), "--progress", "none"],
            stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=tmp_path,
        )  # fmt: skip
        os.write(controller, answer)
        _out, err = proc.communicate(timeout=30)
    finally:
        os.close(controller)
        os.close(terminal)
    return proc, err


@pytest.mark.slow
def test_declining_the_prompt_on_a_terminal_is_exit_2_with_nothing_sent(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    proc, err = _send_from_a_terminal(tmp_path, template_file, smtp_server.url, answer=b"n\n")
    assert "Send 2 message(s) to their recipients via" in err
    assert proc.returncode == 2, err
    assert "not confirmed; nothing was sent" in err
    assert not smtp_server.handler.received


@pytest.mark.slow
def test_no_server_is_said_on_a_terminal_before_the_prompt(
    tmp_path: Path, template_file: Path
) -> None:
    """Nobody is asked to confirm a run whose server is not there: one line, exit 4."""
    from .conftest import free_port

    url = f"smtp://127.0.0.1:{free_port()}"
    proc, err = _send_from_a_terminal(tmp_path, template_file, url, answer=b"y\n")
    assert "Send 2 message(s)" not in err
    assert proc.returncode == 4, err
    assert "cannot connect" in err and "nothing was sent" in err
    assert "Traceback" not in err


def test_the_live_display_renders_counts_on_a_terminal() -> None:
    """rich is imported only when a live display starts: check the display still works."""
    import io

    from rich.console import Console

    from smartmail.progress import RichProgress
    from smartmail.report import Metrics, Outcome
    from smartmail.sources import Row

    console = Console(file=io.StringIO(), force_terminal=True, width=80)
    metrics = Metrics(3)
    metrics.record(Outcome(Row(2, {}), "a@x.org", "sent"))
    display = RichProgress(console)
    display.start(metrics, "sending via file://outbox")
    time.sleep(0.3)
    display.stop()
    raw = console.file.getvalue()  # type: ignore[attr-defined]
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)  # the display's own styling
    assert "sending via file://outbox" in shown and "sent 1" in shown
    assert "rate 0.0/s" not in shown  # a sub-second run shows its rate so far, not nothing
