"""Reading recipients: encodings, delimiters, headers and every kind of bad CSV."""

from __future__ import annotations

from pathlib import Path

import pytest

from smartmail import MessageTemplate, RecipientSource, SendOptions, SourceSpec, preflight
from smartmail.errors import ConfigError, PreflightError, SourceError
from smartmail.sources import sniff_delimiter

from .conftest import TEMPLATE, write


def rows(path: Path, **kw: object) -> list[dict[str, str]]:
    source = RecipientSource(SourceSpec(str(path), **kw))  # type: ignore[arg-type]
    return [row.values for row, _ in source.rows()]


def test_utf8_with_bom_and_quoted_newlines(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_bytes('\ufeffEmail,name,note\r\nann@x.org,Ann,"line 1\r\nline 2"\r\n'.encode())
    got = rows(path)
    assert got == [{"Email": "ann@x.org", "name": "Ann", "note": "line 1\r\nline 2"}]


@pytest.mark.parametrize("delimiter", [";", "\t", ","])
def test_delimiter_is_sniffed_from_the_header(tmp_path: Path, delimiter: str) -> None:
    text = f'email{delimiter}name\nann@x.org{delimiter}"Lee{delimiter} Ann"\n'
    path = write(tmp_path / "r.csv", text)
    assert rows(path) == [{"email": "ann@x.org", "name": f"Lee{delimiter} Ann"}]


def test_sniff_prefers_the_most_frequent_delimiter() -> None:
    assert sniff_delimiter("a;b;c,d\n") == ";"
    assert sniff_delimiter("single\n") == ","


def test_other_encoding_with_option(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "email,name\nbjorn@x.org,Björn\n", encoding="cp1252")
    with pytest.raises(SourceError) as err:
        rows(path)
    assert "row 2" in str(err.value) and "--encoding" in str(err.value)
    assert rows(path, encoding="cp1252") == [{"email": "bjorn@x.org", "name": "Björn"}]


def test_undecodable_bytes_name_the_row(tmp_path: Path) -> None:
    good = "".join(f"u{i}@x.org,U\n" for i in range(3))
    path = tmp_path / "r.csv"
    path.write_bytes(b"email,name\n" + good.encode() + b"bad@x.org,\xff\xfe\n")
    with pytest.raises(SourceError) as err:
        rows(path)
    assert str(path) in str(err.value)


def test_undecodable_bytes_far_down_name_the_exact_row_and_column(tmp_path: Path) -> None:
    # The decoder reads ahead of the CSV reader; the error must still point at the cell.
    good = b"".join(b"u%d@x.org,User %d\n" % (i, i) for i in range(500))
    path = tmp_path / "r.csv"
    path.write_bytes(b"email,name\n" + good + b"bad@x.org,Bj\xf6rn\n" + good)
    with pytest.raises(SourceError) as err:
        rows(path)
    assert str(err.value).startswith(f"{path}, row 502, column 'name': bytes that are not valid")


def test_missing_recipient_column_is_named(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "mail,name\nann@x.org,Ann\n")
    with pytest.raises(SourceError) as err:
        rows(path)
    message = str(err.value)
    assert "column 'email'" in message and "--to-column" in message and "row 1" in message
    assert rows(path, to_column="MAIL") == [{"mail": "ann@x.org", "name": "Ann"}]


def test_recipient_column_is_case_insensitive(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "EMAIL,name\nann@x.org,Ann\n")
    source = RecipientSource(SourceSpec(str(path)))
    list(source.rows())
    assert source.to_column == "EMAIL"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "no header row"),
        ("email,email\na@x.org,b@x.org\n", "appears twice"),
        ("email,,name\na@x.org,,A\n", "empty name"),
    ],
)
def test_bad_headers(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "r.csv", text)
    with pytest.raises(SourceError, match=expected):
        rows(path)


def test_missing_file_and_bad_options(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        RecipientSource(SourceSpec(str(tmp_path / "nope.csv")))
    path = write(tmp_path / "r.csv", "email\na@x.org\n")
    with pytest.raises(ConfigError, match="unknown encoding"):
        RecipientSource(SourceSpec(str(path), encoding="klingon"))
    with pytest.raises(ConfigError, match="one character"):
        RecipientSource(SourceSpec(str(path), delimiter=";;"))


def test_blank_lines_are_ignored_and_rows_keep_spreadsheet_numbers(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "email,name\n\na@x.org,A\n\nb@x.org,B\n")
    source = RecipientSource(SourceSpec(str(path)))
    assert [row.number for row, _ in source.rows()] == [3, 5]


# --- pre-flight over whole files -------------------------------------------------------------


def check(tmp_path: Path, csv_text: str, **options: object):
    csv = write(tmp_path / "r.csv", csv_text)
    template = MessageTemplate(TEMPLATE)
    return preflight(RecipientSource(SourceSpec(str(csv))), template, SendOptions(**options))  # type: ignore[arg-type]


def test_ragged_row_aborts_by_default_and_can_be_skipped(tmp_path: Path) -> None:
    text = "email,name,code\na@x.org,A,1\nb@x.org,B\nc@x.org,C,3,extra\n"
    result = check(tmp_path, text)
    assert not result.ok
    assert [p.row for p in result.problems] == [3, 4]
    assert "ragged" in result.fatal[0] and "row 3" in result.fatal[0]
    skipped = check(tmp_path, text, on_malformed="skip")
    assert skipped.ok and skipped.valid == 1 and set(skipped.skipped) == {3, 4}


def test_invalid_addresses_are_skipped_and_reported_with_row_and_column(tmp_path: Path) -> None:
    text = "email,name,code\na@x.org,A,1\nnot-an-address,B,2\nc@x..org,C,3\n,D,4\n"
    result = check(tmp_path, text)
    assert result.ok and not result.clean
    assert result.valid == 1 and result.invalid == 3
    first = str(result.problems[0])
    assert "row 3" in first and "column 'email'" in first and "not-an-address" in first
    aborted = check(tmp_path, text, on_invalid="abort")
    assert not aborted.ok


def test_duplicates_are_sent_once_by_default(tmp_path: Path) -> None:
    text = "email,name,code\na@x.org,A,1\nA@X.ORG,A again,2\nb@x.org,B,3\n"
    once = check(tmp_path, text)
    assert once.valid == 2 and once.skipped == {3: "duplicate recipient"} and once.clean
    assert check(tmp_path, text, on_duplicate="all").valid == 3
    assert not check(tmp_path, text, on_duplicate="abort").ok


def test_undefined_variable_stops_the_run_naming_variable_and_row(tmp_path: Path) -> None:
    csv = write(tmp_path / "r.csv", "email,name\na@x.org,A\n")
    template = MessageTemplate(TEMPLATE, name="msg.txt")
    result = preflight(RecipientSource(SourceSpec(str(csv))), template, SendOptions())
    assert not result.ok
    assert "'code' is undefined" in result.fatal[0] and "row 2" in result.fatal[0]
    with pytest.raises(PreflightError, match="nothing was sent"):
        raise PreflightError(result.fatal)


def test_header_only_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no data rows"):
        check(tmp_path, "email,name,code\n")
