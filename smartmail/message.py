"""MIME building: a rendered message becomes the exact bytes every transport sends.

Built from `binascii` quoted-printable and base64 and the header encoder in headers.py rather
than `email.message.EmailMessage`: measured here, `EmailMessage` costs ~0.7 ms a message,
which alone would cap a 2-core machine near 1,400 messages/s, while this builder costs well
under 0.1 ms. (`email.header.Header` was used for RFC 2047 until benchmarks/bench_smtp.py
showed it costing ~0.3 ms per non-ASCII header: it sizes quoted-printable byte by byte in
Python.) Every output is checked in the tests against the RFC limits on the raw bytes and by
parsing it back with `email.policy.SMTP`.
"""

from __future__ import annotations

import binascii
import itertools
import os
import re
import stat
import time
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import quote

from . import headers
from .dates import formatdate
from .errors import InvalidRowError, Location
from .records import Record
from .sources import Row
from .templates import Attachment, RenderedMessage

CRLF = "\r\n"
_MAX_LINE = 998
# Patterns compiled on first use (re caches them): most runs need neither.
_FROM_LINE = r"(?m)^From "  # what an mbox mailbox escapes as ">From "
_REWRITTEN = r'["\\]|=\?'  # what a reader would not show as it is in filename="..."


@dataclass(slots=True, repr=False, eq=False)
class OutgoingMessage(Record):
    """What a transport needs: the envelope and the finished MIME bytes."""

    sender: str
    recipients: list[str]
    data: bytes
    message_id: str
    recipient: str
    row: Row
    utf8: bool = False
    tags: dict[str, str] = field(default_factory=dict)


def build(
    rendered: RenderedMessage,
    *,
    envelope_to: list[str] | None = None,
    tags: dict[str, str] | None = None,
) -> OutgoingMessage:
    """Encode a rendered message. `envelope_to` overrides where it goes (for --test-to).

    Date, Message-ID, MIME-Version and the Content-* headers are always the builder's own
    (a template cannot set them). Raises InvalidRowError when a header cannot be written
    within the line limits or an attachment cannot be read.
    """
    utf8, head = _head_for(rendered, envelope_to)
    where = Location(rendered.source, rendered.row.number)
    sender_domain = rendered.sender.rpartition("@")[2] or "localhost"
    message_id = f"<{_unique()}@{sender_domain}>"
    lines = [
        _date_line(),
        *head,
        f"Message-ID: {message_id}",
        "MIME-Version: 1.0",
    ]
    try:
        body = _body(rendered)
    except OSError as exc:
        raise InvalidRowError(where, f"an attachment cannot be read: {exc.strerror}") from None
    data = (CRLF.join(lines) + CRLF + body).encode("utf-8" if utf8 else "ascii")
    return OutgoingMessage(
        sender=rendered.sender,
        recipients=envelope_to if envelope_to is not None else rendered.envelope_to,
        data=data,
        message_id=message_id,
        recipient=rendered.recipient,
        row=rendered.row,
        utf8=utf8,
        tags=tags or {},
    )


def check_buildable(
    rendered: RenderedMessage, envelope_to: list[str] | None = None
) -> RenderedMessage:
    """Refuse now what `build` would refuse later, without building.

    Pre-flight checks every row this way, and the send pass builds each message just before
    it leaves: a message is built once, with the Date of its sending, and pre-flight keeps no
    MIME copies. Attachments are read and encoded here and returned with the message (a
    file's encoding is shared by every message attaching it), so it is sent with the files as
    checked; a header block not encoded yet is encoded here too. Raises InvalidRowError as
    `build` would, and UnicodeEncodeError for text `build` could not encode (a lone
    surrogate, from a template's string literal or a CSV read as UTF-7). `envelope_to` is
    where `build` will send it (--test-to), which can change whether it goes as SMTPUTF8.
    """
    if rendered.head is None:
        rendered = rendered._replace(head=_encode_head(rendered, _utf8(rendered, None)))
    utf8, head = _head_for(rendered, envelope_to)
    for line in head:
        if not line.isascii():
            line.encode("utf-8" if utf8 else "ascii")
    for text in (rendered.text, rendered.html):
        if text is not None and not text.isascii():
            text.encode("utf-8")  # what `_text_part` does to it
    if rendered.attachments and rendered.attachment_parts is None:
        try:
            parts = tuple(_attachment(file) for file in rendered.attachments)
        except OSError as exc:
            where = Location(rendered.source, rendered.row.number)
            raise InvalidRowError(where, f"an attachment cannot be read: {exc.strerror}") from None
        rendered = rendered._replace(attachment_parts=parts)
    return rendered


