"""smtp://HOST:PORT: any SMTP server, one persistent connection per worker thread.

The connection is opened on first use, reused for `messages_per_connection` messages, and
reopened after a drop. Security is STARTTLS by default (`tls` wraps the socket from the
start, `none` sends in clear, and a login over it only to a loopback address unless
`--allow-plaintext-auth`), with certificates verified against the system store or
`--smtp-ca-file`.

The transaction is driven step by step (MAIL, RCPT, DATA, the message, the end-of-data dot,
the reply) rather than through `sendmail()`, so every reply can be classified, the queue id
the server returns (SES SMTP puts its message id there) is kept, and we know on which side of
the dot a failure happened: before it, the server cannot have taken the message and the
failure is retried; after it, a lost reply is `InDoubtError` and never retried. A refusal of
the row's own recipient fails the row even when a Cc is accepted (nothing is sent); refused
Cc/Bcc while the recipient is accepted are sent without and reported (`Delivery.refused`).
Set-up failures are the server's, not the row's: a 5xx greeting or MAIL FROM, a TLS mismatch
or a refused login stop the run; a connection that cannot be made is `ConnectionFailedError`.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import socket
import ssl
import threading
import time
from urllib.parse import SplitResult

from ..errors import (
    ConfigError,
    ConnectionFailedError,
    InDoubtError,
    PermanentError,
    StopRunError,
    ThrottledError,
    TransientError,
    TransportError,
)
from ..message import OutgoingMessage
from .base import Delivery, TransportOptions, is_loopback, register

SECURITY = ("starttls", "tls", "none")
DEFAULT_PORTS = {"starttls": 587, "tls": 465, "none": 25}
# 5xx answers to MAIL FROM about this message (its size, its SMTPUTF8/8BITMIME parameters), not
# about the sender: they fail the row; any other 5xx there stops the run.
MESSAGE_MAIL_CODES = frozenset({552, 555})
_LEADING_DOT = re.compile(rb"(?m)^\.")
# An ASCII dot-atom address: smtplib's `quoteaddr` (email.utils.parseaddr, ~20 us of pure
# Python an address) gives back exactly `<address>` for it.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ADDRESS = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")


class SmtpTransport:
    """Connection settings shared by every worker's session."""

    allow_utf8_local = True
    # A connection `check` opened is handed to the first session as it is within this many
    # seconds; older (the operator took a while at the prompt), a NOOP asks first whether
    # the server still holds it.
    SPARE_FRESH = 5.0
    NOOP_TIMEOUT = 5.0

    def __init__(
        self,
        host: str,
        port: int | None = None,
        *,
        security: str = "starttls",
        user: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
        messages_per_connection: int = 1000,
        ca_file: str | None = None,
        scheme: str = "smtp",
        allow_plaintext_auth: bool = False,
    ) -> None:
        if security not in SECURITY:
            raise ConfigError(f"--smtp-security must be one of {', '.join(SECURITY)}")
        if user and password is None:
            raise ConfigError(
                f"--smtp-user {user} is set but no password: set SMARTMAIL_SMTP_PASSWORD"
            )
        if user and security == "none" and not is_loopback(host) and not allow_plaintext_auth:
            raise ConfigError(
                f"--smtp-user with --smtp-security none would send the password in clear to "
                f"{host}; use starttls or tls, or add --allow-plaintext-auth if the network "
                "between here and the server is trusted"
            )
        self.host = host
        self.port = port or DEFAULT_PORTS[security]
        self.security = security
        self.user = user
        self._password = password
        self.timeout = timeout
        self.messages_per_connection = max(1, messages_per_connection)
        self.url = f"{scheme}://{host}:{self.port}"
        self.ssl_context: ssl.SSLContext | None = None
        if security != "none":
            try:
                self.ssl_context = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"--smtp-ca-file {ca_file}: cannot load ({exc})") from None
        self._spare: tuple[float, smtplib.SMTP] | None = None
        self._spare_lock = threading.Lock()

    def open_session(self) -> SmtpSession:
        return SmtpSession(self)

    def default_rate(self) -> float | None:
        return None

    def check(self) -> None:
        """Connect, secure and log in now, so that a set-up mistake (the login, TLS, a server
        refusing us or not there) is found before the operator confirms the run, not after.
        Raises StopRunError for any failure (the run has not begun: there is nothing to
        retry). The connection is kept for the first session to send on."""
        try:
            conn = self.connect()
        except StopRunError:
            raise
        except TransportError as exc:
            raise StopRunError(str(exc), code=exc.code) from None
        self._keep(conn)

    def _keep(self, conn: smtplib.SMTP) -> None:
        with self._spare_lock:
            old, self._spare = self._spare, (time.monotonic(), conn)
        if old is not None:
            _quit(old[1])

    def take_spare(self) -> smtplib.SMTP | None:
        """The connection `check` opened, if it is still good (once; None otherwise)."""
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is None:
            return None
        made, conn = spare
        if time.monotonic() - made <= self.SPARE_FRESH:
            return conn
        try:
            # A few seconds, not the whole --timeout: a fresh connection costs less than a
            # worker left waiting on one the server has given up on without closing it.
            if conn.sock is not None:
                conn.sock.settimeout(min(self.timeout, self.NOOP_TIMEOUT))
            code, _ = conn.noop()
            if conn.sock is not None:
                conn.sock.settimeout(self.timeout)
        except (OSError, smtplib.SMTPException):
            code = 0
        if code == 250:
            return conn
        with contextlib.suppress(OSError):
            conn.close()
        return None

    def close(self) -> None:
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            _quit(spare[1])

    def connect(self) -> smtplib.SMTP:
        """Open, secure and authenticate one connection; errors come back classified.

        What fails here is the server or the set-up, never a row: a 5xx greeting (a blocked
        IP), a refused or impossible TLS handshake and a refused login stop the run; a
        connection that cannot be made at all is a `ConnectionFailedError`, which the engine's
        circuit breaker counts.
        """
        stage = "connect"
        conn: smtplib.SMTP | None = None
        try:
            if self.security == "tls":
                stage = "TLS handshake"
                conn = smtplib.SMTP_SSL(
                    self.host, self.port, timeout=self.timeout, context=self.ssl_context
                )
            else:
                conn = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
            stage = "EHLO"
            self._hello(conn)
            if self.security == "starttls":
                if not conn.has_extn("starttls"):
                    raise StopRunError(
                        f"{self.url} does not offer STARTTLS; refusing to send in clear "
                        "(use --smtp-security none only for a trusted local relay)"
                    )
                stage = "STARTTLS"
                conn.starttls(context=self.ssl_context)
                stage = "EHLO"
                self._hello(conn)
            if self.user:
                stage = "AUTH"
                conn.login(self.user, self._password or "")
            return conn
        except BaseException as exc:
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.close()
            raise self._connect_error(exc, stage) from None

    def _hello(self, conn: smtplib.SMTP) -> None:
        code, resp = conn.ehlo()
        if code != 250:
            code, resp = conn.helo()
        if code != 250:
            raise smtplib.SMTPHeloError(code, resp)

    def _connect_error(self, exc: BaseException, stage: str) -> BaseException:
        """What a failure to set up a connection means for the run."""
        if isinstance(exc, TransportError) or not isinstance(exc, Exception):
            return exc
        if isinstance(exc, smtplib.SMTPAuthenticationError):
            return StopRunError(
                f"{self.url} refused the login for {self.user}: {exc.smtp_code} "
                f"{_text(exc.smtp_error)}",
                code=str(exc.smtp_code),
            )
        if isinstance(exc, ssl.SSLCertVerificationError):
            return StopRunError(
                f"{self.url}: TLS certificate not trusted ({exc.verify_message}); "
                "give the CA with --smtp-ca-file",
            )
        if isinstance(exc, ssl.SSLError) and not isinstance(
            exc, ssl.SSLEOFError | ssl.SSLZeroReturnError
        ):
            return StopRunError(
                f"{self.url}: the TLS handshake failed ({exc.reason or exc}); check "
                f"--smtp-security (now {self.security}: 'tls' is for a port that speaks TLS "
                "from the first byte, usually 465; 'starttls' for 587)"
            )
        if isinstance(exc, smtplib.SMTPResponseException):
            code, text = exc.smtp_code, _text(exc.smtp_error)
            if 500 <= code < 600:
                return StopRunError(
                    f"{self.url} refused us at {stage}: {code} {text}", code=str(code)
                )
            return ConnectionFailedError(
                f"{self.url} is not taking connections now ({stage}: {code} {text})",
                code=str(code),
            )
        if (
            stage == "AUTH"
            and isinstance(exc, smtplib.SMTPException)
            and not isinstance(exc, smtplib.SMTPServerDisconnected)
        ):
            return StopRunError(f"{self.url}: cannot log in ({exc}); check --smtp-user")
        reason = _os_reason(exc)
        if stage == "connect" and self.security != "tls" and "timed out" in reason:
            reason += (
                " waiting for the greeting (if this port expects TLS from the first byte, "
                "use --smtp-security tls)"
            )
        return ConnectionFailedError(f"cannot connect to {self.url} ({stage}): {reason}")


