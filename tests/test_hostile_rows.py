"""A CSV row can only change what the template lets it change.

Each README promise about untrusted CSV values, tried with a hostile value: attachments stay
in their folder, a display name never becomes a recipient, no control character reaches a
header, the builder's own headers cannot be set or doubled, Message-IDs stay unique across
fork().
"""

from __future__ import annotations

import contextlib
import email
import os
import re
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from smartmail import MessageTemplate, Row, build
from smartmail.cli import main
from smartmail.errors import InvalidRowError, TemplateError

from .conftest import write
from .header_oracle import check_head, decode_mailbox
from .unprivileged import unprivileged


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=policy.SMTP)
    assert isinstance(msg, EmailMessage)
    return msg


def row(**values: str) -> Row:
    values.setdefault("email", "ann@example.org")
    return Row(7, values)


def attaching(folder: Path, header: str = "Attachment: {{ file }}") -> MessageTemplate:
    write(folder / "m.txt", f"From: a@acme.example\nSubject: Invoice\n{header}\n\nSee attached.\n")
    return MessageTemplate.load(folder / "m.txt")


# --- attachments ---------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A template folder with one invoice in it, beside a secret outside it."""
    (tmp_path / "secret").write_text("SMTP_PASSWORD=hunter2")
    inside = tmp_path / "campaign"
    (inside / "invoices").mkdir(parents=True)
    (inside / "invoices" / "7.pdf").write_bytes(b"%PDF-1.4 invoice 7")
    return inside


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("/proc/self/environ", "absolute path"),
        ("/etc/passwd", "absolute path"),
        ("../secret", "'..' is not allowed"),
        ("invoices/../../secret", "'..' is not allowed"),
        ("~/.ssh/id_rsa", "'~' is not expanded"),
        ("~root/.bashrc", "'~' is not expanded"),
    ],
)
def test_an_attachment_path_from_a_column_cannot_leave_the_folder(
    folder: Path, value: str, why: str
) -> None:
    template = attaching(folder)
    with pytest.raises(InvalidRowError) as err:
        template.render(row(file=value), "email")
    assert why in str(err.value)
    assert "row 7" in str(err.value) and "column 'file'" in str(err.value)


def test_a_column_inside_a_fixed_path_is_still_confined(folder: Path) -> None:
    template = attaching(folder, "Attachment: invoices/{{ n }}.pdf")
    out = build(template.render(row(n="7"), "email"))
    (part,) = parse(out.data).iter_attachments()
    assert part.get_content() == b"%PDF-1.4 invoice 7"
    with pytest.raises(InvalidRowError, match="column 'n'"):
        template.render(row(n="../../secret"), "email")


def test_a_value_inside_a_template_path_cannot_name_a_second_file(folder: Path) -> None:
    (folder / "internal.txt").write_text("not for customers")
    template = attaching(folder, "Attachment: invoices/{{ n }}.pdf")
    with pytest.raises(InvalidRowError, match="cannot hold ';'") as err:
        template.render(row(n="7.pdf; internal.txt"), "email")
    assert "column 'n'" in str(err.value)
    # A column that is the whole path slot may still list several files, as documented.
    listing = attaching(folder, "Attachment: {{ files }}")
    out = build(listing.render(row(files="invoices/7.pdf; internal.txt"), "email"))
    assert len(list(parse(out.data).iter_attachments())) == 2
    # And the template's own ';' still separates its own paths.
    both = attaching(folder, "Attachment: invoices/{{ n }}.pdf; internal.txt")
    out = build(both.render(row(n="7"), "email"))
    assert len(list(parse(out.data).iter_attachments())) == 2


def test_a_symlink_leading_out_is_refused_and_one_staying_in_is_followed(folder: Path) -> None:
    (folder / "escape.pdf").symlink_to(folder.parent / "secret")
    (folder / "alias.pdf").symlink_to(folder / "invoices" / "7.pdf")
    (folder / "invoices" / "up").symlink_to(folder.parent)
    template = attaching(folder)
    for value in ("escape.pdf", "invoices/up/secret"):
        with pytest.raises(InvalidRowError, match="leads outside") as err:
            template.render(row(file=value), "email")
        assert "hunter2" not in str(err.value)
    out = build(template.render(row(file="alias.pdf"), "email"))
    (part,) = parse(out.data).iter_attachments()
    assert part.get_content() == b"%PDF-1.4 invoice 7"


