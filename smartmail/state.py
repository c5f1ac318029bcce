"""The local state database: one SQLite file holding the send ledger, the suppression list and
the provider feedback (bounces, complaints, deliveries).

Where it lives: `--state PATH`, else $SMARTMAIL_STATE, else
$XDG_STATE_HOME/smartmail/smartmail.db (~/.local/state/smartmail/smartmail.db). WAL mode
so readers never block the writer, and a busy timeout so several threads and processes can
share it. The schema is created on first use; `PRAGMA user_version` records its version.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:  # imported by connect(): a dry run with no state file has nothing to read
    import sqlite3

STATE_ENV = "SMARTMAIL_STATE"
SCHEMA_VERSION = 2

# Statuses of a delivery (one row per campaign and normalised recipient address):
#   pending -> sending -> sent | failed | skipped
# `sending` is written (and committed) before the first attempt; a row still `sending` when no
# run holds the campaign lock was in flight when a process died: it is "in doubt".
# `feedback` is what the provider said later: delivered | bounced | soft-bounced | complained.
SCHEMA = """
CREATE TABLE IF NOT EXISTS campaigns (
    id            TEXT PRIMARY KEY,
    source        TEXT NOT NULL,
    template_hash TEXT NOT NULL DEFAULT '',
    transport     TEXT NOT NULL DEFAULT '',
    settings      TEXT NOT NULL DEFAULT '{}',  -- template paths, non-secret options (JSON)
    created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    last_run      TEXT
);
CREATE TABLE IF NOT EXISTS deliveries (
    campaign     TEXT NOT NULL REFERENCES campaigns(id),
    recipient    TEXT NOT NULL,
    row_number   INTEGER,
    row_json     TEXT,
    status       TEXT NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'skipped')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    message_id   TEXT,
    provider_id  TEXT,
    last_error   TEXT,
    feedback     TEXT CHECK (feedback IN ('delivered', 'bounced', 'soft-bounced', 'complained')),
    feedback_at  TEXT,
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    sent_at      TEXT,
    PRIMARY KEY (campaign, recipient)
);
-- Partial indexes: a send pass inserts a `sending` row and updates it to `sent` in the next
-- commit, a few rows at a time, so every index entry it makes or moves is a page rewritten
-- in the WAL on every commit. Only the rows feedback looks up (sent: a provider id) and
-- the rows a new run must find (in doubt: `sending`) are indexed, and the in-doubt index
-- stays a few pages however large the ledger grows. (Schema 1 indexed every row's status and
-- provider id: about a fifth more WAL writes a message.)
CREATE INDEX IF NOT EXISTS deliveries_provider ON deliveries(provider_id)
    WHERE provider_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS deliveries_sending ON deliveries(campaign) WHERE status = 'sending';
CREATE TABLE IF NOT EXISTS suppressions (
    address    TEXT PRIMARY KEY,
    reason     TEXT NOT NULL CHECK (reason IN ('bounce', 'complaint', 'unsubscribe', 'manual')),
    detail     TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY,
    provider_id TEXT,
    recipient   TEXT,
    type        TEXT NOT NULL,
    subtype     TEXT,
    detail      TEXT,
    feedback_id TEXT,
    received_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (feedback_id, recipient, type)
);
"""


def default_state_path() -> Path:
    """$SMARTMAIL_STATE, else the XDG state directory."""
    env = os.environ.get(STATE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "smartmail" / "smartmail.db"


def sqlite_file(value: str | os.PathLike[str] | None) -> Path | None:
    """The SQLite file a `--state` value names (None: $SMARTMAIL_STATE, else the XDG default),
    or None for a URL (`dynamodb://TABLE`), which `state_store.open_state` resolves."""
    value = value if value is not None else os.environ.get(STATE_ENV) or None
    if value is None:
        return default_state_path()
    return None if "://" in str(value) else Path(value)


def check_creatable(db: Path) -> None:
    """Refuse a state file that `connect` could not create (its folder neither exists nor can
    be made), as opening it would, for a dry run that reads no state yet."""
    folder = db.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        reason = "not a folder" if not folder.is_dir() else "no permission to write"
        raise ConfigError(f"{db}: cannot open the state database ({folder}: {reason})")


_opened: dict[Path, None] = {}  # every state file connect() opened in this process, in order


def opened() -> list[Path]:
    """The state files this process opened: an error from SQLite itself (a damaged file) names
    no file, and the command line's one-line message must."""
    return list(_opened)


