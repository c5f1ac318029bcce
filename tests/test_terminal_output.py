"""The CLI's own tables, rules and lines (written without rich): they fit the terminal, lose
no word of a long value, style only where the terminal takes it, and never let a CSV value put
an escape sequence on the terminal."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from smartmail.tables import Table, wrap
from smartmail.terminal import Terminal, cell_width

from .conftest import make_csv, run_main, write

# Every escape sequence smartmail itself writes: SGR styles (bold, italic, colours, reset).
OUR_STYLES = re.compile(r"\x1b\[[0-9;]*m")
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\u202e"


class Tty(io.StringIO):
    """A captured stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "COLUMNS", "TERM"):
        monkeypatch.delenv(name, raising=False)


def test_a_long_value_wraps_within_the_width_and_keeps_every_character(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    stream = io.StringIO()
    path = "/var/spool/smartmail/" + "very-long-folder-name/" * 4 + "recipients.failed.csv"
    reason = "the server refused the message because the mailbox is full, try later"
    table = Table("smartmail summary")
    table.add_row("rows to re-drive", path)
    table.add_row("failed: 552 mailbox full", reason)
    table.print(Terminal(stream))
    lines = stream.getvalue().splitlines()
    assert lines[0] == "smartmail summary"
    assert all(cell_width(line) <= 40 for line in lines), lines
    cells = [line.split("│")[1:-1] for line in lines[2:-1]]
    values = [cell[1].strip() for cell in cells]
    labels = [cell[0].strip() for cell in cells]
    assert "".join(values).replace(" ", "") == (path + reason).replace(" ", "")
    shown_labels = " ".join(label for label in labels if label)
    assert shown_labels == "rows to re-drive failed: 552 mailbox full"
    # Broken at spaces where it can be: the reason's lines are whole words.
    assert " ".join(wrap(reason, 16)) == reason
    assert all(len(line) <= 16 for line in wrap(reason, 16))


def test_wide_characters_count_double_and_nothing_is_dropped() -> None:
    text = "東京の顧客リスト 2026 年 春"
    lines = wrap(text, 9)
    assert all(cell_width(line) <= 9 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")


def test_an_ascii_only_stream_gets_ascii_borders() -> None:
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii")
    table = Table("t")
    table.add_row("sent", "3")
    table.print(Terminal(stream))
    stream.flush()
    assert raw.getvalue().decode("ascii").splitlines()[1:] == [
        "+------+---+",
        "| sent | 3 |",
        "+------+---+",
    ]


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_a_stream_that_cannot_show_a_value_gets_its_escape_not_a_traceback(
    tmp_path: Path, encoding: str
) -> None:
    """PYTHONIOENCODING=ascii (or a Latin-1 terminal) and a non-ASCII recipient: the preview,
    the warnings and the summary are all printed, the missing characters as escapes."""
    import os
    import subprocess
    import sys

    write(tmp_path / "r.csv", "email,name\nzo\u00eb@example.org,Zo\u00eb \u0416\nbad,X\n")
    write(tmp_path / "t.txt", "From: a@acme.example\nSubject: Hi {{ name }}\n\nHello {{ name }}\n")
    env = {**os.environ, "PYTHONIOENCODING": encoding}
    done = subprocess.run(
        [sys.executable, "-m", "smartmail", "dry-run", "r.csv", "-t", "t.txt", "--no-state"],
        capture_output=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    out = done.stdout.decode(encoding)
    assert done.returncode == 2, done.stderr.decode(encoding)  # a row invalid, no crash
    assert "Traceback" not in done.stderr.decode(encoding)
    assert "\\u0416" in out  # the preview's rule and text, as escapes
    assert "smartmail dry-run" in out and "valid" in out


def test_the_rich_tables_on_an_ascii_stream_show_escapes_not_a_traceback(tmp_path: Path) -> None:
    """`suppress list` and `status` still draw with rich: an address or campaign name the
    output encoding lacks must not crash them either."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "PYTHONIOENCODING": "ascii"}
    env.pop("SMARTMAIL_STATE", None)

    def smartmail(*args: str) -> subprocess.CompletedProcess[bytes]:
        run = [sys.executable, "-m", "smartmail", *args]
        return subprocess.run(run, capture_output=True, timeout=60, env=env, cwd=tmp_path)

    added = smartmail("suppress", "add", "j\u00fcrgen@example.org", "--reason", "manual")
    assert added.returncode == 0, added.stderr
    for command in (["suppress", "list"], ["status"]):
        done = smartmail(*command)
        assert done.returncode == 0, done.stderr
        assert b"Traceback" not in done.stderr
    listed = smartmail("suppress", "list")
    assert b"j\\xfcrgen@example.org" in listed.stdout


def test_cells_and_rule_titles_are_made_printable_even_on_a_colour_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = Tty()
    term = Terminal(stream)
    assert term.ansi and term.colour
    table = Table(f"list {HOSTILE}")
    table.add_row(f"  invalid: {HOSTILE}", f"x{HOSTILE}y")
    table.add_row("warning", f"w{HOSTILE}", style="yellow")
    table.print(term)
    term.rule(f"row 2: to {HOSTILE}")
    shown = stream.getvalue()
    assert "\x07" not in shown and "\u202e" not in shown
    assert OUR_STYLES.sub("", shown).count("\x1b") == 0
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\u202e" in OUR_STYLES.sub("", shown)
    assert "\x1b[1;33mwarning\x1b[0m" in shown  # the row's own style is still applied


@pytest.mark.parametrize(
    ("env", "stream", "bold", "yellow"),
    [
        ({}, io.StringIO, False, False),  # a pipe or a file: plain text
        ({}, Tty, True, True),
        ({"NO_COLOR": "1"}, Tty, True, False),  # no colours; bold is not a colour
        ({"TERM": "dumb"}, Tty, False, False),
        ({"FORCE_COLOR": "1"}, io.StringIO, True, True),
        ({"TTY_COMPATIBLE": "0"}, Tty, False, False),
    ],
)
def test_styles_follow_what_the_stream_can_show(
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    stream: type[io.StringIO],
    bold: bool,
    yellow: bool,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    term = Terminal(stream())
    assert (term.styled("x", "bold") != "x") is bold
    assert ("33" in term.styled("x", "yellow")) is yellow
    assert term.width == 80  # the captured stream has no size: rich's default


def test_a_dry_run_on_a_colour_terminal_styles_its_own_words_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")
    csv = write(
        tmp_path / "r.csv",
        f"email,name\nann@example.org,Ann\nbad{HOSTILE}@example.org,Bob\n",
    )
    template = write(tmp_path / "t.txt", "From: a@acme.example\nSubject: Hi {{ name }}\n\nHi\n")
    code, out, err = run_main(
        ["dry-run", str(csv), "-t", str(template), "--no-state", "--campaign", f"c{HOSTILE}"],
        capsys,
    )
    assert code == 2  # one invalid row
    assert "\x1b[33mwarning:\x1b[0m" in err and "\x1b[3msmartmail dry-run\x1b[0m" in out
    for shown in (out, err):
        assert OUR_STYLES.sub("", shown).count("\x1b") == 0, shown
        assert "\x07" not in shown and "\u202e" not in shown
    assert "c\\x1b]0;pwned" in OUR_STYLES.sub("", out)  # the campaign cell, made visible


def test_the_rich_tables_in_a_pipe_have_no_trailing_spaces(tmp_path: Path) -> None:
    """rich pads every line to the table's width; in a file or cron mail those spaces are
    noise (and `diff`/`grep ' $'` trip on them), so off a terminal they go."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    env.pop("SMARTMAIL_STATE", None)

    def smartmail(*args: str) -> str:
        run = [sys.executable, "-m", "smartmail", *args]
        done = subprocess.run(run, capture_output=True, timeout=60, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return done.stdout.decode()

    csv = write(tmp_path / "r.csv", "email,name\nann@example.org,Ann\n")
    template = write(tmp_path / "t.txt", "From: a@acme.example\nSubject: Hi {{ name }}\n\nHi\n")
    smartmail("send", str(csv), "-t", str(template), "--transport", f"file://{tmp_path / 'out'}",
              "--campaign", "spring", "--progress", "none")  # fmt: skip
    smartmail("suppress", "add", "gone@example.org", "--reason", "manual")
    for command, shown in ((["status"], "spring"), (["suppress", "list"], "gone@example.org")):
        out = smartmail(*command)
        assert shown in out and "─" in out, out
        padded = [line for line in out.splitlines() if line != line.rstrip()]
        assert not padded, padded


def _campaigns_with_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> Path:
    """A state database holding `name`: 11 sent, 3 failed, 10 delivered, 1 bounced."""
    import sqlite3

    state = tmp_path / "state.db"
    csv = write(
        tmp_path / "r.csv", "email\n" + "".join(f"user{i}@example.org\n" for i in range(14))
    )
    template = write(tmp_path / "t.txt", "From: a@acme.example\nSubject: Hi\n\nHi\n")
    code, _, err = run_main(
        ["send", str(csv), "-t", str(template), "--transport", f"file://{tmp_path / 'out'}",
         "--state", str(state), "--campaign", name, "--progress", "none"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    db = sqlite3.connect(state)
    with db:
        for i, (status, feedback) in enumerate(
            [("failed", None)] * 3 + [("sent", "bounced")] + [("sent", "delivered")] * 10
        ):
            db.execute(
                "UPDATE deliveries SET status = ?, feedback = ? WHERE recipient = ?",
                (status, feedback, f"user{i}@example.org"),
            )
    db.close()
    return state


@pytest.mark.parametrize("columns", [60, 130])
def test_status_on_a_narrow_terminal_shows_every_count_whole(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    columns: int,
) -> None:
    """Ten columns do not fit 60 (nor, with a long campaign name, 130): rich shrank the count
    columns, to "…" or to nothing at all, and the user saw no count. Every count is shown
    whole, beside its label; the campaign name and the date give way instead."""
    import smartmail.cli

    name = "quarterly-billing-notice-for-enterprise-customers-in-the-eu-region"
    state = _campaigns_with_counts(tmp_path, capsys, name)
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # a terminal, as far as rich and we can tell
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.setattr(smartmail.cli, "_consoles", {})
    code, out, err = run_main(["status", "--state", str(state)], capsys)
    assert code == 0, err
    shown = OUR_STYLES.sub("", out)
    assert "…" not in shown, shown
    assert all(cell_width(line) <= columns for line in shown.splitlines()[1:] if name not in line)
    expected = {"sent": 11, "failed": 3, "skipped": 0, "pending": 0, "in doubt": 0,
                "delivered": 10, "bounced": 1, "complained": 0}  # fmt: skip
    if columns == 60:  # each campaign on a few lines: "label count"
        found = dict(re.findall(r"(sent|failed|skipped|pending|in doubt|delivered|bounced|"
                                r"complained) (\d+)", shown))  # fmt: skip
        assert {label: int(n) for label, n in found.items()} == expected, shown
        assert name in shown
    else:  # the table: the first line of the row holds every count, in order
        (row,) = [line for line in shown.splitlines() if re.search(r"\d\d:\d\d", line)]
        assert row.split()[-8:] == [str(n) for n in expected.values()], shown
        assert "".join(line.split()[0] for line in shown.splitlines()[4:] if line.strip()) == name


def test_campaigns_that_differ_by_an_invisible_character_do_not_look_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv_path = make_csv(tmp_path / "r.csv", 1)
    template = write(tmp_path / "t.txt", "From: a@acme.example\nSubject: s\n\nhi\n")
    db = str(tmp_path / "s.db")
    for name in ("spring", "spring\u200b", "spring\ufeff"):
        code, _, err = run_main(
            ["send", str(csv_path), "-t", str(template), "--transport",
             f"file://{tmp_path / 'out'}", "--state", db, "--campaign", name, "--yes",
             "--progress", "none"],
            capsys,
        )  # fmt: skip
        assert code == 0, err
    code, out, _ = run_main(["status", "--state", db], capsys)
    assert code == 0
    assert "spring\\u200b" in out and "spring\\ufeff" in out
