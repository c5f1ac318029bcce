"""One front for either state: `open_state(value)` gives the SQLite file or the DynamoDB table
behind the same calls, so `send`, `status`, `retry`, `suppress` and `events` need not know
which one `--state` named.

    state = open_state(kw["state_path"])        # None, a path, or dynamodb://TABLE[?region=R]
    ledger = state.ledger(campaign, resend=None)  # a Journal with acquire/begin/close
    state.statuses(campaign); state.load(campaign); state.retry_rows(campaign, "failed")
    state.suppressions.add(address, "manual")     # add/remove/reason/get/iter/len/export_csv
    events.consume(queue_url, state.feedback)

The SQLite side only wraps what ledger.py, campaigns.py and suppression.py already do.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import state
from .errors import ConfigError
from .ledger import CampaignRecord, Ledger, Resend
from .sources import Row
from .suppression import SuppressionList

if TYPE_CHECKING:  # imported where used: a SQLite run need not load botocore or events, and
    # a send or dry run not the campaign listing or the DynamoDB URL parser
    from .campaigns import CampaignStatus, Which
    from .events import FeedbackStore, SqliteFeedback
    from .state_dynamodb import DynamoState


class StateStore(Protocol):
    """What the commands need from a state, whichever holds it."""

    def ledger(self, campaign: str, *, resend: Resend = None) -> Any: ...

    def statuses(self, campaign: str | None = None) -> list[CampaignStatus]: ...

    def campaign_ids(self) -> list[str]: ...

    def load(self, campaign: str) -> CampaignRecord | None: ...

    def retry_rows(self, campaign: str, which: Which) -> list[Row]: ...

    @property
    def suppressions(self) -> Any: ...

    @property
    def feedback(self) -> FeedbackStore: ...


class SqliteState:
    """The SQLite state file (one machine), behind the `StateStore` calls.

    `read_only` for a command that only reads: a file of an older schema keeps it (see
    `state.connect`), and a file that does not exist is not made, as it would get this
    smartmail's schema, which an older one refuses; it reads as an empty state.
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, read_only: bool = False
    ) -> None:
        self.path = Path(path) if path is not None else state.default_state_path()
        self.read_only = read_only
        self._conn: sqlite3.Connection | None = None

    def __str__(self) -> str:
        return str(self.path)

    def conn(self) -> sqlite3.Connection:
        """This state's connection (created, with the schema, on first use); one thread."""
        if self._conn is None:
            if self.read_only and not self.path.exists():
                self._conn = state.empty()
            else:
                self._conn = state.connect(self.path, upgrade=not self.read_only)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def ledger(self, campaign: str, *, resend: Resend = None) -> Ledger:
        return Ledger(self.path, campaign, resend=resend)

    def statuses(self, campaign: str | None = None) -> list[CampaignStatus]:
        if not self.path.exists():
            return []
        from . import campaigns

        return campaigns.statuses(self.conn(), self.path, campaign)

    def campaign_ids(self) -> list[str]:
        if not self.path.exists():
            return []
        return [r[0] for r in self.conn().execute("SELECT id FROM campaigns")]

    def load(self, campaign: str) -> CampaignRecord | None:
        from . import campaigns

        return campaigns.load(self.conn(), campaign)

    def retry_rows(self, campaign: str, which: Which) -> list[Row]:
        from . import campaigns

        return campaigns.retry_rows(self.conn(), campaign, which)

    @property
    def suppressions(self) -> SuppressionList:
        return SuppressionList(self.conn())

    @property
    def feedback(self) -> SqliteFeedback:
        from .events import SqliteFeedback

        return SqliteFeedback(self.conn())


def not_there(state: object) -> str:
    """ " (no such file)" for a SQLite state file that does not exist, else "": a mistyped
    --state must not read as an empty state that is really there."""
    path = getattr(state, "path", None)
    return " (no such file)" if isinstance(path, Path) and not path.exists() else ""


def resolve_campaign(state: StateStore, name: str) -> str:
    """The id of the stored campaign `name` names: `name` itself when a campaign has exactly
    that id, else the one campaign whose id `status` prints as `name` (`terminal.printable`),
    so an id holding control or invisible characters can be named by copying what `status`
    shows. `name` unchanged when none does (the caller reports "no campaign"); a ConfigError
    when several do, since picking one could retry the wrong campaign."""
    ids = state.campaign_ids()
    if name in ids:
        return name
    from .terminal import printable

    shown = sorted(i for i in ids if printable(i) == name)
    if len(shown) > 1:
        raise ConfigError(
            f"{len(shown)} campaigns in {state} show as {printable(name)!r} "
            f"({', '.join(repr(i) for i in shown)}); name one with its exact characters"
        )
    return shown[0] if shown else name


def open_state(
    value: str | os.PathLike[str] | None, *, read_only: bool = False
) -> SqliteState | DynamoState:
    """The state `--state` names: dynamodb://TABLE[?…], else a SQLite path (None: the default,
    $SMARTMAIL_STATE or the XDG state directory). `read_only` for a command that only reads:
    a SQLite file stays as the older smartmail can read it (see `SqliteState`)."""
    if value is None:
        value = os.environ.get(state.STATE_ENV) or None
    if value is None:
        return SqliteState(None, read_only=read_only)
    from .dynamo import is_dynamodb_url

    if is_dynamodb_url(str(value)):
        from .state_dynamodb import open_state as open_dynamodb

        return open_dynamodb(str(value))
    return SqliteState(value, read_only=read_only)
