"""Outputs that go away while a command runs: a `--report` whose folder is removed (or becomes
a folder) before the end, and a reader of stdout or stderr that stops reading (`| head -1`).
Real files, SQLite, aiosmtpd and processes."""

from __future__ import annotations

import csv
import json
import os
import re
import select
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import Envelope, Session

from smartmail.report import write_whole

from .conftest import RecordingHandler, SmtpServer, _start, make_csv, run_main, write
from .test_cli import installed_smartmail
from .unprivileged import unprivileged


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


class MidRunHandler(RecordingHandler):
    """Accepts mail like the recording handler, and runs `during` once, while the first
    message is in the server's hands: what happens to the machine mid-campaign."""

    def __init__(self, during: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.during: Callable[[], None] | None = during

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        if self.during is not None:
            self.during()
            self.during = None
        return await super().handle_DATA(server, session, envelope)


def _remove(folder: Path) -> Callable[[], None]:
    return lambda: shutil.rmtree(folder)


def _make_folder_at(path: Path) -> Callable[[], None]:
    return lambda: path.mkdir()


# --- a report that cannot be written at the end ---------------------------------------------------


@pytest.mark.parametrize("breakage", ["folder removed", "a folder at its path"])
def test_a_report_unwritable_at_the_end_is_an_error_and_everything_else_is_recorded(
    tmp_path: Path, template_file: Path, capsys: pytest.CaptureFixture[str], breakage: str
) -> None:
    folder = tmp_path / "reports"
    folder.mkdir()
    report = folder / "run.json"
    during = _remove(folder) if breakage == "folder removed" else _make_folder_at(report)
    handler = MidRunHandler(during, reject_rcpt={"user1@example.org"})
    controller = _start(handler)
    server = SmtpServer(controller.hostname, controller.port, handler)
    csv_path = make_csv(tmp_path / "r.csv", 3)
    failed = tmp_path / "failed.csv"
    state_db = tmp_path / "state.db"
    try:
        code, _, err = run_main(
            ["send", str(csv_path), "-t", str(template_file), "--transport", server.url,
             "--smtp-security", "none", "--state", str(state_db), "--yes", "--workers", "1",
             "--progress", "none", "--retry-wait", "0", "--failed-csv", str(failed),
             "--report", str(report)],
            capsys,
        )  # fmt: skip
    finally:
        controller.stop()
    assert code == 5  # not 0 or 1: the report a script reads next is not this run's
    lines = error_lines(err)
    assert len(lines) == 1 and str(report) in lines[0] and "--report" in lines[0], err
    assert not report.is_file()
    # Everything else is as without --report: two sent, one failed and offered for re-sending.
    assert sorted(r.rcpt_tos[0] for r in handler.received) == [
        "user0@example.org",
        "user2@example.org",
    ]
    with sqlite3.connect(state_db) as db:
        statuses = sorted(s for (s,) in db.execute("SELECT status FROM deliveries"))
    assert statuses == ["failed", "sent", "sent"]
    with failed.open(newline="") as fh:
        assert [row["email"] for row in csv.DictReader(fh)] == ["user1@example.org"]


FULL_DISK = "/dev/full"  # accepts opening for writing, then every write fails: a full disk


@pytest.mark.skipif(not os.path.exists(FULL_DISK), reason="needs /dev/full")
def test_a_report_on_a_full_disk_after_a_clean_run_is_exit_5_and_the_outbox_stays(
    tmp_path: Path, template_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file:// run: the outbox's messages are kept, and the ledger has them: a re-run
    sends nothing again."""
    outbox = tmp_path / "outbox"
    csv_path = make_csv(tmp_path / "r.csv", 2)
    args = ["send", str(csv_path), "-t", str(template_file), "--transport", f"file://{outbox}",
            "--state", str(tmp_path / "s.db"), "--yes", "--progress", "none",
            "--failed-csv", str(tmp_path / "f.csv")]  # fmt: skip
    code, _, err = run_main([*args, "--report", FULL_DISK], capsys)
    assert code == 5, err
    lines = error_lines(err)
    assert len(lines) == 1 and FULL_DISK in lines[0] and "No space left" in lines[0], err
    assert len(list(outbox.glob("*.eml"))) == 2
    code, out, _ = run_main(args, capsys)
    assert code == 0 and "already sent: 2" in out
    assert len(list(outbox.glob("*.eml"))) == 2


REPORT_THAT_RUNS_OUT_OF_ROOM = """
import resource, signal, sys
from smartmail import campaign
real = campaign.CampaignRun._write_report
def short_of_room(self, summary):
    # From here on a file may not grow past 200 bytes (EFBIG, as a disk filling up).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200, resource.RLIM_INFINITY))
    return real(self, summary)
campaign.CampaignRun._write_report = short_of_room
from smartmail.cli import main
main(sys.argv[1:])
"""


def test_a_report_that_cannot_be_written_to_the_end_leaves_the_last_one_whole(
    tmp_path: Path, template_file: Path
) -> None:
    """A cron script reads the report after each run: it must find the last run's, or this
    one's, never the first 200 bytes of a JSON document."""
    report = tmp_path / "report.json"
    last = json.dumps({"campaign": "earlier", "sent": 7, "padding": "x" * 1000})
    report.write_text(last)
    report.chmod(0o640)
    csv_path = make_csv(tmp_path / "r.csv", 2)
    done = subprocess.run(
        [sys.executable, "-c", REPORT_THAT_RUNS_OUT_OF_ROOM, "send", str(csv_path),
         "-t", str(template_file), "--transport", f"file://{tmp_path / 'outbox'}",
         "--state", str(tmp_path / "s.db"), "--yes", "--progress", "none",
         "--report", str(report)],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert done.returncode == 5, done.stderr
    assert "cannot write the report" in done.stderr
    assert report.read_text() == last and (report.stat().st_mode & 0o777) == 0o640
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".report")] == []
    # And written in full, it replaces the last one, keeping its mode.
    args = ["send", str(csv_path), "-t", str(template_file), "--transport",
            f"file://{tmp_path / 'outbox'}", "--state", str(tmp_path / "s.db"), "--yes",
            "--progress", "none", "--report", str(report)]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "smartmail", *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(report.read_text())["skip_reasons"] == {"already sent": 2}
    assert (report.stat().st_mode & 0o777) == 0o640


def test_a_report_through_a_link_to_a_file_not_made_yet_is_written_there(
    tmp_path: Path, template_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--report latest.json`, a link to this month's file, which the first run makes: the
    pre-flight check tried to create the link's own name and refused it ('File exists',
    exit 2, nothing sent), though writing the report follows the link (f9d40d5)."""
    (tmp_path / "reports").mkdir()
    link = tmp_path / "latest.json"
    link.symlink_to(tmp_path / "reports" / "2026-12.json")
    csv_path = make_csv(tmp_path / "r.csv", 2)
    code, _, err = run_main(
        ["send", str(csv_path), "-t", str(template_file), "--transport",
         f"file://{tmp_path / 'outbox'}", "--state", str(tmp_path / "s.db"), "--yes",
         "--progress", "none", "--report", str(link)],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert link.is_symlink() and json.loads(link.read_text())["sent"] == 2
    assert [p.name for p in (tmp_path / "reports").iterdir()] == ["2026-12.json"]


def test_a_report_through_a_link_to_the_ledger_not_made_yet_is_refused(
    tmp_path: Path, template_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The link names the state file this run is about to create: the report would replace
    the ledger at the end, and the next run would send every row again."""
    link = tmp_path / "report.json"
    link.symlink_to(tmp_path / "state.db")
    csv_path = make_csv(tmp_path / "r.csv", 2)
    code, _, err = run_main(
        ["send", str(csv_path), "-t", str(template_file), "--transport",
         f"file://{tmp_path / 'outbox'}", "--state", str(tmp_path / "state.db"), "--yes",
         "--progress", "none", "--report", str(link)],
        capsys,
    )  # fmt: skip
    assert code == 2, err
    assert "which this run reads" in err and not (tmp_path / "outbox").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user takes root")
def test_a_replaced_report_keeps_its_owner_and_group(tmp_path: Path) -> None:
    """Root's cron writing the report a user's script reads (mode 600, the user's): before,
    the new file was root's, and the user could no longer read the report."""
    report = tmp_path / "report.json"
    report.write_text("{}")
    os.chown(report, 4242, 4343)
    report.chmod(0o600)
    write_whole(str(report), '{"sent": 1}\n')
    found = report.stat()
    assert (found.st_uid, found.st_gid, found.st_mode & 0o7777) == (4242, 4343, 0o600)
    assert report.read_text() == '{"sent": 1}\n'


def test_a_report_with_another_name_is_written_where_both_names_see_it(tmp_path: Path) -> None:
    """A hard link (the report also linked where a reader looks): before, the new file took
    one name and the other kept the last run's report for ever."""
    report, other = tmp_path / "report.json", tmp_path / "for-cron.json"
    report.write_text("{}")
    os.link(report, other)
    write_whole(str(report), '{"sent": 1}\n')
    assert other.read_text() == report.read_text() == '{"sent": 1}\n'


def test_a_report_whose_new_file_finds_the_disk_full_leaves_the_last_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: no room for the new file (ENOSPC at its creation). Before, that fell
    back to writing in place, which emptied the last report before failing in turn."""
    import errno

    report = tmp_path / "report.json"
    report.write_text('{"sent": 7}')
    real_open = os.open

    def full(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        if flags & os.O_EXCL:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", full)
    monkeypatch.setattr("builtins.open", _no_room_in_place(open))
    with pytest.raises(OSError, match="No space left"):
        write_whole(str(report), '{"sent": 1}\n')
    monkeypatch.undo()
    assert report.read_text() == '{"sent": 7}'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def _no_room_in_place(real: Callable[..., Any]) -> Callable[..., Any]:
    """`open` for writing that truncates the file and then finds no room, as a full disk."""
    import errno

    def opener(file: Any, mode: str = "r", *args: Any, **kw: Any) -> Any:
        fh = real(file, mode, *args, **kw)
        if "w" in mode:

            def write(_text: str) -> int:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            fh.write = write
        return fh

    return opener


@pytest.mark.skipif(not os.path.exists(FULL_DISK), reason="needs /dev/full")
def test_a_dry_run_whose_report_cannot_be_written_is_exit_2(
    tmp_path: Path, template_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv_path = make_csv(tmp_path / "r.csv", 3)
    code, out, err = run_main(
        ["dry-run", str(csv_path), "-t", str(template_file), "--report", FULL_DISK,
         "--state", str(tmp_path / "s.db")],
        capsys,
    )  # fmt: skip
    assert code == 2  # every row is valid: without the report problem this is 0
    lines = error_lines(err)
    assert len(lines) == 1 and FULL_DISK in lines[0], err
    assert "smartmail dry-run" in out  # the summary is still shown


def test_a_written_report_is_unchanged(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "run.json"
    csv_path = make_csv(tmp_path / "r.csv", 2)
    code, _, err = run_main(
        ["send", str(csv_path), "-t", str(template_file), "--transport", smtp_server.url,
         "--smtp-security", "none", "--state", str(tmp_path / "s.db"), "--yes",
         "--progress", "none", "--failed-csv", str(tmp_path / "f.csv"), "--report", str(report)],
        capsys,
    )  # fmt: skip
    assert code == 0 and not error_lines(err)
    assert json.loads(report.read_text())["sent"] == 2


# --- a reader that stops reading (`| head -1`) ----------------------------------------------------

NOISE = ("Traceback", "BrokenPipe", "Broken pipe", "Exception ignored", "error:")


def run_unread(args: list[str], *, closed: str = "stdout") -> tuple[int, str]:
    """Run the installed command with its stdout (or stdout and stderr: "both") on a pipe
    whose reader has already gone, as after `| head -1` read its line: every write there
    meets EPIPE, from the first one on. Returns the exit status and stderr (when open)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [installed_smartmail(), *args],
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=write_end if closed == "both" else subprocess.PIPE,
            timeout=60,
        )
    finally:
        os.close(write_end)
    return proc.returncode, (proc.stderr or b"").decode()


def run_to_devnull(args: list[str]) -> int:
    """The exit status with nobody reading and nothing lost: output to /dev/null."""
    return subprocess.run(
        [installed_smartmail(), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=60,
    ).returncode


def file_send(csv_path: Path, template: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["send", str(csv_path), "-t", str(template), "--transport",
            f"file://{tmp_path / 'outbox'}", "--state", str(tmp_path / "s.db"), "--yes",
            "--failed-csv", str(tmp_path / "f.csv"), *extra]  # fmt: skip


@pytest.mark.parametrize(
    "args", [["status"], ["status", "--json"], ["suppress", "list"], ["suppress", "export", "-"]]
)
def test_a_listing_whose_reader_has_gone_exits_0_and_says_nothing(
    tmp_path: Path, template_file: Path, args: list[str]
) -> None:
    state_db = str(tmp_path / "s.db")
    assert run_to_devnull(file_send(make_csv(tmp_path / "r.csv", 3), template_file, tmp_path)) == 0
    assert run_to_devnull(["suppress", "add", "gone@example.org", "--state", state_db]) == 0
    code, err = run_unread([*args, "--state", state_db])
    assert (code, err) == (0, "")


@pytest.mark.parametrize("invalid", [False, True])
def test_a_dry_run_whose_reader_has_gone_exits_as_it_would_have(
    tmp_path: Path, template_file: Path, invalid: bool
) -> None:
    csv_path = make_csv(tmp_path / "r.csv", 30)
    if invalid:
        write(csv_path, csv_path.read_text() + "not-an-address,Bad,C9\n")
    args = ["dry-run", str(csv_path), "-t", str(template_file), "--preview", "5", "--no-state"]
    expected = run_to_devnull(args)
    assert expected == (2 if invalid else 0)
    code, err = run_unread(args)
    assert code == expected
    assert not any(noise in err for noise in NOISE), err


def test_a_send_whose_reader_has_gone_records_everything_and_exits_as_it_would_have(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    csv_path = make_csv(tmp_path / "r.csv", 5)
    report = tmp_path / "run.json"
    code, err = run_unread(
        ["send", str(csv_path), "-t", str(template_file), "--transport", smtp_server.url,
         "--smtp-security", "none", "--state", str(tmp_path / "s.db"), "--yes",
         "--failed-csv", str(tmp_path / "f.csv"), "--report", str(report)]
    )  # fmt: skip
    assert code == 0
    assert not any(noise in err for noise in NOISE), err
    assert len(smtp_server.handler.received) == 5
    assert json.loads(report.read_text())["sent"] == 5
    with sqlite3.connect(tmp_path / "s.db") as db:
        assert dict(db.execute("SELECT status, count(*) FROM deliveries GROUP BY status")) == {
            "sent": 5
        }


@pytest.mark.parametrize("progress", ["log", "live"])
def test_a_send_whose_output_and_warnings_are_unread_still_sends_every_valid_row(
    tmp_path: Path, template_file: Path, progress: str
) -> None:
    """`smartmail send ... 2>&1 | head -1`: the pre-flight warning about the invalid row, the
    progress lines and the summary all meet a closed pipe; the send goes on regardless."""
    csv_path = make_csv(tmp_path / "r.csv", 6)
    write(csv_path, csv_path.read_text() + "not-an-address,Bad,C9\n")
    args = file_send(
        csv_path, template_file, tmp_path, "--progress", progress, "--log-interval", "0.1"
    )
    code, _ = run_unread(args, closed="both")
    assert code == 0
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 6
    with sqlite3.connect(tmp_path / "s.db") as db:
        assert dict(db.execute("SELECT status, count(*) FROM deliveries GROUP BY status")) == {
            "sent": 6,
            "skipped": 1,
        }
    # The run finished as one to /dev/null would have: a re-run has nothing new to send.
    assert run_to_devnull(args) == 0
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 6


LIBRARY_RUN_WITH_AN_UNREAD_DISPLAY = """
import contextlib, json, os, sys
from rich.console import Console
from smartmail import CampaignConfig, RunOptions, run_campaign
from smartmail.campaign import Hooks
from smartmail.progress import RichProgress

template, source, outbox, state, failed, out = sys.argv[1:]
read_end, write_end = os.pipe()
os.close(read_end)
unread = os.fdopen(write_end, "w")
display = RichProgress(Console(file=unread, force_terminal=True, width=80))
config = CampaignConfig(template=template, source=source, transport="file://" + outbox)
options = RunOptions(state_path=state, failed_csv=failed)
result = run_campaign(config, options, Hooks(progress=display))
with open(out, "w") as fh:
    json.dump({"code": result.exit_code, "error": result.error, "sent": result.summary.sent}, fh)
with contextlib.suppress(OSError):
    unread.close()
"""


def test_a_progress_display_whose_reader_has_gone_does_not_stop_the_run_finishing(
    tmp_path: Path, template_file: Path
) -> None:
    """A library caller's live display on a stream nobody reads any more (rich then raises
    SystemExit): the send pass still sends, records, and finishes as usual, removing an
    earlier run's failed-rows CSV, now stale, which would offer rows sent since."""
    stale = write(tmp_path / "f.csv", "email,name,code,error\nuser0@example.org,U,C,old\n")
    out = tmp_path / "result.json"
    args = [str(template_file), str(make_csv(tmp_path / "r.csv", 3)), str(tmp_path / "outbox"),
            str(tmp_path / "s.db"), str(stale), str(out)]  # fmt: skip
    subprocess.run(
        [sys.executable, "-c", LIBRARY_RUN_WITH_AN_UNREAD_DISPLAY, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    assert json.loads(out.read_text()) == {"code": 0, "error": None, "sent": 3}
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 3
    assert not stale.exists()


# --- output lost, and a damaged state file: one line, the documented code, nothing lost -----


def _smartmail(args: list[str], cwd: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """The installed command, as cron runs it; `kwargs` go to subprocess.run (stdout...)."""
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.run(
        [installed_smartmail(), *args], cwd=cwd, text=True, timeout=60, check=False, **kwargs
    )


def _send_args(csv_path: Path, template_file: Path, tmp_path: Path, outbox: str) -> list[str]:
    return [
        "send", str(csv_path), "-t", str(template_file), "--transport", f"file://{outbox}",
        "--state", str(tmp_path / "state.db"), "--yes", "--progress", "none",
    ]  # fmt: skip


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_send_whose_output_is_lost_still_sends_every_row_and_says_so(
    tmp_path: Path, template_file: Path
) -> None:
    csv_path = make_csv(tmp_path / "r.csv", 6)
    with open("/dev/full", "w") as full:
        proc = _smartmail(
            _send_args(csv_path, template_file, tmp_path, "outbox"), tmp_path, stdout=full
        )
    assert "Traceback" not in proc.stderr
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 6
    (line,) = error_lines(proc.stderr)
    assert "standard output could not be written (No space left on device)" in line
    assert proc.returncode == 5  # sending began: as for a --report not written
    again = _smartmail(
        _send_args(csv_path, template_file, tmp_path, "outbox"), tmp_path, stdout=subprocess.PIPE
    )
    assert again.returncode == 0 and len(list((tmp_path / "outbox").glob("*.eml"))) == 6


@pytest.mark.parametrize("stdout", ["full", "closed"])
def test_a_status_whose_output_is_lost_is_an_error_not_a_traceback(
    stdout: str, tmp_path: Path, template_file: Path
) -> None:
    if stdout == "full" and not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    csv_path = make_csv(tmp_path / "r.csv", 2)
    assert _smartmail(_send_args(csv_path, template_file, tmp_path, "o"), tmp_path).returncode == 0
    args = ["status", "--state", str(tmp_path / "state.db")]
    if stdout == "full":
        with open("/dev/full", "w") as full:
            proc = _smartmail(args, tmp_path, stdout=full)
    else:  # `smartmail status >&-`: Python starts with no sys.stdout at all
        proc = subprocess.run(
            ["sh", "-c", '"$0" "$@" >&-', installed_smartmail(), *args],
            cwd=tmp_path, text=True, stderr=subprocess.PIPE, timeout=60, check=False,
        )  # fmt: skip
    assert "Traceback" not in proc.stderr
    assert len(error_lines(proc.stderr)) == 1 and "standard output" in proc.stderr
    assert proc.returncode == 2


def test_a_damaged_state_file_is_one_line_naming_it_and_nothing_is_sent(
    tmp_path: Path, template_file: Path
) -> None:
    csv_path = make_csv(tmp_path / "r.csv", 200)
    db = tmp_path / "state.db"
    assert _smartmail(_send_args(csv_path, template_file, tmp_path, "o"), tmp_path).returncode == 0
    with open(db, "r+b") as fh:  # a disk fault in the deliveries' pages
        fh.seek(4096 * 5)
        fh.write(b"\xff" * 4096 * 3)
    proc = _smartmail(
        _send_args(csv_path, template_file, tmp_path, "again"), tmp_path, stdout=subprocess.PIPE
    )
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert str(db) in line and "malformed" in line and "integrity_check" in line
    assert proc.returncode == 2
    assert not (tmp_path / "again").exists() or not list((tmp_path / "again").iterdir())


def test_a_read_only_state_file_is_not_called_damaged(
    tmp_path: Path, template_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SQLite's error for a file this user may not write (a copy made read-only, another
    user's) is not a damaged file: the line must not tell the user to move the ledger aside
    (the next run would then send every row again), but say what is wrong with it."""
    csv_path = make_csv(tmp_path / "r.csv", 2)
    db = tmp_path / "state.db"
    assert _smartmail(_send_args(csv_path, template_file, tmp_path, "o"), tmp_path).returncode == 0

    def body(folder: Path) -> None:
        copy = folder / "state.db"
        shutil.copy(db, copy)
        copy.chmod(0o444)
        code, _, err = run_main(["suppress", "add", "x@example.org", "--state", str(copy)], capsys)
        (line,) = error_lines(err)
        assert str(copy) in line and "read-only" in line
        assert "move it aside" not in line and "backup" not in line
        assert code == 2

    unprivileged(body)


def test_a_non_blocking_stdout_whose_reader_is_slow_gets_all_the_output(
    tmp_path: Path, template_file: Path
) -> None:
    """A CI runner or a node process may hand smartmail a pipe another process made
    non-blocking: a write to it while the reader is slow is EAGAIN, not lost output. The
    command waits for the reader, as with any pipe, rather than end in a BlockingIOError
    traceback with its output cut short."""
    csv_path = make_csv(tmp_path / "r.csv", 1500)
    read, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        proc = subprocess.Popen(
            [installed_smartmail(), "dry-run", str(csv_path), "-t", str(template_file),
             "--preview", "1500"],
            cwd=tmp_path, stdout=write_end, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    finally:
        os.close(write_end)
    time.sleep(1.5)  # the pipe (64 KB) fills meanwhile
    with os.fdopen(read, "rb") as reader:
        out = reader.read().decode()
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.wait(timeout=60) == 0, err
    assert "Traceback" not in err
    assert out.count("user1499@example.org") >= 1 and out.count("\nTo: ") == 1500


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_output_lost_is_said_even_when_the_command_fails_anyway(
    tmp_path: Path, template_file: Path
) -> None:
    bad = write(tmp_path / "bad.csv", "email,name,code\nnot-an-address,Ann,C1\n")
    with open("/dev/full", "w") as full:
        proc = _smartmail(["dry-run", str(bad), "-t", str(template_file)], tmp_path, stdout=full)
    assert "Traceback" not in proc.stderr
    assert "standard output could not be written (No space left on device)" in proc.stderr
    assert proc.returncode == 2  # the dry run's own status: a row is invalid


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_output_lost_is_said_when_the_command_crashes_too(
    tmp_path: Path, template_file: Path
) -> None:
    # A bug that ends the command with a traceback: the preview it printed is lost all the
    # same, and the user must learn that too (the traceback says nothing about stdout).
    csv_path = make_csv(tmp_path / "r.csv", 2)
    script = (
        "import sys, smartmail.cli as cli\n"
        "shown = cli.print_summary\n"
        "def crash(*args, **kwargs):\n"
        "    shown(*args, **kwargs)\n"
        "    raise RuntimeError('a bug')\n"
        "cli.print_summary = crash\n"
        f"sys.argv = ['smartmail', 'dry-run', {str(csv_path)!r}, '-t', {str(template_file)!r},"
        " '--no-state']\n"
        "cli.entry()\n"
    )
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-c", script],
            cwd=tmp_path,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    assert "RuntimeError: a bug" in proc.stderr, proc.stderr
    assert "standard output could not be written (No space left on device)" in proc.stderr
    assert proc.returncode == 1  # Python's own, for an uncaught exception


# --- a terminal that hangs up while SIGHUP is ignored (`nohup`-like, `trap '' HUP`) ----------


def _on_a_terminal(
    args: list[str], cwd: Path, *, stderr_too: bool
) -> tuple[subprocess.Popen[bytes], int]:
    """`python -m smartmail ARGS` with its stdout (and stderr, with `stderr_too`) on a new
    pseudo-terminal, its controlling terminal, and SIGHUP ignored; the terminal's master end
    is returned for the test to read and close (a hang-up: the slave's writes fail with EIO)."""
    import fcntl
    import termios

    master, slave = os.openpty()

    def controlling_terminal() -> None:
        fcntl.ioctl(1, termios.TIOCSCTTY, 0)  # after setsid: the hang-up sends SIGHUP

    try:
        proc = subprocess.Popen(
            ["sh", "-c", "trap '' HUP; exec \"$0\" \"$@\"", sys.executable, "-m", "smartmail",
             *args],
            cwd=cwd, stdin=subprocess.DEVNULL, stdout=slave,
            stderr=slave if stderr_too else subprocess.PIPE,
            start_new_session=True, preexec_fn=controlling_terminal,
        )  # fmt: skip
    finally:
        os.close(slave)
    return proc, master


def _hang_up_once_written(master: int, proc: subprocess.Popen[bytes]) -> bytes:
    """Read from the terminal until the command has written to it, then close it: the output
    after that (the command blocks once the terminal's buffer is full) fails with EIO."""

    seen = b""
    deadline = time.monotonic() + 60
    while not seen and time.monotonic() < deadline and proc.poll() is None:
        if select.select([master], [], [], 0.1)[0]:
            seen = os.read(master, 1024)
    os.close(master)
    return seen


def test_a_dry_run_whose_terminal_hangs_up_says_so_in_one_line_not_a_traceback(
    tmp_path: Path, template_file: Path
) -> None:
    # More preview than a terminal's buffer holds: the command is still writing when it goes.
    csv_path = make_csv(tmp_path / "r.csv", 2000)
    args = ["dry-run", str(csv_path), "-t", str(template_file), "--preview", "2000",
            "--no-state"]  # fmt: skip
    proc, master = _on_a_terminal(args, tmp_path, stderr_too=False)
    try:
        assert _hang_up_once_written(master, proc), "the preview never reached the terminal"
        _, err_bytes = proc.communicate(timeout=60)
    finally:
        proc.kill()
    err = err_bytes.decode()
    assert "Traceback" not in err, err
    (line,) = error_lines(err)
    assert "standard output could not be written (Input/output error)" in line
    assert proc.returncode == 2  # nothing was sent


def test_a_send_whose_terminal_hangs_up_sends_every_row_and_says_so(
    tmp_path: Path, template_file: Path
) -> None:
    csv_path = make_csv(tmp_path / "r.csv", 40)
    args = [*_send_args(csv_path, template_file, tmp_path, "outbox"), "--rate", "40"]
    proc, master = _on_a_terminal(args, tmp_path, stderr_too=False)
    try:
        # The summary comes at the end: the terminal goes once the first message is out.
        deadline = time.monotonic() + 60
        while not list((tmp_path / "outbox").glob("*.eml")) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.close(master)
        _, err_bytes = proc.communicate(timeout=60)
    finally:
        proc.kill()
    err = err_bytes.decode()
    assert "Traceback" not in err, err
    (line,) = error_lines(err)
    assert "standard output could not be written (Input/output error)" in line
    assert "sending began" in line
    assert proc.returncode == 5
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 40


def _paced_send(
    tmp_path: Path, template_file: Path, rows: int, *, progress: str
) -> tuple[Path, list[str]]:
    """A list of `rows` and a `send` of it into ./outbox at `rows` a second (a run of about a
    second), with `--progress` as given."""
    csv_path = make_csv(tmp_path / "r.csv", rows)
    args = [*_send_args(csv_path, template_file, tmp_path, "outbox"), "--rate", str(rows)]
    args[args.index("--progress") + 1] = progress
    return csv_path, args


def test_a_send_whose_terminal_hangs_up_with_its_live_progress_still_sends_every_row(
    tmp_path: Path, template_file: Path
) -> None:
    # stdout and stderr both on the terminal, the live display drawing on it: nothing is left
    # to say the output was lost on, but the run goes on to its end and its exit status.
    csv_path, args = _paced_send(tmp_path, template_file, 40, progress="live")
    proc, master = _on_a_terminal(args, tmp_path, stderr_too=True)
    try:
        assert _hang_up_once_written(master, proc), "the live display never drew"
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 5
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 40
    again = _smartmail(
        _send_args(csv_path, template_file, tmp_path, "outbox"), tmp_path, stdout=subprocess.PIPE
    )
    assert again.returncode == 0 and len(list((tmp_path / "outbox").glob("*.eml"))) == 40


def test_a_send_on_a_terminal_still_gets_its_colours_and_live_display(
    tmp_path: Path, template_file: Path
) -> None:
    # stdout and stderr are wrapped on a terminal too (for a hang-up): rich must still see
    # one, and draw its live display and colours there.
    _, args = _paced_send(tmp_path, template_file, 20, progress="auto")
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    env.update(TERM="xterm-256color", COLUMNS="100", TTY_COMPATIBLE="")
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "smartmail", *args], cwd=tmp_path, env=env,
            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
        )  # fmt: skip
    finally:
        os.close(slave)
    shown = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 0.1)[0]:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every slave end is closed, the command has ended
                break
            if not chunk:
                break
            shown += chunk
        assert proc.wait(timeout=60) == 0, shown
    finally:
        os.close(master)
        proc.kill()
    text = shown.decode("utf-8", "replace")
    assert "\x1b[?25l" in text  # the live display hides the cursor while it draws
    assert re.search(r"\x1b\[[0-9;]*3[0-9](;[0-9]+)*m", text), text  # a colour
    assert "┌" in text and "sent" in text  # the summary's box, as on any terminal


@pytest.mark.parametrize("hang_up", [True, False])
def test_end_of_input_at_the_prompt_is_no_answer_only_if_the_terminal_hung_up(
    monkeypatch: pytest.MonkeyPatch, hang_up: bool
) -> None:
    """A terminal that hung up before the prompt's read began reads as end of input, not EIO
    (the race made the test below fail once in a CI run): still "no answer". Ctrl-D on a
    live terminal stays "not confirmed"."""
    from smartmail.campaign import DeclinedError, Plan
    from smartmail.cli import _confirm

    master, slave = os.openpty()
    stdin = open(slave, encoding="utf-8", closefd=True)  # noqa: SIM115
    try:
        if hang_up:
            os.close(master)
        else:
            os.write(master, b"\x04")  # Ctrl-D
        monkeypatch.setattr(sys, "stdin", stdin)
        plan = Plan("c", "file://outbox", "r.csv", 3, 3, 0, 3, 3)
        if hang_up:
            with pytest.raises(DeclinedError, match="no answer: the terminal went away"):
                _confirm(plan)
        else:
            assert _confirm(plan) is False
    finally:
        stdin.close()
        if not hang_up:
            os.close(master)


def test_a_terminal_that_hangs_up_at_the_prompt_is_no_answer_and_nothing_is_sent(
    tmp_path: Path, template_file: Path
) -> None:
    # The answer's read failed with EIO: a traceback and exit 1 ("some rows failed").
    import fcntl
    import termios

    csv_path = make_csv(tmp_path / "r.csv", 3)
    args = _send_args(csv_path, template_file, tmp_path, "outbox")
    args.remove("--yes")
    master, slave = os.openpty()

    def controlling_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    try:
        proc = subprocess.Popen(
            ["sh", "-c", "trap '' HUP; exec \"$0\" \"$@\"", sys.executable, "-m", "smartmail",
             *args],
            cwd=tmp_path, stdin=slave, stdout=slave, stderr=subprocess.PIPE,
            start_new_session=True, preexec_fn=controlling_terminal,
        )  # fmt: skip
    finally:
        os.close(slave)
    assert proc.stderr is not None
    asked = b""
    try:
        deadline = time.monotonic() + 60
        while b"[y/N]" not in asked and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stderr], [], [], 0.1)[0]:
                asked += os.read(proc.stderr.fileno(), 4096)
            if select.select([master], [], [], 0)[0]:
                os.read(master, 4096)
        assert b"[y/N]" in asked, asked
        os.close(master)  # the hang-up, while the prompt waits for its answer
        _, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
    err = (asked + rest).decode()
    assert "Traceback" not in err, err
    assert "no answer: the terminal went away" in err and "nothing was sent" in err
    assert proc.returncode == 2
    assert not list((tmp_path / "outbox").glob("*.eml"))


def _sending(args: list[str], cwd: Path, output: int) -> subprocess.Popen[bytes]:
    """`python -m smartmail ARGS` started, once its outbox holds 5 messages (a send under
    way); stdout and stderr to `output`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "smartmail", *args], cwd=cwd, stdout=output, stderr=output
    )
    deadline = time.monotonic() + 60
    while len(list((cwd / "outbox").glob("*.eml"))) < 5:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError("the send never began")
        time.sleep(0.01)
    return proc


@pytest.mark.parametrize(
    ("removed", "then"),
    [
        (("state.db", "state.db-wal", "state.db-shm"), "move-back"),
        (("state.db",), "use-the-copy"),
        (("state.db-wal",), "use-the-copy"),
    ],
    ids=["all-moved-back", "file-then-the-copy", "wal-then-the-copy"],
)
def test_a_state_file_removed_during_a_send_stops_it_and_keeps_its_records(
    tmp_path: Path, template_file: Path, removed: tuple[str, ...], then: str
) -> None:
    # The ledger went on writing to the unlinked file, the run ended 0, and the next run
    # (with a new, empty state) sent every row again. Then (a review): the stop discarded the
    # outcomes in its batch, so following its advice left rows in doubt, and a -wal removed
    # alone went unseen.
    csv_path = make_csv(tmp_path / "r.csv", 40)
    args = [*_send_args(csv_path, template_file, tmp_path, "outbox"), "--rate", "20"]
    db = tmp_path / "state.db"
    db.touch(mode=0o600)  # made before the first run, for a list of addresses, not for all
    proc = _sending(args, tmp_path, subprocess.PIPE)
    try:
        for name in removed:
            (tmp_path / name).unlink(missing_ok=True)
        _, err_bytes = proc.communicate(timeout=60)
    finally:
        proc.kill()
    err = err_bytes.decode()
    assert proc.returncode == 5, err
    assert "so the run stopped" in err and "Traceback" not in err
    sent = {p.name.split("-")[1] for p in (tmp_path / "outbox").glob("*.eml")}
    assert 5 <= len(sent) < 40  # stopped, not run to the end into a file nobody reads
    (saved,) = tmp_path.glob("state.db.recovered-*")  # one file, no -wal beside it
    assert str(saved) in err and saved.stat().st_mode & 0o777 == 0o600
    if "state.db" in removed:  # its stale WAL would be read into the copy moved back
        assert not (tmp_path / "state.db-wal").exists()
    if then == "move-back":
        saved.rename(db)
        again_args = args
    else:
        again_args = [*args[: args.index("--state")], "--state", str(saved),
                      *args[args.index("--state") + 2 :]]  # fmt: skip
    again = _smartmail(again_args, tmp_path, stdout=subprocess.PIPE)
    assert again.returncode == 0, again.stderr
    names = [p.name.split("-")[1] for p in (tmp_path / "outbox").glob("*.eml")]
    assert sorted(names) == sorted(set(names)) and len(names) == 40  # each row once, none lost


def test_a_run_killed_once_its_wal_was_removed_leaves_its_records_in_the_state_file(
    tmp_path: Path, template_file: Path
) -> None:
    # Its records were only in the removed -wal, which the process held open: SIGKILL after
    # that lost them, and the next run sent those rows again. Found gone, the WAL is
    # checkpointed into the file at once (and a copy saved), before anything else can happen.
    csv_path = make_csv(tmp_path / "r.csv", 40)
    args = [*_send_args(csv_path, template_file, tmp_path, "outbox"), "--rate", "20"]
    proc = _sending(args, tmp_path, subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        (tmp_path / "state.db-wal").unlink()
        while not list(tmp_path.glob("state.db.recovered-*")):
            assert time.monotonic() < deadline, "the removal was never noticed"
            time.sleep(0.001)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    again = _smartmail(args, tmp_path, stdout=subprocess.PIPE)  # the same command, as cron
    assert again.returncode == 0, again.stderr
    names = [p.name.split("-")[1] for p in (tmp_path / "outbox").glob("*.eml")]
    assert len(names) == len(set(names)), "a row sent twice"
