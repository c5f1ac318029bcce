"""The shared state in Amazon DynamoDB: one table for many workers, `--state dynamodb://TABLE`.

The SQLite state file serves one machine; workers on many machines (queue workers, Lambda)
need one ledger they all see, with writes that are atomic per item. One DynamoDB table holds
everything, keyed by `pk`/`sk` (string), with one sparse global secondary index `gsi1`:

| item | pk | sk | gsi1pk / gsi1sk |
|---|---|---|---|
| campaign | `CAMPAIGNS` | campaign id | - |
| delivery | `D#<campaign>` | recipient key | `P#<provider id>` / recipient, once sent |
| suppression | `S#<address>` | `S` | `SUPPRESSIONS` / address |
| feedback event | `E#<feedback id>` | `<type>#<recipient>` | - |
| queued job (`workqueue`) | `Q#<campaign>` | `<job id>#<digest>` | - |

Deliveries, campaigns and events carry `expires_at` (epoch seconds; the table's TTL attribute),
set `retention_days` after their last write: a campaign re-run after that sends again.
Suppressions never expire. The table is created on first use when missing (on-demand
capacity, TTL on), as the SQLite file is; deploy/template.yaml declares the same table.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .errors import ConfigError, SmartmailError

SCHEME = "dynamodb"
GSI = "gsi1"
TTL_ATTRIBUTE = "expires_at"
DEFAULT_RETENTION_DAYS = 400
DEFAULT_LEASE_SECONDS = 900
CAMPAIGNS_PK = "CAMPAIGNS"
SUPPRESSIONS_GSI_PK = "SUPPRESSIONS"
_TABLE_NAME = re.compile(r"[A-Za-z0-9_.-]{3,255}\Z")
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d+\Z")
_CONFIG_CODES = {
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "MissingAuthenticationTokenException",
    "ExpiredTokenException",
}

Item = dict[str, Any]
# The table's keys and index, as created on first use; deploy/template.yaml declares the same
# (a test compares them).
TABLE_SCHEMA: dict[str, Any] = {
    "AttributeDefinitions": [
        {"AttributeName": name, "AttributeType": "S"} for name in ("pk", "sk", "gsi1pk", "gsi1sk")
    ],
    "KeySchema": [
        {"AttributeName": "pk", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ],
    "GlobalSecondaryIndexes": [
        {
            "IndexName": GSI,
            "KeySchema": [
                {"AttributeName": "gsi1pk", "KeyType": "HASH"},
                {"AttributeName": "gsi1sk", "KeyType": "RANGE"},
            ],
            # Only what listing suppressions reads: a sent delivery's index entry (found by
            # the provider's message id) stays a few bytes, not a copy of its row.
            "Projection": {
                "ProjectionType": "INCLUDE",
                "NonKeyAttributes": ["address", "reason", "detail", "created_at"],
            },
        }
    ],
}


class StateError(SmartmailError):
    """The DynamoDB state could not be read or written (network, throttling after retries)."""

    exit_code = 1


class TableMissing(ConfigError):
    """The table does not exist (yet)."""


@dataclass(frozen=True)
class StateUrl:
    """`dynamodb://TABLE[?region=R&lease=SECONDS&retention_days=DAYS]`, parsed and checked."""

    table: str
    region: str | None = None
    lease_seconds: int = DEFAULT_LEASE_SECONDS
    retention_days: int = DEFAULT_RETENTION_DAYS

    @classmethod
    def parse(cls, url: str) -> StateUrl:
        parts = urlsplit(url)
        if parts.scheme != SCHEME or not parts.netloc or parts.path not in ("", "/"):
            raise ConfigError(
                f"--state {url!r}: expected dynamodb://TABLE[?region=REGION] "
                "(for example dynamodb://smartmail?region=eu-west-1)"
            )
        if not _TABLE_NAME.match(parts.netloc):
            raise ConfigError(
                f"--state {url!r}: {parts.netloc!r} is not a DynamoDB table name "
                "(3-255 characters: letters, digits, '_', '-', '.')"
            )
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = sorted(set(query) - {"region", "lease", "retention_days"})
        if unknown:
            raise ConfigError(
                f"--state {url!r}: unknown option {unknown[0]!r} "
                "(known: region, lease, retention_days)"
            )
        region = query.get("region") or None
        if region is not None and not _REGION.match(region):
            raise ConfigError(f"--state {url!r}: {region!r} is not an AWS region")
        return cls(
            table=parts.netloc,
            region=region,
            lease_seconds=_positive(url, query, "lease", DEFAULT_LEASE_SECONDS),
            retention_days=_positive(url, query, "retention_days", DEFAULT_RETENTION_DAYS),
        )

    def __str__(self) -> str:
        return f"{SCHEME}://{self.table}" + (f"?region={self.region}" if self.region else "")


def is_dynamodb_url(value: str | None) -> bool:
    """True for a `--state` value naming a DynamoDB table rather than a SQLite file."""
    return bool(value) and str(value).startswith(f"{SCHEME}://")


def _positive(url: str, query: dict[str, str], name: str, default: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"--state {url!r}: {name} must be a positive whole number")
    return int(raw)


# --- attribute values --------------------------------------------------------------------------


def s(value: str) -> dict[str, str]:
    return {"S": value}


def n(value: float) -> dict[str, str]:
    return {"N": str(int(value)) if float(value).is_integer() else repr(float(value))}


def text(item: Item, name: str, default: str = "") -> str:
    value = item.get(name)
    return str(value["S"]) if isinstance(value, dict) and "S" in value else default


def opt_text(item: Item, name: str) -> str | None:
    value = item.get(name)
    return str(value["S"]) if isinstance(value, dict) and "S" in value else None


def number(item: Item, name: str, default: float = 0) -> float:
    value = item.get(name)
    return float(value["N"]) if isinstance(value, dict) and "N" in value else default


def now_iso(clock: float | None = None) -> str:
    """The SQLite state's timestamp format (UTC, milliseconds), so both read the same."""
    moment = datetime.fromtimestamp(time.time() if clock is None else clock, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def code_of(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


# --- the table ---------------------------------------------------------------------------------


class StateTable:
    """One DynamoDB table and a client for it; `ensure()` creates the table when missing.

    Every call goes through `call`, which turns botocore errors into one-line `StateError` /
    `ConfigError` messages without request ids or credentials. Conditional-check failures are
    returned to the caller (`ConditionalCheckFailedException` is an answer here, not an error).
    """

    def __init__(self, url: StateUrl, client: Any = None) -> None:
        self.url = url
        self.name = url.table
        if client is None:
            from . import aws

            # Throttling is ridden out by botocore's own retries, not failed as an outcome.
            client = aws.client("dynamodb", region=url.region, max_attempts=10)
        self.client = client
        self._ready = False
        self._ready_lock = threading.Lock()

    def call(self, operation: str, **request: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        api = "".join(word.title() for word in operation.split("_"))
        try:
            return getattr(self.client, operation)(TableName=self.name, **request)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", "")) or "error"
            if code == "ConditionalCheckFailedException":
                raise
            line = f"{self.url}: DynamoDB {api}: {code} {err.get('Message', '')}".strip()
            if code == "ResourceNotFoundException":
                raise TableMissing(line) from None
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _CONFIG_CODES or status == 403:
                # Credentials or permissions: the set-up is wrong, not the moment (exit 2).
                raise ConfigError(line) from None
            raise StateError(line) from None
        except NoCredentialsError:
            raise ConfigError("no AWS credentials found (environment, profile or role)") from None
        except BotoCoreError as exc:
            raise StateError(f"{self.url}: DynamoDB {api}: {exc}") from None

    def ensure(self) -> None:
        """Check the table once; create it (on-demand, with TTL) when it is missing."""
        with self._ready_lock:
            if not self._ready:
                self._check()
                self._ready = True

    def _check(self) -> None:
        try:
            found = self.call("describe_table")["Table"]
        except TableMissing:
            found = self._create()
        keys = {k["AttributeName"]: k["KeyType"] for k in found.get("KeySchema", [])}
        if keys != {"pk": "HASH", "sk": "RANGE"}:
            raise ConfigError(
                f"{self.url}: the table exists but is not a smartmail state table "
                "(its key must be pk (partition) and sk (sort), both strings)"
            )

    def _create(self) -> Item:
        from botocore.exceptions import WaiterError

        try:
            self.call("create_table", BillingMode="PAY_PER_REQUEST", **TABLE_SCHEMA)
        except StateError as exc:
            # Another worker created it a moment ago: wait for it like our own.
            if "ResourceInUseException" not in str(exc):
                raise
        try:
            self.client.get_waiter("table_exists").wait(
                TableName=self.name, WaiterConfig={"Delay": 2, "MaxAttempts": 60}
            )
        except WaiterError as exc:
            raise StateError(f"{self.url}: the new table did not become ready ({exc})") from None
        try:
            self.call(
                "update_time_to_live",
                TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE},
            )
        except StateError as exc:
            if "already enabled" not in str(exc).lower():
                raise
        table: Item = self.call("describe_table")["Table"]
        return table

    def get_many(self, keys: list[Item]) -> dict[tuple[str, str], Item]:
        """Strongly consistent reads of a few items in one BatchGetItem, by (pk, sk)."""
        from botocore.exceptions import BotoCoreError, ClientError

        request: dict[str, Any] = {"Keys": keys, "ConsistentRead": True}
        found: dict[tuple[str, str], Item] = {}
        for _attempt in range(10):
            try:
                page = self.client.batch_get_item(RequestItems={self.name: request})
            except (ClientError, BotoCoreError) as exc:
                raise StateError(f"{self.url}: DynamoDB BatchGetItem: {exc}") from None
            for item in page.get("Responses", {}).get(self.name, []):
                found[(text(item, "pk"), text(item, "sk"))] = item
            left = page.get("UnprocessedKeys", {}).get(self.name)
            if not left:
                return found
            request = left
            time.sleep(0.05 * (_attempt + 1))
        raise StateError(f"{self.url}: DynamoDB BatchGetItem: keys left unprocessed (throttled)")

    def query(self, **request: Any) -> Iterator[Item]:
        """Every item a Query returns, page after page."""
        while True:
            page = self.call("query", **request)
            yield from page.get("Items", [])
            last = page.get("LastEvaluatedKey")
            if not last:
                return
            request["ExclusiveStartKey"] = last

    def count(self, **request: Any) -> int:
        total = 0
        while True:
            page = self.call("query", Select="COUNT", **request)
            total += int(page.get("Count", 0))
            last = page.get("LastEvaluatedKey")
            if not last:
                return total
            request["ExclusiveStartKey"] = last

    def expires(self, now: float) -> dict[str, str]:
        return n(int(now) + self.url.retention_days * 86400)


def delivery_key(campaign: str, recipient: str) -> Item:
    return {"pk": s(f"D#{campaign}"), "sk": s(recipient)}


def suppression_key(address: str) -> Item:
    return {"pk": s(f"S#{address}"), "sk": s("S")}


def campaign_key(campaign: str) -> Item:
    return {"pk": s(CAMPAIGNS_PK), "sk": s(campaign)}
