"""Bodies and attachments as a recipient's mail program reads them.

Every message is first checked on its raw bytes (CRLF only, no line over 998 octets, no NUL:
RFC 5322 2.1.1 and RFC 2045 2.7, which Python's parser does not enforce), then parsed with
`policy.default` with no defect allowed, and what it decodes to is compared with what the
operator meant: the body text, the attachment's text in its own characters, the file name.
"""

from __future__ import annotations

import codecs
import email
import re
from email import policy
from email.message import EmailMessage, MIMEPart
from pathlib import Path

import pytest
from moto import mock_aws

from smartmail import MessageTemplate, Row, build
from smartmail.errors import TemplateError

from .aws_helpers import ses_backend, verify_sender
from .conftest import SmtpServer, run_main, smtp_send, write
from .header_oracle import decode_words


def on_the_wire(data: bytes) -> EmailMessage:
    """The message as a strict reader sees it; the raw-byte rules first."""
    assert b"\x00" not in data, "a NUL on the wire (RFC 5322 2.1.1, RFC 2045 2.7)"
    for line in data.split(b"\r\n"):
        assert len(line) <= 998, f"line of {len(line)} octets"
        assert b"\r" not in line and b"\n" not in line, f"bare CR or LF in {line[:60]!r}"
    msg = email.message_from_bytes(data, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    for part in msg.walk():
        assert not part.defects, (part.get_content_type(), part.defects)
    return msg


def built(template: MessageTemplate, **values: str) -> EmailMessage:
    values.setdefault("email", "ann@example.org")
    return on_the_wire(build(template.render(Row(2, values), "email")).data)


def text_of(part: MIMEPart) -> str:
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


# --- body text -----------------------------------------------------------------------------


@pytest.mark.parametrize("html", [False, True])
def test_a_nul_in_a_body_value_is_encoded_never_sent_raw(html: bool) -> None:
    # 7bit text may not hold a NUL (RFC 2045 2.7): servers refuse or cut such a message.
    t = MessageTemplate(
        "From: a@acme.example\nSubject: s\n\ncode {{ v }}\n",
        html="<p>code {{ v }}</p>\n" if html else None,
    )
    msg = built(t, v="a\x00b")
    plain = msg.get_body(("plain",))
    assert plain is not None and text_of(plain) == "code a\x00b\n"
    if html:
        part = msg.get_body(("html",))
        assert part is not None and text_of(part) == "<p>code a\x00b</p>\n"


@pytest.mark.parametrize(
    "body",
    [
        "From now on, prices fall.\n",
        "Hi {{ v }},\nFrom 1 May: new prices\n",
        "Hallo Zoë,\nFrom 1 May\n",
        "é" + "a" * 69 + "From here the line goes on\n",  # "From" after a soft line break
    ],
)
def test_a_body_line_starting_with_from_survives_an_mbox_delivery(body: str) -> None:
    # A mailbox stored as mbox (and many MDAs writing one) turns a line "From ..." into
    # ">From ...", which the recipient then reads; "=46rom" decodes to the same text and
    # is no such line.
    t = MessageTemplate(f"From: a@acme.example\nSubject: s\n\n{body}")
    out = build(t.render(Row(2, {"email": "ann@example.org", "v": "Ann"}), "email")).data
    raw_body = out.partition(b"\r\n\r\n")[2]
    assert not any(line.startswith(b"From ") for line in raw_body.split(b"\r\n"))
    assert text_of(on_the_wire(out)) == body.replace("{{ v }}", "Ann")


@pytest.mark.parametrize("lead", ["", "é", "From ", "é From "])
@pytest.mark.parametrize("width", range(60, 80))
def test_a_from_line_written_as_46rom_keeps_quoted_printable_lines_within_76(
    lead: str, width: int
) -> None:
    # RFC 2045 6.7 (5): an encoded line is at most 76 characters. "=46rom" is two longer
    # than the "From" it replaces, at the start of a line or after a soft line break.
    body = lead + "a" * width + "From x " * 30 + "é\n"
    t = MessageTemplate(f"From: a@acme.example\nSubject: s\n\n{body}")
    out = build(t.render(Row(2, {"email": "ann@example.org"}), "email")).data
    lines = out.partition(b"\r\n\r\n")[2].split(b"\r\n")
    assert max(len(line) for line in lines) <= 76
    assert not any(line.startswith(b"From ") for line in lines)
    assert text_of(on_the_wire(out)) == body


@pytest.mark.parametrize("width", range(70, 78))
@pytest.mark.parametrize("space", [" ", "\t"])
def test_a_line_ending_in_a_space_keeps_quoted_printable_lines_within_76(
    width: int, space: str
) -> None:
    # b2a_qp writes a line's last space as "=20" after it measured the line: 77 or 78.
    body = "Zoë\n" + "a" * width + space + "\nend\n"
    t = MessageTemplate(f"From: a@acme.example\nSubject: s\n\n{body}")
    out = build(t.render(Row(2, {"email": "ann@example.org"}), "email")).data
    lines = out.partition(b"\r\n\r\n")[2].split(b"\r\n")
    assert max(len(line) for line in lines) <= 76
    assert text_of(on_the_wire(out)) == body


def test_body_lines_over_998_octets_are_encoded_and_read_back_whole() -> None:
    t = MessageTemplate("From: a@acme.example\nSubject: s\n\n{{ url }}\n.\n")
    url = "https://acme.example/?t=" + "x" * 3000
    msg = built(t, url=url)
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert text_of(msg) == f"{url}\n.\n"


_META = re.compile(rb"""<meta\b[^>]*?\bcharset\s*=\s*["']?([A-Za-z0-9._:-]+)""", re.I)


@pytest.mark.parametrize(
    "meta",
    [
        '<meta charset="iso-8859-1">',
        "<META CHARSET=windows-1252>",
        '<meta http-equiv="Content-Type" content="text/html; charset=iso-8859-1" />',
    ],
)
def test_an_html_part_declares_in_its_meta_the_charset_it_is_sent_in(meta: str) -> None:
    # The part is UTF-8; a reader (or a browser the recipient saves it to) that follows the
    # document's own <meta> would otherwise show "ZoÃ«".
    t = MessageTemplate(
        "From: a@acme.example\nSubject: s\n\nHi {{ name }}\n",
        html=f"<html><head>{meta}</head><body>Hi {{{{ name }}}} \u2013 caf\u00e9</body></html>\n",
    )
    part = built(t, name="Zoë").get_body(("html",))
    assert part is not None
    raw = part.get_payload(decode=True)
    assert isinstance(raw, bytes)
    declared = _META.findall(raw)
    assert len(declared) == 1
    assert raw.decode(declared[0].decode()) == raw.decode(part.get_content_charset("us-ascii"))
    assert "Hi Zoë \u2013 café" in raw.decode(declared[0].decode())


@pytest.mark.parametrize(
    "meta",
    [
        '<meta name="description" content="Why charset=latin1 matters">',
        '<meta property="og:description" content="A guide: charset = windows-1252">',
        "<meta name='x' data-charset=latin1>",
        '<meta name="keywords" content="charset=latin1" http-equiv="refresh">',
    ],
)
def test_text_that_mentions_a_charset_in_a_meta_is_left_as_written(meta: str) -> None:
    # Only a charset attribute, or the content of http-equiv="Content-Type", declares
    # the document's encoding (HTML's "extracting a character encoding from a meta
    # element"): a description or a data- attribute is text the recipient may see.
    t = MessageTemplate(
        "From: a@acme.example\nSubject: s\n\nHi\n",
        html=f"<html><head>{meta}</head><body>Hi</body></html>\n",
    )
    part = built(t).get_body(("html",))
    assert part is not None
    assert meta in text_of(part)


@pytest.mark.parametrize(
    "meta",
    [
        '<meta content="text/html; charset=iso-8859-1" http-equiv="content-type">',
        "<meta http-equiv=Content-Type content='text/html;charset=latin1'>",
        '<meta name="x" charset="windows-1252" />',
    ],
)
def test_every_form_of_a_meta_declaration_says_utf8(meta: str) -> None:
    t = MessageTemplate(
        "From: a@acme.example\nSubject: s\n\nHi\n",
        html=f"<html><head>{meta}</head><body>café</body></html>\n",
    )
    part = built(t).get_body(("html",))
    assert part is not None
    head = text_of(part).partition("</head>")[0]
    assert re.search(r"charset\s*=\s*[\"']?utf-8\b", head)
    assert not re.search(r"(?i)iso-8859-1|latin1|windows-1252", head)


# --- attachments ---------------------------------------------------------------------------


def with_attachment(folder: Path, name: str, content: bytes) -> EmailMessage:
    (folder / name).write_bytes(content)
    t = MessageTemplate(
        "From: a@acme.example\nSubject: s\nAttachment: {{ f }}\n\nsee attached\n",
        base_dir=folder,
    )
    msg = built(t, f=name)
    (attachment,) = list(msg.iter_attachments())
    assert isinstance(attachment, EmailMessage)
    return attachment


@pytest.mark.parametrize(
    ("content", "charset"),
    [
        ("Grüße aus Zürich, Zoë\n".encode(), "utf-8"),
        ("\ufeffName;Stadt\nZoë;Zürich\n".encode(), "utf-8"),  # as Excel saves "CSV UTF-8"
        ("Grüße\n".encode("utf-16"), "utf-16"),
        (codecs.BOM_UTF32_LE + "Grüße\n".encode("utf-32-le"), "utf-32"),  # FF FE 00 00
        (codecs.BOM_UTF32_BE + "Grüße\n".encode("utf-32-be"), "utf-32"),
        (b"plain ASCII\n", "us-ascii"),
    ],
)
def test_a_text_attachment_reads_in_the_characters_it_was_written_in(
    tmp_path: Path, content: bytes, charset: str
) -> None:
    # Without a charset a reader takes text/* as US-ASCII (RFC 2046 4.1.2): "GrÃ¼ÃŸe".
    attachment = with_attachment(tmp_path, "notes.txt", content)
    assert attachment.get_content_type() == "text/plain"
    assert attachment.get_content_charset("us-ascii") == charset
    assert attachment.get_content() == content.decode(charset)
    assert attachment.get_payload(decode=True) == content  # the file itself, byte for byte


def test_a_text_attachment_in_an_unknown_charset_claims_none(tmp_path: Path) -> None:
    content = "Grüße\n".encode("latin-1")  # not UTF-8: which 8-bit charset cannot be known
    attachment = with_attachment(tmp_path, "notes.txt", content)
    assert attachment.get_param("charset") is None
    assert attachment.get_payload(decode=True) == content


@pytest.mark.parametrize("name", ["forwarded.eml", "page.mht"])
def test_a_message_file_attachment_arrives_as_the_same_bytes(tmp_path: Path, name: str) -> None:
    # message/rfc822 may not be base64 (RFC 2046 5.2.1): readers parse the base64 text as
    # the message's headers and show an empty or broken attachment.
    content = b"From: x@example.org\r\nSubject: fwd\r\n\r\nhello \xc3\xa9\r\n"
    attachment = with_attachment(tmp_path, name, content)
    assert attachment.get_filename() == name
    assert attachment.get_payload(decode=True) == content


@pytest.mark.parametrize(
    "name",
    [
        "résumé Zoë.pdf",
        "price list.pdf",
        'the "final" one.pdf',
        "back\\slash.pdf",
        "tab\there.pdf",
        "it's 100%.pdf",
        "%41%42.pdf",
        "=?utf-8?q?x?=.pdf",
        "日本語" * 20 + ".pdf",
    ],
)
def test_an_attachment_is_named_as_its_file(tmp_path: Path, name: str) -> None:
    attachment = with_attachment(tmp_path, name, b"%PDF-1.4\n")
    assert attachment.get_filename() == name
    assert attachment.get_payload(decode=True) == b"%PDF-1.4\n"


@pytest.mark.parametrize(
    "name", ["résumé Zoë.pdf", "日本語" * 20 + ".pdf", "back\\slash.pdf", "=?utf-8?q?x?=.pdf"]
)
def test_a_name_outside_a_plain_quoted_string_is_in_content_type_too(
    tmp_path: Path, name: str
) -> None:
    # Outlook over IMAP/POP reads no RFC 2231 filename*: it takes Content-Type's name, in
    # RFC 2047 words as Gmail and Thunderbird write it, and else shows "ATT00001.bin".
    attachment = with_attachment(tmp_path, name, b"%PDF-1.4\n")
    assert attachment.get_filename() == name  # Content-Disposition first (RFC 2183)
    [raw] = [str(v) for k, v in attachment.raw_items() if k.lower() == "content-type"]
    quoted = re.search(r';\s*name="([^"]*)"', re.sub(r"\r?\n", "", raw))  # unfolded
    assert quoted is not None, raw
    assert decode_words(quoted[1]) == name


@pytest.mark.parametrize(
    "name",
    [
        "Invoice 2026-12 Acme Corporation, final.pdf",  # too long for one line with its header
        "quarterly-report-" + "x" * 200 + ".pdf",  # no space to fold at, 221 characters
        "a b " * 60 + ".pdf",
        "日本語のファイル名" * 9 + ".pdf",  # 85 characters, 247 bytes of UTF-8
        "Zoë's résumé, with a rather long description of what it holds, 2026.pdf",
        'the "final" one and ' + "more " * 30 + ".pdf",
        "=?utf-8?q?x?=" * 10 + ".pdf",
        "😀" * 60 + ".txt",
    ],
)
def test_a_long_attachment_name_folds_within_78_and_reads_back_whole(
    tmp_path: Path, name: str
) -> None:
    (tmp_path / name).write_bytes(b"data")
    t = MessageTemplate(
        "From: a@acme.example\nSubject: s\nAttachment: {{ f }}\n\nsee attached\n",
        base_dir=tmp_path,
    )
    data = build(t.render(Row(2, {"email": "ann@example.org", "f": name}), "email")).data
    head_lines = [
        line
        for block in data.split(b"\r\n\r\n")
        if b"Content-Disposition" in block or b"Content-Type" in block
        for line in block.split(b"\r\n")
        if line[:1].isspace() or b":" in line
    ]
    assert head_lines and max(len(line) for line in head_lines) <= 78, max(head_lines, key=len)
    (attachment,) = list(on_the_wire(data).iter_attachments())
    assert attachment.get_filename() == name
    assert attachment.get_payload(decode=True) == b"data"
    [raw] = [str(v) for k, v in attachment.raw_items() if k.lower() == "content-type"]
    quoted = re.search(r';\s*name="([^"]*)"', re.sub(r"\r?\n", "", raw))  # Outlook's
    assert quoted is not None and decode_words(quoted[1]) == name


OFFICE = {
    "report.docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "Zahlen für Zoë.xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "quarterly results, all regions and all product lines 2026.pptx": (
        "application/vnd.openxmlformats-officedocument.presentationml.presentation"
    ),
}


def test_office_attachments_keep_every_line_within_78_but_their_unfoldable_type(
    tmp_path: Path,
) -> None:
    # Office's media types alone make "Content-Type: <type>" 79 to 87 characters. Folding
    # right after the colon or inside the type trips naive parsers, so that line holds the
    # type and nothing more (as Thunderbird and Gmail write it); every parameter and every
    # other line of the message stays within 78.
    for name in OFFICE:
        (tmp_path / name).write_bytes(b"PK\x03\x04 office " + name.encode())
    t = MessageTemplate(
        "From: a@acme.example\nSubject: s\nAttachment: {{ f }}\n\nsee attached\n",
        base_dir=tmp_path,
    )
    row = Row(2, {"email": "ann@example.org", "f": "; ".join(OFFICE)})
    data = build(t.render(row, "email")).data
    unfoldable = {f"Content-Type: {ctype};".encode() for ctype in OFFICE.values()}
    long_lines = [line for line in data.split(b"\r\n") if len(line) > 78]
    assert long_lines and set(long_lines) <= unfoldable, long_lines
    attachments = list(on_the_wire(data).iter_attachments())
    assert [a.get_filename() for a in attachments] == list(OFFICE)
    for attachment, (name, ctype) in zip(attachments, OFFICE.items(), strict=True):
        assert attachment.get_content_type() == ctype
        assert decode_words(str(attachment.get_param("name"))) == name
        assert attachment.get_payload(decode=True) == b"PK\x03\x04 office " + name.encode()


def test_an_empty_attachment_is_an_empty_file(tmp_path: Path) -> None:
    attachment = with_attachment(tmp_path, "empty.bin", b"")
    assert attachment.get_filename() == "empty.bin"
    assert attachment.get_payload(decode=True) == b""


@pytest.mark.parametrize("header", ["Attachment: report.pdf", "Attachment: {{ file }}"])
def test_an_attachment_given_through_a_symbolic_link_is_named_as_the_link(
    smtp_server: SmtpServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], header: str
) -> None:
    # The operator names `report.pdf`, a link to the file a report tool wrote, `x-123.pdf`:
    # the recipient got "x-123.pdf", a name nobody chose for them.
    folder = tmp_path / "campaign"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "x-123.pdf").write_bytes(b"%PDF-1.4 the report\n")
    (folder / "report.pdf").symlink_to(folder / "data" / "x-123.pdf")
    template = write(
        folder / "t.txt", f"From: a@acme.example\nSubject: s\n{header}\n\nsee attached\n"
    )
    csv = write(tmp_path / "r.csv", "email,file\nann@example.org,report.pdf\n")
    code, _, err = run_main(smtp_send(csv, template, smtp_server, tmp_path), capsys)
    assert code == 0, err
    [got] = smtp_server.handler.received
    (attachment,) = list(on_the_wire(got.data).iter_attachments())
    assert isinstance(attachment, EmailMessage)
    assert attachment.get_filename() == "report.pdf"
    assert attachment.get_param("name") == "report.pdf"
    assert attachment.get_payload(decode=True) == b"%PDF-1.4 the report\n"


