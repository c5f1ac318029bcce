"""The suppression list: addresses that must never be sent to again, and why.

Fed by permanent bounces and complaints (`smartmail events`), unsubscribes and by hand
(`smartmail suppress`). `send` and `dry-run` skip every suppressed address and count it as
skipped with the reason. Addresses are stored normalised (see `addresses.normalise`), with an
international domain in its IDNA form, because that is the form a rendered recipient has.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, NamedTuple, Protocol

from . import addresses
from .addresses import normalise
from .errors import Location, SourceError
from .records import Described
from .sources import RecipientSource, Row, SourceSpec

if TYPE_CHECKING:  # the engine imports `key`: a dry run with no state file loads no sqlite3
    import sqlite3

REASONS = ("bounce", "complaint", "unsubscribe", "manual")
EXPORT_COLUMNS = ("email", "reason", "detail", "created_at")
_BATCH = 1000
MAX_DETAIL = 500


class Suppression(NamedTuple):
    """One entry of the list (a NamedTuple: immutable, and cheap to define at start-up)."""

    address: str
    reason: str
    detail: str
    created_at: str


def key(address: str) -> str:
    """The stored form of an address: `addresses.normalise`, the same key the ledger uses."""
    return normalise(address)


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
            (key(address), reason, detail[:MAX_DETAIL]),
        )
        return cur.rowcount > 0

    def remove(self, address: str) -> bool:
        cur = self.conn.execute("DELETE FROM suppressions WHERE address = ?", (key(address),))
        return cur.rowcount > 0

    def reason(self, address: str) -> str | None:
        """Why this address is suppressed, or None when it is not."""
        row = self.conn.execute(
            "SELECT reason FROM suppressions WHERE address = ?", (key(address),)
        ).fetchone()
        return None if row is None else str(row[0])

    def reasons(self, addresses: Iterable[str]) -> dict[str, str]:
        """{address as given: reason} for those of `addresses` that are suppressed; one query."""
        wanted: dict[str, list[str]] = {}
        for address in addresses:
            wanted.setdefault(key(address), []).append(address)
        if not wanted:
            return {}
        found: dict[str, str] = {}
        keys = list(wanted)
        for start in range(0, len(keys), _BATCH):  # SQLite caps the number of parameters
            chunk = keys[start : start + _BATCH]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT address, reason FROM suppressions WHERE address IN ({marks})"
            for stored, why in self.conn.execute(sql, chunk):
                for given in wanted[stored]:
                    found[given] = str(why)
        return found

    def get(self, address: str) -> Suppression | None:
        row = self.conn.execute(
            "SELECT address, reason, detail, created_at FROM suppressions WHERE address = ?",
            (key(address),),
        ).fetchone()
        return None if row is None else Suppression(row[0], row[1], row[2], row[3])

    def __iter__(self) -> Iterator[Suppression]:
        for row in self.conn.execute(
            "SELECT address, reason, detail, created_at FROM suppressions ORDER BY address"
        ):
            yield Suppression(row[0], row[1], row[2], row[3])

    def __len__(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM suppressions").fetchone()[0])

    def add_many(self, entries: Iterable[tuple[str, str, str]]) -> int:
        """Suppress (address, reason, detail) entries in batched transactions; return how many
        were new. Batches keep a large import fast without holding the write lock for long."""
        added = 0
        batch: list[tuple[str, str, str]] = []
        for address, reason, detail in entries:
            if reason not in REASONS:
                raise ValueError(f"reason must be one of {', '.join(REASONS)}")
            batch.append((key(address), reason, detail[:MAX_DETAIL]))
            if len(batch) >= _BATCH:
                added += self._insert(batch)
                batch = []
        if batch:
            added += self._insert(batch)
        return added

    def _insert(self, batch: list[tuple[str, str, str]]) -> int:
        sql = "INSERT OR IGNORE INTO suppressions(address, reason, detail) VALUES (?, ?, ?)"
        before = self.conn.total_changes
        if self.conn.in_transaction:
            self.conn.executemany(sql, batch)
        else:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                self.conn.executemany(sql, batch)
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
        return self.conn.total_changes - before

    def export_csv(self, out: IO[str]) -> int:
        """Write the list as CSV (email, reason, detail, created_at); `import_csv` reads it back."""
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(EXPORT_COLUMNS)
        count = 0
        for entry in self:
            writer.writerow((entry.address, entry.reason, entry.detail, entry.created_at))
            count += 1
        return count


class SuppressionStore(Protocol):
    """What `import_csv` needs: the SQLite list or the DynamoDB one (`dynamo_suppression`)."""

    def add_many(self, entries: Iterable[tuple[str, str, str]]) -> int: ...


@dataclass(repr=False, eq=False)
class ImportResult(Described):
    """What an import did. `problems` are one line each, naming file, row and column."""

    rows: int = 0
    added: int = 0
    already: int = 0
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0


def import_csv(
    suppressions: SuppressionStore,
    location: str,
    *,
    column: str = "email",
    reason: str | None = None,
    encoding: str = "utf-8-sig",
    keep_problems: int = 1000,
) -> ImportResult:
    """Suppress every valid address in a CSV (local path or s3://), streamed.

    The reason is `reason` when given, else the row's own `reason` column (so an export reads
    back as it was written), else manual. A bad row (invalid address or reason, ragged) is
    reported and skipped; the good rows are still imported. Importing twice adds nothing.
    """
    if reason is not None and reason not in REASONS:
        raise ValueError(f"reason must be one of {', '.join(REASONS)}")
    source = RecipientSource(SourceSpec(location, encoding=encoding, to_column=column))
    result = ImportResult()

    def problem(row: int, col: str | None, message: str) -> None:
        result.problem_count += 1
        if len(result.problems) < keep_problems:
            result.problems.append(f"{Location(location, row, col)}: {message}")

    def entries() -> Iterator[tuple[str, str, str]]:
        rows = source.rows()
        try:
            for row, ragged in _header_checked(rows, column):
                result.rows += 1
                if ragged:
                    problem(row.number, None, "wrong number of fields for the header")
                    continue
                values = {k.lower(): v for k, v in row.values.items()}
                raw = row.values.get(source.to_column, "")
                try:
                    address = addresses.validate(raw)
                except addresses.AddressError as exc:
                    problem(row.number, source.to_column, str(exc))
                    continue
                why = reason or values.get("reason", "").strip().lower() or "manual"
                if why not in REASONS:
                    problem(row.number, "reason", f"{why!r} is not one of {', '.join(REASONS)}")
                    continue
                yield address, why, values.get("detail", "").strip()
        finally:
            close = getattr(rows, "close", None)
            if close is not None:
                close()

    result.added = suppressions.add_many(entries())
    result.already = result.rows - result.added - result.problem_count
    return result


def _header_checked(rows: Iterator[tuple[Row, bool]], column: str) -> Iterator[tuple[Row, bool]]:
    """Re-raise a missing-column error with the hint for this command (--column)."""
    try:
        yield from rows
    except SourceError as exc:
        where = exc.where
        if isinstance(where, Location) and where.row == 1 and where.column == column:
            raise SourceError(
                where, "no column with this name", "choose the address column with --column"
            ) from None
        raise
