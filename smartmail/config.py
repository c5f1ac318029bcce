"""What a campaign is: `CampaignConfig` (campaign-wide, stored with the campaign) and
`RunOptions` (one run's, never stored).

The ledger keeps a campaign's config as versioned JSON so `retry`, and any later worker, sends
the same way; settings stored before this existed (`send`'s Click keyword arguments) are
migrated on read. Light on purpose: the CLI imports it to declare its options.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from .errors import ConfigError
from .records import Record

CONFIG_VERSION = 1
ON_INVALID = ("skip", "abort")
ON_MALFORMED = ("abort", "skip")
ON_DUPLICATE = ("once", "all", "abort")
SMTP_SECURITY = ("starttls", "tls", "none")
Resend = Literal["failed", "in-doubt"]


@dataclass(repr=False, eq=False)
class CampaignConfig(Record):
    """Everything campaign-wide that a send needs; what the ledger stores for `retry`.

    Never a secret: the SMTP password is given to each run (`Secrets`, or the
    environment in the CLI). Paths are stored absolute by `resolved()`, so a retry from
    another folder finds the same template.
    """

    template: str
    source: str | None = None
    transport: str | None = None
    campaign: str | None = None
    html_template: str | None = None
    attachments_dir: str | None = None
    encoding: str = "utf-8-sig"
    delimiter: str | None = None
    to_column: str = "email"
    unsubscribe_url: str | None = None
    unsubscribe_mailto: str | None = None
    smtp_security: str = "starttls"
    smtp_user: str | None = None
    smtp_ca_file: str | None = None
    timeout: float = 30.0
    messages_per_connection: int = 1000
    configuration_set: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    workers: int = 4
    rate: float | None = None
    """This process's messages/second; None: the transport's default (SES: the account's
    MaxSendRate) divided by `expected_workers`."""
    expected_workers: int = 1
    """How many processes (machines, queue workers, Lambda senders) share the provider's
    account rate at once; each takes 1/N of it when `rate` is not given."""
    burst: int = 1
    max_retries: int = 3
    retry_wait: float = 1.0
    on_invalid: str = "skip"
    on_malformed: str = "abort"
    on_duplicate: str = "once"
    allow_partial: bool = False
    max_connect_failures: int = 5
    allow_plaintext_auth: bool = False
    version: int = CONFIG_VERSION

    def check(self) -> None:
        """Refuse values no run could use, with the option's name as the CLI spells it."""
        for name, value, allowed in (
            ("--on-invalid", self.on_invalid, ON_INVALID),
            ("--on-malformed", self.on_malformed, ON_MALFORMED),
            ("--on-duplicate", self.on_duplicate, ON_DUPLICATE),
            ("--smtp-security", self.smtp_security, SMTP_SECURITY),
        ):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}")
        if not 1 <= self.workers <= 256:
            raise ConfigError("--workers must be between 1 and 256")
        # `not x > 0`, not `x <= 0`: NaN passes every comparison (Click's range check too).
        if self.rate is not None and not 0 < self.rate < math.inf:
            raise ConfigError("--rate must be a number more than 0")
        if not isinstance(self.expected_workers, int) or self.expected_workers < 1:
            raise ConfigError("--expected-workers must be a whole number, at least 1")
        if self.burst < 1:
            raise ConfigError("--burst must be at least 1")
        if self.max_retries < 0 or not self.retry_wait >= 0:
            raise ConfigError("--max-retries and --retry-wait must be numbers, not negative")
        if self.max_connect_failures < 1:
            raise ConfigError("--max-connect-failures must be at least 1")
        if not self.timeout > 0:
            raise ConfigError("--timeout must be a number more than 0 seconds")
        if self.delimiter is not None and len(self.delimiter) != 1:
            raise ConfigError("--delimiter must be one character (use $'\\t' for a tab)")

    def resolved(self) -> CampaignConfig:
        """The same config with local paths made absolute (what is stored)."""
        changes: dict[str, Any] = {}
        for name in ("template", "html_template", "attachments_dir", "smtp_ca_file"):
            value = getattr(self, name)
            if value:
                changes[name] = os.path.abspath(value)
        if self.source and not self.source.startswith("s3://"):
            changes["source"] = os.path.abspath(self.source)
        return dataclasses.replace(self, **changes)

    def replace(self, **changes: Any) -> CampaignConfig:
        """A copy with some fields changed; `None` values leave a field as it is."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the ledger's `settings`); every field, `version` included."""
        data = dataclasses.asdict(self)
        data["tags"] = dict(self.tags)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, campaign: str | None = None) -> CampaignConfig:
        """Read a stored config, migrating the settings of campaigns sent before it existed.

        Unknown keys are ignored (a newer smartmail may add fields); a newer `version` than
        this one understands is refused rather than half-read.
        """
        data = dict(data)
        version = data.get("version")
        if version is None:
            data = _migrate_v0(data)
        elif not isinstance(version, int) or version > CONFIG_VERSION:
            raise ConfigError(
                f"campaign settings of version {version!r} were stored by a newer smartmail; "
                "upgrade smartmail"
            )
        if not data.get("template"):
            raise ConfigError(
                f"campaign {campaign or data.get('campaign')!r} has no stored template and "
                "options (it was not sent by `smartmail send`); send it again with "
                "`smartmail send`"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["tags"] = dict(values.get("tags") or {})
        values["version"] = CONFIG_VERSION
        if campaign is not None:
            values["campaign"] = campaign
        return cls(**values)


# Click parameter names of `send` (stored as the settings before CampaignConfig) -> field names.
_V0_NAMES = {"template_path": "template", "transport_url": "transport"}


def _migrate_v0(old: dict[str, Any]) -> dict[str, Any]:
    """Settings stored as `send`'s Click keyword arguments (no version): rename and convert."""
    new: dict[str, Any] = {}
    for key, value in old.items():
        new[_V0_NAMES.get(key, key)] = value
    tags = old.get("tags") or []
    if isinstance(tags, list):
        new["tags"] = parse_tags(tags)
    return new


def parse_tags(pairs: Iterable[str]) -> dict[str, str]:
    """KEY=VALUE strings (`--tag`) into a dict, with a one-line error for a malformed one."""
    tags: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ConfigError(f"--tag {pair!r}: expected KEY=VALUE")
        tags[key] = value
    return tags


class RunOptions(NamedTuple):
    """What belongs to one run, never stored with the campaign. (A NamedTuple, immutable:
    a dataclass costs every start-up the compiling of its generated methods.)"""

    limit: int | None = None
    test_to: str | None = None
    report_path: str | None = None
    failed_csv: str | None = None
    """Where failed and unsent rows go; default SOURCE-STEM.failed.csv in the current folder."""
    state_path: str | None = None
    """The state: a SQLite file or `dynamodb://TABLE[?region=R]` (`state_store.open_state`);
    default $SMARTMAIL_STATE or the XDG state folder."""
    no_state: bool = False
    resend: Resend | None = None
    """Retry mode: send the campaign's failed (or in-doubt) rows again, from the ledger."""
    preview: int = 0
