"""Reading the ledger back: campaign counts (`smartmail status`) and the rows `retry` re-sends.

A retry rebuilds its rows from the row values the ledger stored when each row was attempted,
not from the original file: the file may have moved, changed or been an S3 object since, and
the stored values are exactly what the failed message was rendered from. Row numbers stay
those of the original file, so reports still point at the right spreadsheet row.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from .ledger import CampaignRecord
from .lock import CampaignLock
from .sources import RecipientSource, Row, SourceSpec

Which = Literal["failed", "in-doubt"]

_COUNTS = """
SELECT c.id, c.source, c.transport, c.last_run,
       count(d.recipient),
       coalesce(sum(d.status = 'sent'), 0),
       coalesce(sum(d.status = 'failed'), 0),
       coalesce(sum(d.status = 'skipped'), 0),
       coalesce(sum(d.status = 'pending'), 0),
       coalesce(sum(d.status = 'sending'), 0),
       coalesce(sum(d.feedback = 'delivered'), 0),
       coalesce(sum(d.feedback = 'bounced'), 0),
       coalesce(sum(d.feedback = 'soft-bounced'), 0),
       coalesce(sum(d.feedback = 'complained'), 0)
FROM campaigns c LEFT JOIN deliveries d ON d.campaign = c.id
WHERE ? IS NULL OR c.id = ?
GROUP BY c.id
ORDER BY c.last_run DESC, c.id
"""


@dataclass
class CampaignStatus:
    """One campaign's delivery counts. `in_doubt` rows were in flight when a run died;
    while a run holds the campaign (`running`) its `sending` rows are `in_flight` instead."""

    campaign: str
    source: str
    transport: str
    last_run: str | None
    running: bool
    addresses: int
    sent: int
    failed: int
    skipped: int
    pending: int
    in_doubt: int
    in_flight: int
    delivered: int
    bounced: int
    soft_bounced: int
    complained: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def statuses(
    conn: sqlite3.Connection, db_path: str | os.PathLike[str], campaign: str | None = None
) -> list[CampaignStatus]:
    out = []
    for r in conn.execute(_COUNTS, (campaign, campaign)):
        running = CampaignLock(db_path, r[0]).held_elsewhere()
        sending = int(r[9])
        out.append(
            CampaignStatus(
                campaign=r[0],
                source=r[1],
                transport=r[2],
                last_run=r[3],
                running=running,
                addresses=int(r[4]),
                sent=int(r[5]),
                failed=int(r[6]),
                skipped=int(r[7]),
                pending=int(r[8]),
                in_doubt=0 if running else sending,
                in_flight=sending if running else 0,
                delivered=int(r[10]),
                bounced=int(r[11]),
                soft_bounced=int(r[12]),
                complained=int(r[13]),
            )
        )
    return out


def load(conn: sqlite3.Connection, campaign: str) -> CampaignRecord | None:
    """The stored campaign row, or None when the state database has no such campaign."""
    r = conn.execute(
        "SELECT id, source, template_hash, transport, settings FROM campaigns WHERE id = ?",
        (campaign,),
    ).fetchone()
    if r is None:
        return None
    return CampaignRecord(r[0], r[1], r[2], r[3], json.loads(r[4] or "{}"))


def retry_rows(conn: sqlite3.Connection, campaign: str, which: Which) -> list[Row]:
    """The stored rows of the failed (or in-doubt) deliveries, in original row order."""
    # The status written out: the in-doubt query uses the partial index of `sending` rows
    # whatever SQLite version plans it. Failed rows are found by the campaign's key.
    status = "'failed'" if which == "failed" else "'sending'"
    rows = conn.execute(
        "SELECT row_number, row_json FROM deliveries "
        f"WHERE campaign = ? AND status = {status} AND row_json IS NOT NULL "
        "ORDER BY row_number, recipient",
        (campaign,),
    )
    return [Row(int(r[0] or 0), json.loads(r[1])) for r in rows]


class LedgerSource(RecipientSource):
    """A recipient source over rows kept in the ledger; the engine reads it like a CSV."""

    def __init__(self, name: str, rows: list[Row], to_column: str) -> None:
        # Deliberately not calling RecipientSource.__init__: there is no file to check.
        self.spec = SourceSpec(name, to_column=to_column)
        self.name = name
        self._rows = rows
        # Every column any stored row has, in the order first seen: rows stored by runs of
        # different versions of the list need not have the same ones (the failed-rows export
        # writes each row under this header).
        columns = dict.fromkeys(column for row in rows for column in row.values)
        self.columns = list(columns) or [to_column]
        matches = [c for c in self.columns if c.lower() == to_column.lower()]
        self.to_column = matches[0] if matches else to_column

    def rows(self) -> Iterator[tuple[Row, bool]]:
        for row in self._rows:
            yield row, False

    def snapshot(self) -> RecipientSource:
        """The rows are already a private copy, taken from the ledger."""
        return self

    @property
    def reread_in_helper(self) -> bool:
        """The rows are in memory, which a forked helper has a copy of."""
        return True

    @property
    def row_count(self) -> int:
        """How many rows there are (pre-flight's helper is worth it only for many)."""
        return len(self._rows)


def failed_csv_name(source: str) -> str:
    """Where a re-drive export goes by default: SOURCE-STEM.failed.csv in the current folder."""
    stem = Path(source.rstrip("/")).stem or "recipients"
    return f"{stem}.failed.csv"
