"""Pre-flight's helper process (smartmail/prerender.py): it may only ever save time.

A long list is checked by two processes, the helper rendering some blocks of rows. Every
verdict, problem, kept message and attachment must be what one process alone finds, also
when the helper dies, stalls, or reads a list edited meanwhile; it never outlives pre-flight.
Real files, the real SQLite ledger with its writer thread running (the fork happens beside
it), a real SMTP server; the only things patched are the faults injected into the helper.
"""

from __future__ import annotations

import email
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from smartmail import MessageTemplate, RecipientSource, SendOptions, SourceSpec, prerender
from smartmail.cli import _SignalThread
from smartmail.engine import PreflightResult, preflight
from smartmail.ledger import Ledger
from smartmail.state import connect
from smartmail.suppression import SuppressionList

from .conftest import SmtpServer, make_csv, run_main, write

TWO_CPUS = len(os.sched_getaffinity(0)) >= 2 if hasattr(os, "sched_getaffinity") else False
needs_two = pytest.mark.skipif(not TWO_CPUS, reason="the helper runs only with a second CPU")

ROWS = 1700  # 7 blocks: the helper renders blocks 3 and 4 (and 6, past the 1,536th row)


@pytest.fixture(autouse=True)
def patient_helper(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lists of 1,700 rows get a helper here (MIN_ROWS 1,024 instead of 2,048: the tests stay
    fast), and the parent waits for the helper's blocks rather than taking a late one itself
    (GRACE), so which rows the helper renders is the same in every run however busy the
    machine. The tests of those two rules set them back."""
    monkeypatch.setattr(prerender, "MIN_ROWS", 1024)
    monkeypatch.setattr(prerender, "GRACE", 1000.0)


TEMPLATE = """\
From: Acme <news@acme.example>
To: {{ name }} <{{ email }}>
Cc: {{ cc }}
Subject: {{ subject }}
Attachment: {{ file }}

Hi {{ name }}, your code is {{ code }}.
"""


def hostile_campaign(folder: Path) -> tuple[Path, Path]:
    """A list whose trouble is spread over the parent's blocks and the helper's alike."""
    (folder / "files").mkdir()
    write(folder / "files" / "terms.txt", "the terms\n")
    write(folder / "files" / "invoice-7.txt", "invoice seven\n")
    write(folder / "secret.txt", "not to be attached\n")
    template = write(folder / "files" / "msg.txt", TEMPLATE)
    lines = ["email,name,code,cc,subject,file"]
    for i in range(ROWS):
        email_, name, cc, subject, file = f"user{i}@example.org", f"User {i}", "", "Hi", "terms.txt"
        kind = i % 97
        if kind == 3:
            email_ = "not an address"
        elif kind == 11:
            name = "Eve\r\nBcc: victim@evil.example"  # header injection: refused, row skipped
        elif kind == 17:
            email_ = f"user{i - 700 if i > 700 else i + 1}@example.org"  # a duplicate
        elif kind == 23:
            cc = "archive@acme.example"  # suppressed: left out of the message
        elif kind == 29:
            cc = "Boss <boss@acme.example>, other@example.org"
        elif kind == 31:
            subject = ""  # goes, with a warning
        elif kind == 41:
            file = "../secret.txt"  # outside the folder: refused
        elif kind == 43:
            file = "invoice-7.txt"
        elif kind == 47:
            name = "Jörg Müller, Ünïcode"
        elif kind == 53:
            email_ = "gone@example.org"  # the recipient is suppressed
        elif kind == 59:
            file = "missing.txt"
        lines.append(f'{email_},"{name}",C{i:05d},"{cc}",{subject},{file}')
        if kind == 61:
            lines.append(f"ragged{i}@example.org,only two")
    csv_path = write(folder / "recipients.csv", "\n".join(lines) + "\n")
    return csv_path, template


def check(
    csv_path: Path, template: Path, ledger: Any, *, helper: bool, **kwargs: Any
) -> tuple[PreflightResult, dict[str, Path]]:
    attached: dict[str, Path] = {}
    with RecipientSource(SourceSpec(str(csv_path))).snapshot() as snap:
        result = preflight(
            snap,
            MessageTemplate.load(template),
            SendOptions(preflight_helper=helper, **kwargs),
            journal=ledger,
            keep_rendered=64 << 20,
            attachments=attached,
        )
    return result, attached


def verdicts(result: PreflightResult) -> dict[str, Any]:
    return {
        "rows": result.rows,
        "valid": result.valid,
        "invalid": result.invalid,
        "duplicates": result.duplicates,
        "skipped": result.skipped,
        "problems": [str(p) for p in result.problems],
        "fatal": result.fatal,
        "suppressed_copies": result.suppressed_copies,
        "empty_subjects": result.empty_subjects,
        "envelope_recipients": result.envelope_recipients,
        "kept": result.kept,
    }


@pytest.fixture
def suppressing_ledger(tmp_path: Path) -> Any:
    db = tmp_path / "state.db"
    conn = connect(db)
    SuppressionList(conn).add("archive@acme.example", "manual")
    SuppressionList(conn).add("gone@example.org", "bounce")
    conn.close()
    with Ledger(db, "prerender") as ledger:
        ledger.acquire()
        yield ledger


class Spy:
    """Counts the renders made in this process (the helper's are made in its own) and
    remembers the helpers started."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.renders = 0
        self.pids: list[int] = []
        render = MessageTemplate.render
        start = prerender._Helper.start.__func__  # type: ignore[attr-defined]
        parent = os.getpid()

        def counting(template: MessageTemplate, *args: Any, **kwargs: Any) -> Any:
            if os.getpid() == parent:
                self.renders += 1
            return render(template, *args, **kwargs)

        def starting(cls: Any, *args: Any) -> Any:
            helper = start(cls, *args)
            if helper is not None:
                self.pids.append(helper.pid)
            return helper

        monkeypatch.setattr(MessageTemplate, "render", counting)
        monkeypatch.setattr(prerender._Helper, "start", classmethod(starting))

    def all_reaped(self) -> bool:
        for pid in self.pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            return False
        return True


@needs_two
def test_a_long_list_gets_the_same_verdicts_with_the_helper_as_without(
    tmp_path: Path, suppressing_ledger: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    csv_path, template = hostile_campaign(tmp_path)
    alone, attached_alone = check(csv_path, template, suppressing_ledger, helper=False)
    spy = Spy(monkeypatch)
    helped, attached_helped = check(csv_path, template, suppressing_ledger, helper=True)

    assert verdicts(helped) == verdicts(alone)
    assert attached_helped == attached_alone
    # The hostile rows were judged, wherever they fell (a sample of what the list holds).
    assert alone.invalid > 50 and alone.duplicates > 10 and alone.suppressed_copies > 10
    assert any("outside" in p.message or "../" in p.message for p in alone.problems)
    assert all("victim@evil.example" not in m.envelope_to for m in helped.kept.values())
    for number, message in helped.kept.items():  # each message is its own row's
        assert message.row.number == number
        assert message.recipient == message.row.values["email"]
    # And the helper did its share (blocks 2, 4 and 6, less the bad rows rendered again here).
    assert len(spy.pids) == 1 and spy.renders < ROWS - 600
    assert spy.all_reaped()


@needs_two
def test_previews_and_test_to_are_the_same_with_the_helper(tmp_path: Path) -> None:
    csv_path = make_csv(tmp_path / "r.csv", 1300)
    template = write(
        tmp_path / "t.txt", "From: a@acme.example\nTo: {{ email }}\nSubject: {{ code }}\n\nx\n"
    )
    runs = [
        check(csv_path, template, None, helper=helper, preview=3, test_to="proof@acme.example")[0]
        for helper in (False, True)
    ]
    alone, helped = runs
    assert [p.recipients for p in helped.previews] == [["proof@acme.example"]] * 3
    assert [p.row.number for p in helped.previews] == [p.row.number for p in alone.previews]
    assert verdicts(helped) == verdicts(alone)


@needs_two
def test_a_helper_that_dies_midway_changes_no_verdict(
    tmp_path: Path,
    suppressing_ledger: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    csv_path, template = hostile_campaign(tmp_path)
    alone, _ = check(csv_path, template, suppressing_ledger, helper=False)
    pack = prerender._pack
    packed = [0]

    def dying(rendered: Any) -> Any:  # runs in the helper: it is killed in its third block
        packed[0] += 1
        if packed[0] > 600:
            os.kill(os.getpid(), signal.SIGKILL)
        return pack(rendered)

    monkeypatch.setattr(prerender, "_pack", dying)
    spy = Spy(monkeypatch)
    with caplog.at_level(logging.DEBUG, logger="smartmail"):
        helped, _ = check(csv_path, template, suppressing_ledger, helper=True)
    assert verdicts(helped) == verdicts(alone)
    assert "helper process stopped (it ended early)" in caplog.text
    assert ROWS / 2 < spy.renders < ROWS  # it did two blocks, this process the rest
    assert spy.all_reaped()


@needs_two
def test_a_slow_helper_never_holds_preflight_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A helper on a busy CPU (here: one that sleeps) is not waited for: its blocks are
    rendered here after a short grace, and after three of them it is stopped."""
    csv_path, template = hostile_campaign(tmp_path)
    alone, _ = check(csv_path, template, None, helper=False)
    monkeypatch.setattr(prerender, "GRACE", 1.0)
    monkeypatch.setattr(prerender, "_serve", lambda *args: time.sleep(60))
    spy = Spy(monkeypatch)
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG, logger="smartmail"):
        helped, _ = check(csv_path, template, None, helper=True)
    assert time.monotonic() - started < 30  # a hang guard: not the helper's 60 s
    assert verdicts(helped) == verdicts(alone)
    assert "helper process is too slow" in caplog.text
    assert spy.renders >= ROWS and spy.all_reaped()


@needs_two
def test_a_helper_sending_what_no_helper_sends_changes_no_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    csv_path, template = hostile_campaign(tmp_path)
    alone, _ = check(csv_path, template, None, helper=False)
    monkeypatch.setattr(prerender, "_pack", lambda rendered: ("not", "a", "message"))
    helped, _ = check(csv_path, template, None, helper=True)
    assert verdicts(helped) == verdicts(alone)


def other_people(csv_path: Path) -> list[str]:
    return ["email,name,code"] + [f"other{i}@evil.example,X,Z{i}" for i in range(1300)]


def columns_swapped(csv_path: Path) -> list[str]:
    """The very same data lines under a header naming the columns in another order."""
    lines = csv_path.read_text().splitlines()
    return ["code,name,email", *lines[1:]]


@needs_two
@pytest.mark.parametrize("replacement", [other_people, columns_swapped])
def test_a_list_edited_while_a_dry_run_reads_it_is_judged_as_this_process_read_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, replacement: Any
) -> None:
    """A dry-run reads the file in place (no private copy). If it is replaced after this
    process opened it, the helper reads the new one: its renders must not be taken for the
    rows this process read (every message would go to someone else's address), not even
    when only the header changed and every value is where it was."""
    csv_path = write(
        tmp_path / "r.csv",
        "email,name,code\n" + "".join(f"user{i}@example.org,User {i},C{i}\n" for i in range(1300)),
    )
    template = write(
        tmp_path / "t.txt", "From: a@acme.example\nTo: {{ email }}\nSubject: {{ code }}\n\n.\n"
    )
    start = prerender._Helper.start.__func__  # type: ignore[attr-defined]

    def replaced_first(cls: Any, *args: Any) -> Any:
        lines = replacement(csv_path)
        write(tmp_path / "new.csv", "\n".join(lines) + "\n").replace(csv_path)
        return start(cls, *args)

    monkeypatch.setattr(prerender._Helper, "start", classmethod(replaced_first))
    result = preflight(
        RecipientSource(SourceSpec(str(csv_path))),
        MessageTemplate.load(template),
        SendOptions(),
        keep_rendered=64 << 20,
    )
    assert result.valid == 1300 and len(result.kept) == 1300
    for message in result.kept.values():
        assert message.recipient == message.row.values["email"]
        assert message.recipient.endswith("@example.org")
        assert message.head is not None
        assert f"Subject: {message.row.values['code']}" in message.head


@needs_two
def test_ctrl_c_during_preflight_stops_the_helper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    csv_path = make_csv(tmp_path / "r.csv", 1300)
    template = write(tmp_path / "t.txt", "From: a@acme.example\nTo: {{ email }}\nSubject: x\n\n.\n")
    spy = Spy(monkeypatch)

    class Interrupting:
        def skip_reason(self, recipient: str, row: Any) -> str | None:
            if row.number > 900:
                raise KeyboardInterrupt
            return None

        def sending(self, message: Any) -> None:
            return None

        def record(self, outcome: Any) -> None:
            return None

    with pytest.raises(KeyboardInterrupt):
        check(csv_path, template, Interrupting(), helper=True)
    assert len(spy.pids) == 1 and spy.all_reaped()


def test_only_a_list_another_process_can_read_alike_is_given_to_a_helper(
    tmp_path: Path,
) -> None:
    local = make_csv(tmp_path / "r.csv", 2)
    assert RecipientSource(SourceSpec(str(local))).reread_in_helper
    with RecipientSource(SourceSpec(str(local))).snapshot() as snap:
        assert snap.reread_in_helper  # a private local copy, even of an S3 object
    assert not RecipientSource(SourceSpec("s3://bucket/list.csv")).reread_in_helper
    turned = RecipientSource(SourceSpec(str(make_csv(tmp_path / "p.csv", 2))))
    (tmp_path / "p.csv").unlink()
    os.mkfifo(tmp_path / "p.csv")  # now a pipe: a second reader would take rows from the first
    assert not turned.reread_in_helper

    class Custom(RecipientSource):
        pass

    assert not Custom(SourceSpec(str(local))).reread_in_helper


@needs_two
def test_a_long_send_through_the_cli_sends_each_row_its_own_message_once(
    smtp_server: SmtpServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    csv_path = make_csv(tmp_path / "r.csv", 1300)
    template = write(
        tmp_path / "t.txt",
        "From: Acme <news@acme.example>\nTo: {{ name }} <{{ email }}>\n"
        "Subject: Code {{ code }}\n\nHi {{ name }}, your code is {{ code }}.\n",
    )
    spy = Spy(monkeypatch)
    args = ["send", str(csv_path), "-t", str(template), "--transport", smtp_server.url]
    args += ["--smtp-security", "none", "--yes", "--workers", "4"]
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    assert len(spy.pids) == 1 and spy.renders < 1300 and spy.all_reaped()
    received = smtp_server.handler.received
    assert sorted(r.rcpt_tos[0] for r in received) == sorted(
        f"user{i}@example.org" for i in range(1300)
    )
    for r in received:
        i = int(r.rcpt_tos[0].removeprefix("user").split("@")[0])
        message = email.message_from_string(str(r.message))
        assert message["Subject"] == f"Code C{i:05d}"
        assert f"User {i} <user{i}@example.org>" in message["To"]
        assert f"your code is C{i:05d}." in message.get_payload()
    # The ledger (its writer thread ran beside the fork) holds every row: a re-run sends none.
    code, out, err = run_main(args, capsys)
    assert code == 0, err
    assert "already sent" in out + err
    assert len(received) == 1300


@needs_two
def test_blocks_larger_than_the_read_ahead_are_taken_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """12 KB messages make a block of 3 MB, past the 1 MB the parent reads ahead: it must
    still read the whole block due (it once spun for 10 s and gave the helper up)."""
    csv_path = make_csv(tmp_path / "r.csv", 1300)
    body = ("{{ name }} " + "x" * 88 + "\n") * 120
    template = write(
        tmp_path / "t.txt", f"From: a@acme.example\nTo: {{{{ email }}}}\nSubject: s\n\n{body}"
    )
    alone, _ = check(csv_path, template, None, helper=False)
    monkeypatch.setattr(prerender, "BUFFER", 4096)  # any part is then past it
    spy = Spy(monkeypatch)
    with caplog.at_level(logging.DEBUG, logger="smartmail"):
        helped, _ = check(csv_path, template, None, helper=True)
    assert verdicts(helped) == verdicts(alone)
    assert "helper process stopped" not in caplog.text
    assert spy.renders == 1300 - 2 * 256  # blocks 3 and 4 came from it


@needs_two
def test_rows_too_long_to_be_worth_copying_are_rendered_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few rows with 20 KB values among short ones are rendered by this process alone (and
    judged the same); a list of long rows gets no helper at all."""
    lines = ["email,name,code"]
    for i in range(1300):
        lines.append(f"user{i}@example.org,User {i},{'Z' * 20000 if i % 50 == 7 else i}")
    csv_path = write(tmp_path / "r.csv", "\n".join(lines) + "\n")
    template = write(
        tmp_path / "t.txt", "From: a@acme.example\nTo: {{ email }}\nSubject: s\n\n{{ code }}\n"
    )
    alone, _ = check(csv_path, template, None, helper=False)
    spy = Spy(monkeypatch)
    helped, _ = check(csv_path, template, None, helper=True)
    assert verdicts(helped) == verdicts(alone)
    assert len(spy.pids) == 1 and spy.renders < 1300 - 450  # blocks 3 and 4, less long rows

    wide = ["email,name,code"] + [f"u{i}@example.org,U,{'Z' * 3000}" for i in range(1300)]
    write(tmp_path / "wide.csv", "\n".join(wide) + "\n")
    check(tmp_path / "wide.csv", template, None, helper=True)
    assert len(spy.pids) == 1  # no second helper for the list of long rows


@needs_two
def test_only_a_list_of_some_thousand_rows_gets_a_helper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A helper renders from the fourth block on: for a queue job of up to 1,000 rows it would
    be a fork for one block or none. The list's size tells how many rows to expect."""
    monkeypatch.setattr(prerender, "MIN_ROWS", 2048)
    template = write(tmp_path / "t.txt", "From: a@acme.example\nTo: {{ email }}\nSubject: s\n\n.\n")
    spy = Spy(monkeypatch)
    for rows in (512, 1000, 1800):
        check(make_csv(tmp_path / f"{rows}.csv", rows), template, None, helper=True)
    assert spy.pids == []
    check(make_csv(tmp_path / "big.csv", 2600), template, None, helper=True)
    assert len(spy.pids) == 1 and spy.all_reaped()


@needs_two
def test_the_helper_runs_none_of_the_parents_signal_handlers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queue worker stops gracefully on SIGTERM, and a second one aborts the job: a SIGTERM
    that reaches the helper (a process-group kill) must not count in the parent."""
    csv_path, template = hostile_campaign(tmp_path)
    alone, _ = check(csv_path, template, None, helper=False)
    spy = Spy(monkeypatch)
    heard: list[int] = []
    monkeypatch.setattr(_SignalThread, "began", False)  # install() sets it; put back after
    handlers = _SignalThread(heard.append)  # its handler writes to a pipe a thread reads
    handlers.install()  # as `smartmail worker` does before it runs any job

    class Signalling:
        def skip_reason(self, recipient: str, row: Any) -> str | None:
            if row.number == 900:
                os.kill(spy.pids[0], signal.SIGTERM)
            return None

        def sending(self, message: Any) -> None:
            return None

        def record(self, outcome: Any) -> None:
            return None

    try:
        helped, _ = check(csv_path, template, Signalling(), helper=True)
        time.sleep(0.3)  # what the pipe holds, the thread has acted on by now
    finally:
        handlers.close()
    assert heard == []
    assert verdicts(helped) == verdicts(alone)  # the helper died of it; this process went on
    assert spy.all_reaped()


@needs_two
def test_a_helper_works_beside_more_than_1024_open_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long-running process may hold many files: the pipe's number is then past what
    select() takes (it crashed pre-flight)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip("this machine allows fewer than 1,200 open files")
        monkeypatch.setattr(resource, "_restore", (soft, hard), raising=False)
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        csv_path = make_csv(tmp_path / "r.csv", 1300)
        template = write(
            tmp_path / "t.txt", "From: a@acme.example\nTo: {{ email }}\nSubject: s\n\n.\n"
        )
        spy = Spy(monkeypatch)
        result, _ = check(csv_path, template, None, helper=True)
        assert result.valid == 1300 and len(spy.pids) == 1 and spy.renders < 1300 - 500
    finally:
        for fd in held:
            os.close(fd)
        if soft < 1200:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_container_cpu_quota_of_one_cpu_means_no_helper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`docker run --cpus=1` leaves two CPUs in the affinity mask but one CPU of time: a helper
    would only take turns with the parent."""
    v2 = tmp_path / "v2"
    v2.mkdir()
    write(v2 / "cpu.max", "100000 100000\n")
    assert prerender._quota(v2) == 1.0
    write(v2 / "cpu.max", "max 100000\n")
    assert prerender._quota(v2) is None
    v1 = tmp_path / "v1"
    v1.mkdir()
    write(v1 / "cpu.cfs_quota_us", "250000\n")
    write(v1 / "cpu.cfs_period_us", "100000\n")
    assert prerender._quota(v1) == 2.5
    snap = RecipientSource(SourceSpec(str(make_csv(tmp_path / "r.csv", 2)))).snapshot()
    with snap:
        monkeypatch.setattr(prerender, "_cgroup_cpus", lambda: 1.0)
        assert not prerender.usable(snap)
        monkeypatch.setattr(prerender, "_cgroup_cpus", lambda: 2.5)
        assert prerender.usable(snap) == TWO_CPUS


def test_the_helper_can_be_turned_off_and_is_off_where_one_cpu_is_all_there_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with RecipientSource(SourceSpec(str(make_csv(tmp_path / "r.csv", 2)))).snapshot() as snap:
        monkeypatch.setattr(prerender, "_cgroup_cpus", lambda: None)
        assert prerender.usable(snap) == TWO_CPUS
        monkeypatch.setenv("SMARTMAIL_PREFLIGHT_HELPER", "0")
        assert not prerender.usable(snap)
        monkeypatch.delenv("SMARTMAIL_PREFLIGHT_HELPER")
        monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1769")  # one CPU's time
        assert not prerender.usable(snap)


def test_an_odd_cgroup_file_means_no_quota_not_a_failed_preflight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = tmp_path / "cgroup"
    proc.write_bytes(b"0::/system.slice/mail-caf\xe9.service\n3:cpu,cpuacct:/\n")
    root = tmp_path / "sys"
    (root / "cpu,cpuacct").mkdir(parents=True)
    write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "100000\n")
    write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "0\n")  # a period of zero
    write(root / "cpu.max", "garbage\n")
    monkeypatch.setattr(prerender, "_PROC_CGROUP", str(proc))
    monkeypatch.setattr(prerender, "_CGROUP_ROOT", str(root))
    assert prerender._cgroup_cpus() is None
    write(root / "cpu.max", "50000 100000\n")
    assert prerender._cgroup_cpus() == 0.5
