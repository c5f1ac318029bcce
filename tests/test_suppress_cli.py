"""`smartmail suppress add|remove|list|import|export`, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from smartmail.cli import cli, main
from smartmail.state import connect
from smartmail.suppression import SuppressionList

from .conftest import write


def run(state: Path, *args: str) -> Any:
    return CliRunner().invoke(
        cli, ["suppress", *args, "--state", str(state)], catch_exceptions=False
    )


def listed(state: Path) -> dict[str, dict[str, str]]:
    result = run(state, "list", "--json")
    assert result.exit_code == 0, result.output
    return {e["address"]: e for e in json.loads(result.output)}


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


def test_add_list_remove_round_trip(state: Path) -> None:
    result = run(
        state, "add", "Ann@Example.ORG", "bob@bücher.example", "--detail", "asked by phone"
    )
    assert result.exit_code == 0
    assert "suppressed 2 address(es); 0 already" in result.output

    entries = listed(state)
    # Stored as a rendered recipient is looked up: lower case, domain in IDNA.
    assert set(entries) == {"ann@example.org", "bob@xn--bcher-kva.example"}
    assert entries["ann@example.org"]["reason"] == "manual"
    assert entries["ann@example.org"]["detail"] == "asked by phone"
    conn = connect(state)
    assert SuppressionList(conn).reason("ANN@example.org") == "manual"
    assert SuppressionList(conn).reason("bob@bücher.example") == "manual"

    again = run(state, "add", "ann@example.org", "--reason", "complaint")
    assert "suppressed 0 address(es); 1 already" in again.output
    assert listed(state)["ann@example.org"]["reason"] == "manual", "the first reason is kept"

    table = run(state, "list")
    assert "ann@example.org" in table.output and "suppressed addresses: 2" in table.output

    removed = run(state, "remove", "ann@example.org", "nobody@example.org")
    assert "removed 1 address(es); 1 were not on the list" in removed.output
    assert set(listed(state)) == {"bob@xn--bcher-kva.example"}


def test_add_refuses_an_invalid_address_and_adds_nothing(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["suppress", "add", "ok@example.org", "not-an-address", "--state", str(state)])
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "'not-an-address' is not an address" in err and "nothing was added" in err
    assert listed(state) == {}


def test_reason_must_be_a_known_one(state: Path) -> None:
    result = CliRunner().invoke(
        cli, ["suppress", "add", "a@example.org", "--reason", "spite", "--state", str(state)]
    )
    assert result.exit_code == 2
    assert "spite" in result.output


def test_import_reports_bad_rows_and_is_idempotent(state: Path, tmp_path: Path) -> None:
    csv = write(
        tmp_path / "bounces.csv",
        "Name,Email\n"
        "Ann,ann@example.org\n"
        "Bob,not-an-address\n"
        "Cid,cid@example.org,extra\n"
        "Dee,DEE@example.org\n"
        "Ann again,ann@example.org\n",
    )
    first = run(state, "import", str(csv), "--column", "email", "--reason", "bounce")
    assert first.exit_code == 1
    assert f"{csv}, row 3, column 'Email'" in first.output
    assert f"{csv}, row 4" in first.output
    assert "5 row(s): 2 newly suppressed, 1 already on the list, 2 bad row(s)" in first.output
    assert {a: e["reason"] for a, e in listed(state).items()} == {
        "ann@example.org": "bounce",
        "dee@example.org": "bounce",
    }

    second = run(state, "import", str(csv), "--column", "email", "--reason", "bounce")
    assert "0 newly suppressed, 3 already on the list" in second.output
    assert len(listed(state)) == 2


def test_import_without_the_column_says_which_option_to_use(state: Path, tmp_path: Path) -> None:
    csv = write(tmp_path / "x.csv", "mail\nann@example.org\n")
    with pytest.raises(Exception, match=r"x\.csv, row 1, column 'email'.*--column"):
        run(state, "import", str(csv))


def test_export_then_import_elsewhere_keeps_reasons(state: Path, tmp_path: Path) -> None:
    run(state, "add", "ann@example.org", "--reason", "unsubscribe")
    run(state, "add", "bob@example.org", "--reason", "complaint", "--detail", "abuse, via FBL")
    out = tmp_path / "export.csv"
    exported = run(state, "export", str(out))
    assert exported.exit_code == 0 and "exported 2" in exported.output
    assert out.read_text().splitlines()[0] == "email,reason,detail,created_at"

    other = tmp_path / "other.db"
    imported = run(other, "import", str(out))
    assert imported.exit_code == 0, imported.output
    entries = listed(other)
    assert {a: (e["reason"], e["detail"]) for a, e in entries.items()} == {
        "ann@example.org": ("unsubscribe", ""),
        "bob@example.org": ("complaint", "abuse, via FBL"),
    }


def test_export_to_stdout(state: Path) -> None:
    run(state, "add", "ann@example.org")
    result = run(state, "export", "-")
    lines = result.output.splitlines()
    assert lines[0] == "email,reason,detail,created_at"
    assert lines[1].startswith("ann@example.org,manual,,")


def test_state_path_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "env.db"
    monkeypatch.setenv("SMARTMAIL_STATE", str(db))
    result = CliRunner().invoke(cli, ["suppress", "add", "a@example.org"], catch_exceptions=False)
    assert result.exit_code == 0
    assert SuppressionList(connect(db)).reason("a@example.org") == "manual"


@pytest.mark.parametrize(
    "command",
    [["suppress"], ["suppress", "add"], ["suppress", "remove"], ["suppress", "list"],
     ["suppress", "import"], ["suppress", "export"], ["events"]],
)  # fmt: skip
def test_help(command: list[str]) -> None:
    result = CliRunner().invoke(cli, [*command, "--help"], catch_exceptions=False)
    assert result.exit_code == 0
    assert "Usage: cli " + " ".join(command) in result.output
