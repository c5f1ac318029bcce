"""The ledger meets SES feedback: the provider ids the ledger stores for an SES send are the ones
SES bounce, complaint and delivery notifications name, so `status` counts the feedback and the
next campaign skips the suppressed addresses. SES is moto (`mock_aws`), in process.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from moto import mock_aws

from smartmail.events import apply
from smartmail.ses_feedback import parse
from smartmail.state import connect

from .aws_helpers import REGION, verify_sender
from .conftest import make_csv
from .test_events import bounce, complaint, delivery
from .test_ledger import run_cli

pytestmark = pytest.mark.usefixtures("aws_env")


@mock_aws
def test_ses_feedback_lands_on_ledger_deliveries_and_suppresses_next_time(
    tmp_path: Path, template_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    verify_sender()
    csv = make_csv(tmp_path / "r.csv", 4)
    db = tmp_path / "state.db"

    def send(campaign: str) -> dict[str, object]:
        report = tmp_path / f"{campaign}.json"
        code, out = run_cli(
            ["send", str(csv), "-t", str(template_file), "--transport", f"ses://{REGION}",
             "--rate", "50", "--state", str(db), "--campaign", campaign, "--yes",
             "--progress", "none", "--report", str(report)]
        )  # fmt: skip
        assert code == 0, out
        data: dict[str, object] = json.loads(report.read_text())
        return data

    assert send("spring")["sent"] == 4
    conn = sqlite3.connect(db)
    ids = dict(conn.execute("SELECT recipient, provider_id FROM deliveries"))
    conn.close()
    assert len(set(ids.values())) == 4  # SES message ids, one per delivery

    state = connect(db)
    for notification in (
        bounce(ids["user0@example.org"], ["user0@example.org"]),
        complaint(ids["user1@example.org"], ["User1@Example.org"]),
        delivery(ids["user2@example.org"], ["user2@example.org"]),
    ):
        apply(state, parse(json.dumps(notification)))
    state.close()

    code, out = run_cli(["status", "spring", "--state", str(db), "--json"])
    assert code == 0
    (spring,) = json.loads(out)
    counts = {k: spring[k] for k in ("sent", "delivered", "bounced", "complained")}
    assert counts == {"sent": 4, "delivered": 1, "bounced": 1, "complained": 1}
    summer = send("summer")
    assert (summer["sent"], summer["skip_reasons"]) == (2, {"suppressed": 2})
