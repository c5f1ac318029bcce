"""Non-ASCII subjects and display names: whatever the text, a mail client reads back exactly it.

smartmail encodes RFC 2047 words itself (the standard library's encoder was too slow for a
mail merge), so these check the output the way a recipient's client would: parsed back with
`email.policy.SMTP`, 7-bit, and within the line limits.
"""

from __future__ import annotations

import email
from email import policy
from email.message import EmailMessage

from hypothesis import given, settings
from hypothesis import strategies as st

from smartmail import MessageTemplate, Row, build

TEMPLATE = MessageTemplate(
    "From: Åsa Öberg <asa@acme.example>\nTo: {{ name }} <{{ email }}>\n"
    "Subject: {{ subject }}\n\nbody\n"
)
# Letters from several scripts, emoji, and the characters that are special in headers or in
# RFC 2047 itself (=, ?, _), plus tabs and runs of spaces.
TEXT = st.text(
    alphabet=st.sampled_from(list("aZ09 \t=?_.-!*+/,;:'()[]éßÅ€漢字ёЖ😀👍🏽")),
    min_size=1,
    max_size=200,
).filter(str.strip)  # an empty rendered header is left out of the message
NAME = st.text(alphabet=st.sampled_from(list("aZ09 =?_.-!*+/'éßÅ€漢字ёЖ😀")), max_size=90)


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=policy.SMTP)
    assert isinstance(msg, EmailMessage)
    return msg


def words(text: str) -> str:
    """Header values are unstructured text: folding may change runs of white space only."""
    return " ".join(text.split())


@settings(max_examples=150, deadline=None)
@given(subject=TEXT, name=NAME)
def test_any_subject_and_display_name_reads_back_exactly(subject: str, name: str) -> None:
    rendered = TEMPLATE.render(
        Row(2, {"email": "ann@example.org", "name": name, "subject": subject}), "email"
    )
    data = build(rendered).data
    assert data.isascii()
    head = data.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 998
    msg = parse(data)
    assert words(str(msg["Subject"])) == words(subject)
    (to,) = msg["To"].addresses
    assert to.addr_spec == "ann@example.org"
    # Python 3.11's parser puts a space between adjacent encoded-words of a phrase (CPython
    # gh-128110), so spaces are not compared here; tests/header_oracle.py compares exactly.
    assert "".join(to.display_name.split()) == "".join(name.split())
    assert msg["From"].addresses[0].display_name == "Åsa Öberg"


def test_long_non_ascii_subject_is_folded_into_short_encoded_words() -> None:
    subject = "Привет, " * 30
    data = build(
        TEMPLATE.render(
            Row(2, {"email": "a@example.org", "name": "A", "subject": subject}), "email"
        )
    ).data
    head = data.split(b"\r\n\r\n", 1)[0].decode("ascii")
    subject_lines = head.split("Subject: ", 1)[1].split("\r\nMessage-ID")[0].split("\r\n")
    assert len(subject_lines) > 5
    assert all(len(line) <= 78 for line in subject_lines)
    assert all(len(word) <= 75 for line in subject_lines for word in line.split())
    assert words(str(parse(data)["Subject"])) == words(subject)