def _utf8(rendered: RenderedMessage, envelope_to: list[str] | None) -> bool:
    """Whether the message goes as SMTPUTF8: decided by what is sent, the envelope (the
    message's own, or `envelope_to` in its place) and the address headers written."""
    envelope = rendered.envelope_to if envelope_to is None else envelope_to
    return headers.needs_utf8(rendered.sender, envelope, rendered.headers)


def _head_for(rendered: RenderedMessage, envelope_to: list[str] | None) -> tuple[bool, list[str]]:
    """SMTPUTF8 or not, and the header block encoded for it.

    `rendered.head`, when present, is encoded for the message's own envelope (the template
    decides as `_utf8` does; leaving a suppressed copy out clears it); sent elsewhere
    (--test-to) the decision can differ, and the block is encoded again."""
    utf8 = _utf8(rendered, envelope_to)
    head = rendered.head
    if head is None or (envelope_to is not None and utf8 != _utf8(rendered, None)):
        head = _encode_head(rendered, utf8)
    return utf8, head


def _encode_head(rendered: RenderedMessage, utf8: bool) -> list[str]:
    try:
        return headers.encode(rendered.headers, utf8)
    except headers.HeaderError as exc:
        raise InvalidRowError(Location(rendered.source, rendered.row.number), str(exc)) from None


_DATE: list[tuple[int, str]] = [(0, "")]


def _date_line() -> str:
    """The Date header, in UTC and stated as such; formatted once a second, as formatdate
    costs more than the rest of the header block."""
    now = int(time.time())
    second, line = _DATE[0]
    if second != now:
        line = f"Date: {formatdate(now, localtime=False)[:-5]}+0000"
        _DATE[0] = (now, line)
    return line


_PROCESS_PREFIX = os.urandom(10).hex()
_SEQUENCE = itertools.count(1)


def _reseed() -> None:
    """After fork() the child must not repeat the parent's Message-IDs and boundaries."""
    global _PROCESS_PREFIX, _SEQUENCE
    _PROCESS_PREFIX = os.urandom(10).hex()
    _SEQUENCE = itertools.count(1)


os.register_at_fork(after_in_child=_reseed)


def _unique() -> str:
    """A process-wide unique token for Message-IDs and MIME boundaries.

    80 random bits drawn once per process (again in a forked child) plus a counter (`next()`
    on itertools.count is atomic under the GIL): unique like uuid4, without a system call
    per message.
    """
    return f"{_PROCESS_PREFIX}{next(_SEQUENCE):x}"