class SmtpSession:
    """One worker's connection."""

    def __init__(self, transport: SmtpTransport) -> None:
        self.transport = transport
        self.conn: smtplib.SMTP | None = None
        self.sent_on_conn = 0

    def send(self, message: OutgoingMessage) -> str | Delivery:
        if self.conn is not None and self.sent_on_conn >= self.transport.messages_per_connection:
            self.close()
        if self.conn is None:
            self.conn = self.transport.take_spare() or self.transport.connect()
            self.sent_on_conn = 0
        try:
            reply, refused = self._transaction(self.conn, message)
        except InDoubtError:
            self.drop()
            raise
        except TransportError as exc:
            if isinstance(exc, TransientError) and exc.code in (None, "421"):
                self.close()
            raise
        except (OSError, smtplib.SMTPException) as exc:
            # Before the end-of-data dot: the server cannot have taken the message.
            self.drop()
            raise TransientError(
                f"connection to {self.transport.url} lost: {_os_reason(exc)}"
            ) from None
        self.sent_on_conn += 1
        provider_id = self.message_id_from_reply(reply, message)
        return Delivery(provider_id, tuple(refused)) if refused else provider_id

    def message_id_from_reply(self, reply: str, message: OutgoingMessage) -> str:
        """The id to record for a sent message; subclasses parse provider ids from the reply."""
        return message.message_id

    def classify(self, code: int, text: str, stage: str) -> TransportError:
        return classify_reply(code, text, stage)

    def _transaction(self, conn: smtplib.SMTP, message: OutgoingMessage) -> tuple[str, list[str]]:
        """MAIL, RCPT, DATA step by step; returns the final reply and the refused Cc/Bcc.

        Everything up to the last byte of the end-of-data dot can fail safely (the server
        drops an unfinished transaction). After it, the server holds the whole message: a
        lost reply then raises `InDoubtError`, never a retryable error.
        """
        options: list[str] = []
        if message.utf8:
            if not conn.has_extn("smtputf8"):
                raise PermanentError(
                    f"{message.recipient}: the message needs SMTPUTF8 (an address in its "
                    f"envelope or headers has a non-ASCII local part), which "
                    f"{self.transport.url} does not offer"
                )
            options += ["SMTPUTF8", "BODY=8BITMIME"]
        if conn.has_extn("size"):
            options.append(f"SIZE={len(message.data)}")
        code, resp = _mail(conn, message.sender, options)
        if code != 250:
            self._reset(conn)
            raise self.classify(code, _text(resp), "MAIL FROM")
        refused_primary, refused_other = self._recipients(conn, message)
        if refused_primary:
            # The row's own recipient is refused: send nothing, even if a Cc was accepted.
            self._reset(conn)
            code, text = max(refused_primary)
            raise self.classify(code, text, "RCPT TO")
        code, resp = conn.docmd("DATA")
        if code != 354:
            self._reset(conn)
            raise self.classify(code, _text(resp), "DATA")
        conn.send(_data_payload(message.data))
        # The whole message, dot included, is on its way: from here a lost answer is in doubt.
        try:
            code, resp = conn.getreply()
        except (OSError, smtplib.SMTPException) as exc:
            raise InDoubtError(
                f"no answer from {self.transport.url} after the whole message was sent "
                f"({_os_reason(exc)}); it may have been delivered"
            ) from None
        if code == 250:
            return _text(resp), [text for _, text in refused_other]
        if 400 <= code < 600:
            self._reset(conn)
            raise self.classify(code, _text(resp), "end of DATA")
        raise InDoubtError(
            f"unexpected answer from {self.transport.url} after the whole message was sent "
            f"({code} {_text(resp)}); it may have been delivered"
        )

    def _recipients(
        self, conn: smtplib.SMTP, message: OutgoingMessage
    ) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
        """RCPT TO each envelope address; the refusals of the row's recipient, and of others.

        With --test-to the envelope holds only the test address, which then is the primary.
        """
        primary = message.recipient.lower()
        if all(r.lower() != primary for r in message.recipients):
            primaries = {r.lower() for r in message.recipients}
        else:
            primaries = {primary}
        refused_primary: list[tuple[int, str]] = []
        refused_other: list[tuple[int, str]] = []
        for rcpt in message.recipients:
            conn.putcmd("rcpt", f"TO:{quote_address(rcpt)}")
            code, resp = conn.getreply()
            if code not in (250, 251):
                refused = refused_primary if rcpt.lower() in primaries else refused_other
                refused.append((code, f"{rcpt}: {code} {_text(resp)}"))
        return refused_primary, refused_other

    @staticmethod
    def _reset(conn: smtplib.SMTP) -> None:
        with contextlib.suppress(OSError, smtplib.SMTPException):
            conn.rset()

    def drop(self) -> None:
        """Close a connection that failed, without a QUIT that could wait out the timeout."""
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            conn.quit()
        except (OSError, smtplib.SMTPException):
            with contextlib.suppress(OSError):
                conn.close()


