"""Run metrics (thread-safe counters the engine updates) and the summary built from them.

The summary is what the user sees at the end (the CLI draws `Summary.table_rows()`) and
what `--report PATH` writes (the same numbers as JSON). The counts always add up:
rows = sent + failed + skipped + unsent + lost_replies, where `lost_replies` are this run's
rows in doubt (the provider's answer was lost after the whole message was handed over).
`in_doubt` counts every row in doubt the run left alone: those plus the rows skipped because an
earlier run left them in doubt; `in_doubt_rows` lists them, for `retry --in-doubt`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import threading
import time
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .ratelimit import RateStats
from .records import Record
from .sources import Row

Status = Literal["sent", "failed", "skipped", "unsent", "in-doubt"]
STATUSES: tuple[Status, ...] = ("sent", "failed", "skipped", "unsent", "in-doubt")
IN_DOUBT_PREFIX = "in doubt"  # the reason of every in-doubt row, this run's or an earlier one's
MAX_LISTED = 1000  # rows listed by name in the report (in doubt, sent without some Cc/Bcc)


@dataclass(slots=True, repr=False, eq=False)
class Outcome(Record):
    """How one row ended. Every row gets exactly one."""

    row: Row
    recipient: str
    status: Status
    reason: str = ""
    message_id: str | None = None
    attempts: int = 0
    latency: float | None = None
    refused: tuple[str, ...] = ()
    """For a sent row: other envelope recipients (Cc, Bcc) the provider refused."""


class Metrics:
    """Counters shared by every worker; cheap enough to update once per message."""

    def __init__(self, total: int, clock: Any = time.monotonic) -> None:
        self.total = total
        self._clock = clock
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.reasons: dict[str, Counter[str]] = {"failed": Counter(), "skipped": Counter()}
        self.retries = 0
        self.in_doubt_rows: list[dict[str, Any]] = []
        self.refused_rows: list[dict[str, Any]] = []
        self.refused_count = 0
        self.latencies = array("d")
        self.started = clock()
        self.finished: float | None = None

    def record(self, outcome: Outcome) -> None:
        with self._lock:
            self.counts[outcome.status] += 1
            if outcome.status in self.reasons:
                self.reasons[outcome.status][_reason_key(outcome.reason)] += 1
            if outcome.latency is not None:
                self.latencies.append(outcome.latency)
            listed = len(self.in_doubt_rows) < MAX_LISTED
            doubt = outcome.status == "in-doubt" or outcome.status == "skipped"
            if listed and doubt and outcome.reason.startswith(IN_DOUBT_PREFIX):
                self.in_doubt_rows.append(_listed(outcome))
            if outcome.refused:
                self.refused_count += 1
                if len(self.refused_rows) < MAX_LISTED:
                    self.refused_rows.append({**_listed(outcome), "refused": list(outcome.refused)})

    def retried(self) -> None:
        with self._lock:
            self.retries += 1

    def done(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            elapsed = (self.finished or self._clock()) - self.started
            sent = self.counts["sent"]
            return {
                "total": self.total,
                "sent": sent,
                "failed": self.counts["failed"],
                "skipped": self.counts["skipped"],
                "unsent": self.counts["unsent"],
                "in_doubt": self.counts["in-doubt"],
                "done": sum(self.counts.values()),
                "retries": self.retries,
                "elapsed": elapsed,
                "rate": sent / elapsed if elapsed > 0 else 0.0,
            }

    def finish(self) -> None:
        with self._lock:
            self.finished = self._clock()

    def count_unreached(self) -> None:
        """Count as not sent the rows that got no outcome: the send pass stopped on an error
        (the ledger failed, the list changed) before it read them. The counts then add up."""
        with self._lock:
            missing = self.total - sum(self.counts.values())
            if missing > 0:
                self.counts["unsent"] += missing


def _listed(outcome: Outcome) -> dict[str, Any]:
    return {"row": outcome.row.number, "recipient": outcome.recipient, "reason": outcome.reason}


def _reason_key(reason: str) -> str:
    """Group reasons that differ only by address or detail after the first colon-part."""
    return reason.split(": ", 1)[0][:80] if reason else "unknown"


def _percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    index = min(len(values) - 1, max(0, round(pct / 100 * len(values) + 0.5) - 1))
    return values[index]


@dataclass(repr=False, eq=False)
class Summary(Record):
    """Everything a user wants to know after a run; also the JSON report."""

    campaign: str
    transport: str
    source: str
    rows: int
    sent: int
    failed: int
    skipped: int
    unsent: int
    retries: int
    elapsed_seconds: float
    rate_per_second: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    throttles: int = 0
    rate_configured: float | None = None
    rate_lowest: float | None = None
    rate_final: float | None = None
    slowdowns: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)
    failure_reasons: dict[str, int] = field(default_factory=dict)
    stopped: str | None = None
    interrupted: bool = False
    dry_run: bool = False
    test_to: str | None = None
    failed_csv: str | None = None
    warnings: list[str] = field(default_factory=list)
    in_doubt: int = 0
    lost_replies: int = 0
    in_doubt_rows: list[dict[str, Any]] = field(default_factory=list)
    sent_without: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        metrics: Metrics,
        rate: RateStats,
        *,
        campaign: str,
        transport: str,
        source: str,
        **extra: Any,
    ) -> Summary:
        snap = metrics.snapshot()
        skipped = metrics.reasons["skipped"]
        earlier = sum(n for r, n in skipped.items() if r.startswith(IN_DOUBT_PREFIX))
        extra.setdefault("in_doubt", earlier + snap["in_doubt"])
        extra.setdefault("lost_replies", snap["in_doubt"])
        extra.setdefault("in_doubt_rows", list(metrics.in_doubt_rows))
        extra.setdefault("sent_without", list(metrics.refused_rows))
        if metrics.refused_count:
            extra.setdefault("warnings", []).append(
                f"{metrics.refused_count} message(s) went without some Cc/Bcc recipients the "
                "server refused (listed under sent_without in --report)"
            )
        lat = sorted(metrics.latencies)
        p50 = _percentile(lat, 50)
        p95 = _percentile(lat, 95)
        return cls(
            campaign=campaign,
            transport=transport,
            source=source,
            rows=metrics.total,
            sent=snap["sent"],
            failed=snap["failed"],
            skipped=snap["skipped"],
            unsent=snap["unsent"],
            retries=snap["retries"],
            elapsed_seconds=round(snap["elapsed"], 3),
            rate_per_second=round(snap["rate"], 2),
            latency_p50_ms=round(p50 * 1000, 2) if p50 is not None else None,
            latency_p95_ms=round(p95 * 1000, 2) if p95 is not None else None,
            throttles=rate.throttles,
            rate_configured=rate.configured,
            rate_lowest=rate.lowest,
            rate_final=rate.current,
            slowdowns=rate.slowdowns,
            skip_reasons=dict(metrics.reasons["skipped"].most_common()),
            failure_reasons=dict(metrics.reasons["failed"].most_common()),
            **extra,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def table_rows(self) -> list[tuple[str, str]]:
        """What the summary table shows, as (what, value) lines: the CLI prints them (and the
        warnings after them); the data stays apart from how it is drawn."""
        shown = [("campaign", self.campaign), ("transport", self.transport)]
        shown.append(("rows", str(self.rows)))
        if self.test_to:
            shown.append(("test messages", f"{self.sent} to {self.test_to}"))
        else:
            shown.append(("sent" if not self.dry_run else "valid", str(self.sent)))
        shown.append(("failed", str(self.failed)))
        shown.append(("skipped", str(self.skipped)))
        reasons = list(self.skip_reasons.items())[:5]
        for reason, count in reasons:
            shown.append((f"  {reason}", str(count)))
        shown.append(("not sent (left for a later run)", str(self.unsent)))
        # Rows an earlier run left in doubt are a skip reason above, named with the retry
        # command; the total again is only worth a line when it holds rows not shown there.
        listed = sum(n for reason, n in reasons if reason.startswith(IN_DOUBT_PREFIX))
        if self.in_doubt > listed:
            shown.append(("in doubt (not sent again)", str(self.in_doubt)))
        if self.lost_replies:
            shown.append(("  answer lost after sending (this run)", str(self.lost_replies)))
        if not self.dry_run:
            shown.append(("retries", str(self.retries)))
            shown.append(("throttled", str(self.throttles)))
            if self.slowdowns:
                shown.append(
                    (
                        "rate adapted",
                        f"{self.slowdowns}x, lowest {self.rate_lowest:.2f}/s, "
                        f"ended at {self.rate_final:.2f}/s",
                    )
                )
            shown.append(("elapsed", f"{self.elapsed_seconds:.2f} s"))
            shown.append(("achieved rate", f"{self.rate_per_second:.1f} msg/s"))
            if self.latency_p50_ms is not None:
                shown.append(
                    ("latency p50 / p95", f"{self.latency_p50_ms} / {self.latency_p95_ms} ms")
                )
        for reason, count in list(self.failure_reasons.items())[:5]:
            shown.append((f"failed: {reason}", str(count)))
        if self.stopped:
            shown.append(("stopped", self.stopped))
        if self.interrupted:
            shown.append(("interrupted", "yes: re-run to send the rest"))
        if self.failed_csv:
            shown.append(("rows to re-drive", self.failed_csv))
        return shown


# The new files `write_whole` is writing now: an abort that ends the process meanwhile
# (`os._exit`, no `finally` runs) removes them first (`remove_unfinished`).
_unfinished: set[str] = set()


def remove_unfinished() -> None:
    """Remove the new files of reports still being written: for an abort, just before it ends
    the process, so no partial `.NAME.*.tmp` is left beside the last report."""
    for temp in list(_unfinished):
        with contextlib.suppress(OSError):
            os.unlink(temp)


def write_whole(path: str, text: str) -> None:
    """Write `text` to `path` so that whoever reads it finds the previous file or this one,
    never a part of either: a file that cannot be written to the end (a full disk, an abort
    that ends the process meanwhile) leaves the previous one as it was.

    Written to a new file beside it (created with the mode the umask allows, or the old
    file's mode, owner and group), then renamed over it; a symbolic link is followed, so the
    file it names is replaced, not the link. What is not a regular file (/dev/stdout, a FIFO,
    a folder, where the error says so) is written in place, and so is a file whose folder
    takes no new file, one with other names (hard links, which a new file would leave behind
    on the old report) and one whose owner or group a new file could not have (a reader who
    may read it by them would lose it: root's cron writing a user's report, a shared group).
    Raises OSError.
    """
    target = os.path.realpath(path)
    try:
        old: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        old = None
    if old is not None and (not stat.S_ISREG(old.st_mode) or old.st_nlink > 1):
        _write_in_place(target, text)
        return
    folder, name = os.path.split(target)
    temp = os.path.join(folder, f".{name}.{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        # A folder that takes no new file, or a name too long for the new one's. Not a full
        # disk: writing in place would then empty the last report and fail.
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.ENAMETOOLONG):
            raise
        _write_in_place(target, text)
        return
    _unfinished.add(temp)
    try:
        if old is not None:
            new = os.fstat(fd)
            if (new.st_uid, new.st_gid) != (old.st_uid, old.st_gid):
                try:
                    os.fchown(fd, old.st_uid, old.st_gid)
                except PermissionError:
                    os.close(fd)
                    fd = -1
                    os.unlink(temp)
                    _write_in_place(target, text)
                    return
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fd = -1
            fh.write(text)
            fh.flush()
            # On disk before the rename: after a power loss the name then holds this report
            # or the last one, never an empty file (ext4, XFS and others may reorder them).
            os.fsync(fh.fileno())
        if old is not None:
            os.chmod(temp, stat.S_IMODE(old.st_mode))  # after the chown, which clears set-id bits
        os.replace(temp, target)
    except BaseException:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    finally:
        _unfinished.discard(temp)


def _write_in_place(target: str, text: str) -> None:
    with open(target, "w", encoding="utf-8") as fh:
        fh.write(text)
