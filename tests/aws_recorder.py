"""pytest plugin: record every AWS operation smartmail's own clients make during the test run.

It hooks `smartmail.aws.CLIENT_HOOKS`, so only clients made by smartmail are watched (test
set-up clients made directly with boto3 are not), and registers a botocore `before-call`
handler on each. At the end of the session every recorded operation must map to an action
IAMpolicy.json allows; if one does not, the run fails, whatever order the tests ran in.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest

from smartmail import aws

from .iam import not_allowed


class OperationRecorder:
    """Counts (signing name, operation) for every call made on a watched client."""

    def __init__(self) -> None:
        self.calls: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def watch(self, client: Any) -> None:
        client.meta.events.register("before-call", self._record)

    def _record(self, model: Any, **_: Any) -> None:
        key = (str(model.service_model.signing_name), str(model.name))
        with self._lock:
            self.calls[key] += 1


RECORDER = OperationRecorder()


def pytest_configure(config: pytest.Config) -> None:
    if RECORDER.watch not in aws.CLIENT_HOOKS:
        aws.CLIENT_HOOKS.append(RECORDER.watch)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    missing = not_allowed(RECORDER.calls)
    if missing:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = ["AWS calls made by smartmail that IAMpolicy.json does not allow:", *missing]
        if reporter is not None:
            reporter.write_line("\n".join(lines), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if RECORDER.calls:
        calls = ", ".join(f"{s}:{op} x{n}" for (s, op), n in sorted(RECORDER.calls.items()))
        terminalreporter.write_line(
            f"AWS operations made by smartmail (checked against IAMpolicy.json): {calls}"
        )