def _quit(conn: smtplib.SMTP) -> None:
    """QUIT a connection nobody will send on; never raises."""
    try:
        conn.quit()
    except (OSError, smtplib.SMTPException):
        with contextlib.suppress(OSError):
            conn.close()


def quote_address(address: str) -> str:
    """`<address>` for MAIL FROM and RCPT TO, as `smtplib.quoteaddr` writes it.

    The plain addresses of nearly every row skip its parser; any other (a quoted local part,
    a non-ASCII address) still goes through it.
    """
    if _PLAIN_ADDRESS.fullmatch(address):
        return f"<{address}>"
    return smtplib.quoteaddr(address)


def _mail(conn: smtplib.SMTP, sender: str, options: list[str]) -> tuple[int, bytes]:
    """`conn.mail(sender, options)` with `quote_address`; SMTPUTF8 keeps smtplib's own path
    (it switches the connection's command encoding)."""
    if "SMTPUTF8" in options:
        return conn.mail(sender, options)
    tail = " " + " ".join(options) if options and conn.does_esmtp else ""
    conn.putcmd("mail", f"FROM:{quote_address(sender)}{tail}")
    return conn.getreply()


def _data_payload(data: bytes) -> bytes:
    """The DATA bytes as smtplib sends them: leading dots doubled, CRLF, then '.' CRLF."""
    payload = _LEADING_DOT.sub(b"..", data)
    if not payload.endswith(b"\r\n"):
        payload += b"\r\n"
    return payload + b".\r\n"


