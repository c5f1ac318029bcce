"""The suppression list and SES feedback in the DynamoDB state table (see `smartmail.dynamo`).

Same semantics as the SQLite `SuppressionList`: addresses stored in the key form
(`suppression.key`), the first reason kept, never expired. One item per address
(`pk = S#<address>`) so a lookup is one read anywhere in the table; the sparse index `gsi1`
(`SUPPRESSIONS` / address) lists them in address order for `suppress list` and `export`.
"""

from __future__ import annotations

import contextlib
import csv
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import IO

from botocore.exceptions import ClientError

from .dynamo import (
    GSI,
    SUPPRESSIONS_GSI_PK,
    StateTable,
    code_of,
    n,
    now_iso,
    s,
    suppression_key,
    text,
)
from .events import FEEDBACK_RANK
from .ses_feedback import Feedback, RecipientEvent
from .suppression import EXPORT_COLUMNS, MAX_DETAIL, REASONS, Suppression, key

Clock = Callable[[], float]
_PARALLEL = 8
_CHUNK = 256


def _conditional_failed(exc: ClientError) -> bool:
    return code_of(exc) == "ConditionalCheckFailedException"


class DynamoSuppressionList:
    """The suppression list in a state table; the interface of `suppression.SuppressionList`."""

    def __init__(self, table: StateTable, clock: Clock = time.time) -> None:
        self.table = table
        self.clock = clock

    def add(self, address: str, reason: str, detail: str = "") -> bool:
        """Suppress an address; return False when it already was (the first reason is kept)."""
        if reason not in REASONS:
            raise ValueError(f"reason must be one of {', '.join(REASONS)}")
        self.table.ensure()
        addr = key(address)
        item = {
            **suppression_key(addr),
            "gsi1pk": s(SUPPRESSIONS_GSI_PK),
            "gsi1sk": s(addr),
            "address": s(addr),
            "reason": s(reason),
            "detail": s(detail[:MAX_DETAIL]),
            "created_at": s(now_iso(self.clock())),
        }
        try:
            self.table.call("put_item", Item=item, ConditionExpression="attribute_not_exists(pk)")
        except ClientError as exc:
            if _conditional_failed(exc):
                return False
            raise
        return True

    def remove(self, address: str) -> bool:
        self.table.ensure()
        found = self.table.call(
            "delete_item", Key=suppression_key(key(address)), ReturnValues="ALL_OLD"
        )
        return bool(found.get("Attributes"))

    def reason(self, address: str) -> str | None:
        """Why this address is suppressed, or None when it is not."""
        entry = self.get(address)
        return None if entry is None else entry.reason

    def get(self, address: str) -> Suppression | None:
        self.table.ensure()
        found = self.table.call(
            "get_item", Key=suppression_key(key(address)), ConsistentRead=True
        ).get("Item")
        return None if not found else _entry(found)

    def __iter__(self) -> Iterator[Suppression]:
        self.table.ensure()
        for item in self.table.query(
            IndexName=GSI,
            KeyConditionExpression="gsi1pk = :p",
            ExpressionAttributeValues={":p": s(SUPPRESSIONS_GSI_PK)},
        ):
            yield _entry(item)

    def __len__(self) -> int:
        self.table.ensure()
        return self.table.count(
            IndexName=GSI,
            KeyConditionExpression="gsi1pk = :p",
            ExpressionAttributeValues={":p": s(SUPPRESSIONS_GSI_PK)},
        )

    def add_many(self, entries: Iterable[tuple[str, str, str]]) -> int:
        """Suppress (address, reason, detail) entries; return how many were new.

        One conditional write each (a batch write cannot keep the first reason), several in
        flight at once. Chunks go in file order and an address repeated within a chunk keeps
        its first entry, so the first reason wins as in the SQLite list's `add_many`.
        """
        added = 0
        chunk: dict[str, tuple[str, str, str]] = {}
        with ThreadPoolExecutor(_PARALLEL, thread_name_prefix="smartmail-suppress") as pool:
            for address, reason, detail in entries:
                if reason not in REASONS:
                    raise ValueError(f"reason must be one of {', '.join(REASONS)}")
                chunk.setdefault(key(address), (address, reason, detail))
                if len(chunk) >= _CHUNK:
                    added += sum(pool.map(lambda e: self.add(*e), chunk.values()))
                    chunk = {}
            added += sum(pool.map(lambda e: self.add(*e), chunk.values()))
        return added

    def export_csv(self, out: IO[str]) -> int:
        """Write the list as CSV (email, reason, detail, created_at), as the SQLite list does."""
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(EXPORT_COLUMNS)
        count = 0
        for entry in self:
            writer.writerow((entry.address, entry.reason, entry.detail, entry.created_at))
            count += 1
        return count