def test_a_fixed_attachment_problem_stops_at_load(folder: Path) -> None:
    for header, why in [
        ("Attachment: terms.pdf", "attachment not found: terms.pdf"),
        ("Attachment: /etc/hostname", "absolute path"),
        ("Attachment: invoices/7.pdf; ../secret", "'..' is not allowed"),
    ]:
        with pytest.raises(TemplateError, match=re.escape(why)) as err:
            attaching(folder, header)
        assert "m.txt" in str(err.value)


def test_attachments_dir_is_the_one_folder_paths_resolve_in(folder: Path, tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    (files / "7.pdf").write_bytes(b"from the attachments folder")
    write(folder / "m.txt", "From: a@acme.example\nSubject: x\nAttachment: {{ file }}\n\nbody\n")
    template = MessageTemplate.load(folder / "m.txt", attachments_dir=files)
    out = build(template.render(row(file="7.pdf"), "email"))
    (part,) = parse(out.data).iter_attachments()
    assert part.get_content() == b"from the attachments folder"
    for value in ("invoices/7.pdf", "../campaign/invoices/7.pdf", str(folder / "invoices/7.pdf")):
        with pytest.raises(InvalidRowError, match="column 'file'"):
            template.render(row(file=value), "email")
    with pytest.raises(TemplateError, match="does not exist"):
        MessageTemplate.load(folder / "m.txt", attachments_dir=tmp_path / "nope")


def test_unreadable_attachments_are_one_line_row_errors(folder: Path) -> None:
    template = attaching(folder)
    os.mkfifo(folder / "pipe.pdf")  # opening a FIFO would block the run
    for value, why in [("invoices", "not a regular file"), ("pipe.pdf", "not a regular file")]:
        with pytest.raises(InvalidRowError, match=why) as err:
            template.render(row(file=value), "email")
        assert "\n" not in str(err.value)


def test_an_attachment_name_too_long_for_the_file_system_is_that_rows_error(
    folder: Path,
) -> None:
    """One row's 300-character file name (ENAMETOOLONG) used to stop the whole run."""
    template = attaching(folder)
    for value in ("x" * 300, "invoices/" + "y" * 300 + ".pdf"):
        with pytest.raises(InvalidRowError, match="cannot be read: File name too long") as err:
            template.render(row(file=value), "email")
        assert "row 7" in str(err.value) and "\n" not in str(err.value)
    assert template.render(row(file="invoices/7.pdf"), "email").attachments  # the rest go


def test_an_attachment_without_read_permission_is_a_row_error() -> None:
    def body(folder: Path) -> None:
        locked = folder / "locked.pdf"
        locked.write_bytes(b"x")
        locked.chmod(0)
        with pytest.raises(InvalidRowError, match="cannot be read"):
            attaching(folder).render(row(file="locked.pdf"), "email")

    unprivileged(body)


def test_a_file_that_vanishes_before_building_is_a_row_error(folder: Path) -> None:
    rendered = attaching(folder).render(row(file="invoices/7.pdf"), "email")
    (folder / "invoices" / "7.pdf").unlink()
    with pytest.raises(InvalidRowError, match="attachment cannot be read") as err:
        build(rendered)
    assert "row 7" in str(err.value)


def test_a_hostile_attachment_row_is_skipped_by_send_and_nothing_leaks(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        tmp_path / "r.csv",
        "email,file\nann@example.org,invoices/7.pdf\nspy@evil.example,/proc/self/environ\n",
    )
    attaching(folder)
    outbox = tmp_path / "outbox"
    with contextlib.suppress(SystemExit):  # the exit code is the CLI's business
        main(
            [
                "send",
                str(tmp_path / "r.csv"),
                "-t",
                str(folder / "m.txt"),
                "--transport",
                f"file://{outbox}",
                "--yes",
                "--progress",
                "none",
            ]
        )
    out, err = capsys.readouterr()
    files = list(outbox.glob("*.eml"))
    assert len(files) == 1 and "ann@example.org" in files[0].name
    assert "absolute path" in out + err and "row 3" in out + err
    assert all(b"PATH=" not in f.read_bytes() for f in files)


# --- recipients only from address positions ------------------------------------------------

NAMES = [
    "spy@evil.example, Ann",
    "Smith, John",
    "Ann <spy@evil.example>",
    'Ann" <spy@evil.example>, "x',
    "spy@evil.example",
    "Ann; spy@evil.example",
    "Group: spy@evil.example;",
    "Zoë, spy@évil.example",
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "to",
    [
        "To: {{ name }} <{{ email }}>",
        "To: {{ mailbox(name, email) }}",
        'To: "{{ name }}" <{{ email }}>',
    ],
)
def test_a_display_name_is_one_name_never_a_recipient(name: str, to: str) -> None:
    t = MessageTemplate(f"From: a@acme.example\n{to}\nSubject: Hi\n\nbody\n")
    out = build(t.render(row(name=name), "email"))
    assert out.recipients == ["ann@example.org"]
    fields = check_head(out.data, out.utf8)
    assert decode_mailbox(fields["To"]) == (name, "ann@example.org")
    (mailbox,) = parse(out.data)["To"].addresses
    assert (mailbox.display_name, mailbox.addr_spec) == (name, "ann@example.org")


def test_mailbox_prints_quoted_in_a_body_and_is_one_mailbox_in_a_list() -> None:
    t = MessageTemplate(
        "From: a@acme.example\nTo: {{ mailbox(name, email) }}, boss@acme.example\n"
        "Cc: {{ mailbox('', cc) }}\nSubject: Hi\n\nDear {{ mailbox(name, email) }}\n"
    )
    out = build(t.render(row(name="Smith, John", cc="cfo@acme.example"), "email"))
    assert out.recipients == ["ann@example.org", "boss@acme.example", "cfo@acme.example"]
    msg = parse(out.data)
    assert [a.display_name for a in msg["To"].addresses] == ["Smith, John", ""]
    assert msg.get_content().strip() == 'Dear "Smith, John" <ann@example.org>'


@pytest.mark.parametrize(
    "cc",
    ["a@example.org, spy@evil.example", "Ann <a@example.org>", "a@example.org spy@evil.example"],
)
def test_an_address_position_holds_exactly_one_address(cc: str) -> None:
    t = MessageTemplate("From: a@acme.example\nCc: {{ cc }}\nSubject: Hi\n\nbody\n")
    with pytest.raises(InvalidRowError, match="not exactly one address") as err:
        t.render(row(cc=cc), "email")
    assert "row 7, column 'cc'" in str(err.value)


def test_empty_address_positions_are_left_out() -> None:
    t = MessageTemplate(
        "From: a@acme.example\nCc: boss@acme.example, {{ cc }}\nBcc: {{ bcc }}\nSubject: Hi\n\nb\n"
    )
    out = build(t.render(row(cc="", bcc=""), "email"))
    assert out.recipients == ["ann@example.org", "boss@acme.example"]
    assert b"Bcc" not in out.data


def test_a_fixed_address_header_is_checked_at_load() -> None:
    with pytest.raises(TemplateError, match="Reply-To"):
        MessageTemplate("From: a@acme.example\nReply-To: support@\nSubject: x\n\nbody\n")
    with pytest.raises(TemplateError, match="From"):
        MessageTemplate("From: a@acme.example, b@acme.example\nSubject: x\n\nbody\n")


# --- control characters --------------------------------------------------------------------

CONTROLS = ["\x00", "\x07", "\x08", "\x0b", "\x0c", "\x1b[2J", "\x7f", "\x85", "\x9b31m"]
CONTROLS += ["\u2028", "\u2029", "\r", "\n", "\r\nBcc: victim@evil.example"]


@pytest.mark.parametrize("evil", CONTROLS)
@pytest.mark.parametrize(
    "header",
    ["Subject: Hi {{ v }}", "Subject: x\nTo: {{ v }} <{{ email }}>", "Subject: x\nX-Tag: {{ v }}"],
)
def test_a_control_character_from_a_column_is_refused_in_any_header(evil: str, header: str) -> None:
    t = MessageTemplate(f"From: a@acme.example\n{header}\n\nbody {{{{ v }}}}\n")
    with pytest.raises(InvalidRowError) as err:
        t.render(row(v=f"Ann{evil}", other="fine"), "email")
    message = str(err.value)
    assert "row 7, column 'v'" in message and f"U+{ord(evil[0]):04X}" in message
    assert message.isprintable(), "the error itself must be safe to print"


def test_the_column_named_is_the_one_the_header_uses() -> None:
    t = MessageTemplate("From: a@acme.example\nSubject: {{ subject }}\n\n{{ notes }}\n")
    with pytest.raises(InvalidRowError, match="column 'subject'"):
        t.render(row(notes="line\nbreak", subject="Hi\nBcc: x@evil.example"), "email")


def test_tabs_in_headers_and_control_characters_in_the_body_are_fine() -> None:
    t = MessageTemplate("From: a@acme.example\nSubject: {{ s }}\n\n{{ body }}\n")
    out = build(t.render(row(s="a\tb", body="bell\x07 and\r\nlines"), "email"))
    msg = parse(out.data)
    assert msg["Subject"] == "a\tb"
    assert "bell\x07" in msg.get_content()


@pytest.mark.parametrize("char", ["\x1b", "\x00", "\x85", "\u2028", "\u2029"])
def test_control_characters_in_the_template_itself_stop_at_load(char: str) -> None:
    with pytest.raises(TemplateError, match=re.escape(f"U+{ord(char):04X}")):
        MessageTemplate(f"From: a@acme.example\nSubject: dark {char}[31mred\n\nbody\n")
    # A tab is white space, and any printable character is fine.
    MessageTemplate("From: a@acme.example\nSubject: a\tb \u00e9\u2027\n\nbody\n")


# --- headers the builder owns --------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        "Date: Mon, 1 Jan 2024 00:00:00 +0000",
        "Message-ID: <fixed@acme.example>",
        "message-id: {{ id }}",
        "MIME-Version: 1.0",
        "Content-Type: text/html",
        "Content-Transfer-Encoding: 8bit",
    ],
)
def test_headers_the_builder_owns_are_refused_at_load(header: str) -> None:
    name = header.partition(":")[0]
    with pytest.raises(TemplateError, match=f"{name}: smartmail writes this header itself"):
        MessageTemplate(f"From: a@acme.example\nSubject: x\n{header}\n\nbody\n", name="m.txt")


