"""The transport protocol and the registry that picks a transport by URL scheme.

A transport is opened once per run; each worker thread opens its own `Session` (one SMTP
connection, one boto3 client) and reuses it for every message it sends. `Session.send`
either returns the provider's message id (or a `Delivery` when there is more to say) or raises
one of the classified errors in `smartmail.errors` (TransientError, its ConnectionFailedError
and ThrottledError, PermanentError, InDoubtError, StopRunError); the engine acts on the class
alone, so a new transport slots in without touching it.

Transport URLs are user input that may hold a login: every message here shows them through
`redact`, so a mistyped `smpt://user:secret@host` never echoes the secret.
"""

from __future__ import annotations

import importlib
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Protocol
from urllib.parse import SplitResult, urlsplit

from ..errors import ConfigError
from ..message import OutgoingMessage


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message the provider accepted, with what the plain id cannot say.

    `refused`: envelope recipients other than the row's own (Cc, Bcc) that the server refused
    while it accepted the row's recipient, each as "address: code text". The message went
    without them; the engine reports them with the row.
    """

    provider_id: str
    refused: tuple[str, ...] = ()


class Session(Protocol):
    """One worker's handle on the transport. Used by one thread only."""

    def send(self, message: OutgoingMessage) -> str | Delivery:
        """Send one message; return the provider's id for it (Message-ID when it has none)."""
        ...

    def close(self) -> None:
        """Release the connection; never raises."""
        ...


class Transport(Protocol):
    """A way to deliver messages, configured from a URL and options."""

    url: str
    """The URL as shown to the user (never with a password in it)."""

    allow_utf8_local: bool
    """Whether non-ASCII local parts (SMTPUTF8) can be sent; SES cannot."""

    def open_session(self) -> Session:
        """A new session for one worker thread."""
        ...

    def default_rate(self) -> float | None:
        """Messages/second to run at when --rate is not given; None means no limit."""
        ...

    def close(self) -> None:
        """Release run-wide resources."""
        ...


@dataclass(repr=False)
class TransportOptions:
    """Options shared by transports; each takes what applies to it.

    Its repr (and so str and format) shows `smtp_password` as `<hidden>`: options end up in
    logs, debugger views and a library caller's prints, and the password must not.
    """

    smtp_security: str = "starttls"
    smtp_user: str | None = None
    smtp_password: str | None = None
    timeout: float = 30.0
    messages_per_connection: int = 1000
    ca_file: str | None = None
    configuration_set: str | None = None
    allow_plaintext_auth: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        shown = (
            f"{f.name}=<hidden>"
            if f.name == "smtp_password" and self.smtp_password is not None
            else f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
        )
        return f"{type(self).__qualname__}({', '.join(shown)})"


Factory = Callable[[SplitResult, TransportOptions], Transport]
_REGISTRY: dict[str, Factory] = {}


def register(scheme: str, factory: Factory) -> None:
    """Make `scheme://...` URLs build a transport with `factory`."""
    _REGISTRY[scheme] = factory


_PLAIN_USER = re.compile(r"[A-Za-z0-9._+%-]*")
_NO_PASSWORD = "do not put a password in the transport URL; set SMARTMAIL_SMTP_PASSWORD instead"


def redact(url: str) -> str:
    """`url` fit to show: a password (anything after ':' in the part before the last '@') masked.

    Works on the raw text, not on urlsplit, because a mistyped URL is exactly the one urlsplit
    may cut in the wrong place (a '/' in the password ends the host part early).
    """
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, sep, userinfo = head.partition("://")
    user, colon, _ = userinfo.partition(":")
    if not _PLAIN_USER.fullmatch(user):
        user, colon = "***", ":"
    if not sep:
        return f"***@{tail}"
    if not colon:
        return url
    return f"{scheme}://{user}:***@{tail}"


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses: traffic that never leaves the machine."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_BUILT_IN = {"smtp": "smtp", "file": "file", "ses": "ses", "ses+smtp": "ses_smtp"}


def get_transport(url: str, options: TransportOptions | None = None) -> Transport:
    """Build the transport a URL names, e.g. smtp://host:587, file://outbox, ses://eu-west-1."""
    shown = redact(url)
    scheme = url.partition(":")[0].lower() if ":" in url else ""
    factory = _REGISTRY.get(scheme)
    if factory is None and scheme in _BUILT_IN:
        # Only the module named: an smtp:// run need not load the SES client's code.
        importlib.import_module(f".{_BUILT_IN[scheme]}", __package__)
        factory = _REGISTRY.get(scheme)
    if factory is None:
        from . import file, ses, ses_smtp, smtp  # noqa: F401 - every built-in, to list them

        known = ", ".join(f"{s}://" for s in sorted(_REGISTRY))
        raise ConfigError(f"unknown transport {shown!r}; use one of {known}")
    if shown != url and scheme != "file":
        raise ConfigError(_NO_PASSWORD)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsed now, so a bad port is a clear error, not a traceback
    except ValueError:
        raise ConfigError(
            f"transport URL {shown!r} is not valid (check the host and port)"
        ) from None
    if parts.password:
        raise ConfigError(_NO_PASSWORD)
    return factory(parts, options or TransportOptions())
