"""Templates and MIME: what a recipient's mail client would see, parsed back with policy.SMTP."""

from __future__ import annotations

import email
from datetime import UTC
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from smartmail import MessageTemplate, Row, build
from smartmail.errors import InvalidRowError, TemplateError

from .conftest import write


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=policy.SMTP)
    assert isinstance(msg, EmailMessage)
    return msg


def render(template: MessageTemplate, **values: str) -> bytes:
    values.setdefault("email", "ann@example.org")
    return build(template.render(Row(2, values), "email")).data


def test_non_ascii_names_and_subject_are_rfc2047_encoded() -> None:
    t = MessageTemplate(
        "From: Åsa Öberg <asa@acme.example>\nTo: {{ name }} <{{ email }}>\n"
        "Subject: Привет, {{ name }}!\n\nBonjour {{ name }} ☺\n"
    )
    data = render(t, name="Chloé Dubois")
    assert data.isascii(), "headers must be 7-bit on the wire"
    msg = parse(data)
    assert msg["Subject"] == "Привет, Chloé Dubois!"
    assert msg["To"].addresses[0].display_name == "Chloé Dubois"
    assert msg["From"].addresses[0].display_name == "Åsa Öberg"
    assert msg.get_content().replace("\r\n", "\n") == "Bonjour Chloé Dubois ☺\n"
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")


def test_html_part_makes_multipart_alternative_and_only_html_is_escaped() -> None:
    t = MessageTemplate(
        "From: a@acme.example\nSubject: Hi\n\nHello {{ name }}\n",
        html="<p>Hello {{ name }}</p>",
    )
    msg = parse(render(t, name="<b>Tom & Jerry</b>"))
    assert msg.get_content_type() == "multipart/alternative"
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert text is not None and html is not None
    assert text.get_content().replace("\r\n", "\n") == "Hello <b>Tom & Jerry</b>\n"
    assert html.get_content() == "<p>Hello &lt;b&gt;Tom &amp; Jerry&lt;/b&gt;</p>"


def test_sibling_html_file_is_the_html_part(tmp_path: Path) -> None:
    write(tmp_path / "m.txt", "From: a@acme.example\nSubject: Hi\n\ntext\n")
    write(tmp_path / "m.html", "<p>html</p>")
    msg = parse(render(MessageTemplate.load(tmp_path / "m.txt")))
    assert msg.get_content_type() == "multipart/alternative"


