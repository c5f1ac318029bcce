"""The command line as users call it: help, exit codes, one-line errors, a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from smartmail.cli import cli, reference

from .conftest import SMTP_PASSWORD, SMTP_USER, SmtpServer, make_csv, run_main, write

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def all_commands() -> list[list[str]]:
    found: list[list[str]] = [[]]
    for name, command in cli.commands.items():
        found.append([name])
        if isinstance(command, click.Group):
            found += [[name, sub] for sub in command.commands]
    return found


@pytest.mark.parametrize("command", all_commands(), ids=lambda c: " ".join(c) or "smartmail")
def test_help_for_every_command(command: list[str]) -> None:
    result = CliRunner().invoke(cli, [*command, "--help"], catch_exceptions=False)
    assert result.exit_code == 0
    assert result.output.startswith("Usage: ")


def test_cli_reference_is_up_to_date() -> None:
    documented = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert documented.strip() == reference().strip(), "run `make docs` and commit docs/cli.md"


def test_dry_run_of_the_examples_previews_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(
        [
            "dry-run",
            str(EXAMPLES / "recipients.csv"),
            "-t",
            str(EXAMPLES / "welcome.txt"),
            "--preview",
            "2",
        ],
        capsys,
    )
    assert code == 0
    assert "row 2: to ann@example.org" in out and "row 3: to bjorn@example.org" in out
    assert "Subject: Ann Lee, your Pro plan renews on 2026-12-01" in out
    assert "valid" in out and "multipart/alternative" in out


def test_dry_run_with_invalid_rows_exits_2_naming_row_and_column(
    tmp_path: Path, template_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv_path = write(tmp_path / "r.csv", "email,name,code\na@x.org,A,1\nnope,B,2\n")
    code, _out, err = run_main(["dry-run", str(csv_path), "-t", str(template_file)], capsys)
    assert code == 2
    assert f"{csv_path}, row 3, column 'email': 'nope' is not an address" in err
    assert "\n" not in err.strip().split("warning: ", 1)[1].split("warning:")[0].strip()


def test_send_to_an_outbox_with_a_json_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outbox, report = tmp_path / "outbox", tmp_path / "report.json"
    code, out, err = run_main(
        [
            "send",
            str(EXAMPLES / "recipients.csv"),
            "-t",
            str(EXAMPLES / "welcome.txt"),
            "--transport",
            f"file://{outbox}",
            "--yes",
            "--report",
            str(report),
            "--progress",
            "none",
        ],
        capsys,
    )
    assert code == 0, err
    files = sorted(outbox.glob("*.eml"))
    assert len(files) == 5 and files[0].name.startswith("000000002-ann@example.org")
    data = json.loads(report.read_text())
    assert (data["rows"], data["sent"], data["failed"], data["skipped"]) == (5, 5, 0, 0)
    assert data["transport"] == f"file://{outbox}"
    assert "smartmail summary" in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["send", "missing.csv", "-t", "T", "--transport", "file://o"],
            "missing.csv: no such file",
        ),
        (["send", "R", "-t", "nope.txt", "--transport", "file://o"], "nope.txt: no such file"),
        (["send", "R", "-t", "T"], "no transport"),
        (["send", "R", "-t", "T", "--transport", "smtp://u:pw@h:25"], "do not put a password"),
        (["send", "R", "-t", "T", "--transport", "gopher://x"], "unknown transport"),
        (
            ["send", "-t", "T", "--transport", "file://o", "--bucket", "b"],
            "--bucket and --key go together",
        ),
        (
            ["send", "R", "-t", "T", "--transport", "file://o", "--tag", "oops"],
            "expected KEY=VALUE",
        ),
    ],
)
def test_usage_errors_are_one_line_with_exit_2(
    tmp_path: Path,
    template_file: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    expected: str,
) -> None:
    csv_path = make_csv(tmp_path / "r.csv", 2)
    os.chdir(tmp_path)
    args = [str(csv_path) if a == "R" else str(template_file) if a == "T" else a for a in args]
    code, _, err = run_main(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err


def test_malformed_csv_sends_nothing(
    tmp_path: Path, template_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv_path = write(tmp_path / "r.csv", "email,name,code\na@x.org,A,1\nb@x.org,B\n")
    outbox = tmp_path / "outbox"
    code, _, err = run_main(
        [
            "send",
            str(csv_path),
            "-t",
            str(template_file),
            "--transport",
            f"file://{outbox}",
            "--yes",
        ],
        capsys,
    )
    assert code == 2
    assert f"{csv_path}, row 3: wrong number of fields" in err and "nothing was sent" in err
    assert not list(outbox.glob("*.eml"))


def installed_smartmail() -> str:
    script = Path(sys.executable).parent / "smartmail"
    assert script.exists(), "the package must be installed (make test does it)"
    return str(script)


@pytest.mark.slow
def test_installed_command_against_a_real_server_without_a_terminal(
    tls_smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    csv_path = make_csv(tmp_path / "r.csv", 40)
    tls_smtp_server.handler.reject_rcpt = {"user5@example.org"}
    env = {
        **os.environ,
        "SMARTMAIL_SMTP_PASSWORD": SMTP_PASSWORD,
        "SMARTMAIL_STATE": str(tmp_path / "s.db"),
    }
    proc = subprocess.run(
        [
            installed_smartmail(),
            "send",
            str(csv_path),
            "-t",
            str(template_file),
            "--transport",
            tls_smtp_server.url,
            "--smtp-user",
            SMTP_USER,
            "--smtp-ca-file",
            str(tls_smtp_server.ca_file),
            "--workers",
            "4",
            "--rate",
            "40",
            "--log-interval",
            "0.2",
            "--failed-csv",
            str(tmp_path / "failed.csv"),
            "--debug",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr  # one row failed for good
    assert len(tls_smtp_server.handler.received) == 39
    assert "\x1b" not in proc.stdout + proc.stderr, "no control characters when not on a terminal"
    assert "rows, sent" in proc.stderr, "plain progress lines when not on a terminal"
    assert SMTP_PASSWORD not in proc.stdout + proc.stderr
    assert "user5@example.org" in (tmp_path / "failed.csv").read_text()


def test_python_dash_m_works() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "smartmail", "--version"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0 and "smartmail, version" in proc.stdout


# --- the process's exit (`cli.entry`: atexit's work, then no teardown) ----------------------


def _entry(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`code` runs first in a fresh interpreter, then smartmail's process entry point with a
    dry run of the examples; stdout goes to a file, as from cron."""
    script = (
        f"{code}\nimport sys\nfrom smartmail.cli import entry\n"
        f"sys.argv = ['smartmail', 'dry-run', {str(EXAMPLES / 'recipients.csv')!r}, "
        f"'-t', {str(EXAMPLES / 'welcome.txt')!r}, '--no-state', '--preview', '1']\nentry()\n"
    )
    out = tmp_path / "out.txt"
    with open(out, "w", encoding="utf-8") as fh:
        proc = subprocess.run(
            [sys.executable, "-c", script],
            stdout=fh,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
    proc.stdout = out.read_text(encoding="utf-8")
    return proc


def test_the_exit_runs_what_atexit_holds_and_output_to_a_file_is_whole(tmp_path: Path) -> None:
    # A coverage tool's save, logging's last flush: registered with atexit, they still run.
    proc = _entry(
        "import atexit, pathlib\natexit.register(pathlib.Path('atexit-ran').write_text, 'yes')",
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "atexit-ran").read_text() == "yes"
    assert "row 2: to ann@example.org" in proc.stdout  # the preview, then the summary's end
    assert proc.stdout.rstrip().endswith("┘")


def test_the_exit_waits_for_a_hosts_thread_still_running(tmp_path: Path) -> None:
    # A thread that is not a daemon keeps Python's exit, which waits for it to finish.
    proc = _entry(
        "import pathlib, threading, time\n"
        "threading.Thread(target=lambda: (time.sleep(0.5), "
        "pathlib.Path('thread-done').write_text('yes'))).start()",
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "thread-done").read_text() == "yes"


def test_the_exit_code_of_a_failed_run_comes_through_the_entry_point(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.csv", "email,name\nnot-an-address,Ann\n")
    script = (
        "import sys\nfrom smartmail.cli import entry\n"
        f"sys.argv = ['smartmail', 'dry-run', {str(bad)!r}, "
        f"'-t', {str(EXAMPLES / 'welcome.txt')!r}, '--no-state']\nentry()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode != 0
    assert "not-an-address" in proc.stdout + proc.stderr


EXAMPLE_RUN = [str(EXAMPLES / "recipients.csv"), "-t", str(EXAMPLES / "welcome.txt")]


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["suppress", "list"],
        ["dry-run", *EXAMPLE_RUN],
        ["send", *EXAMPLE_RUN, "--transport", "file://outbox", "--yes"],
    ],
    ids=["status", "suppress-list", "dry-run", "send"],
)
def test_a_state_made_by_a_newer_smartmail_is_left_as_it_was(
    tmp_path: Path, command: list[str]
) -> None:
    # The one-line error, exit 2, and nothing added beside the database: no -wal or -shm
    # file of a connection the process ended without closing.
    from smartmail import state

    db = tmp_path / "state" / "smartmail.db"
    db.parent.mkdir()
    conn = state.connect(db)
    conn.execute(f"PRAGMA user_version = {state.SCHEMA_VERSION + 1}")
    conn.close()
    before = sorted(p.name for p in db.parent.iterdir())
    proc = subprocess.run(
        [sys.executable, "-m", "smartmail", *command, "--state", str(db)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "made by a newer smartmail" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in db.parent.iterdir()) == before


def test_a_profiler_or_tracer_running_the_command_gets_its_results(tmp_path: Path) -> None:
    # `python -m cProfile -m smartmail ...` writes its statistics after the program ends, as
    # `trace` writes its counts: the command's quick exit must not end the process before.
    out = tmp_path / "profile.out"
    args = ["dry-run", *EXAMPLE_RUN, "--no-state", "--preview", "0"]
    proc = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "smartmail", *args],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "smartmail dry-run" in proc.stdout
    import pstats

    profiled = pstats.Stats(str(out)).get_stats_profile().func_profiles
    assert "main" in profiled and "_main" in profiled  # smartmail.cli's, as it ran
    proc = subprocess.run(
        [sys.executable, "-m", "trace", "--listfuncs", "--module", "smartmail", "--version"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "smartmail, version" in proc.stdout and "functions called:" in proc.stdout


def test_importing_the_main_module_leaves_the_importing_process_alone(tmp_path: Path) -> None:
    # A tool that imports every module (pytest --doctest-modules, a documentation generator)
    # must not be ended by smartmail/__main__.py: only `python -m smartmail` runs the CLI.
    script = (
        "import sys\nsys.argv = ['tool', '--version']\n"
        "try:\n    import smartmail.__main__\nexcept SystemExit:\n    pass\n"
        "print('the importer goes on')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "the importer goes on" in proc.stdout


def test_a_sqlite_api_misuse_is_called_a_bug_not_a_damaged_file(tmp_path: Path) -> None:
    # Told to move aside a healthy ledger, a user would have the next run send every row
    # again: an error in how smartmail used SQLite says it is a bug, and nothing about the file.
    import sqlite3

    from smartmail.cli import _state_error

    line = _state_error(sqlite3.ProgrammingError("Cannot operate on a closed database."))
    assert "internal error: ProgrammingError" in line and "bug in smartmail" in line
    assert "move it aside" not in line and "integrity_check" not in line