def _entry(item: dict[str, object]) -> Suppression:
    return Suppression(
        text(item, "address"), text(item, "reason"), text(item, "detail"), text(item, "created_at")
    )


class DynamoFeedback:
    """The state table as an `events.FeedbackStore`, so `events.apply` (and `smartmail
    events`, and the Lambda feedback handler) act on it with the SQLite rules.

    DynamoDB has no transaction across these items; `apply` keeps the event last and every
    action is idempotent, so a message applied twice (a retry, two consumers) changes
    nothing more than once.
    """

    def __init__(self, table: StateTable, clock: Clock = time.time) -> None:
        self.table = table
        self.clock = clock
        self.suppressions = DynamoSuppressionList(table, clock)

    def transaction(self) -> AbstractContextManager[None]:
        self.table.ensure()
        return contextlib.nullcontext()

    @staticmethod
    def _event_key(fb: Feedback, rcpt: RecipientEvent) -> dict[str, dict[str, str]]:
        return {"pk": s(f"E#{fb.feedback_id}"), "sk": s(f"{fb.type}#{rcpt.address}")}

    def seen(self, fb: Feedback, rcpt: RecipientEvent) -> bool:
        found = self.table.call(
            "get_item",
            Key=self._event_key(fb, rcpt),
            ConsistentRead=True,
            ProjectionExpression="pk",
        )
        return bool(found.get("Item"))

    def suppress(self, address: str, reason: str, detail: str) -> bool:
        return self.suppressions.add(address, reason, detail)

    def mark(self, provider_id: str, recipient: str, feedback: str) -> int:
        """Find the delivery by the provider's message id (index gsi1) and raise its feedback."""
        rank = FEEDBACK_RANK[feedback]
        changed = 0
        for found in self.table.query(
            IndexName=GSI,
            KeyConditionExpression="gsi1pk = :p AND gsi1sk = :r",
            ExpressionAttributeValues={":p": s(f"P#{provider_id}"), ":r": s(recipient)},
        ):
            now = self.clock()
            try:
                self.table.call(
                    "update_item",
                    Key={"pk": found["pk"], "sk": found["sk"]},
                    UpdateExpression=(
                        "SET feedback = :f, feedback_rank = :rank, feedback_at = :now, "
                        "updated_at = :now"
                    ),
                    ConditionExpression=(
                        "attribute_exists(pk) AND "
                        "(attribute_not_exists(feedback_rank) OR feedback_rank <= :rank)"
                    ),
                    ExpressionAttributeValues={
                        ":f": s(feedback),
                        ":rank": n(rank),
                        ":now": s(now_iso(now)),
                    },
                )
            except ClientError as exc:
                if _conditional_failed(exc):
                    continue
                raise
            changed += 1
        return changed

    def record(self, fb: Feedback, rcpt: RecipientEvent) -> bool:
        now = self.clock()
        item = {
            **self._event_key(fb, rcpt),
            "type": s(fb.type),
            "recipient": s(rcpt.address),
            "received_at": s(now_iso(now)),
            "expires_at": self.table.expires(now),
        }
        if fb.provider_id:
            item["provider_id"] = s(fb.provider_id)
        if rcpt.subtype:
            item["subtype"] = s(rcpt.subtype)
        if rcpt.detail:
            item["detail"] = s(rcpt.detail)
        try:
            self.table.call("put_item", Item=item, ConditionExpression="attribute_not_exists(pk)")
        except ClientError as exc:
            if _conditional_failed(exc):
                return False
            raise
        return True
