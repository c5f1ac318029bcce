"""The transport protocol and the registry that picks a transport by URL scheme.

A transport is opened once per run; each worker thread opens its own `Session` (one SMTP
connection, one boto3 client) and reuses it for every message it sends. `Session.send`
either returns the provider's message id or raises one of the classified errors in
`smartmail.errors` (TransientError, ThrottledError, PermanentError, StopRunError); the engine
acts on the class alone, so a new transport slots in without touching it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import SplitResult, urlsplit

from ..errors import ConfigError
from ..message import OutgoingMessage


class Session(Protocol):
    """One worker's handle on the transport. Used by one thread only."""

    def send(self, message: OutgoingMessage) -> str:
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


@dataclass
class TransportOptions:
    """Options shared by transports; each takes what applies to it."""

    smtp_security: str = "starttls"
    smtp_user: str | None = None
    smtp_password: str | None = None
    timeout: float = 30.0
    messages_per_connection: int = 1000
    ca_file: str | None = None
    configuration_set: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)


Factory = Callable[[SplitResult, TransportOptions], Transport]
_REGISTRY: dict[str, Factory] = {}


def register(scheme: str, factory: Factory) -> None:
    """Make `scheme://...` URLs build a transport with `factory`."""
    _REGISTRY[scheme] = factory


def get_transport(url: str, options: TransportOptions | None = None) -> Transport:
    """Build the transport a URL names, e.g. smtp://host:587, file://outbox, ses://eu-west-1."""
    from . import file, ses, ses_smtp, smtp  # noqa: F401 - built-in transports register themselves

    parts = urlsplit(url)
    factory = _REGISTRY.get(parts.scheme)
    if factory is None:
        known = ", ".join(f"{s}://" for s in sorted(_REGISTRY))
        raise ConfigError(f"unknown transport {url!r}; use one of {known}")
    if parts.password:
        raise ConfigError(
            "do not put a password in the transport URL; set SMARTMAIL_SMTP_PASSWORD instead"
        )
    return factory(parts, options or TransportOptions())
