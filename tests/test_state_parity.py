"""The same story told to both states gives the same answers: SQLite (one machine) and
DynamoDB (many workers) behind `state_store.open_state`, as `status`, `retry`, `suppress`
and `events` will use them. What differs on purpose (a lock vs a lease for in-doubt rows) is
tested in test_ledger.py and test_dynamo_state.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from moto import mock_aws

from smartmail.events import apply, parse
from smartmail.ledger import CampaignRecord
from smartmail.message import OutgoingMessage
from smartmail.report import Outcome
from smartmail.sources import Row
from smartmail.state_store import open_state

from .aws_helpers import REGION
from .dynamo_helpers import atomic_moto
from .test_events import bounce

__all__ = ["atomic_moto"]


@pytest.fixture(params=["sqlite", "dynamodb"])
def state_url(
    request: pytest.FixtureRequest, tmp_path: Path, aws_env: None, atomic_moto: None
) -> Iterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "state.db")
        return
    with mock_aws():
        yield f"dynamodb://parity-state?region={REGION}"


def msg(address: str, number: int) -> OutgoingMessage:
    row = Row(number, {"email": address, "name": f"N{number}"})
    return OutgoingMessage("n@acme.example", [address], b"x", f"<{number}@a>", address, row)


def story(url: str) -> dict[str, Any]:
    """Send a small campaign with every kind of outcome, then ask what a re-run would do."""
    state = open_state(url)
    ledger = state.ledger("spring")
    ledger.acquire()
    ledger.begin(CampaignRecord("spring", "/lists/spring.csv", "h1", "file://out", {"rate": 3}))
    sent, failed, stopped = (
        msg("a@example.org", 2),
        msg("b@example.org", 3),
        msg("c@example.org", 4),
    )
    skipped = msg("d@example.org", 5)
    for m in (sent, failed, stopped):
        ledger.sending(m)
    ledger.record(Outcome(sent.row, sent.recipient, "sent", message_id="ses-a"))
    ledger.record(Outcome(failed.row, failed.recipient, "failed", "permanent: 550"))
    ledger.record(Outcome(stopped.row, stopped.recipient, "unsent", "interrupted"))
    ledger.record(Outcome(skipped.row, skipped.recipient, "skipped", "invalid: bad"))
    ledger.record(Outcome(sent.row, sent.recipient, "skipped", "late skip"))  # changes nothing
    ledger.close()
    state.suppressions.add("e@example.org", "manual", "asked by phone")
    applied = apply(state.feedback, parse(json.dumps(bounce("ses-a", ["a@example.org"]))))
    again = apply(state.feedback, parse(json.dumps(bounce("ses-a", ["a@example.org"]))))
    rerun = state.ledger("spring")
    retry = state.ledger("spring", resend="failed")
    [status] = state.statuses("spring")
    out: dict[str, Any] = {
        "rerun": {
            m.recipient: rerun.skip_reason(m.recipient, m.row)
            for m in (sent, failed, stopped, skipped, msg("e@example.org", 6))
        },
        "retry": retry.skip_reason(failed.recipient, failed.row),
        "status": {k: v for k, v in status.to_dict().items() if k != "last_run"},
        "record": state.load("spring"),
        "retry_rows": state.retry_rows("spring", "failed"),
        "suppressed": sorted((e.address, e.reason, e.detail) for e in state.suppressions),
        "applied": (applied.suppressed, applied.deliveries, again.duplicates, again.suppressed),
    }
    rerun.close()
    retry.close()
    assert state.suppressions.remove("e@example.org")
    out["after_remove"] = len(state.suppressions)
    return out


def test_both_states_tell_the_same_story(state_url: str) -> None:
    got = story(state_url)
    assert got["rerun"] == {
        "a@example.org": "already sent",
        "b@example.org": "failed before (smartmail retry spring sends it again)",
        "c@example.org": None,
        "d@example.org": None,
        "e@example.org": "suppressed: manual",
    }
    assert got["retry"] is None
    assert got["status"] == {
        "campaign": "spring",
        "source": "/lists/spring.csv",
        "transport": "file://out",
        "running": False,
        "addresses": 4,
        "sent": 1,
        "failed": 1,
        "skipped": 1,
        "pending": 1,
        "in_doubt": 0,
        "in_flight": 0,
        "delivered": 0,
        "bounced": 1,
        "soft_bounced": 0,
        "complained": 0,
    }
    assert got["record"] == CampaignRecord(
        "spring", "/lists/spring.csv", "h1", "file://out", {"rate": 3}
    )
    assert got["retry_rows"] == [Row(3, {"email": "b@example.org", "name": "N3"})]
    assert got["suppressed"] == [
        ("a@example.org", "bounce", "General: smtp; 550 5.1.1 user unknown"),
        ("e@example.org", "manual", "asked by phone"),
    ]
    assert got["applied"] == (1, 1, 1, 0)
    assert got["after_remove"] == 1
