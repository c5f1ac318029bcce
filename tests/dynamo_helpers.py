"""Set-up for the DynamoDB state tests: moto with DynamoDB's per-item atomicity.

DynamoDB evaluates a condition and applies the write as one atomic step per item. moto does
not lock: two threads of its server can both pass a condition before either writes. The
property under test is smartmail's conditions, not moto's locking, so item writes in moto are
serialised here, as the real service serialises them.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from smartmail.state_dynamodb import DynamoState

_WRITES = ("put_item", "update_item", "delete_item", "transact_write_items")
_LOCK = threading.RLock()


def serialise_moto_item_writes(monkeypatch: pytest.MonkeyPatch | None = None) -> None:
    """Wrap moto's DynamoDB item writes in one lock (this process's moto, server included)."""
    from moto.dynamodb.models import DynamoDBBackend

    for name in _WRITES:
        original = getattr(DynamoDBBackend, name)
        if getattr(original, "_serialised", False):
            continue

        def locked(*args: Any, __original: Callable[..., Any] = original, **kw: Any) -> Any:
            with _LOCK:
                return __original(*args, **kw)

        wrapped = functools.wraps(original)(locked)
        wrapped._serialised = True  # type: ignore[attr-defined]
        if monkeypatch is not None:
            monkeypatch.setattr(DynamoDBBackend, name, wrapped)
        else:
            setattr(DynamoDBBackend, name, wrapped)


@pytest.fixture
def atomic_moto(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    serialise_moto_item_writes(monkeypatch)
    yield


@contextlib.contextmanager
def lambda_state(url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[DynamoState]:
    """The state the Lambda handlers open (`SMARTMAIL_STATE` = `url`), in moto, with their
    per-container cache of states emptied before and after: each test starts cold."""
    from moto import mock_aws

    from smartmail import aws_lambda

    monkeypatch.setenv("SMARTMAIL_STATE", url)
    aws_lambda._STATES.clear()
    with mock_aws():
        yield aws_lambda.state_from_env()
    aws_lambda._STATES.clear()
