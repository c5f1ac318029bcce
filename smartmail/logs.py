"""smartmail's loggers, made when something first logs, and the CLI's logging set-up held
until then.

`import logging` brings traceback, string and textwrap with it (~4 ms: a tenth of what a dry
run adds to Click and Jinja2) for log lines a dry run almost never writes. A module takes its
logger from `getLogger` here, a stand-in that imports `logging` on its first call. The CLI
hands its configuration to `defer`, which applies it at once if `logging` is loaded already,
else just before the first log line (`ready`). Code that brings in a library logging through
`logging` directly (botocore and urllib3, in aws.py) calls `ready()` first, so their warnings
meet the same handler.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import logging

_pending: list[Callable[[], None]] = []


def defer(setup: Callable[[], None]) -> None:
    """Run `setup` (a logging configuration) before anything logs."""
    if "logging" in sys.modules:
        setup()
    else:
        _pending.append(setup)


def ready() -> None:
    """Apply the configuration `defer` holds, if any: something is about to log."""
    while _pending:
        _pending.pop(0)()


class _OnFirstUse:
    """Stands for `logging.getLogger(name)` until an attribute is asked for; then the real
    logger answers (a log call's frame is the caller's, as with the logger itself)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: logging.Logger | None = None

    def __getattr__(self, attribute: str) -> Any:
        if self._logger is None:
            import logging

            ready()
            self._logger = logging.getLogger(self._name)
        return getattr(self._logger, attribute)


def getLogger(name: str) -> logging.Logger:
    """The logger `name`, without importing `logging` until it is used."""
    return cast("logging.Logger", _OnFirstUse(name))