def test_attachments_from_a_header_listing_paths(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 10
    (tmp_path / "invoice-7.pdf").write_bytes(payload)
    (tmp_path / "terms.txt").write_text("terms")
    write(
        tmp_path / "m.txt",
        "From: a@acme.example\nSubject: Invoice\n"
        "Attachment: invoice-{{ n }}.pdf; terms.txt\n\nSee attached.\n",
    )
    msg = parse(render(MessageTemplate.load(tmp_path / "m.txt"), n="7"))
    assert msg.get_content_type() == "multipart/mixed"
    assert "Attachment" not in msg
    parts = list(msg.iter_attachments())
    assert [p.get_filename() for p in parts] == ["invoice-7.pdf", "terms.txt"]
    assert parts[0].get_content_type() == "application/pdf"
    assert parts[0].get_content() == payload


def test_missing_attachment_is_an_invalid_row(tmp_path: Path) -> None:
    write(tmp_path / "m.txt", "From: a@acme.example\nSubject: x\nAttachment: {{ f }}\n\nbody\n")
    with pytest.raises(InvalidRowError, match="attachment not found"):
        render(MessageTemplate.load(tmp_path / "m.txt"), f="nope.pdf")


@pytest.mark.parametrize("evil", ["Hi\r\nBcc: victim@evil.example", "Hi\nX-Injected: 1", "a\rb"])
def test_header_injection_is_rejected_for_that_row(evil: str) -> None:
    t = MessageTemplate("From: a@acme.example\nSubject: {{ subject }}\n\nbody\n")
    with pytest.raises(InvalidRowError, match="header injection") as err:
        render(t, subject=evil)
    assert "row 2" in str(err.value)


def test_line_breaks_in_body_values_are_fine() -> None:
    t = MessageTemplate("From: a@acme.example\nSubject: x\n\n{{ note }}\n")
    msg = parse(render(t, note="line 1\r\nline 2"))
    assert msg.get_content().replace("\r\n", "\n") == "line 1\nline 2\n"


def test_bcc_goes_in_the_envelope_not_the_headers() -> None:
    t = MessageTemplate(
        "From: a@acme.example\nTo: {{ email }}\nCc: boss@acme.example\nBcc: archive@acme.example\n"
        "Subject: x\n\nbody\n"
    )
    out = build(t.render(Row(2, {"email": "ann@example.org"}), "email"))
    assert out.recipients == ["ann@example.org", "boss@acme.example", "archive@acme.example"]
    msg = parse(out.data)
    assert "Bcc" not in msg and msg["Cc"] == "boss@acme.example"


def test_default_to_header_is_the_recipient_column() -> None:
    t = MessageTemplate("From: a@acme.example\nSubject: x\n\nbody\n")
    msg = parse(render(t))
    assert msg["To"] == "ann@example.org"


def test_international_domain_becomes_idna() -> None:
    t = MessageTemplate("From: a@acme.example\nSubject: x\n\nbody\n")
    out = build(t.render(Row(2, {"email": "anna@bücher.example"}), "email"))
    assert out.recipients == ["anna@xn--bcher-kva.example"]
    assert parse(out.data)["To"] == "anna@xn--bcher-kva.example"


def test_message_ids_are_unique_and_use_the_sender_domain() -> None:
    t = MessageTemplate("From: a@acme.example\nSubject: x\n\nbody\n")
    ids = {parse(render(t))["Message-ID"] for _ in range(50)}
    assert len(ids) == 50
    assert all(i.endswith("@acme.example>") for i in ids)


def test_long_lines_and_long_subjects_stay_within_smtp_limits() -> None:
    t = MessageTemplate("From: a@acme.example\nSubject: {{ s }}\n\n{{ body }}\n")
    data = render(t, s="word " * 60, body="x" * 5000)
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    msg = parse(data)
    assert msg["Subject"] == ("word " * 60).strip()
    assert msg.get_content().strip() == "x" * 5000


def test_undefined_variable_names_the_variable() -> None:
    t = MessageTemplate("From: a@acme.example\nSubject: {{ nmae }}\n\nbody\n", name="m.txt")
    with pytest.raises(TemplateError) as err:
        render(t)
    assert "'nmae' is undefined" in str(err.value) and "row 2" in str(err.value)


def test_sandbox_blocks_unsafe_attribute_access() -> None:
    t = MessageTemplate("From: a@acme.example\nSubject: x\n\n{{ ''.__class__.__mro__ }}\n")
    with pytest.raises(TemplateError):
        render(t)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Subject: x\n\nbody", "no From"),
        ("From: a@acme.example\n\nbody", "no Subject"),
        ("From: a@acme.example\nSubject: {{ x\n\nbody", "header Subject"),
        ("From: a@acme.example\nSubject: {{ x|nosuch }}\n\nbody", "header Subject.*nosuch"),
        ("From: a@acme.example\nSubject: {% if x %}\nTo: {% endif %}\n\nbody", "header Subject"),
        ("From: a@acme.example\nnot a header\n\nbody", "line 2"),
    ],
)
def test_template_errors_say_where(text: str, expected: str) -> None:
    with pytest.raises(TemplateError, match=expected):
        MessageTemplate(text, name="m.txt")


def test_invalid_addresses_in_headers_are_invalid_rows() -> None:
    t = MessageTemplate("From: {{ sender }}\nSubject: x\n\nbody\n")
    with pytest.raises(InvalidRowError, match="From"):
        render(t, sender="not an address")


@pytest.mark.parametrize(
    "when", [0, 951_700_000, 1_078_012_800, 1_709_251_199.5, 1_790_000_000, 4_102_444_799]
)
def test_the_date_is_written_as_email_utils_writes_it(when: float) -> None:
    """smartmail.dates replaces email.utils at start-up: the same RFC 5322 text, leap days,
    year ends and fractions of a second included."""
    from email.utils import formatdate as reference

    from smartmail.dates import formatdate

    assert formatdate(when) == reference(when, localtime=False)
    assert formatdate(when, usegmt=True) == reference(when, usegmt=True)


def test_a_message_is_dated_now_in_utc_with_english_names() -> None:
    import time
    from datetime import datetime
    from email.utils import parsedate_to_datetime

    msg = parse(render(MessageTemplate("From: a@acme.example\nSubject: Hi\n\nHi\n")))
    raw = msg["Date"]
    stamp = parsedate_to_datetime(raw)
    assert raw.endswith(" +0000") and stamp.tzinfo is not None
    assert abs(stamp.timestamp() - time.time()) < 5
    day = datetime.fromtimestamp(stamp.timestamp(), UTC)
    assert raw.startswith(("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")[day.weekday()] + ", ")
