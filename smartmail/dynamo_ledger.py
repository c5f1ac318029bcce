"""The send ledger in the DynamoDB state table: no double send across workers and machines.

Same statuses and rules as the SQLite `Ledger` (pending -> sending -> sent | failed | skipped),
but many workers share a campaign at once, so there is no campaign lock. Instead `sending` is
a **claim**: one conditional write that succeeds only when the delivery is new, pending or
skipped (or failed, for `retry`), so of two workers holding the same job exactly one wins
and the other gets `ClaimLost` and must not send. A claim carries a lease
(`lease_until`, `dynamodb://TABLE?lease=SECONDS`, 15 minutes by default): a row still
`sending` after its lease was in flight when its worker died. It is *in doubt*: reported,
never sent again except by `retry --in-doubt`, whose claim may take over an expired lease.
`sent` is never overwritten, and an outcome only moves a row this worker claimed (checked
with its claim token), so a slow worker can never undo another's work.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from botocore.exceptions import ClientError

from . import logs
from .campaigns import CampaignStatus, Which
from .dynamo import (
    CAMPAIGNS_PK,
    Item,
    StateTable,
    campaign_key,
    code_of,
    delivery_key,
    n,
    now_iso,
    number,
    opt_text,
    s,
    suppression_key,
    text,
)
from .errors import AlreadyClaimedError, SmartmailError
from .ledger import (
    CampaignRecord,
    LedgerError,
    Resend,
    in_doubt_reason,
    recipient_key,
    row_json,
)
from .message import OutgoingMessage
from .report import Outcome
from .sources import Row

log = logs.getLogger("smartmail")
Clock = Callable[[], float]
_CHANGEABLE = "attribute_not_exists(pk) OR st IN (:pending, :skipped)"
_ROWS_PER_READ = 50  # a delivery and a suppression key each: BatchGetItem takes 100
HELD = "already being sent"
"""The skip reason of a row another live worker holds (`sending` under an unexpired lease).
A job with such a row is not done: that worker may still give the row back (see
`workqueue.Worker.run_job`). A claim whose lease ran out is in doubt instead."""


class ClaimLost(AlreadyClaimedError):
    """Another worker has claimed (or finished) this delivery: this one must not send it."""

    def __init__(
        self, campaign: str, recipient: str, status: str, *, expired: bool = False
    ) -> None:
        self.recipient = recipient
        self.status = status
        why = {
            "sent": "already sent",
            "sending": in_doubt_reason(campaign) if expired else HELD,
            "failed": f"failed before (smartmail retry {campaign} sends it again)",
        }.get(status, f"already {status}")
        super().__init__(
            f"{recipient}: {why} (campaign {campaign}); not sent by this worker", skip_reason=why
        )


class DynamoLedger:
    """The ledger of one campaign in a state table; implements the engine's `Journal`.

    The methods of the SQLite `Ledger` that the CLI calls (`acquire`, `begin`, `close`,
    context manager) are here too; `acquire` takes no lock, since sharing a campaign between
    workers is the point, and only makes sure the table and the campaign exist.
    """

    def __init__(
        self,
        table: StateTable,
        campaign: str,
        *,
        resend: Resend = None,
        clock: Clock = time.time,
        worker: str | None = None,
    ) -> None:
        self.table = table
        self.path = str(table.url)
        self.campaign = campaign
        self.resend: Resend = resend
        self.clock = clock
        self.lease = table.url.lease_seconds
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # The claims this ledger holds: the token, and the row it claimed for (a later row
        # with the same address, skipped as a duplicate, must not take the claim away).
        # key: (claim token, row number, the delivery's status before the claim; None unknown)
        self._claims: dict[str, tuple[str, int, str | None]] = {}
        self._guard = threading.Lock()
        self._numbers = itertools.count(1)
        self._acquired = False
        # The claim this thread took last and when its lease was last set, for `keep_claim`
        # (the engine claims a row and then waits for its rate slot on the same thread).
        self._local = threading.local()

    # --- lifecycle -------------------------------------------------------------------------

    def acquire(self) -> None:
        """Make sure the table and the campaign item exist; no lock (see the class doc)."""
        self.table.ensure()
        self._acquired = True
        now = self.clock()
        self._update(
            campaign_key(self.campaign),
            "SET #source = if_not_exists(#source, :empty), "
            "created_at = if_not_exists(created_at, :now), updated_at = :now, expires_at = :exp",
            {":empty": s(""), ":now": s(now_iso(now)), ":exp": self.table.expires(now)},
            names={"#source": "source"},
        )

    def begin(self, record: CampaignRecord | None = None) -> None:
        """Create or update the campaign item (None: keep its settings, note this run)."""
        self.table.ensure()
        now = self.clock()
        values: dict[str, Any] = {":now": s(now_iso(now)), ":exp": self.table.expires(now)}
        update = "SET last_run = :now, updated_at = :now, expires_at = :exp"
        names: dict[str, str] = {}
        if record is None:
            update += ", #source = if_not_exists(#source, :empty)"
            values[":empty"] = s("")
        else:
            update += (
                ", #source = :source, template_hash = :hash, transport = :transport, "
                "settings = :settings"
            )
            values.update(
                {
                    ":source": s(record.source),
                    ":hash": s(record.template_hash),
                    ":transport": s(record.transport),
                    ":settings": s(json.dumps(record.settings, sort_keys=True)),
                }
            )
        update += ", created_at = if_not_exists(created_at, :now)"
        names["#source"] = "source"
        self._update(campaign_key(record.id if record else self.campaign), update, values, names)

    def close(self) -> None:
        """Nothing to flush: every write is made when it happens. Safe to call twice."""

    def flush(self) -> None:
        """Nothing queued: every outcome was written when it was recorded (as `Ledger.flush`
        waits for its writer)."""

    def __enter__(self) -> DynamoLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the Journal protocol ----------------------------------------------------------------

    def skip_reason(self, recipient: str, row: Row) -> str | None:
        """One consistent batch read of the delivery and the suppression, then the SQLite
        ledger's rules, with an expired lease in place of "no run holds the lock"."""
        return self.skip_reasons([(recipient, row)])[0]

    def skip_reasons(self, items: Sequence[tuple[str, Row]]) -> list[str | None]:
        """`skip_reason` for many rows, one answer per item, in order: strongly consistent
        BatchGetItem calls of 50 rows (a delivery and a suppression each: the 100 keys one
        call takes). A job's pre-flight and its send pass then make one round trip per 50
        rows instead of one per row (each costs the worker ~1.5 ms of boto3 CPU)."""
        keys = [recipient_key(recipient) for recipient, _row in items]
        wanted = [key for key in dict.fromkeys(keys) if key]  # DynamoDB refuses an empty key
        found = self._read_many(
            [
                item
                for key in wanted
                for item in (delivery_key(self.campaign, key), suppression_key(key))
            ],
            "the ledger",
        )
        deliveries = "D#" + self.campaign
        return [
            self._veto(found.get((deliveries, key)), found.get(("S#" + key, "S"))) for key in keys
        ]

    def _veto(self, delivery: Item | None, suppressed: Item | None) -> str | None:
        status = text(delivery, "st") if delivery else None
        if status == "sent":
            return "already sent"
        if status == "sending" and delivery is not None:
            if not self._expired(delivery):
                return HELD
            if self.resend != "in-doubt":
                return in_doubt_reason(self.campaign)
        if status == "failed" and self.resend != "failed":
            return f"failed before (smartmail retry {self.campaign} sends it again)"
        if suppressed is not None:
            return f"suppressed: {text(suppressed, 'reason')}"
        return None

    def suppressed(self, addresses: Sequence[str]) -> dict[str, str]:
        """Which of a message's other envelope addresses (Cc, Bcc, a second To) are
        suppressed: {address as given: reason}, as the SQLite ledger answers. Only the
        suppression list applies to them, never the campaign's deliveries (a Cc may rightly
        be copied on many rows' messages)."""
        wanted: dict[str, list[str]] = {}
        for address in addresses:
            addr = recipient_key(address)
            if addr:  # DynamoDB refuses an empty key
                wanted.setdefault(addr, []).append(address)
        items = self._read_many([suppression_key(k) for k in wanted], "the suppression list")
        found: dict[str, str] = {}
        for addr, given in wanted.items():
            item = items.get(("S#" + addr, "S"))
            if item is not None:
                for address in given:
                    found[address] = text(item, "reason")
        return found

    def _read_many(self, keys: list[Item], what: str) -> dict[tuple[str, str], Item]:
        """Strongly consistent BatchGetItem calls of at most 100 keys (what one call takes),
        by (pk, sk); a failure is a LedgerError saying `what` could not be read."""
        found: dict[tuple[str, str], Item] = {}
        try:
            self.table.ensure()
            for start in range(0, len(keys), 2 * _ROWS_PER_READ):
                found.update(self.table.get_many(keys[start : start + 2 * _ROWS_PER_READ]))
        except SmartmailError as exc:
            raise LedgerError(f"cannot read {what}: {exc}") from None
        return found

    def sending(self, message: OutgoingMessage) -> None:
        """Claim the delivery before the first attempt, or raise `ClaimLost` (do not send)."""
        if not self._acquired:
            # Library users may never call acquire(); deliveries still need their campaign.
            self.acquire()
        key = recipient_key(message.recipient)
        token = f"{self.worker}#{next(self._numbers)}"
        now = self.clock()
        condition = _CHANGEABLE
        values: dict[str, Any] = {":pending": s("pending"), ":skipped": s("skipped")}
        if self.resend == "failed":
            condition += " OR st = :failed"
            values[":failed"] = s("failed")
        elif self.resend == "in-doubt":
            condition += " OR (st = :sending AND lease_until < :clock)"
            values[":clock"] = n(now)
        values.update(
            {
                ":sending": s("sending"),
                ":zero": n(0),
                ":one": n(1),
                ":mid": s(message.message_id or ""),
                ":row": n(message.row.number),
                ":json": s(row_json(message.row)),
                ":token": s(token),
                ":lease": n(now + self.lease),
                ":now": s(now_iso(now)),
                ":exp": self.table.expires(now),
            }
        )
        before: str | None = None  # unknown, unless the write says
        try:
            answer = self.table.call(
                "update_item",
                Key=delivery_key(self.campaign, key),
                UpdateExpression=(
                    "SET st = :sending, attempts = if_not_exists(attempts, :zero) + :one, "
                    "message_id = :mid, row_no = :row, row_json = :json, claim = :token, "
                    "lease_until = :lease, updated_at = :now, "
                    "created_at = if_not_exists(created_at, :now), expires_at = :exp"
                ),
                ConditionExpression=condition,
                ExpressionAttributeValues=values,
                ReturnValues="UPDATED_OLD",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
            # What it was: a row this run then does not attempt goes back to that (`record`).
            # No old attributes: a new row. Old ones without `st`: it did not change, so it
            # was `sending` (an implementation may leave an unchanged attribute out).
            old_values = answer.get("Attributes") or {}
            before = text(old_values, "st") or ("sending" if old_values else "pending")
        except ClientError as exc:
            if code_of(exc) != "ConditionalCheckFailedException":
                raise
            old: Item = dict(exc.response.get("Item") or {})  # type: ignore[call-overload]
            if not old:
                old = self._read(key)
            if text(old, "claim") != token:
                raise self._lost(key, old) from None
            # Our own claim: botocore retried a write whose first try was applied and whose
            # answer was lost. The token is unique to this attempt, so the row is ours.
        except SmartmailError as exc:
            raise LedgerError(str(exc)) from None
        with self._guard:
            self._claims[key] = (token, message.row.number, before)
        self._local.held = (key, token, now)

    def keep_claim(self) -> None:
        """Called after each wait between the claim and a send (the rate slot, a retry's
        backoff), on the claiming thread: once half the lease has gone by, renew it, on
        condition that the claim is still ours. A claim that ran out and was taken over
        meanwhile (`retry --in-doubt`) raises `ClaimLost`: the row is someone else's now,
        and sending it too would be a double send. Costs nothing until half a lease has
        passed, which a send rarely waits."""
        held = getattr(self._local, "held", None)
        if held is None:
            return
        key, token, renewed = held
        now = self.clock()
        if now - renewed < self.lease / 2:
            return
        try:
            self.table.call(
                "update_item",
                Key=delivery_key(self.campaign, key),
                UpdateExpression="SET lease_until = :lease, updated_at = :now",
                ConditionExpression="st = :sending AND claim = :token",
                ExpressionAttributeValues={
                    ":sending": s("sending"),
                    ":token": s(token),
                    ":lease": n(now + self.lease),
                    ":now": s(now_iso(now)),
                },
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as exc:
            if code_of(exc) != "ConditionalCheckFailedException":
                self._not_renewed(renewed, now, f"{self.path}: could not renew a claim ({exc})")
                return
            self._local.held = None
            old: Item = dict(exc.response.get("Item") or {})  # type: ignore[call-overload]
            if not old:
                old = self._read(key)
            raise self._lost(key, old) from None
        except SmartmailError as exc:
            self._not_renewed(renewed, now, str(exc))
            return
        self._local.held = (key, token, now)

    def _not_renewed(self, renewed: float, now: float, problem: str) -> None:
        """A renewal the state did not write (throttled, unreachable). While a quarter of the
        lease last written is left, the claim is still ours: the row is sent, and the next
        wait tries again. (Raising would record it `failed`, unsent, for a manual retry.)
        Past that, another process may take the row over any moment: LedgerError."""
        if now < renewed + self.lease * 3 / 4:
            log.warning("%s; the claim's lease still runs, so the row is sent", problem)
            return
        raise LedgerError(problem)

    def record(self, outcome: Outcome) -> None:
        key = recipient_key(outcome.recipient)
        if not key:
            return
        with self._guard:
            claim = self._claims.get(key)
            token, before = None, None
            if claim is not None and claim[1] == outcome.row.number:
                token, _number, before = self._claims.pop(key)
        held = getattr(self._local, "held", None)
        if held is not None and held[0] == key:
            self._local.held = None
        now = self.clock()
        stamp = {":now": s(now_iso(now)), ":exp": self.table.expires(now)}
        row = {":row": n(outcome.row.number), ":json": s(row_json(outcome.row))}
        dkey = delivery_key(self.campaign, key)
        common = "updated_at = :now, expires_at = :exp"
        born = "created_at = if_not_exists(created_at, :now)"
        keep_row = "row_no = if_not_exists(row_no, :row), row_json = if_not_exists(row_json, :json)"
        if outcome.status == "sent":
            values: dict[str, Any] = {**stamp, **row, ":sent": s("sent")}
            update = f"SET st = :sent, sent_at = :now, {common}, {born}, {keep_row}"
            if outcome.message_id:
                # The provider's id finds this delivery again when SES feedback arrives.
                values.update(
                    {
                        ":pid": s(outcome.message_id),
                        ":gpk": s(f"P#{outcome.message_id}"),
                        ":gsk": s(key),
                    }
                )
                update += ", provider_id = :pid, gsi1pk = :gpk, gsi1sk = :gsk"
            self._update(dkey, update + " REMOVE claim, lease_until, last_error", values)
            return
        why = {":why": s(outcome.reason)}
        changeable = {":pending": s("pending"), ":skipped": s("skipped")}
        if outcome.status == "failed":
            values = {**stamp, **row, **why, ":failed": s("failed")}
            update = (
                f"SET st = :failed, last_error = :why, {common}, {born}, {keep_row} "
                "REMOVE claim, lease_until"
            )
            if token is not None:
                condition = "claim = :token"
                values[":token"] = s(token)
            else:
                # Never over a row another worker holds, or one that was sent.
                condition = _CHANGEABLE + " OR st = :failed"
                values.update(changeable)
        elif outcome.status == "skipped":
            values = {**stamp, **row, **why, **changeable}
            update = (
                f"SET st = :skipped, last_error = :why, row_no = :row, row_json = :json, "
                f"{common}, {born}"
            )
            condition = _CHANGEABLE
        elif outcome.status == "in-doubt":
            # The provider may hold the message: the row stays `sending`, its lease ended now,
            # so it is in doubt at once and only `retry --in-doubt` sends it again.
            values = {**stamp, **why, ":sending": s("sending"), ":zero": n(0)}
            update = f"SET last_error = :why, lease_until = :zero, {common}"
            condition = "st = :sending"
            if token is not None:
                condition += " AND claim = :token"
                values[":token"] = s(token)
        elif token is not None and self.resend == "in-doubt" and before in ("sending", None):
            # Claimed by a `retry --in-doubt` and not attempted: in doubt again, at once, for
            # the next one (as the SQLite ledger's `_put_back`), its own reason kept. Only a row
            # that was in doubt (or may have been: the write's answer was lost): a `pending`
            # one it took (put back by another run meanwhile) goes back to pending.
            values = {**stamp, ":zero": n(0), ":token": s(token)}
            update = f"SET lease_until = :zero, {common}"
            condition = "claim = :token"
        elif token is not None and self.resend == "failed" and before == "failed":
            # A `retry`'s row not attempted: failed again, its own error kept, for the next.
            values = {**stamp, ":failed": s("failed"), ":token": s(token)}
            update = f"SET st = :failed, {common} REMOVE claim, lease_until"
            condition = "claim = :token"
        elif token is not None:
            values = {**stamp, **why, ":pending": s("pending"), ":token": s(token)}
            update = f"SET st = :pending, last_error = :why, {common} REMOVE claim, lease_until"
            condition = "claim = :token"
        else:
            values = {**stamp, **row, **why, ":pending": s("pending")}
            update = (
                f"SET st = :pending, last_error = :why, row_no = :row, row_json = :json, "
                f"{common}, {born}"
            )
            condition = "attribute_not_exists(pk)"
        self._update(dkey, update, values, condition=condition)

    # --- helpers -----------------------------------------------------------------------------

    def _read(self, key: str) -> Item:
        """The delivery as it is now (strongly consistent); {} when there is none."""
        try:
            found = self.table.call(
                "get_item", Key=delivery_key(self.campaign, key), ConsistentRead=True
            ).get("Item")
        except SmartmailError as exc:
            raise LedgerError(str(exc)) from None
        return dict(found or {})

    def _expired(self, delivery: Item) -> bool:
        return number(delivery, "lease_until") < self.clock()

    def _lost(self, key: str, old: Item) -> ClaimLost:
        """The `ClaimLost` for a delivery found as `old`: held by another worker while its
        lease runs, in doubt once it ran out (that worker is gone; nothing will give it back)."""
        status = text(old, "st", "sending")
        expired = status == "sending" and "lease_until" in old and self._expired(old)
        return ClaimLost(self.campaign, key, status, expired=expired)

    def _update(
        self,
        key: Item,
        update: str,
        values: dict[str, Any],
        names: dict[str, str] | None = None,
        *,
        condition: str | None = None,
    ) -> bool:
        """One UpdateItem; False when its condition did not hold (the row was not ours)."""
        request: dict[str, Any] = {
            "Key": key,
            "UpdateExpression": update,
            "ExpressionAttributeValues": values,
        }
        if names:
            request["ExpressionAttributeNames"] = names
        if condition:
            request["ConditionExpression"] = condition
        try:
            self.table.call("update_item", **request)
        except ClientError as exc:
            if code_of(exc) == "ConditionalCheckFailedException":
                return False
            raise LedgerError(f"{self.path}: could not record to the ledger ({exc})") from None
        except SmartmailError as exc:
            raise LedgerError(f"could not record to the ledger: {exc}") from None
        return True


# --- reading the ledger back (status, retry) ------------------------------------------------


def load(table: StateTable, campaign: str) -> CampaignRecord | None:
    """The stored campaign, or None when the table has no such campaign."""
    table.ensure()
    item = table.call("get_item", Key=campaign_key(campaign), ConsistentRead=True).get("Item")
    return None if not item else _record(item)


def _record(item: Item) -> CampaignRecord:
    return CampaignRecord(
        text(item, "sk"),
        text(item, "source"),
        text(item, "template_hash"),
        text(item, "transport"),
        json.loads(text(item, "settings") or "{}"),
    )


def statuses(
    table: StateTable, campaign: str | None = None, *, clock: Clock = time.time
) -> list[CampaignStatus]:
    """Each campaign's counts, most recent run first, as `campaigns.statuses` gives them.

    A campaign is `running` while any of its claims holds an unexpired lease; those rows are
    `in_flight`, and the expired ones `in_doubt`. Counting reads the campaign's deliveries
    (a few attributes each); DynamoDB keeps no running totals that could drift.
    """
    table.ensure()
    if campaign is not None:
        found = table.call("get_item", Key=campaign_key(campaign)).get("Item")
        items = [found] if found else []
    else:
        items = list(
            table.query(
                KeyConditionExpression="pk = :p", ExpressionAttributeValues={":p": s(CAMPAIGNS_PK)}
            )
        )
    now = clock()
    out = [_status(table, item, now) for item in items]
    out.sort(key=lambda c: c.campaign)
    out.sort(key=lambda c: c.last_run or "", reverse=True)
    return out


def campaign_ids(table: StateTable) -> list[str]:
    """Every stored campaign's id, from the campaign items alone (no delivery is read)."""
    table.ensure()
    items = table.query(
        KeyConditionExpression="pk = :p",
        ExpressionAttributeValues={":p": s(CAMPAIGNS_PK)},
        ProjectionExpression="sk",
    )
    return [text(item, "sk") for item in items]


def _status(table: StateTable, item: Item, now: float) -> CampaignStatus:
    counts: dict[str, int] = {}
    name = text(item, "sk")
    for d in table.query(
        KeyConditionExpression="pk = :p",
        ExpressionAttributeValues={":p": s(f"D#{name}")},
        ProjectionExpression="st, lease_until, feedback",
    ):
        status = text(d, "st")
        if status == "sending":
            status = "in_flight" if number(d, "lease_until") >= now else "in_doubt"
        counts[status] = counts.get(status, 0) + 1
        feedback = opt_text(d, "feedback")
        if feedback:
            counts[f"fb:{feedback}"] = counts.get(f"fb:{feedback}", 0) + 1
    return CampaignStatus(
        campaign=name,
        source=text(item, "source"),
        transport=text(item, "transport"),
        last_run=opt_text(item, "last_run"),
        running=counts.get("in_flight", 0) > 0,
        addresses=sum(v for k, v in counts.items() if not k.startswith("fb:")),
        sent=counts.get("sent", 0),
        failed=counts.get("failed", 0),
        skipped=counts.get("skipped", 0),
        pending=counts.get("pending", 0),
        in_doubt=counts.get("in_doubt", 0),
        in_flight=counts.get("in_flight", 0),
        delivered=counts.get("fb:delivered", 0),
        bounced=counts.get("fb:bounced", 0),
        soft_bounced=counts.get("fb:soft-bounced", 0),
        complained=counts.get("fb:complained", 0),
    )


def retry_rows(
    table: StateTable, campaign: str, which: Which, *, clock: Clock = time.time
) -> list[Row]:
    """The stored rows of the failed (or in-doubt: lease expired) deliveries, in row order."""
    table.ensure()
    values: dict[str, Any] = {":p": s(f"D#{campaign}")}
    if which == "failed":
        condition = "st = :failed"
        values[":failed"] = s("failed")
    else:
        condition = "st = :sending AND lease_until < :clock"
        values.update({":sending": s("sending"), ":clock": n(clock())})
    found = [
        (int(number(d, "row_no")), text(d, "sk"), text(d, "row_json"))
        for d in table.query(
            KeyConditionExpression="pk = :p",
            FilterExpression=condition + " AND attribute_exists(row_json)",
            ExpressionAttributeValues=values,
            ProjectionExpression="sk, row_no, row_json",
        )
    ]
    found.sort()
    return [Row(number_, json.loads(values_)) for number_, _key, values_ in found]


class ClaimKeepingLimiter:
    """A run's rate limiter that, after each wait for a slot, lets the ledger renew the
    claim the waiting thread holds (`DynamoLedger.keep_claim`): the engine claims a row
    before it waits for its slot, and that wait (workers / rate seconds, longer once SES
    throttles) must not outlast the claim's lease unnoticed."""

    def __init__(self, limiter: Any, keep_claim: Callable[[], None]) -> None:
        self._limiter = limiter
        self._keep_claim = keep_claim

    def acquire(self) -> float:
        waited = float(self._limiter.acquire())
        self._keep_claim()
        return waited

    def __getattr__(self, name: str) -> Any:
        return getattr(self._limiter, name)
