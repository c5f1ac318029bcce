"""Header fields on the wire: RFC 5322 folding and RFC 2047 encoded-words, within the limits.

Every line this module writes is at most 998 octets without its CRLF (RFC 5322 2.1.1), and
at most 78 where a fold is possible; every encoded-word is at most 75 characters (RFC 2047 2)
and decodes on its own to whole characters. Folds go only where white space already is, so
unfolding gives back the value exactly. A value that cannot be written within the limits
raises `HeaderError`, which the template turns into an invalid row.

Written by hand rather than with `email.header.Header` or `email.policy` for speed (a mail
merge encodes every row; see message.py), and because the standard library writes one
encoded-word "however long" for display names.
"""

from __future__ import annotations

import binascii
import re
import string
from collections.abc import Iterable, Sequence

from .addresses import Mailbox, to_idna

CRLF = "\r\n"
MAX_LINE = 998  # octets, excluding CRLF: a MUST of RFC 5322 2.1.1
FOLD_AT = 78  # the SHOULD of the same section: kept wherever a fold is possible
MAX_WORD = 75  # RFC 2047 2: an encoded-word, "=?utf-8?q?...?=" included

# Unstructured text fields: a long ASCII word there may be written as encoded-words to fold
# it. Other fields are structured (a URL, a message id) and must stay as they are. In these,
# in the others readers show as text (SHOWN_FIELDS) and in `X-` fields (which readers may
# show), text that looks like an encoded-word is encoded, so it reads as typed instead of
# being decoded into other text.
TEXT_FIELDS = frozenset({"subject", "comments"})
# Other fields readers show decoded as text: Organization (Thunderbird), Keywords, and
# Thread-Topic (Outlook).
SHOWN_FIELDS = TEXT_FIELDS | {"organization", "keywords", "thread-topic"}


def _shown_as_text(name: str) -> bool:
    lower = name.lower()
    return lower in SHOWN_FIELDS or lower.startswith("x-")


_Q_PREFIX = "=?utf-8?q?"
_B_PREFIX = "=?utf-8?b?"
_OVERHEAD = len(_Q_PREFIX) + len("?=")
_TEXT = MAX_WORD - _OVERHEAD  # encoded characters in one word
_MIN_FIRST = 12  # room for one 4-byte character, Q-encoded
_B_BYTES = _TEXT // 4 * 3  # 45 bytes -> 60 base64 characters
# RFC 5322 atext, and any non-ASCII character (RFC 6532): everything but ASCII controls,
# space and specials. Written negated: a class spanning U+0080-U+10FFFF costs every start-up
# ~5 ms to compile.
_ATOM = r"""[^\x00-\x20"(),.:;<>@\[\\\]\x7f]+"""
_ATOMS = re.compile(f"{_ATOM}(?: {_ATOM})*")  # one space apart


class HeaderError(ValueError):
    """A header value that cannot be written within the line limits; the message says why."""


def needs_utf8(
    sender: str,
    recipients: Iterable[str],
    fields: Iterable[tuple[str, str | tuple[Mailbox, ...]]] = (),
) -> bool:
    """SMTPUTF8 is needed when a local part is non-ASCII (domains are always IDNA): in the
    envelope as it is sent (the sender, `recipients`: after suppressed copies are left out,
    or the --test-to address in place of the message's own), or in an address header that
    is written (`fields`; Bcc is not), where such a local part can only go raw, in UTF-8."""
    if not sender.partition("@")[0].isascii():
        return True
    if not all(a.isascii() or a.rpartition("@")[0].isascii() for a in recipients):
        return True
    return any(
        not box.address.isascii() and not box.address.rpartition("@")[0].isascii()
        for name, value in fields
        if not isinstance(value, str) and name.lower() != "bcc"
        for box in value
    )


def encode(headers: Sequence[tuple[str, str | tuple[Mailbox, ...]]], utf8: bool) -> list[str]:
    """The header lines (folded, without a final CRLF) of the template's headers; Bcc skipped."""
    lines: list[str] = []
    for name, value in headers:
        if isinstance(value, str):
            lines.append(unstructured(name, value, utf8))
        elif name.lower() != "bcc":
            lines.append(address_header(name, value, utf8))
    return lines


