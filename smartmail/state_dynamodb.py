"""`--state dynamodb://TABLE[?region=…]`: the whole state (ledger, suppression list, feedback)
in one DynamoDB table, behind the calls `send`, `status`, `retry`, `suppress` and `events`
make on the SQLite state.

    state = open_state("dynamodb://smartmail?region=eu-west-1")
    ledger = state.ledger("weekly")            # the engine's Journal
    state.suppressions.add("a@example.com", "manual")
    state.statuses()                            # what `smartmail status` prints
    events.consume(queue_url, state.feedback)   # what `smartmail events` applies

Nothing here knows about Click; the CLI picks this when `--state` is a dynamodb:// URL.
"""

from __future__ import annotations

import time
from typing import Any

from . import dynamo_ledger
from .campaigns import CampaignStatus, Which
from .dynamo import StateTable, StateUrl, is_dynamodb_url
from .dynamo_ledger import ClaimLost, DynamoLedger
from .dynamo_suppression import DynamoFeedback, DynamoSuppressionList
from .ledger import CampaignRecord, Resend
from .sources import Row

__all__ = [
    "ClaimLost",
    "DynamoFeedback",
    "DynamoLedger",
    "DynamoState",
    "DynamoSuppressionList",
    "StateUrl",
    "is_dynamodb_url",
    "open_state",
]


class DynamoState:
    """One state table: its ledgers, suppression list and feedback store."""

    def __init__(self, url: StateUrl, *, client: Any = None, clock: Any = time.time) -> None:
        self.url = url
        self.clock = clock
        self.table = StateTable(url, client)
        self.suppressions = DynamoSuppressionList(self.table, clock)
        self.feedback = DynamoFeedback(self.table, clock)

    def __str__(self) -> str:
        return str(self.url)

    def close(self) -> None:
        """Nothing to release (every write is made when it happens); for symmetry with SQLite."""

    def ensure(self) -> None:
        """Check the table now (creating it when missing) rather than at the first write."""
        self.table.ensure()

    def ledger(self, campaign: str, *, resend: Resend = None) -> DynamoLedger:
        return DynamoLedger(self.table, campaign, resend=resend, clock=self.clock)

    def load(self, campaign: str) -> CampaignRecord | None:
        return dynamo_ledger.load(self.table, campaign)

    def statuses(self, campaign: str | None = None) -> list[CampaignStatus]:
        return dynamo_ledger.statuses(self.table, campaign, clock=self.clock)

    def campaign_ids(self) -> list[str]:
        return dynamo_ledger.campaign_ids(self.table)

    def retry_rows(self, campaign: str, which: Which) -> list[Row]:
        return dynamo_ledger.retry_rows(self.table, campaign, which, clock=self.clock)


def open_state(url: str, *, client: Any = None) -> DynamoState:
    """The state named by a `dynamodb://TABLE[?region=R&lease=S&retention_days=D]` URL.

    Raises ConfigError for anything else (a SQLite path is opened by `state.connect`). The
    table is checked, and created when missing, at its first use.
    """
    return DynamoState(StateUrl.parse(url), client=client)
