"""Email addresses: validation, normalisation and IDNA for international domains.

Validation is deliberately stricter than `email.utils.parseaddr` (which accepts almost
anything) and looser than full RFC 5322 (quoted local parts and IP literals are refused):
the aim is to catch typos in a list before they cost a bounce.
"""

from __future__ import annotations

import re
from email.utils import getaddresses

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL_ASCII = re.compile(rf"{_ATOM}(?:\.{_ATOM})*\Z")
_LOCAL_UTF8 = re.compile(r"[^\s\"(),:;<>@\[\\\]]+(?:\.[^\s\"(),:;<>@\[\\\].]+)*\Z")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")


class AddressError(ValueError):
    """An address that cannot be mailed; the message says why."""


def to_idna(domain: str) -> str:
    """The ASCII (punycode) form of a domain, which every server and SES accept."""
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise AddressError(f"domain {domain!r} is not a valid international domain name") from None


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
    ascii_domain = to_idna(domain.rstrip(".")).lower()
    labels = ascii_domain.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise AddressError(f"{addr!r} has an invalid domain")
    if labels[-1].isdigit():
        raise AddressError(f"{addr!r} has a numeric top-level domain")
    return f"{local}@{ascii_domain}"


def normalise(address: str) -> str:
    """The key that identifies a recipient: the same mailbox always gives the same key.

    Domains are case-insensitive; local parts technically are not, but every real provider
    treats them so, and two rows differing only in case are the same person.
    """
    return address.strip().lower()


_SIMPLE = re.compile(r"\s*(?:([^<>\"(),@]*?)\s*<([^<>\s]+)>|([^<>\s\"(),]+))\s*\Z")


def parse_list(value: str) -> list[tuple[str, str]]:
    """Split a header value such as 'Ann <a@x.org>, b@y.org' into (name, address) pairs.

    The usual single `Name <addr>` or bare `addr` takes a regex fast path (a mail merge
    parses one per row); anything with quotes, comments or commas goes to the standard
    library's full parser.
    """
    if "," not in value:
        simple = _SIMPLE.match(value)
        if simple:
            name, bracketed, bare = simple.groups()
            return [((name or "").strip(), bracketed or bare)]
    pairs = getaddresses([value])
    return [(name, addr) for name, addr in pairs if addr or name]
