"""smtp://HOST:PORT: any SMTP server, one persistent connection per worker thread.

The connection is opened on first use, reused for `messages_per_connection` messages, and
reopened after a drop. Security is STARTTLS by default (`tls` wraps the socket from the
start, `none` sends in clear), with certificates verified against the system store or
`--smtp-ca-file`. The transaction is driven step by step (MAIL, RCPT, DATA) rather than
through `sendmail()`, so every reply can be classified and the queue id the server returns
(SES SMTP puts its message id there) is kept.
"""

from __future__ import annotations

import contextlib
import smtplib
import socket
import ssl
from urllib.parse import SplitResult

from ..errors import (
    ConfigError,
    PermanentError,
    StopRunError,
    ThrottledError,
    TransientError,
    TransportError,
)
from ..message import OutgoingMessage
from .base import TransportOptions, register

SECURITY = ("starttls", "tls", "none")
DEFAULT_PORTS = {"starttls": 587, "tls": 465, "none": 25}


class SmtpTransport:
    """Connection settings shared by every worker's session."""

    allow_utf8_local = True

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
    ) -> None:
        if security not in SECURITY:
            raise ConfigError(f"--smtp-security must be one of {', '.join(SECURITY)}")
        if user and password is None:
            raise ConfigError(
                f"--smtp-user {user} is set but no password: set SMARTMAIL_SMTP_PASSWORD"
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

    def open_session(self) -> SmtpSession:
        return SmtpSession(self)

    def default_rate(self) -> float | None:
        return None

    def close(self) -> None:
        return None

    def connect(self) -> smtplib.SMTP:
        """Open, secure and authenticate one connection; errors come back classified."""
        try:
            conn: smtplib.SMTP
            if self.security == "tls":
                conn = smtplib.SMTP_SSL(
                    self.host, self.port, timeout=self.timeout, context=self.ssl_context
                )
            else:
                conn = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
            conn.ehlo()
            if self.security == "starttls":
                if not conn.has_extn("starttls"):
                    conn.close()
                    raise StopRunError(
                        f"{self.url} does not offer STARTTLS; refusing to send in clear "
                        "(use --smtp-security none only for a trusted local relay)"
                    )
                conn.starttls(context=self.ssl_context)
                conn.ehlo()
            if self.user:
                conn.login(self.user, self._password or "")
            return conn
        except TransportError:
            raise
        except smtplib.SMTPAuthenticationError as exc:
            raise StopRunError(
                f"{self.url} refused the login for {self.user}: {exc.smtp_code} "
                f"{_text(exc.smtp_error)}",
                code=str(exc.smtp_code),
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise StopRunError(
                f"{self.url}: TLS certificate not trusted ({exc.verify_message}); "
                "give the CA with --smtp-ca-file",
            ) from None
        except smtplib.SMTPResponseException as exc:
            raise classify_reply(exc.smtp_code, _text(exc.smtp_error), "connect") from None
        except (OSError, smtplib.SMTPException) as exc:
            raise TransientError(f"cannot connect to {self.url}: {_os_reason(exc)}") from None


class SmtpSession:
    """One worker's connection."""

    def __init__(self, transport: SmtpTransport) -> None:
        self.transport = transport
        self.conn: smtplib.SMTP | None = None
        self.sent_on_conn = 0

    def send(self, message: OutgoingMessage) -> str:
        if self.conn is not None and self.sent_on_conn >= self.transport.messages_per_connection:
            self.close()
        if self.conn is None:
            self.conn = self.transport.connect()
            self.sent_on_conn = 0
        try:
            reply = self._transaction(self.conn, message)
        except TransportError as exc:
            if isinstance(exc, TransientError) and exc.code in (None, "421"):
                self.close()
            raise
        except smtplib.SMTPServerDisconnected as exc:
            self.close()
            raise TransientError(
                f"connection to {self.transport.url} lost: {_os_reason(exc)}"
            ) from None
        except smtplib.SMTPResponseException as exc:
            error = self.classify(exc.smtp_code, _text(exc.smtp_error), "DATA")
            if exc.smtp_code == 421:
                self.close()
            else:
                self._reset(self.conn)
            raise error from None
        except (OSError, smtplib.SMTPException) as exc:
            self.close()
            raise TransientError(
                f"connection to {self.transport.url} lost: {_os_reason(exc)}"
            ) from None
        self.sent_on_conn += 1
        return self.message_id_from_reply(reply, message)

    def message_id_from_reply(self, reply: str, message: OutgoingMessage) -> str:
        """The id to record for a sent message; subclasses parse provider ids from the reply."""
        return message.message_id

    def classify(self, code: int, text: str, stage: str) -> TransportError:
        return classify_reply(code, text, stage)

    def _transaction(self, conn: smtplib.SMTP, message: OutgoingMessage) -> str:
        options: list[str] = []
        if message.utf8:
            if not conn.has_extn("smtputf8"):
                raise PermanentError(
                    f"{message.recipient}: the address needs SMTPUTF8, which "
                    f"{self.transport.url} does not offer"
                )
            options += ["SMTPUTF8", "BODY=8BITMIME"]
        if conn.has_extn("size"):
            options.append(f"SIZE={len(message.data)}")
        code, resp = conn.mail(message.sender, options)
        if code != 250:
            self._reset(conn)
            raise self.classify(code, _text(resp), "MAIL FROM")
        refused: list[tuple[int, str]] = []
        for rcpt in message.recipients:
            code, resp = conn.rcpt(rcpt)
            if code not in (250, 251):
                refused.append((code, f"{rcpt}: {_text(resp)}"))
        if len(refused) == len(message.recipients):
            self._reset(conn)
            code, text = max(refused)
            raise self.classify(code, text, "RCPT TO")
        code, resp = conn.data(message.data)
        if code != 250:
            self._reset(conn)
            raise self.classify(code, _text(resp), "DATA")
        return _text(resp)

    @staticmethod
    def _reset(conn: smtplib.SMTP) -> None:
        with contextlib.suppress(OSError, smtplib.SMTPException):
            conn.rset()

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            conn.quit()
        except (OSError, smtplib.SMTPException):
            with contextlib.suppress(OSError):
                conn.close()


def classify_reply(code: int, text: str, stage: str) -> TransportError:
    """Map an SMTP reply to what the engine should do: retry, slow down, fail, or stop."""
    detail = f"{stage}: {code} {text}".strip()
    lowered = text.lower()
    if code in (530, 534, 535, 538):
        return StopRunError(f"authentication required or refused ({detail})", code=str(code))
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
    )


register("smtp", _factory)