def classify_reply(code: int, text: str, stage: str) -> TransportError:
    """Map an SMTP reply to what the engine should do: retry, slow down, fail, or stop."""
    detail = f"{stage}: {code} {text}".strip()
    lowered = text.lower()
    if code in (530, 534, 535, 538):
        return StopRunError(f"authentication required or refused ({detail})", code=str(code))
    if stage == "MAIL FROM" and 500 <= code < 600 and code not in MESSAGE_MAIL_CODES:
        # The sender (or our IP) is refused: every later row would be refused the same way.
        return StopRunError(f"the server refuses the sender ({detail})", code=str(code))
    if 400 <= code < 500:
        if "throttl" in lowered or ("rate" in lowered and "exceed" in lowered):
            return ThrottledError(detail, code=str(code))
        return TransientError(detail, code=str(code))
    if 500 <= code < 600:
        return PermanentError(detail, code=str(code))
    return TransientError(f"unexpected reply ({detail})", code=str(code))


def _text(resp: bytes | str) -> str:
    if isinstance(resp, bytes):
        resp = resp.decode("utf-8", "replace")
    return " ".join(resp.split())


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _factory(url: SplitResult, options: TransportOptions) -> SmtpTransport:
    if not url.hostname:
        raise ConfigError("an SMTP transport needs a host: smtp://HOST[:PORT]")
    if url.path.strip("/") or url.query or url.fragment:
        # Not echoed: a password is what people put there (`?password=...`).
        raise ConfigError(
            "an SMTP transport URL is smtp://HOST[:PORT], with nothing after the port; "
            "the password comes from SMARTMAIL_SMTP_PASSWORD"
        )
    user = options.smtp_user or url.username
    return SmtpTransport(
        url.hostname,
        url.port,
        security=options.smtp_security,
        user=user,
        password=options.smtp_password,
        timeout=options.timeout,
        messages_per_connection=options.messages_per_connection,
        ca_file=options.ca_file,
        allow_plaintext_auth=options.allow_plaintext_auth,
    )


register("smtp", _factory)
