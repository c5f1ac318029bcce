"""Amazon SES account limits: the sending quota, the run plan it allows, and sender identities.

SES caps an account twice: a steady rate (MaxSendRate, messages per second) and a rolling
24-hour count (Max24HourSend). The rate feeds the token bucket; the 24-hour count is checked
before a run starts, so a cron job does not send half a list and then hit "Daily message
quota exceeded" in the middle (the rows would stay unsent, but the recipients would get the
mail on different days without anyone having chosen that). SES counts recipients, not
messages: the plan counts each message's envelope recipients (To + Cc + Bcc).

Quota and identity are read with SES v1 `GetSendQuota` (v2 `GetAccount` needs a wider
permission and is not in moto) and SES v2 `GetEmailIdentity` (scoped to one identity ARN in
IAMpolicy.json, unlike v1's identity calls which only take `*`).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

from .errors import EXIT_STOPPED, ConfigError, SmartmailError

SANDBOX_DAILY = 200.0
SANDBOX_RATE = 1.0
SES_SCHEMES = ("ses", "ses+smtp")


class QuotaError(SmartmailError):
    """The run would not fit in what is left of the 24-hour quota; nothing was sent."""


class QuotaExhaustedError(SmartmailError):
    """Nothing is left of the 24-hour quota: same meaning as a provider stop (exit 4)."""

    exit_code = EXIT_STOPPED


@dataclass(frozen=True)
class SendQuota:
    """GetSendQuota's answer. `max_24_hour_send` is -1 for an unlimited account."""

    max_24_hour_send: float
    max_send_rate: float
    sent_last_24_hours: float

    @property
    def unlimited(self) -> bool:
        return self.max_24_hour_send < 0

    @property
    def remaining(self) -> int:
        """Messages (recipients) that may still be sent in the rolling 24 hours."""
        return max(0, int(self.max_24_hour_send - self.sent_last_24_hours))

    @property
    def sandboxed(self) -> bool:
        """The sandbox's tell-tale limits: 200 a day at 1 a second."""
        return self.max_24_hour_send == SANDBOX_DAILY and self.max_send_rate <= SANDBOX_RATE


@runtime_checkable
class QuotaSource(Protocol):
    """A transport that sends through an SES account and can read its quota."""

    region: str

    def send_quota(self) -> SendQuota:
        """The account's quota in the transport's region (cached for the run)."""
        ...


def region_from_url(url: str) -> str:
    """The region of a ses:// or ses+smtp:// URL, with a clear error for anything else."""
    parts = urlsplit(url)
    if parts.scheme not in SES_SCHEMES or not parts.hostname:
        raise ConfigError(f"{url!r} is not an SES transport; use ses://REGION or ses+smtp://REGION")
    return check_region(parts.hostname)


def check_region(region: str) -> str:
    region = region.strip().lower()
    pieces = region.split("-")
    if len(pieces) < 3 or not pieces[-1].isdigit() or not all(p.isalpha() for p in pieces[:-1]):
        raise ConfigError(f"{region!r} is not an AWS region (e.g. us-east-1, eu-west-1)")
    return region


def aws_reason(exc: BaseException) -> str:
    """One line from a botocore error: code and message, never request ids or credentials."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        text = f"{error.get('Code', '')}: {error.get('Message', '')}".strip(": ")
        if text:
            return text
    return str(exc) or type(exc).__name__


def fetch_send_quota(region: str) -> SendQuota:
    """Ask SES for the account's quota; a failure is a pre-flight error naming the cause."""
    from botocore.exceptions import BotoCoreError, ClientError

    from . import aws

    try:
        answer = aws.client("ses", region=region).get_send_quota()
    except (ClientError, BotoCoreError) as exc:
        raise ConfigError(
            f"cannot read the SES sending quota in {region} ({aws_reason(exc)}); "
            "check the AWS credentials and the ses:GetSendQuota permission (IAMpolicy.json)"
        ) from None
    return SendQuota(
        max_24_hour_send=float(answer.get("Max24HourSend", 0.0)),
        max_send_rate=float(answer.get("MaxSendRate", 0.0)),
        sent_last_24_hours=float(answer.get("SentLast24Hours", 0.0)),
    )


def rows_to_send(valid: int, limit: int | None, test_to: str | None) -> int:
    """How many messages a run will send: the engine's own rule for --limit and --test-to."""
    if limit is None:
        limit = 1 if test_to else None
    return valid if limit is None else min(limit, valid)


def plan_limit(to_send: int, quota: SendQuota, *, allow_partial: bool) -> int | None:
    """The --limit the run must have to fit the 24-hour quota (None: it fits as it is).

    Raises QuotaError when it does not fit and partial runs are not allowed, and
    QuotaExhaustedError when nothing at all is left.
    """
    if quota.unlimited or to_send <= quota.remaining:
        return None
    left, cap = quota.remaining, int(quota.max_24_hour_send)
    if left == 0:
        raise QuotaExhaustedError(
            f"the SES 24-hour quota is used up ({cap} of {cap}); nothing was sent, "
            "run again once the rolling 24 hours free some of it"
        )
    if not allow_partial:
        raise QuotaError(
            f"{to_send} messages to send but only {left} of the SES 24-hour quota of {cap} "
            f"are left; nothing was sent (--allow-partial sends {left} now and leaves the "
            "rest for a later run)"
        )
    return left