def _text_part(text: str, subtype: str) -> str:
    """A text part: 7bit when it can be, else quoted-printable UTF-8.

    7bit is ASCII in lines of at most 998 octets with no NUL (RFC 2045 2.7): a NUL from a
    CSV value sent raw is refused by some servers and cuts the text short in some readers;
    quoted-printable writes it as =00. Nor may a line start with "From ": a mailbox stored
    as mbox turns it into ">From ", which the recipient then reads; quoted-printable writes
    "=46rom "."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if (
        text.isascii()
        and "\x00" not in text
        and not (text.startswith("From ") or "\nFrom " in text)
        and all(len(line) <= _MAX_LINE for line in text.split("\n"))
    ):
        return (
            f'Content-Type: text/{subtype}; charset="us-ascii"{CRLF}'
            f"Content-Transfer-Encoding: 7bit{CRLF}{CRLF}" + text.replace("\n", CRLF)
        )
    qp = binascii.b2a_qp(text.encode("utf-8"), istext=True).decode("ascii")
    if ("From " in qp and re.search(_FROM_LINE, qp)) or (
        # a line's last space or tab, which b2a_qp encodes after measuring the line
        ("=20" in qp or "=09" in qp) and re.search(r"=(?:20|09)$", qp, re.M)
    ):
        qp = _rewrapped(qp)
    return (
        f'Content-Type: text/{subtype}; charset="utf-8"{CRLF}'
        f"Content-Transfer-Encoding: quoted-printable{CRLF}{CRLF}" + qp.replace("\n", CRLF)
    )


def _boundary() -> str:
    return f"=_smartmail_{_unique()}"


def _multipart(subtype: str, parts: list[str]) -> str:
    boundary = _boundary()
    out = [f'Content-Type: multipart/{subtype}; boundary="{boundary}"{CRLF}{CRLF}']
    for part in parts:
        out.append(f"--{boundary}{CRLF}{part}{CRLF}")
    out.append(f"--{boundary}--{CRLF}")
    return "".join(out)


def _body(rendered: RenderedMessage) -> str:
    main = _text_part(rendered.text, "plain")
    if rendered.html is not None:
        main = _multipart("alternative", [main, _text_part(rendered.html, "html")])
    if not rendered.attachments:
        return main
    parts = rendered.attachment_parts
    if parts is None:
        parts = tuple(_attachment(p) for p in rendered.attachments)
    return _multipart("mixed", [main, *parts])


def _attachment(file: Attachment) -> str:
    info = os.stat(file.path)
    return _encoded_attachment(str(file.path), file.name, info.st_mtime_ns, info.st_size)


_QP_LINE = 76  # RFC 2045 6.7 (5), the soft line break's "=" included


def _rewrapped(qp: str) -> str:
    """Quoted-printable text with no line starting "From " and none over 76 characters.

    A line starting "From " is written "=46rom ", two characters longer; and b2a_qp writes
    a line's last space or tab as "=20"/"=09" after it measured the line (77 or 78). The
    encoded lines of such a text line (split by soft line breaks) are split again."""
    out: list[str] = []
    pieces: list[str] = []
    for line in qp.split("\n"):
        pieces.append(line)
        if line.endswith("="):  # a soft line break: "=" is otherwise always "=3D"
            continue
        if any(p.startswith("From ") or len(p) > _QP_LINE for p in pieces):
            out.extend(_qp_wrapped("".join(p.removesuffix("=") for p in pieces)))
        else:
            out.extend(pieces)
        pieces = []
    out.extend(pieces)  # never left: b2a_qp ends no text with a soft line break
    return "\n".join(out)


def _qp_wrapped(encoded: str) -> list[str]:
    """One encoded text line in lines of at most 76 characters, soft line breaks between,
    an escape (=XX) never split, and "=46" for the F of a line that would start "From "."""
    atoms = re.findall(r"=[0-9A-F]{2}|.", encoded)
    lines: list[str] = []
    line = ""
    i = 0
    while i < len(atoms):
        atom = atoms[i]
        if not line and atom == "F" and "".join(atoms[i : i + 5]) == "From ":
            atom = "=46"
        room = _QP_LINE if i == len(atoms) - 1 else _QP_LINE - 1  # the last needs no "="
        if line and len(line) + len(atom) > room:
            lines.append(line + "=")
            line = ""
            continue  # the atom starts the next line, which may make it "=46"
        line += atom
        i += 1
    lines.append(line)
    return lines


@lru_cache(maxsize=64)
def _encoded_attachment(path: str, filename: str, _mtime: int, _size: int) -> str:
    """Encode a file once per run, however many messages attach it (cache keyed by mtime),
    as `filename`: the name it was attached by, a symbolic link's and not its target's."""
    import base64  # imported here: a run without attachments needs neither
    import mimetypes

    ctype, encoding = mimetypes.guess_type(filename)
    if ctype is None or encoding is not None or ctype.startswith(("message/", "multipart/")):
        # message/* and multipart/* may not be base64 (RFC 2046 5.2.1, 5.1): a reader parses
        # the base64 text as the attached message's headers. As a file, it arrives intact.
        ctype = "application/octet-stream"
    data = _read_regular(path)
    if ctype.startswith("text/"):
        charset = _text_charset(data)
        if charset is not None:
            ctype += f'; charset="{charset}"'
    payload = base64.encodebytes(data).decode("ascii").replace("\n", CRLF)
    type_param, disposition = _named(filename, ctype)
    return (
        f"Content-Type: {ctype}{type_param}{CRLF}"
        f"Content-Transfer-Encoding: base64{CRLF}"
        f"Content-Disposition: {disposition}{CRLF}{CRLF}{payload}"
    )


def _named(filename: str, ctype: str) -> tuple[str, str]:
    """Content-Type's name parameter (with its leading ";") and Content-Disposition's value
    for an attachment called `filename`, every line within 78 characters (RFC 5322 2.1.1)
    but "Content-Type: <type>;" of a type too long for it (Office's), which cannot fold: a
    fold after the colon or inside the type trips naive parsers.

    A quoted-string only for a name that reads back as it is: a backslash there escapes the
    next character (RFC 5322 3.2.4), and readers decode what looks like an encoded-word (RFC
    2047) in a quoted file name. Any other name goes as RFC 2231 `filename*=`. A name too
    long for one line goes in RFC 2231 continuations (`filename*0=`, `filename*1=`...).
    """
    limit = headers.FOLD_AT
    plain = filename.isascii() and filename.isprintable() and not re.search(_REWRITTEN, filename)
    if plain and len(f' name="{filename}"') <= limit:
        one_line = len(f'Content-Type: {ctype}; name="{filename}"') <= limit
        type_param = f'{"; " if one_line else f";{CRLF} "}name="{filename}"'
    else:
        # Outlook over IMAP or POP reads no RFC 2231 and shows "ATT00001.bin": it takes
        # Content-Type's name, in RFC 2047 words, as Gmail and Thunderbird write it too. Not
        # standard, but harmless: readers of RFC 2231 take the filename* (RFC 2183). The
        # first word leaves room for ' name="' before it and, alone, the closing quote.
        first = limit - len(' name="=?utf-8?q??="')
        words = f"{CRLF} ".join(headers.encoded_words(filename, first))
        type_param = f';{CRLF} name="{words}"'
    encoded = f"filename*=utf-8''{quote(filename, safe='')}"
    value = f'filename="{filename}"' if plain else encoded
    if len(f"Content-Disposition: attachment; {value}") <= limit:
        return type_param, f"attachment; {value}"
    if len(f" {value}") <= limit:
        return type_param, f"attachment;{CRLF} {value}"
    # Cut between characters, never inside one's %XX escapes: each piece then decodes on its
    # own too, for a reader that decodes before it joins.
    pieces: list[str] = []
    piece = "" if plain else "utf-8''"
    for char in filename:
        part = char if plain else quote(char, safe="")
        if (
            piece not in ("", "utf-8''")
            and len(f' filename*{len(pieces)}*="{piece}{part}";') > limit
        ):
            pieces.append(piece)
            piece = ""
        piece += part
    pieces.append(piece)
    params = (
        f'filename*{n}="{p}"' if plain else f"filename*{n}*={p}" for n, p in enumerate(pieces)
    )
    return type_param, f"attachment;{CRLF} " + f";{CRLF} ".join(params)


def _text_charset(data: bytes) -> str | None:
    """The charset of a text attachment, when its bytes tell: a text/* part without one is
    read as US-ASCII (RFC 2046 4.1.2), so a UTF-8 file would show as "GrÃ¼ÃŸe". None for
    bytes in some other charset, which cannot be known (a reader then guesses)."""
    # A byte order mark says so. UTF-32's first: its little-endian mark, FF FE 00 00, begins
    # with UTF-16's (FF FE), and a reader told utf-16 would show every other character as NUL.
    if data.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "utf-32"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    if b"\x00" in data:
        return None
    if data.isascii():
        return "us-ascii"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return "utf-8"


def _read_regular(path: str) -> bytes:
    """Read a file the template checked, refusing what it could have been swapped for since:
    a symbolic link (O_NOFOLLOW) or anything but a regular file (a FIFO would block)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file", path)
        return fh.read()
