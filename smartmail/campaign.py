"""One campaign pipeline for every entry point: `send`, `retry`, library callers, queue workers.

    config = CampaignConfig(template="welcome.txt", source="recipients.csv",
                            transport="smtp://mail.example:587")
    result = run_campaign(config, RunOptions(report_path="report.json"))
    print(result.summary.sent, result.exit_code)

`CampaignConfig` is everything campaign-wide (what the ledger stores, so `retry` sends the same
way), typed and versioned; `RunOptions` is what belongs to one run (limit, proof address,
report paths); both live in `smartmail.config` and are re-exported here. `run_campaign` does
lock -> snapshot -> pre-flight -> quota plan -> confirm -> send -> summary, and keeps the
promises of the README whoever calls it: nothing is sent when anything before the first
message fails (an exception, exit code 2, 3 or 4), and once sending has begun a problem never
loses the summary of what was sent (`CampaignResult.error`, exit 5).
Prompts, progress, warnings and stopping are injected (`Hooks`), never Click or a terminal.

This module imports nothing heavy at load time (the CLI's start-up depends on it); the engine,
transports and ledger are imported when a campaign runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .config import CONFIG_VERSION, CampaignConfig, Resend, RunOptions, parse_tags
from .errors import (
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_STOPPED,
    EXIT_USAGE,
    ConfigError,
    SmartmailError,
)
from .files import check_writable, check_writable_dir, readable
from .records import Described

if TYPE_CHECKING:
    from .dynamo_ledger import DynamoLedger
    from .engine import PreflightResult, Run, SendOptions
    from .ledger import CampaignRecord, Ledger
    from .progress import ProgressDisplay
    from .report import Summary
    from .sources import RecipientSource
    from .state_dynamodb import DynamoState
    from .state_store import SqliteState
    from .templates import MessageTemplate
    from .transports import Transport

    CampaignLedger = Ledger | DynamoLedger

__all__ = [
    "CONFIG_VERSION",
    "EXIT_INCOMPLETE",
    "CampaignConfig",
    "CampaignResult",
    "CampaignRun",
    "DeclinedError",
    "DryRunResult",
    "Hooks",
    "NothingToSendError",
    "Plan",
    "Resend",
    "RunOptions",
    "Secrets",
    "dry_run_campaign",
    "load_config",
    "load_record",
    "parse_tags",
    "run_campaign",
]

EXIT_INCOMPLETE = 5
"""Sending began, then a problem of our own or of the state stopped the run (ledger failure,
source changed, internal error): some messages were sent; the summary says which."""


# Skip reasons that mean "the ledger holds this row already", not "this row cannot be sent".
_LEDGER_SKIPS = ("already sent", "already being sent", "in doubt", "failed before")


class DeclinedError(SmartmailError):
    """The confirmation was declined: nothing was sent (exit 2, not an interruption)."""

    exit_code = EXIT_USAGE


class NothingToSendError(SmartmailError):
    """Every row was skipped (invalid, duplicate, suppressed...): nothing was sent (exit 2).

    `summary` holds the counts and the skip reasons, for the caller to show.
    """

    exit_code = EXIT_USAGE

    def __init__(self, message: str, summary: Summary) -> None:
        super().__init__(message)
        self.summary = summary


class Plan(NamedTuple):
    """What a run is about to do, shown to `Hooks.confirm` before the first message.

    Immutable records here are NamedTuples: a frozen dataclass generates and compiles six
    methods when the module loads (~0.6 ms of every start-up, a dry run's included).
    """

    campaign: str
    transport: str
    source: str
    rows: int
    valid: int
    skipped: int
    messages: int
    recipients: int
    """Envelope recipients (To + Cc + Bcc) of the messages to send: what SES counts."""
    test_to: str | None = None
    partial_of: int | None = None
    """With --allow-partial: the messages that would have been sent without the quota."""


@dataclass(repr=False, eq=False)  # hooks are callables: equality means nothing (and costs start-up)
class Hooks(Described):
    """How a run talks to whoever started it. Every hook is optional: the defaults are silent
    and never ask (a library call, a worker, a Lambda)."""

    confirm: Callable[[Plan], bool] | None = None
    """Asked once, after pre-flight and the quota plan, before anything is sent. An SMTP
    transport first connects and logs in: a set-up mistake raises StopRunError (exit code
    4) without asking."""
    warn: Callable[[str], None] | None = None
    """Pre-flight problems that do not stop the run, and other notices; one line each."""
    progress: ProgressDisplay | None = None
    stop: threading.Event | None = None
    """Set it (from a signal handler, another thread) to finish what is in flight and stop."""
    sending: Callable[[Plan], None] | None = None
    """Called once, just before the first message: from here on a stop leaves rows unsent
    rather than abandoning a run that sent nothing (the CLI installs its signal handlers)."""
    s3_client: Any = None
    """The boto3 S3 client to read an s3:// source with (default: one from the environment)."""


class Secrets(NamedTuple):
    """What a run needs and a campaign never stores, kept apart from everything that may be
    logged or serialised (and out of `repr`). The CLI reads them from the environment; a
    worker or a Lambda from wherever it keeps secrets."""

    smtp_password: str | None = None

    def __repr__(self) -> str:
        return f"Secrets(smtp_password={'<hidden>' if self.smtp_password else None})"


@dataclass(repr=False, eq=False)
class CampaignResult(Described):
    """How a run ended. `error` is set when a problem stopped it after sending had begun."""

    summary: Summary
    plan: Plan | None = None
    error: str | None = None
    note: str | None = None
    report_error: str | None = None
    """The `--report` file could not be written at the end (one line naming it). Everything
    else (the ledger, the failed-rows CSV, an outbox) is recorded as usual."""

    @property
    def nothing_sent(self) -> bool:
        """No message of this run was attempted (so none can have arrived)."""
        s = self.summary
        return not (s.sent or s.failed or s.lost_replies)

    @property
    def exit_code(self) -> int:
        """The documented exit code (the CLI uses 130/143 instead when a signal stopped it,
        unless this is 5).

        A problem after the send pass began is 5, unless not one message was attempted: then
        it is 2, which always means that nothing was sent. A report that could not be
        written turns what would have been 0, 1, 4 (stopped) or 130 (interrupted) into 5
        once a message was attempted: whoever reads it must not take its absence, or an old
        one, for this run's, and "stopped, or interrupted: the next run sends the rest"
        would hide that. When none was, 0 becomes 2, and a stop or an interruption keeps its
        own code (it says all there is; the CLI, too, keeps 130/143 over anything but 5)."""
        if self.error is not None:
            return EXIT_USAGE if self.nothing_sent else EXIT_INCOMPLETE
        if self.report_error is not None and not self.nothing_sent:
            return EXIT_INCOMPLETE
        if self.summary.stopped:
            return EXIT_STOPPED
        if self.summary.interrupted:
            return EXIT_INTERRUPTED
        if self.report_error is not None:
            return EXIT_USAGE
        if self.summary.failed or self.summary.lost_replies:
            return EXIT_SOME_FAILED
        return EXIT_OK


@dataclass(repr=False, eq=False)
class DryRunResult(Described):
    """What a dry run found: every row's verdict (`checked`, previews included) and the
    summary. Exit code 0 only when every row is valid."""

    checked: PreflightResult
    summary: Summary
    report_error: str | None = None
    """The `--report` file could not be written (one line naming it): exit 2."""

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.checked.clean and self.report_error is None else EXIT_USAGE


def dry_run_campaign(
    config: CampaignConfig,
    options: RunOptions | None = None,
    hooks: Hooks | None = None,
    *,
    secrets: Secrets | None = None,
) -> DryRunResult:
    """Pre-flight a campaign and send nothing; see `CampaignRun.check`."""
    return CampaignRun(config, options, hooks, secrets=secrets).check()


def run_campaign(
    config: CampaignConfig,
    options: RunOptions | None = None,
    hooks: Hooks | None = None,
    *,
    secrets: Secrets | None = None,
    source: RecipientSource | None = None,
) -> CampaignResult:
    """Validate everything, then send the campaign once; see `CampaignRun`."""
    return CampaignRun(config, options, hooks, secrets=secrets, source=source).run()


class CampaignRun:
    """One run of a campaign. `run()` once; `stop()` and `abort_summary()` from elsewhere
    (a signal handler) while it runs.

    Raises a `SmartmailError` for anything found before the first message (nothing sent:
    exit 2, 3 locked, 4 quota); returns a `CampaignResult` once sending has begun.
    `source` replaces `config.source` with rows from elsewhere (a queue job's rows, read like
    a CSV); `config.source` still names the campaign's list in the ledger.
    """

    def __init__(
        self,
        config: CampaignConfig,
        options: RunOptions | None = None,
        hooks: Hooks | None = None,
        *,
        secrets: Secrets | None = None,
        source: RecipientSource | None = None,
    ) -> None:
        self.given_source = source
        self.secrets = secrets or Secrets()
        self.config = config
        self.options = options or RunOptions()
        self.hooks = hooks or Hooks()
        self.stop_event = self.hooks.stop or threading.Event()
        self.ledger: CampaignLedger | None = None
        self.ledger_gone = False  # its state file was removed or replaced during the run
        self.state: SqliteState | DynamoState | None = None
        self.engine_run: Run | None = None
        self.campaign: str | None = config.campaign
        self._snapshots: list[RecipientSource] = []
        self._scratch: list[str] = []

    # --- control from outside ------------------------------------------------------------------

    def stop(self) -> None:
        """Take no more rows; messages in flight finish; the rest stays unsent."""
        self.stop_event.set()

    def abort_summary(self, timeout: float = 3.0) -> Summary | None:
        """For an abort (a second Ctrl-C): commit what the ledger has queued and return the
        counts so far, both within `timeout` seconds (None when they could not be had); the
        progress display is stopped first, so the terminal is left clean.

        Messages still in flight stay `sending` in the ledger: in doubt, never re-sent by a
        plain re-run. Meant to be followed by ending the process at once.
        """
        found: list[Summary] = []

        def work() -> None:
            if self.hooks.progress is not None:
                with contextlib.suppress(Exception):
                    self.hooks.progress.stop()
            # Counted before the flush: every outcome counted is queued for the ledger by
            # then, so the ledger holds at least what the counts say (sends that finish
            # meanwhile are committed too, or left in doubt). And before the release, which
            # waits for a commit under way (a slow disk): the counts are shown regardless.
            if self.engine_run is not None:
                found.append(self._summary(self.engine_run, interrupted=True))
            if self.ledger is not None:
                # Rows marked ahead were never attempted: back to pending. Safe only once the
                # run is stopping, when no worker starts a send any more.
                release = getattr(self.ledger, "release_ahead", None)
                if release is not None and self.stop_event.is_set():
                    with contextlib.suppress(Exception):
                        release()
                with contextlib.suppress(Exception):
                    self.ledger.flush()

        thread = threading.Thread(target=work, name="smartmail-abort", daemon=True)
        thread.start()
        thread.join(timeout)
        return found[0] if found else None

    # --- the pipeline --------------------------------------------------------------------------

    def run(self) -> CampaignResult:
        """Lock, snapshot, pre-flight, plan, confirm, send; the list's private copy is removed
        however the run ends."""
        try:
            return self._run()
        except SmartmailError as exc:
            # Raised before the first message: whatever failed (the DynamoDB state unreachable,
            # say), nothing was sent, and the exit code says so (2; 3 locked, 4 quota).
            if exc.exit_code not in (EXIT_USAGE, EXIT_LOCKED, EXIT_STOPPED):
                exc.exit_code = EXIT_USAGE
            raise
        finally:
            for snap in self._snapshots:
                with contextlib.suppress(Exception):
                    snap.close()
            self._snapshots.clear()
            if self._scratch:
                import shutil

                for folder in self._scratch:
                    shutil.rmtree(folder, ignore_errors=True)
                self._scratch.clear()

    def _run(self) -> CampaignResult:
        from . import campaigns
        from .engine import preflight

        config, opts = self.config, self.options
        config.check()
        send_options = self._send_options()
        if opts.resend:
            config = self._queued_template()
        with readable(config.template):
            template = self._template()
        record = None
        if opts.resend:
            record = self._stored_record()
            source = None
        elif self.given_source is not None:
            source = self.given_source
        else:
            with readable(config.source):
                source = self._source()
        self.campaign = self._campaign_id(source, template)
        send_options.campaign = self.campaign
        send_options.tags = {**config.tags}
        send_options.tags.setdefault("campaign", self.campaign)
        failed_csv = opts.failed_csv or campaigns.failed_csv_name(
            (source.name if source else record.source if record else "") or "recipients"
        )
        inputs = self._inputs(record.source if record else None)
        check_writable(failed_csv, "--failed-csv", inputs)
        if opts.report_path:
            check_writable(opts.report_path, "--report", inputs)
        send_options.failed_csv = Path(failed_csv)
        transport = self._transport()
        try:
            ledger = self._open_ledger(send_options)
            if opts.resend:
                assert record is not None and ledger is not None
                self._warn_if_template_changed(record, template)
                assert self.state is not None
                rows = self.state.retry_rows(self.campaign, opts.resend)
                if not rows:
                    transport.close()
                    return self._nothing_to_retry(record.source, str(transport.url))
                source = campaigns.LedgerSource(record.source, rows, config.to_column)
            assert source is not None
            source = self.snapshot(source)
            with readable(source.name):
                checked = preflight(
                    source,
                    template,
                    send_options,
                    allow_utf8_local=transport.allow_utf8_local,
                    journal=ledger,
                    keep_rendered=send_options.render_cache_chars,
                )
            if not checked.ok:
                from .errors import PreflightError

                raise PreflightError(checked.fatal, checked.fatal_count)
            for problem in checked.problems[:20]:
                self._warn(str(problem))
            if checked.problem_count > 20:
                self._warn(f"... and {checked.problem_count - 20} more problem(s)")
            self._refuse_if_nothing_to_send(checked, send_options, str(transport.url))
            plan = self._plan(checked, send_options, transport)
            if self.hooks.confirm is not None and plan.messages:
                # Log in before asking: a wrong password or a server refusing us is said
                # now, not after the operator said yes. The connection then sends first.
                check = getattr(transport, "check", None)
                if check is not None:
                    check()
                if not self.hooks.confirm(plan):
                    raise DeclinedError("not confirmed; nothing was sent")
            if ledger is not None:
                ledger.begin(None if opts.resend else self._record(source, template, transport))
            if self.hooks.sending is not None:
                self.hooks.sending(plan)
        except BaseException:
            try:
                transport.close()
            finally:
                # Also when another Ctrl-C lands in the close: the campaign is unlocked.
                self._close_ledger_quietly()
            raise
        return self._send(source, template, transport, checked, send_options, plan)

    def check(self) -> DryRunResult:
        """Pre-flight only (a dry run): validate and render every row, send nothing, lock
        nothing, write no state. The ledger is read, so rows already sent or suppressed show
        as skipped; a state file that does not exist yet holds neither, and is not made."""
        from .engine import dry_run_summary, preflight
        from .state import check_creatable, sqlite_file
        from .unsubscribe import missing_warning

        config, opts = self.config, self.options
        config.check()
        with readable(config.template):
            template = self._template()
        with readable(config.source):
            source = self._source()
        self.campaign = self._campaign_id(source, template)
        send_options = self._send_options()
        send_options.campaign = self.campaign
        send_options.tags = {**config.tags}
        send_options.tags.setdefault("campaign", self.campaign)
        if opts.report_path:
            check_writable(opts.report_path, "--report", self._inputs(None))
        transport = self._transport() if config.transport else None
        ledger = None
        state = None
        if not (opts.no_state or opts.test_to):
            db = sqlite_file(opts.state_path)
            if db is not None and not db.exists():
                check_creatable(db)  # what opening it would have found; sqlite3 not loaded
            else:
                from .state_store import open_state

                state = open_state(opts.state_path, read_only=True)
                ledger = state.ledger(self.campaign)  # never acquired: reads only
        try:
            with readable(source.name):
                checked = preflight(
                    source,
                    template,
                    send_options,
                    allow_utf8_local=transport.allow_utf8_local if transport else True,
                    journal=ledger,
                )
        finally:
            if ledger is not None:
                ledger.close()
            if state is not None:
                state.close()
            if transport is not None:
                transport.close()
        url = str(transport.url) if transport else "(none)"
        summary = dry_run_summary(checked, send_options, url)
        warning = missing_warning(checked.valid, template.header_names)
        if warning:
            summary.warnings.append(warning)
        problem = self._write_report(summary)
        return DryRunResult(checked=checked, summary=summary, report_error=problem)

    def _send_options(self) -> SendOptions:
        """The engine's options for this run, from the campaign's config and the run's own."""
        from .engine import SendOptions

        config, opts = self.config, self.options
        send_options = SendOptions(
            workers=config.workers,
            max_connect_failures=config.max_connect_failures,
            limit=opts.limit,
            test_to=opts.test_to,
            on_invalid=config.on_invalid,
            on_malformed=config.on_malformed,
            on_duplicate=config.on_duplicate,
            preview=opts.preview,
        )
        send_options.check()
        return send_options

    def _pause(self, seconds: float) -> None:
        """A backoff sleep that ends early when the run is stopping."""
        self.stop_event.wait(seconds)

    def snapshot(self, source: RecipientSource) -> RecipientSource:
        """Hook: the recipients as pre-flight and the send pass will both read them.

        A private copy taken under the campaign lock (`RecipientSource.snapshot`): an edit
        while the prompt waits changes nothing, and an S3 object is downloaded once. Closed
        (removed) when the run ends.
        """
        snap = source.snapshot()
        self._snapshots.append(snap)
        return snap

    def _send(
        self,
        source: RecipientSource,
        template: MessageTemplate,
        transport: Transport,
        checked: PreflightResult,
        send_options: SendOptions,
        plan: Plan,
    ) -> CampaignResult:
        from .engine import Run
        from .retry import RetryPolicy

        config = self.config
        retry = RetryPolicy(
            max_retries=config.max_retries, initial=config.retry_wait, sleep=self._pause
        )
        run = Run(
            source,
            template,
            transport,
            checked,
            options=send_options,
            limiter=self._limiter(transport),
            retry=retry,
            journal=self.ledger,
            progress=self.hooks.progress,
            stop=self.stop_event,
        )
        self.engine_run = run
        error: str | None = None
        summary: Summary | None = None
        closed: str | None = None
        try:
            try:
                summary = run.run()
            except SmartmailError as exc:
                error = str(exc)
            except Exception as exc:
                error = f"internal error: {type(exc).__name__}: {exc}"
        finally:
            try:
                if self.stop_event.is_set() and self.ledger is not None:
                    # Stopping (a second KeyboardInterrupt from Python may have cut the wait
                    # for the workers short): rows marked and not yet taken by a worker were
                    # never attempted, so they go back to pending rather than in doubt.
                    release = getattr(self.ledger, "release_ahead", None)
                    if release is not None:
                        with contextlib.suppress(Exception):
                            release()
            finally:
                # Also on KeyboardInterrupt, and on another one in the release: every outcome
                # known so far is committed, and the campaign unlocked.
                closed = self._close_ledger()
        # The ledger's file gone under the run: its close says where the records went, which
        # matters more than the mark it refused, which stopped the run.
        error = closed if closed is not None and self.ledger_gone else (error or closed)
        if summary is None or error is not None:
            summary = self._summary(run, error=error)
        # Last, after the ledger is closed and the failed rows written: a report that cannot be
        # written (its folder removed meanwhile) loses nothing else, and the exit code says so.
        report_error = self._write_report(summary)
        return CampaignResult(summary=summary, plan=plan, error=error, report_error=report_error)

    # --- steps ---------------------------------------------------------------------------------

    def _template(self) -> MessageTemplate:
        from . import codecache, unsubscribe
        from .templates import MessageTemplate

        config = self.config
        kwargs: dict[str, Any] = {
            "cache": codecache.default_cache(),  # skips Jinja's compiler after the first run
            "html_path": config.html_template,
            "extra_headers": unsubscribe.headers(config.unsubscribe_url, config.unsubscribe_mailto),
        }
        if config.attachments_dir:
            kwargs["attachments_dir"] = config.attachments_dir
        return MessageTemplate.load(config.template, **kwargs)

    def _source(self) -> RecipientSource:
        from .sources import RecipientSource, SourceSpec

        config = self.config
        if not config.source:
            raise ConfigError(
                "no recipients: give a CSV path, s3://bucket/key, or --bucket and --key"
            )
        if not config.source.startswith("s3://") and os.path.isdir(config.source):
            raise ConfigError(f"{config.source}: is a folder, not a CSV file; nothing was sent")
        spec = SourceSpec(
            location=config.source,
            encoding=config.encoding,
            delimiter=config.delimiter,
            to_column=config.to_column,
        )
        return RecipientSource(spec, s3_client=self.hooks.s3_client)

    def _campaign_id(self, source: RecipientSource | None, template: MessageTemplate) -> str:
        from .engine import default_campaign_id
        from .sources import SourceSpec, describe

        if self.config.campaign:
            return self.config.campaign
        # The campaign's list names it, also when the rows come from elsewhere (a queue job).
        spec = SourceSpec(self.config.source) if self.config.source else None
        if spec is None:
            assert source is not None
            spec = source.spec
        return default_campaign_id(describe(spec), template.source_text)

    def _inputs(self, stored_source: str | None) -> list[str | None]:
        """The local files this run reads, which no output may be."""
        from .state import default_state_path

        config = self.config
        source = config.source or stored_source
        return [
            None if source and source.startswith("s3://") else source,
            config.template,
            config.html_template or str(Path(config.template).with_suffix(".html")),
            str(self.options.state_path or default_state_path()),
        ]

    def _queued_template(self) -> CampaignConfig:
        """A retry of a queued campaign whose template is not where `enqueue` read it (the
        upload function's temporary folder, another machine): the template bundle the
        workers send from, unpacked into a private folder removed when the run ends."""
        if Path(self.config.template).is_file():
            return self.config
        import tempfile

        from .workqueue import stored_template

        settings = self._stored_record().settings
        folder = tempfile.mkdtemp(prefix="smartmail-retry-")
        self._scratch.append(folder)
        found = stored_template(self.config, settings, Path(folder), self.hooks.s3_client)
        if found is not None:
            self.config = found
        return self.config

    def _stored_record(self) -> CampaignRecord:
        if not self.config.campaign:
            raise ConfigError("a retry needs the campaign's name")
        return load_record(self.options.state_path, self.config.campaign)

    def _transport(self) -> Transport:
        from .transports import TransportOptions, get_transport

        config = self.config
        if not config.transport:
            raise ConfigError(
                "no transport: give --transport (e.g. smtp://localhost:587 or file://outbox)"
            )
        options = TransportOptions(
            smtp_security=config.smtp_security,
            smtp_user=config.smtp_user,
            smtp_password=self.secrets.smtp_password,
            timeout=config.timeout,
            messages_per_connection=config.messages_per_connection,
            ca_file=config.smtp_ca_file,
            configuration_set=config.configuration_set,
            allow_plaintext_auth=config.allow_plaintext_auth,
            tags=dict(config.tags),
        )
        transport = get_transport(config.transport, options)
        outbox = getattr(transport, "directory", None)
        if isinstance(outbox, Path):
            try:
                check_writable_dir(outbox, "the outbox")
            except BaseException:
                transport.close()
                raise
        return transport

    def _open_ledger(self, send_options: SendOptions) -> CampaignLedger | None:
        """The campaign's ledger in the state `state_path` names (`state_store.open_state`:
        a SQLite file, or `dynamodb://TABLE`), acquired. None with no_state, and for a proof
        (--test-to): a message sent to one test address must not count as sending the campaign.

        The SQLite ledger's `acquire` locks the campaign (another run: `LockedError`, exit 3);
        the DynamoDB one takes no lock, since workers share campaigns, and claims each row
        before sending it instead, so two runs at once still never send a row twice.
        """
        from .state_store import open_state

        opts = self.options
        if opts.no_state or opts.test_to:
            if opts.resend:
                raise ConfigError("a retry needs the state database (the rows are in it)")
            return None
        if self.config.on_duplicate == "all":
            raise ConfigError(
                "--on-duplicate all cannot work with the ledger, which keeps one delivery per "
                "address and campaign; add --no-state to send to every duplicate row"
            )
        assert self.campaign is not None
        self.state = open_state(opts.state_path)
        ledger = self.state.ledger(self.campaign, resend=opts.resend)
        self.ledger = ledger
        ledger.acquire()
        return ledger

    def _close_ledger(self) -> str | None:
        """Commit what is queued and release the lock; the problem, if any, as a line."""
        if self.ledger is None:
            return None
        from .ledger import StateFileGoneError

        try:
            self.ledger.close()
        except StateFileGoneError as exc:
            self.ledger_gone = True
            return str(exc)
        except SmartmailError as exc:
            return str(exc)
        finally:
            if self.state is not None:
                with contextlib.suppress(Exception):
                    self.state.close()
        return None

    def _close_ledger_quietly(self) -> None:
        with contextlib.suppress(Exception):
            self._close_ledger()

    def _warn(self, line: str) -> None:
        if self.hooks.warn is not None:
            self.hooks.warn(line)

    def _warn_if_template_changed(self, record: CampaignRecord, template: MessageTemplate) -> None:
        if record.template_hash and record.template_hash != template_hash(template):
            self._warn(
                "the template changed since the campaign was sent; the retry uses it as it is now"
            )

    def _refuse_if_nothing_to_send(
        self, checked: PreflightResult, send_options: SendOptions, transport: str
    ) -> None:
        """Every row skipped for a reason of its own (invalid, duplicate, suppressed): exit 2.

        A re-run of a campaign the ledger already holds (already sent, failed before, in doubt)
        is not this: it reports "nothing new to send" and succeeds, as cron expects.
        """
        if checked.valid or not checked.skipped:
            return
        reasons = list(checked.skipped.values())
        if any(r.startswith(_LEDGER_SKIPS) for r in reasons):
            return
        from .engine import dry_run_summary

        summary = dry_run_summary(checked, send_options, transport)
        summary.dry_run = False
        problem = self._write_report(summary)
        if problem is not None:
            self._warn(problem)
        first = next((str(p) for p in checked.problems), reasons[0])
        raise NothingToSendError(
            f"every row was skipped ({len(reasons)} of {checked.rows}; first: {first}); "
            "nothing was sent",
            summary,
        )

    def _plan(
        self, checked: PreflightResult, send_options: SendOptions, transport: Transport
    ) -> Plan:
        """How many messages and envelope recipients this run sends; on SES, fit the 24-hour
        quota (refuse, or trim with allow_partial)."""
        from .quota import QuotaSource, plan_recipients, rows_to_send

        messages = rows_to_send(checked.valid, send_options.limit, send_options.test_to)
        counts = envelope_counts(checked, messages, send_options.test_to)
        partial_of: int | None = None
        if isinstance(transport, QuotaSource):
            try:
                quota = transport.send_quota()
            except ConfigError as exc:
                if self.config.rate is None:
                    raise ConfigError(f"{exc}; or give --rate to send without it") from None
                self._warn(f"24-hour quota not checked: {exc}")
            else:
                limit = plan_recipients(counts, quota, allow_partial=self.config.allow_partial)
                if limit is not None:
                    partial_of, messages = messages, limit
                    counts = counts[:limit]
                    send_options.limit = limit
                    self._warn(
                        f"--allow-partial: sending {limit} of {partial_of} now (what is left "
                        "of the SES 24-hour quota); the rest stays unsent for a later run"
                    )
        assert self.campaign is not None
        return Plan(
            campaign=self.campaign,
            transport=str(transport.url),
            source=checked.source,
            rows=checked.rows,
            valid=checked.valid,
            skipped=len(checked.skipped),
            messages=messages,
            recipients=sum(counts),
            test_to=send_options.test_to,
            partial_of=partial_of,
        )

    def _limiter(self, transport: Transport) -> Any:
        """`rate` is this process's; by default the transport's rate (SES: the account's
        MaxSendRate) divided by `expected_workers`, so N workers together stay within it.
        A worker waiting for its slot wakes when the run stops: a row it holds then goes back
        to pending at once, instead of waiting out the slot (up to workers / rate seconds),
        or being left in doubt by an abort meanwhile."""
        from .ratelimit import TokenBucket, Unlimited

        rate = self.config.rate
        if rate is None:
            # The account's rate is shared: each of the expected workers takes its share.
            account = transport.default_rate()
            rate = account / self.config.expected_workers if account else None
        limiter: Any = (
            TokenBucket(rate, self.config.burst, sleep=self._pause)
            if rate
            else Unlimited(sleep=self._pause)
        )
        keep_claim = getattr(self.ledger, "keep_claim", None)
        if keep_claim is not None:
            # A shared ledger's claims carry a lease: a long wait for a slot renews it.
            from .dynamo_ledger import ClaimKeepingLimiter

            limiter = ClaimKeepingLimiter(limiter, keep_claim)
        return limiter

    def _record(
        self, source: RecipientSource, template: MessageTemplate, transport: Transport
    ) -> CampaignRecord:
        from .ledger import CampaignRecord

        assert self.campaign is not None
        config = self.config.resolved()
        config = dataclasses.replace(config, campaign=self.campaign, to_column=source.to_column)
        where = config.source or source.name
        return CampaignRecord(
            self.campaign, where, template_hash(template), str(transport.url), config.to_dict()
        )

    def _summary(self, run: Run, *, error: str | None = None, interrupted: bool = False) -> Summary:
        """The counts of a run that did not finish normally."""
        from .report import Summary

        run.metrics.finish()
        failed_rows = run.failed_rows
        return Summary.build(
            run.metrics,
            run.limiter.stats(),
            campaign=run.options.campaign,
            transport=str(run.transport.url),
            source=run.source.name,
            stopped=error or run.stop_reason,
            interrupted=interrupted or (run.stop.is_set() and run.stop_reason is None),
            test_to=run.options.test_to,
            failed_csv=str(failed_rows.path) if failed_rows and failed_rows.count else None,
            warnings=[w for w in [failed_rows.warning(run.options.campaign)] if w]
            if failed_rows
            else [],
        )

    def _nothing_to_retry(self, source: str, transport: str) -> CampaignResult:
        from .ratelimit import Unlimited
        from .report import Metrics, Summary

        self._close_ledger_quietly()
        metrics = Metrics(0)
        metrics.finish()
        assert self.campaign is not None
        summary = Summary.build(
            metrics, Unlimited().stats(), campaign=self.campaign, transport=transport, source=source
        )
        which = self.options.resend or "failed"
        return CampaignResult(
            summary=summary,
            note=f"nothing to retry: campaign {self.campaign} has no {which} rows",
            # A report all the same: a script reading it must not find the last run's.
            report_error=self._write_report(summary),
        )

    def _write_report(self, summary: Summary) -> str | None:
        """Write `--report`, if asked; the problem as one line naming the file, if any.

        Pre-flight made sure it could be written, but its folder may have been removed, or a
        folder made at its path, by the end of a campaign that took hours."""
        path = self.options.report_path
        if not path:
            return None
        from .report import write_whole

        try:
            write_whole(path, summary.to_json() + "\n")
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            return f"--report {path}: cannot write the report ({reason})"
        return None


# --- helpers shared with the CLI and other entry points -----------------------------------------


def load_config(state_path: str | os.PathLike[str] | None, campaign: str) -> CampaignConfig:
    """The config a campaign was last sent with, from the state (for `retry`)."""
    record = load_record(state_path, campaign)
    return CampaignConfig.from_dict(record.settings, campaign=record.id)


def load_record(state_path: str | os.PathLike[str] | None, campaign: str) -> CampaignRecord:
    """The campaign's record in the state `state_path` names (a SQLite file, None for the
    default, or `dynamodb://TABLE`), or a one-line error naming the state. Only reads: the
    run's ledger upgrades an older schema (or makes the file) when it takes the campaign, a
    typo in the campaign's name does neither. `campaign` may be the id as `status` prints
    it (`state_store.resolve_campaign`); the record holds the real one."""
    from .state_store import not_there, open_state, resolve_campaign

    state = open_state(state_path, read_only=True)
    try:
        record = state.load(resolve_campaign(state, campaign))
    finally:
        state.close()
    if record is None:
        raise ConfigError(
            f"no campaign {campaign!r} in {state}{not_there(state)}; `smartmail status` lists them"
        )
    return record


def template_hash(template: MessageTemplate) -> str:
    """What the ledger keeps to tell a retry that the template changed since."""
    return hashlib.sha256(template.source_text.encode()).hexdigest()[:16]


def envelope_counts(checked: PreflightResult, messages: int, test_to: str | None) -> list[int]:
    """Envelope recipients of the first `messages` valid rows, in row order (SES counts each).

    Rows pre-flight kept rendered are counted exactly; any beyond its memory budget count as
    the largest message seen, so the quota check errs on the safe side.
    """
    if test_to:
        return [1] * messages
    exact = [len(m.envelope_to) for _, m in sorted(checked.kept.items())][:messages]
    widest = max(exact, default=1)
    return exact + [widest] * (messages - len(exact))
