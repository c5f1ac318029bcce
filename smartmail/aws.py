"""The one place smartmail makes boto3 clients, so every AWS call it makes goes through here.

boto3 clients are thread-safe but sessions are not, so each thread gets its own Session.
`CLIENT_HOOKS` lets an observer see every client made (the IAM policy test records each
operation smartmail calls this way).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import boto3
from botocore.config import Config

from . import logs

CLIENT_HOOKS: list[Callable[[Any], None]] = []
_local = threading.local()


def session() -> boto3.session.Session:
    """This thread's boto3 session (credentials and region from the usual environment)."""
    logs.ready()  # botocore and urllib3 log through `logging`: the CLI's handler first
    current = getattr(_local, "session", None)
    if current is None:
        current = boto3.session.Session()
        _local.session = current
    return current


def client(
    service: str,
    *,
    region: str | None = None,
    max_attempts: int | None = None,
    max_pool_connections: int = 10,
    timeout: float | None = None,
) -> Any:
    """A client for `service`. `max_attempts=1` turns botocore's own retries off."""
    settings: dict[str, Any] = {"max_pool_connections": max_pool_connections}
    if max_attempts is not None:
        settings["retries"] = {"total_max_attempts": max_attempts, "mode": "standard"}
    if timeout is not None:
        settings["connect_timeout"] = timeout
        settings["read_timeout"] = timeout
    make: Any = session().client  # boto3's overloads name every service; ours is a str
    made = make(service, region_name=region, config=Config(**settings))
    for hook in CLIENT_HOOKS:
        hook(made)
    return made
