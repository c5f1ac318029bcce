"""ses+smtp://REGION[:PORT]: the SES SMTP interface, on the SMTP transport's persistent connections.

Host `email-smtp.REGION.amazonaws.com`; STARTTLS on 587 (default), 2587 or 25, TLS from the
first byte on 465 or 2465. `?endpoint=HOST:PORT` sends to another server instead (a test
server, a VPC endpoint's DNS name), with STARTTLS unless the port is 465/2465 or
`--smtp-security tls` is given; plain text is never allowed for SES.

The login is `--smtp-user` with the password in SMARTMAIL_SMTP_PASSWORD, or, when no user is
given, derived from the AWS credentials in the environment: the user is the access key id and
the password is computed from the secret access key with SES's documented algorithm
(`smtp_password`). SES replies are classified by their text, as SES words them: "454
Throttling failure: Maximum sending rate exceeded" slows down, "Daily message quota exceeded"
and an unverified sender stop the run, other "554 Message rejected" fail the row.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from urllib.parse import SplitResult, parse_qs

from ..errors import ConfigError, StopRunError, ThrottledError, TransportError
from ..message import OutgoingMessage
from ..quota import QuotaAware, check_region
from .base import Delivery, TransportOptions, register
from .ses import daily_quota_exceeded, sender_not_verified
from .smtp import SmtpSession, SmtpTransport, classify_reply

STARTTLS_PORTS = (587, 2587, 25)
TLS_PORTS = (465, 2465)
_SES_ID = re.compile(r"^(?:2\.0\.0\s+)?Ok\s+(\S+)", re.IGNORECASE)
_STOP_WORDS = ("sending paused", "suspended", "configuration set", "mail from domain")

# Fixed inputs of SES's SMTP password algorithm (a SigV4 signing key for a fixed date).
_CHAIN = ("11111111", None, "ses", "aws4_request", "SendRawEmail")  # None: the region goes here
_VERSION = 4


def smtp_password(secret_access_key: str, region: str) -> str:
    """The SES SMTP password for an IAM secret access key in `region` (SigV4-style, version 4)."""
    key = ("AWS4" + secret_access_key).encode("utf-8")
    for part in _CHAIN:
        data = (region if part is None else part).encode("utf-8")
        key = hmac.new(key, data, hashlib.sha256).digest()
    return base64.b64encode(bytes([_VERSION]) + key).decode("ascii")


def _credentials_from_aws(region: str) -> tuple[str, str]:
    from .. import aws

    creds = aws.session().get_credentials()
    if creds is None:
        raise ConfigError(
            "ses+smtp needs a login: give --smtp-user and set SMARTMAIL_SMTP_PASSWORD, or provide "
            "AWS credentials (an IAM user's access key) to derive the SMTP password from"
        )
    frozen = creds.get_frozen_credentials()
    if frozen.token:
        raise ConfigError(
            "the AWS credentials are temporary (they have a session token), and SES SMTP only "
            "accepts passwords derived from an IAM user's long-term key; give --smtp-user and "
            "SMARTMAIL_SMTP_PASSWORD instead"
        )
    if not frozen.access_key or not frozen.secret_key:
        raise ConfigError("the AWS credentials are incomplete; cannot derive an SES SMTP login")
    return frozen.access_key, smtp_password(frozen.secret_key, region)


class SesSmtpTransport(QuotaAware, SmtpTransport):
    """The SMTP transport pointed at SES, with SES's reply wording classified."""

    allow_utf8_local = False

    def __init__(
        self,
        region: str,
        port: int | None = None,
        *,
        endpoint: str | None = None,
        force_tls: bool = False,
        user: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
        messages_per_connection: int = 1000,
        ca_file: str | None = None,
    ) -> None:
        self.region = check_region(region)
        if endpoint:
            host, port = _split_endpoint(endpoint)
        else:
            host = f"email-smtp.{self.region}.amazonaws.com"
            port = port or 587
            if port not in STARTTLS_PORTS + TLS_PORTS:
                raise ConfigError(
                    f"ses+smtp port {port}: SES listens on 587, 2587 or 25 (STARTTLS) "
                    "and 465 or 2465 (TLS)"
                )
        security = "tls" if force_tls or port in TLS_PORTS else "starttls"
        if not user:
            user, password = _credentials_from_aws(self.region)
        super().__init__(
            host,
            port,
            security=security,
            user=user,
            password=password,
            timeout=timeout,
            messages_per_connection=messages_per_connection,
            ca_file=ca_file,
            scheme="ses+smtp",
        )
        self.url = f"ses+smtp://{self.region}:{port}" + (
            f"?endpoint={host}:{port}" if endpoint else ""
        )

    def open_session(self) -> SesSmtpSession:
        return SesSmtpSession(self)


class SesSmtpSession(SmtpSession):
    """An SMTP session that knows SES's replies and message ids."""

    def __init__(self, transport: SesSmtpTransport) -> None:
        super().__init__(transport)
        self._sender = ""

    def send(self, message: OutgoingMessage) -> str | Delivery:
        self._sender = message.sender
        return super().send(message)

    def classify(self, code: int, text: str, stage: str) -> TransportError:
        detail = f"{stage}: {code} {text}"
        lowered = text.lower()
        if daily_quota_exceeded(text):
            return StopRunError(f"{detail} (the rest is left for a later run)", code=str(code))
        if code == 454 and ("throttling" in lowered or "sending rate" in lowered):
            return ThrottledError(detail, code=str(code))
        if code == 554:
            if sender_not_verified(text, self._sender):
                return StopRunError(
                    f"{detail} (verify the sender address or its domain in SES)", code=str(code)
                )
            if any(word in lowered for word in _STOP_WORDS):
                return StopRunError(detail, code=str(code))
        return classify_reply(code, text, stage)

    def message_id_from_reply(self, reply: str, message: OutgoingMessage) -> str:
        """SES answers DATA with '250 Ok <SES message id>': that id is what SES events carry."""
        found = _SES_ID.match(reply)
        return found.group(1) if found else message.message_id


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    host, colon, port = endpoint.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"endpoint={endpoint!r}: expected HOST:PORT, e.g. 127.0.0.1:2587")
    return host.strip("[]"), int(port)


def _factory(url: SplitResult, options: TransportOptions) -> SesSmtpTransport:
    if not url.hostname:
        raise ConfigError("an SES SMTP transport needs a region: ses+smtp://REGION[:PORT]")
    if url.path.strip("/") or url.fragment:  # not echoed: it may be a password
        raise ConfigError("an SES SMTP transport URL is ses+smtp://REGION[:PORT][?endpoint=HOST]")
    query = parse_qs(url.query)
    unknown = set(query) - {"endpoint"}
    if unknown:
        raise ConfigError(f"ses+smtp: unknown URL parameter(s) {', '.join(sorted(unknown))}")
    if options.smtp_security == "none":
        raise ConfigError("ses+smtp always uses TLS; --smtp-security none is not allowed")
    endpoint = query.get("endpoint", [None])[-1]
    return SesSmtpTransport(
        url.hostname,
        url.port,
        endpoint=endpoint,
        force_tls=options.smtp_security == "tls",
        user=options.smtp_user or url.username,
        password=options.smtp_password,
        timeout=options.timeout,
        messages_per_connection=options.messages_per_connection,
        ca_file=options.ca_file,
    )


register("ses+smtp", _factory)
