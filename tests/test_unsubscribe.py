"""One-click unsubscribe headers (RFC 8058) in the messages that go out, and dry-run's warning."""

from __future__ import annotations

import json
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from smartmail.cli import cli
from smartmail.headers import unstructured
from smartmail.unsubscribe import UNSUBSCRIBE_WARN_THRESHOLD

from .conftest import SmtpServer, make_csv, write

URL = "https://acme.example/u?e={{ email|urlencode }}&c={{ code }}"


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def outbox_messages(outbox: Path) -> dict[str, EmailMessage]:
    found: dict[str, EmailMessage] = {}
    for path in sorted(outbox.glob("*.eml")):
        msg = message_from_bytes(path.read_bytes(), policy=policy.SMTP)
        assert isinstance(msg, EmailMessage)
        found[msg["To"].addresses[0].addr_spec] = msg
    return found


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SMARTMAIL_STATE", str(tmp_path / "state.db"))


def test_sent_message_has_one_click_headers(
    smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    csv = make_csv(tmp_path / "r.csv", 3)
    result = invoke(
        "send", str(csv), "-t", str(template_file), "--transport", smtp_server.url,
        "--smtp-security", "none", "--yes", "--progress", "none",
        "--unsubscribe-url", URL, "--unsubscribe-mailto", "unsub@acme.example",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    by_rcpt = smtp_server.handler.by_recipient()
    assert len(by_rcpt) == 3
    msg = by_rcpt["user1@example.org"][0].message
    assert msg["List-Unsubscribe"] == (
        "<https://acme.example/u?e=user1%40example.org&c=C00001>, "
        "<mailto:unsub@acme.example?subject=unsubscribe>"
    )
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    other = by_rcpt["user2@example.org"][0].message
    assert "e=user2%40example.org" in str(other["List-Unsubscribe"]), "rendered per row"


def test_long_url_survives_folding(tmp_path: Path, template_file: Path) -> None:
    csv = make_csv(tmp_path / "r.csv", 1)
    long_url = "https://unsubscribe.acme.example/very/long/path/" + "x" * 120 + "?e={{ email }}"
    result = invoke(
        "send", str(csv), "-t", str(template_file), "--transport", f"file://{tmp_path / 'out'}",
        "--yes", "--progress", "none", "--unsubscribe-url", long_url,
        "--unsubscribe-mailto", "unsub@acme.example",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (msg,) = outbox_messages(tmp_path / "out").values()
    expected = long_url.replace("{{ email }}", "user0@example.org")
    assert msg["List-Unsubscribe"].startswith(f"<{expected}>")
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_http_url_gets_no_one_click_post_header(tmp_path: Path, template_file: Path) -> None:
    csv = make_csv(tmp_path / "r.csv", 1)
    result = invoke(
        "send", str(csv), "-t", str(template_file), "--transport", f"file://{tmp_path / 'out'}",
        "--yes", "--progress", "none", "--unsubscribe-url", "http://acme.example/u?e={{ email }}",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (msg,) = outbox_messages(tmp_path / "out").values()
    assert msg["List-Unsubscribe"] == "<http://acme.example/u?e=user0@example.org>"
    assert msg["List-Unsubscribe-Post"] is None


def test_mailto_alone(tmp_path: Path, template_file: Path) -> None:
    csv = make_csv(tmp_path / "r.csv", 1)
    result = invoke(
        "send", str(csv), "-t", str(template_file), "--transport", f"file://{tmp_path / 'out'}",
        "--yes", "--progress", "none", "--unsubscribe-mailto", "unsub@acme.example",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (msg,) = outbox_messages(tmp_path / "out").values()
    assert msg["List-Unsubscribe"] == "<mailto:unsub@acme.example?subject=unsubscribe>"
    assert msg["List-Unsubscribe-Post"] is None


@pytest.mark.parametrize(
    "token, problem",
    [
        ("abc\r\nBcc: victim@example.net", "header injection"),
        ("", "rendered empty"),
    ],
)
def test_bad_rendered_url_fails_its_row(
    tmp_path: Path, template_file: Path, token: str, problem: str
) -> None:
    # An empty token is tried as the whole URL taken from a CSV column.
    ann_token = "https://acme.example/u/1" if not token else "ok1"
    csv = write(
        tmp_path / "r.csv",
        "email,name,code,token\n"
        f"ann@example.org,Ann,C1,{ann_token}\n"
        f'bob@example.org,Bob,C2,"{token}"\n',
    )
    url = "{{ token }}" if not token else "https://acme.example/u?t={{ token }}"
    dry = invoke("dry-run", str(csv), "-t", str(template_file), "--unsubscribe-url", url)
    assert dry.exit_code == 2, "dry-run exits non-zero when a row is invalid"
    text = " ".join(dry.output.split())
    assert problem in text and "row 3" in text

    sent = invoke(
        "send", str(csv), "-t", str(template_file), "--transport", f"file://{tmp_path / 'out'}",
        "--yes", "--progress", "none", "--unsubscribe-url", url,
    )  # fmt: skip
    messages = outbox_messages(tmp_path / "out")
    assert len(messages) == 1, "only the good row went out"
    (msg,) = messages.values()
    assert msg["To"].addresses[0].addr_spec == "ann@example.org"
    assert msg["Bcc"] is None
    assert "skipped" in sent.output


def test_unsafe_url_characters_are_refused(tmp_path: Path, template_file: Path) -> None:
    csv = make_csv(tmp_path / "r.csv", 1)
    dry = invoke(
        "dry-run", str(csv), "-t", str(template_file),
        "--unsubscribe-url", "https://acme.example/u?n={{ name }}",
    )  # fmt: skip
    assert dry.exit_code == 2
    assert "urlencode" in " ".join(dry.output.split())


def test_invalid_mailto_is_a_usage_error(tmp_path: Path, template_file: Path) -> None:
    csv = make_csv(tmp_path / "r.csv", 1)
    with pytest.raises(Exception, match="--unsubscribe-mailto"):
        invoke("dry-run", str(csv), "-t", str(template_file), "--unsubscribe-mailto", "nope")


def test_dry_run_warns_for_a_big_campaign_without_unsubscribe(
    tmp_path: Path, template_file: Path
) -> None:
    csv = make_csv(tmp_path / "big.csv", UNSUBSCRIBE_WARN_THRESHOLD + 1)
    report = tmp_path / "report.json"
    result = invoke(
        "dry-run", str(csv), "-t", str(template_file), "--preview", "0", "--report", str(report)
    )
    assert result.exit_code == 0, result.output
    assert f"warning: {UNSUBSCRIBE_WARN_THRESHOLD + 1} recipients and no List-Unsubscribe" in (
        result.stderr
    )
    assert "List-Unsubscribe" in result.stdout, "also a row of the summary table"
    assert any("List-Unsubscribe" in w for w in json.loads(report.read_text())["warnings"])

    quiet = invoke(
        "dry-run", str(csv), "-t", str(template_file), "--preview", "0", "--report", str(report),
        "--unsubscribe-url", URL,
    )  # fmt: skip
    assert quiet.exit_code == 0
    assert "List-Unsubscribe header" not in quiet.output
    assert json.loads(report.read_text())["warnings"] == []


def test_no_warning_at_the_threshold(tmp_path: Path, template_file: Path) -> None:
    csv = make_csv(tmp_path / "r.csv", UNSUBSCRIBE_WARN_THRESHOLD)
    result = invoke("dry-run", str(csv), "-t", str(template_file), "--preview", "0")
    assert result.exit_code == 0
    assert "List-Unsubscribe" not in result.output


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab:<>/?=@. x"), min_size=70, max_size=400))
def test_long_ascii_headers_fold_and_parse_back_unchanged(value: str) -> None:
    value = value.strip()
    line = unstructured("List-Unsubscribe", value, utf8=False)
    assert all(part.strip() for part in line.split("\r\n")), "no blank continuation lines"
    # Unfolding (dropping each CRLF before white space) gives the value back exactly.
    assert line.split(": ", 1)[1].replace("\r\n", "") == value
    if "=?" not in value:
        # Python's parser also decodes text that looks like an RFC 2047 encoded-word, which a
        # structured field such as this one never holds (RFC 2047 section 5): skip those.
        parsed = message_from_bytes(line.encode() + b"\r\n\r\nbody\r\n", policy=policy.SMTP)
        assert str(parsed["List-Unsubscribe"] or "") == value
