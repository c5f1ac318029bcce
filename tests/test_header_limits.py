"""Header lines keep RFC 5322 and RFC 2047 limits in every mode, for any name and subject.

Checked on the raw bytes by tests/header_oracle.py (every line <= 998 octets, encoded-words
<= 75 characters and whole, folds only at white space, no bare CR/LF), then read back: by the
oracle's RFC 2047 decoder exactly, and by `email.policy.SMTP` as one address with that name.
"""

from __future__ import annotations

import email
from email import policy
from email.message import EmailMessage

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartmail import MessageTemplate, Row, build
from smartmail.errors import InvalidRowError

from .header_oracle import check_head, decode_mailbox, decode_words

TEMPLATE = MessageTemplate(
    "From: Åsa Öberg <asa@acme.example>\nTo: {{ name }} <{{ email }}>\n"
    "Subject: {{ subject }}\n\nbody\n"
)
ASCII_TO = "ann@example.org"
UTF8_TO = "ännchen@example.org"  # a non-ASCII local part: the message goes as SMTPUTF8
FORBIDDEN = "".join(chr(c) for c in (*range(32), *range(127, 160)) if c != 9) + "\u2028\u2029"
# Any Unicode but the characters a header refuses (and lone surrogates, which no CSV holds).
CHARS = st.characters(exclude_categories=["Cs"], exclude_characters=FORBIDDEN)
SPACES = st.sampled_from([" ", "  ", "\t", "\u00a0", "\u3000"])
WORDS = st.lists(
    st.one_of(st.text(CHARS, min_size=1, max_size=40), SPACES, st.text(CHARS, max_size=400)),
    max_size=12,
).map("".join)


def parse(data: bytes, utf8: bool) -> EmailMessage:
    if utf8:  # the bytes parser would see UTF-8 header bytes as undecodable
        msg = email.message_from_string(data.decode("utf-8"), policy=policy.SMTP)
    else:
        msg = email.message_from_bytes(data, policy=policy.SMTP)
    assert isinstance(msg, EmailMessage)
    return msg


def send(name: str, subject: str, to: str) -> tuple[bytes, bool]:
    out = build(TEMPLATE.render(Row(2, {"email": to, "name": name, "subject": subject}), "email"))
    return out.data, out.utf8


def check_round_trip(name: str, subject: str, to: str) -> None:
    data, utf8 = send(name, subject, to)
    assert utf8 == (to == UTF8_TO)
    fields = check_head(data, utf8)
    # The strict reading: exactly what was given (outer white space of a name aside).
    assert decode_words(fields["Subject"]) == subject.strip(" \t")
    display, addr = decode_mailbox(fields["To"])
    assert (display, addr) == (name.strip(" \t"), to)
    # And a real parser: one recipient, that address, that name. Python 3.11 reads a space
    # between two adjacent encoded-words of a display name (gh-128110) and folds runs of white
    # space, so its reading is compared modulo white space; the oracle above is exact.
    msg = parse(data, utf8)
    (mailbox,) = msg["To"].addresses
    assert mailbox.addr_spec == to
    assert "".join(mailbox.display_name.split()) == "".join(name.split())
    assert " ".join(str(msg["Subject"]).split()) == " ".join(subject.split())


@pytest.mark.parametrize("to", [ASCII_TO, UTF8_TO])
@settings(max_examples=120, deadline=None)
@given(name=WORDS, subject=WORDS.filter(lambda s: s.strip(" \t")))
def test_any_name_and_subject_keep_the_limits_and_read_back(
    to: str, name: str, subject: str
) -> None:
    check_round_trip(name, subject, to)


@pytest.mark.parametrize("to", [ASCII_TO, UTF8_TO])
@pytest.mark.parametrize(
    "name",
    [
        "Smith, John",
        "spy@evil.example, Ann",
        'Ann "The Boss" O\'Neil \\ co',
        "Дмитрий Иванов",
        "山田恵美" * 200,  # no space anywhere: must still split into words
        "Ann " * 400,
        "x" * 1500,  # one ASCII word longer than a line: encoded-words rather than refused
        "=?utf-8?q?spoof?=",
        "Chloé Dubois, Paris",
    ],
)
def test_hard_names_keep_the_limits(name: str, to: str) -> None:
    check_round_trip(name, "Hello", to)


@pytest.mark.parametrize("to", [ASCII_TO, UTF8_TO])
@pytest.mark.parametrize(
    "subject",
    ["Привет, " * 300, "漢字" * 600, "word " * 400, "=?utf-8?q?fake?= header", "x" * 1500],
)
def test_long_subjects_fold_within_the_limits(subject: str, to: str) -> None:
    check_round_trip("Ann", subject, to)


def test_a_structured_header_that_cannot_fold_makes_the_row_invalid() -> None:
    t = MessageTemplate("From: a@acme.example\nSubject: x\nX-Ref: <{{ ref }}>\n\nbody\n")
    with pytest.raises(InvalidRowError, match="too long to fold") as err:
        t.render(Row(5, {"email": ASCII_TO, "ref": "r" * 1200}), "email")
    assert "row 5" in str(err.value)
    data = build(t.render(Row(5, {"email": ASCII_TO, "ref": "r" * 900}), "email")).data
    assert check_head(data, utf8=False)["X-Ref"] == "<" + "r" * 900 + ">"


def test_smtputf8_is_decided_by_the_envelope_not_the_recipient_column() -> None:
    t = MessageTemplate(
        "From: a@acme.example\nTo: {{ name }} <boss@acme.example>\nSubject: x\n\nb\n"
    )
    out = build(t.render(Row(2, {"email": UTF8_TO, "name": "Zoë"}), "email"))
    assert not out.utf8
    assert decode_mailbox(check_head(out.data, utf8=False)["To"]) == ("Zoë", "boss@acme.example")
    t = MessageTemplate("From: a@acme.example\nCc: {{ email }}\nSubject: Zoë\n\nb\n")
    out = build(t.render(Row(2, {"email": UTF8_TO}), "email"))
    assert out.utf8 and check_head(out.data, utf8=True)["Subject"] == "Zoë"
