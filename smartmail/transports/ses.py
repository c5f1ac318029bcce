"""ses://REGION: Amazon SES v2 `SendEmail` with Raw content, one boto3 client per worker.

The raw content is the exact MIME the core builds, so headers, HTML parts and attachments are
byte-for-byte what every other transport sends. botocore's own retries are off
(`max_attempts=1`): its standard mode would retry "Daily message quota exceeded", which cannot
succeed, would hide throttles from the shared rate limiter, and would send a request again
after a read timeout, when SES may already have accepted it. Every error is classified here
instead, on the error code, and on the text only where SES uses one code for two meanings
(Throttling: rate vs daily quota; MessageRejected: content vs unverified sender).

Which side of the request a network failure is on decides what it means: a connection that
could not be made (DNS, refused, connect timeout, TLS set-up) never carried the request and is
a `ConnectionFailedError`, retried; a read timeout or a connection closed once the request was
written may follow an accepted message and is an `InDoubtError`, never retried.

boto3 is imported lazily, so SMTP and file users do not pay for it at start-up.
"""

from __future__ import annotations

import contextlib
import re
import threading
from functools import lru_cache
from typing import Any
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
from ..quota import QuotaAware, aws_reason, check_region
from .base import TransportOptions, register

THROTTLE_CODES = frozenset(
    {"Throttling", "ThrottlingException", "TooManyRequestsException", "RequestThrottled"}
)
STOP_CODES = frozenset(
    {
        "AccountSendingPausedException",
        "SendingPausedException",
        "AccountSuspendedException",
        "ConfigurationSetDoesNotExist",
        "ConfigurationSetDoesNotExistException",
        "ConfigurationSetSendingPausedException",
        "MailFromDomainNotVerifiedException",
        "MailFromDomainNotVerified",
        # v2 answers NotFoundException when the configuration set (or identity) is missing.
        "NotFoundException",
        # A sending limit of the account, not of this message: later rows would hit it too.
        "LimitExceededException",
        # Credentials or permissions: every later row would be refused the same way.
        "AccessDenied",
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "InvalidSignatureException",
        "ExpiredToken",
        "ExpiredTokenException",
        "MissingAuthenticationToken",
        "IncompleteSignature",
    }
)
PERMANENT_CODES = frozenset(
    {
        "MessageRejected",
        "InvalidParameterValue",
        "InvalidParameterCombination",
        "BadRequestException",
        "ValidationError",
        "ValidationException",
    }
)
TRANSIENT_CODES = frozenset(
    {"InternalFailure", "InternalError", "InternalServerError", "ServiceUnavailable"}
)
POOL_CONNECTIONS = 256  # as many as --workers allows; the pool opens them only when needed
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_IDENTITY_LIST = re.compile(r"failed the check in region [\w-]+:\s*(.+)", re.IGNORECASE)


def daily_quota_exceeded(text: str) -> bool:
    return "daily message quota exceeded" in text.lower()


def sender_not_verified(text: str, sender: str) -> bool | None:
    """For a 'not verified' rejection: True when it is the sender (stop the run), False when
    only recipients are named (the sandbox refusing an unverified recipient: fail the row),
    None when the text is not about verification at all."""
    lowered = text.lower()
    if "not verified" not in lowered and "did not have authority to send from" not in lowered:
        return None
    named = _IDENTITY_LIST.search(text)
    if named is None:
        return True
    identities = {i.strip().strip(".").lower() for i in named.group(1).split(",")}
    sender = sender.lower()
    return sender in identities or sender.rpartition("@")[2] in identities


