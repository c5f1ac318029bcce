"""The suppression list: addresses that must never be sent to again, and why.

Fed by permanent bounces and complaints (`smartmail events`), unsubscribes and by hand
(`smartmail suppress`). `send` and `dry-run` skip every suppressed address and count it as
skipped with the reason. Addresses are stored normalised (see `addresses.normalise`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

from .addresses import normalise

REASONS = ("bounce", "complaint", "unsubscribe", "manual")


@dataclass(frozen=True)
class Suppression:
    address: str
    reason: str
    detail: str
    created_at: str


class SuppressionList:
    """Reads and writes the `suppressions` table of a state database connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def add(self, address: str, reason: str, detail: str = "") -> bool:
        """Suppress an address; return False when it already was (the first reason is kept)."""
        if reason not in REASONS:
            raise ValueError(f"reason must be one of {', '.join(REASONS)}")
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO suppressions(address, reason, detail) VALUES (?, ?, ?)",
            (normalise(address), reason, detail),
        )
        return cur.rowcount > 0

    def remove(self, address: str) -> bool:
        cur = self.conn.execute("DELETE FROM suppressions WHERE address = ?", (normalise(address),))
        return cur.rowcount > 0

    def reason(self, address: str) -> str | None:
        """Why this address is suppressed, or None when it is not."""
        row = self.conn.execute(
            "SELECT reason FROM suppressions WHERE address = ?", (normalise(address),)
        ).fetchone()
        return None if row is None else str(row[0])

    def __iter__(self) -> Iterator[Suppression]:
        for row in self.conn.execute(
            "SELECT address, reason, detail, created_at FROM suppressions ORDER BY address"
        ):
            yield Suppression(row[0], row[1], row[2], row[3])

    def __len__(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM suppressions").fetchone()[0])