def connect(
    path: str | os.PathLike[str] | None = None, *, shared: bool = False, upgrade: bool = True
) -> sqlite3.Connection:
    """Open (creating if needed) the state database, in WAL mode with the schema in place.

    Each thread must use its own connection, unless `shared`: then the caller makes sure only
    one thread at a time uses it (the ledger's writer connection, under its commit lock).
    Without `upgrade` (a command that only reads) a file of an older schema is left as it
    is: an older smartmail refuses a file once upgraded, and every query still works on it,
    as an older schema differs only by its indexes. Nor is a state that holds nothing (no
    file, or an empty one: `touch`ed, or made by `install /dev/null` before the first cron
    run) given one, nor its folder made: it reads as an empty state (`empty()`).
    """
    import sqlite3

    db = Path(path) if path is not None else default_state_path()
    if not upgrade and not db.exists():
        return empty()
    conn: sqlite3.Connection | None = None
    try:
        if upgrade:
            db.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(db, timeout=30.0, isolation_level=None, check_same_thread=not shared)
        conn.row_factory = sqlite3.Row
        # sqlite3 opens any file lazily: `--state recipients.csv` or /dev/null fails only here.
        # Read before WAL mode is set: setting it writes the header into an empty file.
        if not upgrade and _blank(conn):
            _close(conn)
            return empty()
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA foreign_keys=ON")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version < SCHEMA_VERSION and (upgrade or version == 0):
            try:
                _upgrade(conn)
            except sqlite3.OperationalError as exc:
                # A file this user may only read (a copy made read-only, another user's): an
                # older schema differs only by its indexes, so what only reads it still may,
                # as before the upgrade existed; a write fails as it always did.
                if version == 0 or exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_READONLY:
                    raise
    except BaseException as exc:
        _close(conn)
        if isinstance(exc, (OSError, sqlite3.Error)):
            raise ConfigError(f"{db}: cannot open the state database ({exc})") from None
        raise
    _opened[db] = None
    if version > SCHEMA_VERSION:
        _close(conn)
        raise ConfigError(f"{db}: made by a newer smartmail (schema {version}); upgrade smartmail")
    return conn


def _blank(conn: sqlite3.Connection) -> bool:
    """A database with nothing in it (a new or empty file): no schema, no version."""
    # fetchall: a statement left unfinished would hold its read snapshot open, and the
    # connection would not see what other connections commit later (a new suppression).
    ((found,),) = conn.execute("SELECT count(*) FROM sqlite_master").fetchall()
    ((version,),) = conn.execute("PRAGMA user_version").fetchall()
    return bool(found == 0 and version == 0)


def empty() -> sqlite3.Connection:
    """An empty state in memory, for a command that only reads a state file that does not
    exist: making the file would give it this schema, which an older smartmail refuses."""
    import sqlite3

    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.executescript(SCHEMA)
    return conn


def _close(conn: sqlite3.Connection | None) -> None:
    """Close a connection `connect` will not return. Not left to the garbage collector: a
    sqlite3 connection is in a reference cycle (its statement cache), so only a collection
    frees it, and the command line's quick exit (`cli.entry`, `os._exit`) runs none. Its close
    is what removes the -wal and -shm files that opening it in WAL mode made beside the
    database."""
    if conn is not None:
        import sqlite3

        with contextlib.suppress(sqlite3.Error):
            conn.close()


# What schema 2 replaced (see SCHEMA); dropped when a schema 1 database is opened.
_SCHEMA_1_INDEXES = ("deliveries_provider_id", "deliveries_status")


def _upgrade(conn: sqlite3.Connection) -> None:
    """Create the schema, or bring an older one up to date, in one transaction: a process
    opening the file meanwhile waits (busy timeout) and then finds it done. Every statement
    is idempotent, so two processes upgrading at once do no harm."""
    drops = "".join(f"DROP INDEX IF EXISTS {index};" for index in _SCHEMA_1_INDEXES)
    try:
        conn.executescript(
            f"BEGIN IMMEDIATE;{drops}{SCHEMA};PRAGMA user_version={SCHEMA_VERSION};COMMIT;"
        )
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