def classify_client_error(exc: BaseException, sender: str = "") -> TransportError:
    """Map a botocore error to what the engine must do: retry, slow down, fail, or stop."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        HTTPClientError,
        NoCredentialsError,
        ParamValidationError,
        PartialCredentialsError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        text = str(error.get("Message", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        detail = f"SES {code}: {text}".rstrip(": ")
        if daily_quota_exceeded(text):
            return StopRunError(f"{detail} (the rest is left for a later run)", code=code)
        if code in THROTTLE_CODES or status == 429:
            return ThrottledError(detail, code=code)
        if code == "MessageRejected":
            about_sender = sender_not_verified(text, sender)
            if about_sender:
                return StopRunError(
                    f"{detail} (verify the sender address or its domain in SES)", code=code
                )
        if code in STOP_CODES:
            return StopRunError(detail, code=code)
        if code in PERMANENT_CODES:
            return PermanentError(detail, code=code)
        if code in TRANSIENT_CODES or status >= 500:
            return TransientError(detail, code=code)
        return PermanentError(detail, code=code)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return StopRunError(f"no usable AWS credentials ({type(exc).__name__})")
    if isinstance(exc, ParamValidationError):
        reason = " ".join(str(exc).split())[:300]  # one line, never the whole message body
        return PermanentError(f"SES request refused before sending: {reason}")
    if isinstance(exc, BotoConnectionError):
        # Endpoint unreachable, connect timeout, proxy, TLS set-up: the request never left.
        return ConnectionFailedError(f"cannot reach SES: {aws_reason(exc)}")
    if isinstance(exc, HTTPClientError):
        # Read timeout, connection closed or reset after the request was written: SES may
        # have accepted the message.
        return InDoubtError(
            f"no answer from SES after the request was sent ({aws_reason(exc)}); "
            "it may have been accepted"
        )
    if isinstance(exc, BotoCoreError):
        return TransientError(f"SES connection problem: {aws_reason(exc)}")
    return TransientError(f"SES connection problem: {type(exc).__name__}: {exc}")


@lru_cache(maxsize=32)
def _email_tags(items: tuple[tuple[str, str], ...]) -> tuple[dict[str, str], ...]:
    """SES allows only [A-Za-z0-9_-], up to 256, in tag names and values; computed once per run."""
    return tuple({"Name": sanitise_tag(k), "Value": sanitise_tag(v)} for k, v in items)


def sanitise_tag(value: str) -> str:
    """Replace characters SES refuses with '_' and cut to 256 (an empty value becomes '_')."""
    return _TAG_UNSAFE.sub("_", value)[:256] or "_"


class SesTransport(QuotaAware):
    """Settings and one boto3 client shared by every worker; the quota is read once per run.

    boto3 clients are thread-safe. One per worker cost ~10 MB and ~25 ms of CPU each (every
    client loads and parses the service model and endpoint rules again); one shared client
    with a connection pool as large as any --workers costs that once.
    """

    allow_utf8_local = False

    def __init__(
        self,
        region: str,
        *,
        configuration_set: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.region = check_region(region)
        self.configuration_set = configuration_set or None
        self.timeout = timeout
        self.url = f"ses://{self.region}"
        self._client: Any = None
        self._client_lock = threading.Lock()

    def open_session(self) -> SesSession:
        return SesSession(self)

    def client(self) -> Any:
        """The workers' shared client, made on first use."""
        with self._client_lock:
            if self._client is None:
                self._client = self.make_client()
            return self._client

    def make_client(self) -> Any:
        from .. import aws

        return aws.client(
            "sesv2",
            region=self.region,
            max_attempts=1,
            max_pool_connections=POOL_CONNECTIONS,
            timeout=self.timeout,
        )

    def close(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()


class SesSession:
    """One worker's use of the shared client (its pool keeps a connection alive per worker)."""

    def __init__(self, transport: SesTransport) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        self.transport = transport
        self.client: Any = transport.client()
        self._errors: tuple[type[Exception], ...] = (ClientError, BotoCoreError)

    def request(self, message: OutgoingMessage) -> dict[str, Any]:
        """The SendEmail parameters for one message."""
        params: dict[str, Any] = {
            "FromEmailAddress": message.sender,
            "Destination": {"ToAddresses": list(message.recipients)},
            "Content": {"Raw": {"Data": message.data}},
        }
        if self.transport.configuration_set:
            params["ConfigurationSetName"] = self.transport.configuration_set
        if message.tags:
            params["EmailTags"] = list(_email_tags(tuple(message.tags.items())))
        return params

    def send(self, message: OutgoingMessage) -> str:
        try:
            answer = self.client.send_email(**self.request(message))
        except self._errors as exc:
            raise classify_client_error(exc, message.sender) from None
        return str(answer.get("MessageId") or message.message_id)

    def close(self) -> None:
        self.client = None  # the transport closes the shared client at the end of the run


def _factory(url: SplitResult, options: TransportOptions) -> SesTransport:
    if not url.hostname:
        raise ConfigError("an SES transport needs a region: ses://REGION, e.g. ses://eu-west-1")
    if url.port or url.path.strip("/") or url.username:
        raise ConfigError(
            f"ses://{url.hostname}{url.path}: expected only a region, e.g. ses://eu-west-1"
        )
    return SesTransport(
        url.hostname, configuration_set=options.configuration_set, timeout=options.timeout
    )


register("ses", _factory)