def octets(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


# --- unstructured fields -------------------------------------------------------------------


def unstructured(name: str, value: str, utf8: bool) -> str:
    """`Name: value`, folded at spaces; non-ASCII words (unless `utf8`) as encoded-words.

    Only the words that need it are encoded, so `Hello Zoë, your order` stays readable in
    the raw message. In a field shown as text (a Subject, an Organization, an `X-` field),
    text that merely looks like an encoded-word (`=?...?=`) is encoded too, so a reader shows
    it as typed instead of decoding it; so is, in a Subject or Comments, a word too long for a
    line. Any other field's ASCII value is written as it is, or not at all.
    """
    text = name.lower() in TEXT_FIELDS
    if (value.isascii() or utf8) and not ("=?" in value and _shown_as_text(name)):
        line = f"{name}: {value}"
        if len(line) <= FOLD_AT and line.isascii():
            return line
        try:
            return _fold_words(f"{name}:", value.split(" "))
        except HeaderError:
            if value.isascii() and not text:
                raise
    first = max(_MIN_FIRST, FOLD_AT - len(name) - 2 - _OVERHEAD)
    if not value.isascii():
        try:
            return _fold_words(f"{name}:", _some_encoded(value, first))
        except HeaderError:
            pass  # a very long ASCII word among them: encode it all
    return f"{name}: " + f"{CRLF} ".join(encoded_words(value, first))


def _some_encoded(value: str, first: int) -> list[str]:
    """The words of `value` with each run of words that need encoding as encoded-words.

    A run is encoded whole, the spaces inside it too, because decoders drop the white space
    between two adjacent encoded-words (RFC 2047 6.2) but keep it next to plain text.
    """
    out: list[str] = []
    run: list[str] = []  # words of the current run, and the empty words (spaces) inside it
    spaces: list[str] = []  # blank words (white space) since the last other one
    for word in value.split(" "):
        if not word.strip(" \t"):
            spaces.append(word)
        elif not word.isascii() or "=?" in word:
            if run:
                run += spaces
            else:
                out += spaces
            run.append(word)
            spaces = []
        else:
            if run:
                out += encoded_words(" ".join(run), first if not out else _TEXT)
                run = []
            out += spaces
            out.append(word)
            spaces = []
    if run:
        out += encoded_words(" ".join(run), first if not out else _TEXT)
    return out + spaces


# --- address fields ------------------------------------------------------------------------


def address_header(name: str, mailboxes: Sequence[Mailbox], utf8: bool) -> str:
    """`Name: mailbox, mailbox`: each display name one phrase, each address one addr-spec.

    A display name is data: it is written as atoms only when it is plain words, else as one
    quoted-string (RFC 5322 3.2.4) or, when not ASCII (outside SMTPUTF8) or too long for a
    line, as encoded-words (RFC 2047 5(3)); so nothing in it can read as a second address.
    """
    tokens: list[str] = []
    last = len(mailboxes) - 1
    limit = MAX_LINE - len(name) - 3  # "Name: " before, "," after, on the tightest line
    for index, box in enumerate(mailboxes):
        local, _, domain = box.address.rpartition("@")
        addr = f"{local}@{to_idna(domain)}"
        comma = "," if index < last else ""
        display = box.name.strip(" \t")
        if not display:
            tokens.append(addr + comma)
            continue
        words = _phrase(display, utf8)
        if any(octets(word) > limit for word in words):
            words = encoded_words(display, _TEXT)
        tokens.extend(words)
        tokens.append(f"<{addr}>{comma}")
    if len(tokens) <= 4:
        line = f"{name}: {' '.join(tokens)}"
        if len(line) <= FOLD_AT and line.isascii():
            return line
    return _fold_words(f"{name}:", tokens, leading_space=True)


def _phrase(display: str, utf8: bool) -> list[str]:
    """A display name as the words of an RFC 5322 phrase, split where it may fold."""
    if not (display.isascii() or utf8) or "=?" in display:
        return encoded_words(display, _TEXT)
    if _is_atoms(display):
        return display.split(" ")
    quoted = display.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{quoted}"'.split(" ")


def _is_atoms(display: str) -> bool:
    """Words of atext (or any printable non-ASCII character, RFC 6532) separated by single
    spaces. (ASCII atext is printable, so a whole display that is printable has printable
    words.) One regular expression, as every row's display name comes here."""
    return _ATOMS.fullmatch(display) is not None and (display.isascii() or display.isprintable())


# --- folding -------------------------------------------------------------------------------


def _fold_words(head: str, words: list[str], leading_space: bool = False) -> str:
    """Join `words` with single spaces after `head`, folding before a word where a line would
    pass 78 octets. A blank word (in a run of white space) never starts a line, so no line
    is white space only.
    Raises HeaderError when a line still passes 998 octets."""
    lines: list[str] = []
    if leading_space or not words:
        current, rest = head, words
    else:
        current, rest = f"{head} {words[0]}", words[1:]
    has_word = not leading_space
    for word in rest:
        blank = not word.strip(" \t")
        if not blank and has_word and octets(current) + 1 + octets(word) > FOLD_AT:
            lines.append(current)
            current = f" {word}"
        else:
            current = f"{current} {word}"
        has_word = has_word or not blank
    lines.append(current)
    for line in lines:
        if octets(line) > MAX_LINE:
            raise HeaderError(
                f"the {head[:-1]}: header has a word too long to fold within "
                f"{MAX_LINE} octets a line"
            )
    return CRLF.join(lines)


# --- RFC 2047 encoded-words ----------------------------------------------------------------

# "Q" encoding: in an encoded-word that may stand in a phrase (a display name) only letters,
# digits and !*+-/ go literally (5(3)); a space is "_"; every other byte is =XX.
_Q_LITERAL = string.ascii_letters + string.digits + "!*+-/"


class _QTable(dict[int, str]):
    """str.translate table: code point -> its Q-encoded UTF-8 bytes, filled on first use."""

    def __missing__(self, code: int) -> str:
        char = chr(code)
        if char in _Q_LITERAL:
            encoded = char
        elif char == " ":
            encoded = "_"
        else:
            encoded = "".join(f"={byte:02X}" for byte in char.encode("utf-8"))
        self[code] = encoded
        return encoded


_Q_TABLE = _QTable()


def encoded_words(text: str, first: int) -> list[str]:
    """`text` as UTF-8 encoded-words, "Q" or "B" whichever is shorter: the first word with at
    most `first` encoded characters, the rest at most 63 (75 with the wrapping), each holding
    whole characters (6.3: each word must decode on its own). Safe in a phrase and in text;
    decoders join adjacent words without the space between them (6.2)."""
    encoded = text.translate(_Q_TABLE)
    raw = text.encode("utf-8")
    if len(encoded) <= (len(raw) + 2) // 3 * 4:
        return _q_words(encoded, first)
    return _b_words(text, first // 4 * 3)


def _q_words(encoded: str, first: int) -> list[str]:
    words: list[str] = []
    size = first
    while len(encoded) > size:
        cut = size
        if encoded[cut - 1] == "=":
            cut -= 1
        elif encoded[cut - 2] == "=":
            cut -= 2
        while encoded[cut] == "=" and encoded[cut + 1] in "89AB":  # a continuation byte
            cut -= 3
        words.append(f"{_Q_PREFIX}{encoded[:cut]}?=")
        encoded = encoded[cut:]
        size = _TEXT
    words.append(f"{_Q_PREFIX}{encoded}?=")
    return words


def _b64(data: bytes | bytearray) -> str:
    """`base64.b64encode(data)` as text, without importing base64 (binascii is loaded anyway)."""
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _b_words(text: str, first_bytes: int) -> list[str]:
    words: list[str] = []
    budget = first_bytes
    chunk = bytearray()
    for char in text:
        data = char.encode("utf-8")
        if chunk and len(chunk) + len(data) > budget:
            words.append(f"{_B_PREFIX}{_b64(chunk)}?=")
            chunk = bytearray()
            budget = _B_BYTES
        chunk += data
    words.append(f"{_B_PREFIX}{_b64(chunk)}?=")
    return words