def plan_recipients(counts: list[int], quota: SendQuota, *, allow_partial: bool) -> int | None:
    """The message limit a run must have so its envelope recipients fit the 24-hour quota.

    `counts` are the envelope recipients (To + Cc + Bcc) of each message to send, in order:
    SES counts every recipient against the quota, not messages. None: it fits as it is.
    Raises QuotaError when it does not fit and partial runs are not allowed (or not even the
    first message fits), and QuotaExhaustedError when nothing at all is left.
    """
    total = sum(counts)
    if quota.unlimited or total <= quota.remaining:
        return None
    left, cap = quota.remaining, int(quota.max_24_hour_send)
    if left == 0:
        raise QuotaExhaustedError(
            f"the SES 24-hour quota is used up ({cap} of {cap}); nothing was sent, "
            "run again once the rolling 24 hours free some of it"
        )
    what = (
        f"{len(counts)} messages to send"
        if total == len(counts)
        else f"{len(counts)} messages to {total} recipients (To, Cc and Bcc each count)"
    )
    fits, used = 0, 0
    for n in counts:
        if used + n > left:
            break
        used += n
        fits += 1
    if not allow_partial or fits == 0:
        hint = (
            f"--allow-partial sends {fits} now and leaves the rest for a later run"
            if fits
            else "not even the first message fits"
        )
        raise QuotaError(
            f"{what} but only {left} of the SES 24-hour quota of {cap} "
            f"are left; nothing was sent ({hint})"
        )
    return fits


@dataclass(frozen=True)
class IdentityStatus:
    """Whether SES lets the account send as `sender`, and through which identity."""

    sender: str
    identity: str | None
    verified: bool
    status: str


def sender_identity(region: str, sender: str) -> IdentityStatus:
    """Check the address identity, then its domain: SES lets the sender send when either is
    verified (a pending address identity does not stop a verified domain)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from . import aws

    client = aws.client("sesv2", region=region)
    domain = sender.rpartition("@")[2].lower()
    found: list[IdentityStatus] = []
    for identity in (sender, domain):
        if not identity:
            continue
        try:
            answer = client.get_email_identity(EmailIdentity=identity)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NotFoundException":
                continue
            raise ConfigError(
                f"cannot check the SES identity {identity} ({aws_reason(exc)})"
            ) from None
        except BotoCoreError as exc:
            raise ConfigError(f"cannot check the SES identity {identity} ({exc})") from None
        status = str(answer.get("VerificationStatus", "UNKNOWN"))
        verified = bool(answer.get("VerifiedForSendingStatus")) or status == "SUCCESS"
        found.append(IdentityStatus(sender, identity, verified, status))
        if verified:
            return found[-1]
    return found[0] if found else IdentityStatus(sender, None, False, "NOT_FOUND")


@dataclass(frozen=True)
class AccountReport:
    """What `smartmail quota` shows."""

    region: str
    quota: SendQuota
    identity: IdentityStatus | None

    @property
    def warnings(self) -> list[str]:
        found: list[str] = []
        if self.quota.sandboxed:
            found.append(
                "the account looks sandboxed (200 a day at 1 a second): SES only delivers to "
                "verified recipients until production access is granted"
            )
        if self.identity is not None and not self.identity.verified:
            found.append(
                f"the sender {self.identity.sender} is not verified in {self.region} "
                f"(neither the address nor its domain): every send would be refused"
            )
        return found

    @property
    def ok(self) -> bool:
        return self.identity is None or self.identity.verified

    def rows(self) -> list[tuple[str, str]]:
        q = self.quota
        cap = "unlimited" if q.unlimited else f"{q.max_24_hour_send:g}"
        rows = [
            ("region", self.region),
            ("max send rate", f"{q.max_send_rate:g} msg/s"),
            ("24-hour quota", cap),
            ("sent in the last 24 hours", f"{q.sent_last_24_hours:g}"),
            ("left", "unlimited" if q.unlimited else str(q.remaining)),
        ]
        if self.identity is not None:
            ident = self.identity
            via = f" (identity {ident.identity}: {ident.status})" if ident.identity else ""
            rows.append(
                ("sender " + ident.sender, ("verified" if ident.verified else "NOT verified") + via)
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "region": self.region,
            "quota": {
                **asdict(self.quota),
                "remaining": None if self.quota.unlimited else self.quota.remaining,
            },
            "sandboxed": self.quota.sandboxed,
            "identity": asdict(self.identity) if self.identity else None,
            "warnings": self.warnings,
        }


def account_report(region: str, sender: str | None = None) -> AccountReport:
    """Quota and (when a sender is given) its identity, for `smartmail quota`."""
    quota = fetch_send_quota(region)
    identity = sender_identity(region, sender) if sender else None
    return AccountReport(region, quota, identity)


class QuotaAware:
    """What both SES transports share: the account quota read once per run, and the rate it sets.

    A subclass sets `region`; the lock makes the first read safe from several threads.
    """

    region: str
    _quota: SendQuota | None = None
    _quota_lock = threading.Lock()

    def send_quota(self) -> SendQuota:
        with self._quota_lock:
            if self._quota is None:
                self._quota = fetch_send_quota(self.region)
            return self._quota

    def forget_quota(self) -> None:
        """Read the quota again next time: for a transport kept across runs (a queue worker,
        a warm Lambda), whose first answer may be hours old."""
        with self._quota_lock:
            self._quota = None

    def default_rate(self) -> float | None:
        rate = self.send_quota().max_send_rate
        return rate if rate > 0 else None