# --- headers the template and the options both give -----------------------------------------


def test_list_unsubscribe_from_the_template_and_an_option_is_refused_not_sent_twice() -> None:
    # Two List-Unsubscribe fields: which one a mailbox provider honours (or whether it shows
    # its unsubscribe button at all) is anyone's guess.
    extra = [
        ("List-Unsubscribe", "<https://acme.example/u/{{ email }}>"),
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    ]
    with pytest.raises(TemplateError, match="List-Unsubscribe: appears more than once"):
        MessageTemplate(
            "From: a@acme.example\nSubject: s\nList-Unsubscribe: <mailto:u@acme.example>\n\nb\n",
            extra_headers=extra,
        )


# --- end to end: the same rows to a real SMTP server and to SES -----------------------------


def campaign(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "Grüße.txt").write_bytes("Grüße aus Zürich\n".encode())
    (tmp_path / "fwd.eml").write_bytes(b"From: x@example.org\r\nSubject: fwd\r\n\r\nhi\r\n")
    template = write(
        tmp_path / "t.txt",
        "From: Acme <news@acme.example>\nSubject: Hi {{ name }}\n"
        "Attachment: Grüße.txt; fwd.eml\n\nHello {{ name }}\n.\nCode: {{ code }}\n",
    )
    csv = write(tmp_path / "r.csv", "email,name,code\nann@example.org,Zoë,a\x00b\n")
    return csv, template


