"""One error hierarchy for the whole library.

The CLI turns any `SmartmailError` into one line and its `exit_code`, in one place
(`cli.main`). Transport errors carry a classification the engine acts on, so the engine
never needs to know which provider raised them.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_STOPPED = 4
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class SmartmailError(Exception):
    """Base of every error smartmail raises on purpose; the message is shown to the user."""

    exit_code = EXIT_USAGE


class ConfigError(SmartmailError):
    """A bad option or option combination."""


class Location:
    """Where in an input a problem is: file, 1-based row (data row, header is row 1), column."""

    __slots__ = ("column", "file", "row")

    def __init__(self, file: str, row: int | None = None, column: str | None = None) -> None:
        self.file = file
        self.row = row
        self.column = column

    def __str__(self) -> str:
        parts = [self.file]
        if self.row is not None:
            parts.append(f"row {self.row}")
        if self.column is not None:
            parts.append(f"column {self.column!r}")
        return ", ".join(parts)


class InputError(SmartmailError):
    """A problem in the recipients file or the template, with where it is."""

    def __init__(self, where: Location | str, message: str, hint: str = "") -> None:
        self.where = where
        self.problem = message
        self.hint = hint
        text = f"{where}: {message}"
        if hint:
            text += f" ({hint})"
        super().__init__(text)


class SourceError(InputError):
    """The recipients file cannot be read or is malformed."""


class TemplateError(InputError):
    """The message template cannot be parsed or rendered."""


class PreflightError(SmartmailError):
    """Pre-flight validation found problems that stop the run before anything is sent."""

    def __init__(self, problems: list[str], total: int | None = None) -> None:
        self.problems = problems
        count = total if total is not None else len(problems)
        first = problems[0] if problems else "validation failed"
        more = f" (and {count - 1} more problem(s); run dry-run to list them)" if count > 1 else ""
        super().__init__(f"{first}{more}; nothing was sent")


class LockedError(SmartmailError):
    """Another run of the same campaign holds the lock."""

    exit_code = EXIT_LOCKED


class AlreadyClaimedError(SmartmailError):
    """A shared ledger refused this worker's claim on a row: another worker holds it, or it
    was sent (or failed) meanwhile. The row must not be sent by this worker; the engine
    records it as skipped with `skip_reason`, not as a failure.

    Raised by a journal's `sending()`; the engine catches this class, so it never needs to
    know which ledger (the DynamoDB one's `ClaimLost`) raised it.
    """

    exit_code = EXIT_SOME_FAILED

    def __init__(self, message: str, skip_reason: str) -> None:
        self.skip_reason = skip_reason
        super().__init__(message)


# --- transport outcomes -------------------------------------------------------------------


class TransportError(SmartmailError):
    """A send did not succeed. Subclasses say what the engine must do about it."""

    exit_code = EXIT_SOME_FAILED

    def __init__(self, message: str, code: str | None = None) -> None:
        self.code = code
        super().__init__(message)


class TransientError(TransportError):
    """Might succeed if tried again later: retried with backoff (SMTP 4xx, drops, timeouts)."""


class ThrottledError(TransientError):
    """The provider said we are too fast: retried, and the shared rate limiter slows down."""


class ConnectionFailedError(TransientError):
    """The provider could not be reached at all (refused, DNS, connect timeout, no greeting).

    Retried like any transient error, and also counted by the engine's circuit breaker: many in
    a row, with no success between them, mean an outage, and the run stops (rows left unsent)
    instead of spending every row's retries on a server that is not there.
    """


class InDoubtError(TransportError):
    """The whole message was handed over, and then the answer was lost (timeout, drop, reset).

    The provider may have accepted it, so it is never retried: sending again could deliver it
    twice. The row is left *in doubt* in the ledger, and only `smartmail retry --in-doubt` sends
    it again. Deliberately not a `TransientError`, so no retry policy can catch it by accident.
    """


class PermanentError(TransportError):
    """Never succeeds for this message (SMTP 5xx, rejected recipient): fail the row, no retry."""


class StopRunError(TransportError):
    """Nothing more can be sent in this run (daily quota used, account paused, bad sender).

    The engine stops taking rows; the row in hand and all later ones stay unsent (not failed)
    so the next run picks them up.
    """

    exit_code = EXIT_STOPPED


class InvalidRowError(InputError):
    """One row cannot be sent as it is (bad address, header injection, missing attachment).

    Unlike other input errors this is about a single row: by default the row is skipped and
    reported, and `--on-invalid abort` turns it into a pre-flight failure.
    """
