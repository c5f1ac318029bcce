"""An oracle for header blocks, stricter than Python's `email` parser, working on raw bytes.

Python's parser accepts over-long lines, over-long or malformed encoded-words and bare line
feeds; this checks the RFC 5322 and RFC 2047 limits themselves, and decodes encoded-words the
way RFC 2047 6.2 says (white space between adjacent encoded-words is dropped), which Python
3.11 does not do inside a display name (CPython gh-128110).
"""

from __future__ import annotations

import base64
import binascii
import re

MAX_LINE = 998
MAX_WORD = 75
_NAME = re.compile(rb"[!-9;-~]+:")
_EW = re.compile(r"=\?([^?\s]+)\?([QqBb])\?([^?\s]*)\?=\Z")
_Q_PHRASE = re.compile(r"(?:[A-Za-z0-9!*+\-/_]|=[0-9A-F]{2})*\Z")
_B = re.compile(r"[A-Za-z0-9+/]*={0,2}\Z")


def check_head(data: bytes, utf8: bool) -> dict[str, str]:
    """Assert the header block of `data` keeps every limit; return the unfolded fields."""
    head, sep, _ = data.partition(b"\r\n\r\n")
    assert sep, "no blank line after the header block"
    assert b"\r" not in head.replace(b"\r\n", b""), "bare CR in the header block"
    assert b"\n" not in head.replace(b"\r\n", b""), "bare LF in the header block"
    fields: dict[str, str] = {}
    name = ""
    for raw in head.split(b"\r\n"):
        assert len(raw) <= MAX_LINE, f"line of {len(raw)} octets: {raw[:60]!r}"
        assert raw.strip(b" \t"), "a line of white space only"
        if utf8:
            line = raw.decode("utf-8")  # must be valid UTF-8
        else:
            assert raw.isascii(), f"8-bit header line outside SMTPUTF8: {raw[:60]!r}"
            line = raw.decode("ascii")
        assert not any((c < " " and c != "\t") or c == "\x7f" for c in line), repr(line[:80])
        if raw[:1] in (b" ", b"\t"):
            assert name, "continuation before any field"
            fields[name] += line  # unfolding: only the CRLF goes
        else:
            assert _NAME.match(raw), f"not a field: {raw[:60]!r}"
            name, _, value = line.partition(":")
            assert name not in fields, f"{name} appears twice"
            fields[name] = value
        for word in line.split():
            if word.startswith("=?"):
                check_encoded_word(word.rstrip(","))
    return {k: v[1:] if v.startswith(" ") else v for k, v in fields.items()}


def check_encoded_word(word: str) -> str:
    """Assert one encoded-word is well formed, short enough and whole; return its text."""
    assert len(word) <= MAX_WORD, f"encoded-word of {len(word)} characters"
    match = _EW.match(word)
    assert match, f"malformed encoded-word {word!r}"
    charset, encoding, text = match.groups()
    assert charset.lower() == "utf-8"
    if encoding in "Qq":
        assert _Q_PHRASE.match(text), f"Q text not safe in a phrase: {text!r}"
        raw = binascii.a2b_qp(text.replace("_", " ").encode("ascii"), header=False)
    else:
        assert _B.match(text) and len(text) % 4 == 0, f"bad base64 {text!r}"
        raw = base64.b64decode(text, validate=True)
    return raw.decode("utf-8")  # each word decodes on its own (RFC 2047 5, 6.3)


def decode_words(value: str) -> str:
    """Decode RFC 2047 text as RFC 2047 6.2 says: ews adjacent over white space join up."""
    parts = re.split(r"([ \t]+)", value)
    out: list[str] = []
    previous_ew = False
    pending_space = ""
    for part in parts:
        if not part:
            continue
        if not part.strip(" \t"):
            pending_space = part
            continue
        ew = _EW.match(part) is not None
        if not (ew and previous_ew):
            out.append(pending_space)
        out.append(check_encoded_word(part) if ew else part)
        pending_space = ""
        previous_ew = ew
    out.append(pending_space)
    return "".join(out).strip(" \t") if out else ""


def decode_mailbox(value: str) -> tuple[str, str]:
    """(display name, address) of a field holding exactly one mailbox, as we write them."""
    value = value.strip()
    if not value.endswith(">"):
        assert " " not in value and "," not in value, value
        return "", value
    phrase, _, addr = value[:-1].rpartition("<")
    assert "<" not in addr and "," not in addr and " " not in addr, value
    phrase = phrase.strip()
    if phrase.startswith('"'):
        assert phrase.endswith('"') and len(phrase) >= 2, phrase
        inner = phrase[1:-1]
        assert re.fullmatch(r'(?:[^"\\]|\\.)*', inner, re.S), f"bad quoted-string {phrase!r}"
        return re.sub(r"\\(.)", r"\1", inner, flags=re.S), addr
    assert not any(c in phrase for c in '",<>@;:\\()[]'), f"specials outside quotes: {phrase!r}"
    return decode_words(phrase), addr
