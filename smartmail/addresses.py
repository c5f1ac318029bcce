"""Email addresses: validation, normalisation and IDNA for international domains.

Validation is deliberately stricter than `email.utils.parseaddr` (which accepts almost
anything) and looser than full RFC 5322 (quoted local parts and IP literals are refused):
the aim is to catch typos in a list before they cost a bounce.

International domains follow IDNA 2008 with UTS 46 mapping, non-transitional, as browsers
and current mail servers do: `faß.de` is `xn--fa-hia.de`, a different domain from `fass.de`
(Python's own "idna" codec is IDNA 2003 and would send it to `fass.de`).
"""

from __future__ import annotations

import contextlib
import re
from typing import NamedTuple

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL_ASCII = re.compile(rf"{_ATOM}(?:\.{_ATOM})*\Z")
# Non-ASCII (RFC 6531) local parts: anything printable but the specials; never a control
# character (C0, DEL, C1), which would go into RCPT TO and the To: header as it is.
_UTF8_SPECIALS = r"\s\"(),:;<>@\[\\\]\x00-\x1f\x7f-\x9f"
_LOCAL_UTF8 = re.compile(rf"[^{_UTF8_SPECIALS}]+(?:\.[^{_UTF8_SPECIALS}.]+)*\Z")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")


class AddressError(ValueError):
    """An address that cannot be mailed; the message says why."""


class Mailbox(NamedTuple):
    """One mailbox of an address header: a display name (data, never parsed) and an address.

    `str()` gives the readable form, the name quoted when RFC 5322 needs it, for a template
    body; the message builder does its own wire encoding (RFC 2047, folding).
    """

    name: str
    address: str

    def __str__(self) -> str:
        name = " ".join(self.name.split())
        if not name:
            return self.address
        if not _PHRASE.match(name):
            name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{name} <{self.address}>"


# A display name that needs no quoting: atoms (RFC 5322 atext, or any non-ASCII, RFC 6532)
# separated by single spaces.
_PHRASE_WORD = r'[^\x00-\x20\x7f()<>\[\]:;@\\,."]+'
_PHRASE = re.compile(rf"{_PHRASE_WORD}(?: {_PHRASE_WORD})*\Z")


def to_idna(domain: str) -> str:
    """The ASCII form of a domain (IDNA 2008, UTS 46 non-transitional), lower case.

    ASCII domains take the fast path unchanged: only international ones pay for `idna`.
    """
    if domain.isascii():
        return domain
    import idna  # only international domains pay for its tables

    try:
        return idna.encode(domain, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        raise AddressError(f"domain {domain!r} is not a valid international domain name") from None


def _strip_root(domain: str) -> str:
    """`example.com.` (the DNS root spelt out) is `example.com`: one trailing dot, once."""
    return domain[:-1] if domain.endswith(".") else domain


def validate(address: str, *, allow_utf8_local: bool = True) -> str:
    """Return the address in sendable form (domain in IDNA), or raise AddressError."""
    addr = address.strip()
    if not addr:
        raise AddressError("empty address")
    if len(addr) > 254:
        raise AddressError("address longer than 254 characters")
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain:
        raise AddressError(f"{addr!r} is not an address (no local part or domain)")
    if len(local) > 64:
        raise AddressError("local part longer than 64 characters")
    if not local.isascii():
        if not allow_utf8_local:
            raise AddressError(
                f"{addr!r} has a non-ASCII local part, which this transport cannot send "
                "(SES does not support SMTPUTF8)"
            )
        if not _LOCAL_UTF8.match(local):
            raise AddressError(f"{addr!r} has an invalid local part")
    elif not _LOCAL_ASCII.match(local):
        raise AddressError(f"{addr!r} has an invalid local part")
    ascii_domain = to_idna(_strip_root(domain)).lower()
    labels = ascii_domain.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise AddressError(f"{addr!r} has an invalid domain")
    if labels[-1].isdigit():
        raise AddressError(f"{addr!r} has a numeric top-level domain")
    return f"{local}@{ascii_domain}"


def normalise(address: str) -> str:
    """The key that identifies a recipient: the same mailbox always gives the same key.

    Used for the ledger, duplicate detection and the suppression list, so a raw CSV value
    and its validated form give the same key: lower case, one trailing dot of the domain
    dropped, an international domain in the IDNA form `validate` sends to. Domains are
    case-insensitive; local parts technically are not, but every real provider treats them
    so, and two rows differing only in case are the same person.
    """
    addr = address.strip()
    if addr.isascii() and not addr.endswith("."):
        return addr.lower()
    local, at, domain = addr.rpartition("@")
    if not at:
        return addr.lower()
    domain = _strip_root(domain)
    if not domain.isascii():
        with contextlib.suppress(AddressError):  # not mailable anyway: any stable key will do
            domain = to_idna(domain)
    return f"{local}@{domain}".lower()