def test_every_message_has_exactly_one_of_each_owned_header() -> None:
    t = MessageTemplate("From: a@acme.example\nSubject: x\n\nbody\n", html="<p>x</p>")
    fields = check_head(build(t.render(row(), "email")).data, utf8=False)  # no field twice
    assert {"Date", "Message-ID", "MIME-Version", "Content-Type"} <= set(fields)


def test_a_single_header_given_twice_is_refused() -> None:
    with pytest.raises(TemplateError, match="Subject: appears more than once"):
        MessageTemplate("From: a@acme.example\nSubject: x\nSubject: y\n\nbody\n")


# --- uniqueness across fork() --------------------------------------------------------------


def test_message_ids_and_boundaries_differ_in_a_forked_child() -> None:
    t = MessageTemplate("From: a@acme.example\nSubject: x\n\nbody\n", html="<p>x</p>")
    rendered = t.render(row(), "email")

    def ids(data: bytes) -> tuple[str, str]:
        msg = parse(data)
        return str(msg["Message-ID"]), str(msg.get_param("boundary"))

    build(rendered)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one message, reported to the parent, then out
        try:
            os.write(write_fd, "\n".join(ids(build(rendered).data)).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        child = tuple(pipe.read().decode().split("\n"))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    parent = ids(build(rendered).data)
    assert len(child) == 2 and child[0].startswith("<")
    assert child[0] != parent[0] and child[1] != parent[1]


def test_the_templates_own_quotes_comments_and_commas_are_still_syntax() -> None:
    t = MessageTemplate(
        "From: billing@acme.example (Acme Billing)\n"
        'To: "Acme, Inc." <office@acme.example>, {{ name }} <{{ email }}> (via {{ name }})\n'
        "Subject: x\n\nbody\n"
    )
    out = build(t.render(row(name="Ann (x"), "email"))
    assert out.recipients == ["office@acme.example", "ann@example.org"]
    msg = parse(out.data)
    assert [(a.display_name, a.addr_spec) for a in msg["To"].addresses] == [
        ("Acme, Inc.", "office@acme.example"),
        ("Ann (x", "ann@example.org"),
    ]
    assert msg["From"].addresses[0].display_name == "Acme Billing"


@pytest.mark.parametrize(
    "header", ["Subject", "X-Note", "Comments", "Organization", "Keywords", "Thread-Topic"]
)
def test_encoded_word_lookalikes_from_csv_read_back_as_typed(tmp_path: Path, header: str) -> None:
    # A value shaped like an RFC 2047 encoded-word would be shown decoded by mail readers
    # ("=?utf-8?b?...?=" -> any text the sender chose): it is encoded, so it reads as typed.
    # Organization, Keywords and Outlook's Thread-Topic are shown as text too.
    fixed = "" if header == "Subject" else "Subject: Hi\n"
    write(tmp_path / "m.txt", f"From: a@acme.example\n{fixed}{header}: {{{{ v }}}}\n\nb\n")
    template = MessageTemplate.load(tmp_path / "m.txt")
    value = "=?utf-8?b?WW91ciBhY2NvdW50IGlzIGxvY2tlZA==?="  # "Your account is locked"
    out = build(template.render(row(v=value), "email"))
    assert str(parse(out.data)[header]) == value
    check_head(out.data, utf8=False)
