"""Progress while sending: a live rich display on a terminal, plain log lines elsewhere.

Both read the engine's `Metrics` from their own thread at an interval, so the engine never
checks whether it has a terminal and pays nothing per message for the display. `NullProgress`
is the silent one (library use, Lambda). rich is imported only by `RichProgress`, so a library
caller that never shows a live display never loads it.
"""

from __future__ import annotations

import threading
import time
from typing import IO, TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.live import Live

    from .report import Metrics


class ProgressDisplay(Protocol):
    def start(self, metrics: Metrics, title: str) -> None: ...

    def stop(self) -> None: ...


class NullProgress:
    def start(self, metrics: Metrics, title: str) -> None:
        return None

    def stop(self) -> None:
        return None


class LogProgress:
    """One plain line every `interval` seconds: for cron mail and log files, no escapes."""

    def __init__(self, stream: IO[str], interval: float = 10.0) -> None:
        self.stream = stream
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._metrics: Metrics | None = None

    def start(self, metrics: Metrics, title: str) -> None:
        self._metrics = metrics
        self._title = title
        self._thread = threading.Thread(target=self._run, name="smartmail-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._line()

    def _line(self) -> None:
        if self._metrics is None:
            return
        s = self._metrics.snapshot()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        print(
            f"{stamp} {self._title}: {s['done']}/{s['total']} rows, sent {s['sent']}, "
            f"failed {s['failed']}, skipped {s['skipped']}, {s['rate']:.1f} msg/s",
            file=self.stream,
            flush=True,
        )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class RichProgress:
    """Progress bar, counts, current rate and ETA, refreshed a few times a second."""

    def __init__(self, console: Console) -> None:
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )

        self.console = console
        self._live: Live | None = None
        self._metrics: Metrics | None = None
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._task = self._bar.add_task("sending", total=None)
        self._began = time.monotonic()
        self._last = (self._began, 0)
        self._rate = 0.0

    def start(self, metrics: Metrics, title: str) -> None:
        self._metrics = metrics
        from rich.live import Live

        self._bar.update(self._task, description=title, total=metrics.total)
        self._began = time.monotonic()  # the rate counts from the first message, not set-up
        self._last = (self._began, 0)
        self._live = Live(get_renderable=self._render, console=self.console, refresh_per_second=4)
        self._live.start()

    def _render(self) -> RenderableType:
        from rich.console import Group
        from rich.text import Text

        if self._metrics is None:
            return Text("")
        s = self._metrics.snapshot()
        now = time.monotonic()
        then, before = self._last
        if now - then >= 1.0:
            self._rate = (s["sent"] - before) / (now - then)
            self._last = (now, s["sent"])
        elif then == self._began and now > then:
            # No whole second yet: the rate so far. A run shorter than a second (or its first
            # second) would otherwise end on "0.0/s" beside a summary of hundreds a second.
            self._rate = s["sent"] / (now - then)
        self._bar.update(self._task, completed=s["done"])
        line = Text.assemble(
            ("sent ", "dim"),
            (str(s["sent"]), "green"),
            ("  failed ", "dim"),
            (str(s["failed"]), "red" if s["failed"] else ""),
            ("  skipped ", "dim"),
            (str(s["skipped"]), "yellow" if s["skipped"] else ""),
            ("  retries ", "dim"),
            (str(s["retries"]), ""),
            ("  rate ", "dim"),
            (f"{self._rate:.1f}/s", "cyan"),
        )
        return Group(self._bar, line)

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