def check_received(data: bytes) -> None:
    msg = on_the_wire(data)
    body = msg.get_body(("plain",))
    assert body is not None and text_of(body) == "Hello Zoë\n.\nCode: a\x00b\n"
    text, message = list(msg.iter_attachments())
    assert isinstance(text, EmailMessage) and isinstance(message, EmailMessage)
    assert text.get_filename() == "Grüße.txt"
    assert text.get_content() == "Grüße aus Zürich\n"
    assert message.get_filename() == "fwd.eml"
    assert message.get_payload(decode=True) == b"From: x@example.org\r\nSubject: fwd\r\n\r\nhi\r\n"


def test_a_server_without_smtputf8_receives_the_message_as_meant(
    ascii_smtp_server: SmtpServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv, template = campaign(tmp_path)
    code, _, err = run_main(smtp_send(csv, template, ascii_smtp_server, tmp_path), capsys)
    assert code == 0, err
    [got] = ascii_smtp_server.handler.received
    assert got.data.isascii() and "BODY=8BITMIME" not in got.mail_options
    check_received(got.data)


@mock_aws
@pytest.mark.usefixtures("aws_env")
def test_ses_receives_the_same_message_as_meant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    verify_sender()
    csv, template = campaign(tmp_path)
    args = ["send", str(csv), "-t", str(template), "--transport", "ses://us-east-1"]
    args += ["--state", str(tmp_path / "s.db"), "--yes", "--progress", "none"]
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    [sent] = ses_backend().sent_messages
    raw = sent.raw_data
    check_received(raw.encode("utf-8") if isinstance(raw, str) else raw)
