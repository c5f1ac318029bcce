"""The command line: parses options, calls the library, turns errors into one line and an exit code.

Nothing else in smartmail imports Click. Exit codes: 0 all sent, 1 some rows failed,
2 usage or pre-flight error, 3 campaign locked by another run, 4 run stopped by the provider
(quota, paused account), 130 interrupted (SIGINT), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import click
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__, campaigns, state, unsubscribe
from .addresses import AddressError
from .addresses import validate as validate_address
from .engine import (
    ON_DUPLICATE,
    ON_INVALID,
    ON_MALFORMED,
    PreflightResult,
    SendOptions,
    default_campaign_id,
    dry_run_summary,
    preflight,
    send_campaign,
)
from .errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_STOPPED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    ConfigError,
    PreflightError,
    SmartmailError,
)
from .events import SQS_MAX_VISIBILITY, SQS_MAX_WAIT, ConsumeSummary, consume, transaction
from .ledger import CampaignRecord, Ledger
from .progress import LogProgress, NullProgress, ProgressDisplay, RichProgress
from .ratelimit import Limiter, TokenBucket, Unlimited
from .report import Summary
from .retry import RetryPolicy
from .sources import RecipientSource, SourceSpec, describe
from .state import STATE_ENV, connect
from .suppression import REASONS, SuppressionList, import_csv
from .templates import MessageTemplate
from .transports import Transport, TransportOptions, get_transport

F = TypeVar("F", bound=Callable[..., Any])
PASSWORD_ENV = "SMARTMAIL_SMTP_PASSWORD"
DEBUG_ENV = "SMARTMAIL_DEBUG"

# soft_wrap: an error is one line, however narrow the terminal or log file.
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
out_console = Console(highlight=False)


def common_options(func: F) -> F:
    """Options shared by `send` and `dry-run`: what to read, how to render, how to judge rows."""
    options = [
        click.argument("source", required=False),
        click.option("--bucket", help="S3 bucket of the recipients CSV (with --key)."),
        click.option("--key", help="S3 key of the recipients CSV (with --bucket)."),
        click.option(
            "-t",
            "--template",
            "template_path",
            required=True,
            type=click.Path(dir_okay=False),
            help="Message template: header block, blank line, body.",
        ),
        click.option(
            "--html-template",
            type=click.Path(dir_okay=False),
            help="HTML part. Default: the template's name with .html, when that file exists.",
        ),
        click.option(
            "--unsubscribe-url",
            metavar="TEMPLATE",
            help="One-click unsubscribe URL, a Jinja2 template rendered per row, e.g. "
            "'https://acme.example/u?e={{ email|urlencode }}'. Adds List-Unsubscribe and "
            "(for https) List-Unsubscribe-Post.",
        ),
        click.option(
            "--unsubscribe-mailto",
            metavar="ADDRESS",
            help="Also offer unsubscribing by mail to ADDRESS in List-Unsubscribe.",
        ),
        click.option(
            "--transport",
            "transport_url",
            envvar="SMARTMAIL_TRANSPORT",
            show_envvar=True,
            help="smtp://HOST:PORT, file://DIR, ses://REGION or ses+smtp://REGION.",
        ),
        click.option(
            "--encoding",
            default="utf-8-sig",
            show_default=True,
            help="CSV encoding (UTF-8 with or without BOM by default).",
        ),
        click.option(
            "--delimiter", help="CSV delimiter. Default: sniffed from the header (, ; tab)."
        ),
        click.option(
            "--to-column",
            default="email",
            show_default=True,
            help="Column holding the recipient address (case-insensitive).",
        ),
        click.option(
            "--on-invalid",
            type=click.Choice(ON_INVALID),
            default="skip",
            show_default=True,
            help="A row with a bad address or header injection: skip it, or abort.",
        ),
        click.option(
            "--on-malformed",
            type=click.Choice(ON_MALFORMED),
            default="abort",
            show_default=True,
            help="A ragged row (wrong number of fields): abort, or skip.",
        ),
        click.option(
            "--on-duplicate",
            type=click.Choice(ON_DUPLICATE),
            default="once",
            show_default=True,
            help="A recipient in several rows: send once, to all, or abort.",
        ),
        click.option(
            "--campaign", help="Campaign name. Default: derived from the source and template."
        ),
        click.option(
            "--tag",
            "tags",
            multiple=True,
            metavar="KEY=VALUE",
            help="Message tag (SES); may be repeated.",
        ),
        click.option(
            "--debug", is_flag=True, envvar=DEBUG_ENV, help="Show tracebacks and debug logs."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def transport_options(func: F) -> F:
    options = [
        click.option(
            "--smtp-security",
            type=click.Choice(["starttls", "tls", "none"]),
            default="starttls",
            show_default=True,
            help="How to secure SMTP.",
        ),
        click.option(
            "--smtp-user",
            envvar="SMARTMAIL_SMTP_USER",
            show_envvar=True,
            help=f"SMTP login; the password is read from ${PASSWORD_ENV}.",
        ),
        click.option(
            "--smtp-ca-file",
            type=click.Path(dir_okay=False, exists=True),
            help="CA bundle to verify the server's certificate (default: system store).",
        ),
        click.option(
            "--allow-plaintext-auth",
            is_flag=True,
            help="Allow --smtp-user with --smtp-security none to a host other than localhost "
            "(the password crosses the network in clear).",
        ),
        click.option(
            "--timeout",
            type=float,
            default=30.0,
            show_default=True,
            help="Seconds before a network operation counts as failed.",
        ),
        click.option(
            "--messages-per-connection",
            type=int,
            default=1000,
            show_default=True,
            help="Reopen an SMTP connection after this many messages.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def state_options(func: F) -> F:
    """Where the ledger lives (`send`, `dry-run`)."""
    options = [
        click.option(
            "--state",
            "state_path",
            type=click.Path(dir_okay=False),
            envvar=state.STATE_ENV,
            show_envvar=True,
            help="State database (ledger, suppression list). "
            "Default: $XDG_STATE_HOME/smartmail/smartmail.db.",
        ),
        click.option(
            "--no-state",
            is_flag=True,
            help="Keep no ledger: no campaign lock, no skipping of addresses already "
            "sent to or suppressed. For one-off sends only.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="smartmail")
def cli() -> None:
    """Personalised bulk email from a CSV, through SMTP, Amazon SES or a local outbox.

    Start with `smartmail dry-run`, then `smartmail send`.
    """


@cli.command("dry-run")
@common_options
@transport_options
@state_options
@click.option(
    "--preview",
    type=int,
    default=1,
    show_default=True,
    help="Show the first N messages as they would be sent.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False),
    help="Also write the summary as JSON to this file.",
)
def dry_run_cmd(preview: int, report_path: str | None, **kw: Any) -> None:
    """Validate and render every row and show previews; send nothing.

    Exits 0 only if every row is valid.
    """
    setup_logging(kw["debug"])
    source, template, options = _prepare(kw, preview=preview)
    transport = _transport(kw) if kw["transport_url"] else None
    allow_utf8 = transport.allow_utf8_local if transport else True
    ledger = _ledger(kw, options, lock=False)
    checked = preflight(source, template, options, allow_utf8_local=allow_utf8, journal=ledger)
    for message in checked.previews:
        out_console.rule(f"row {message.row.number}: to {', '.join(message.recipients)}")
        click.echo(message.data.decode("utf-8", "replace").replace("\r\n", "\n"))
    out_console.rule()
    _print_problems(checked)
    summary = dry_run_summary(checked, options, transport.url if transport else "(none)")
    warning = unsubscribe.missing_warning(checked.valid, template.header_names)
    if warning:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
        summary.warnings.append(warning)
    _finish_summary(summary, report_path)
    _ledger_notes(summary)
    if not checked.clean:
        raise SystemExit(EXIT_USAGE)


@cli.command("send")
@common_options
@transport_options
@state_options
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=4,
    show_default=True,
    help="Parallel senders, each with its own connection.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    help="Messages per second across all workers. Default: the transport's (none for SMTP).",
)
@click.option(
    "--burst",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Sends allowed at once above the steady rate.",
)
@click.option(
    "--max-retries",
    type=click.IntRange(0, 20),
    default=3,
    show_default=True,
    help="Retries of a transient failure (4xx, drop, timeout), with exponential backoff.",
)
@click.option(
    "--retry-wait",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="First backoff wait in seconds; doubles each retry, up to 30 s, plus jitter.",
)
@click.option(
    "--max-connect-failures",
    type=click.IntRange(1, 1000),
    default=5,
    show_default=True,
    help="Stop the run, rows left unsent, after this many sends in a row (across workers) "
    "could not reach the server or lost its answer.",
)
@click.option("--limit", type=click.IntRange(0), help="Send only the first N sendable rows.")
@click.option(
    "--test-to",
    metavar="ADDRESS",
    help="Send the first N (--limit, default 1) messages to ADDRESS instead; a proof.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False),
    help="Also write the summary as JSON to this file.",
)
@click.option(
    "--failed-csv",
    type=click.Path(dir_okay=False),
    help="Where to write failed and unsent rows for re-sending. "
    "Default: SOURCE-NAME.failed.csv in the current folder.",
)
@click.option(
    "--progress",
    "progress_mode",
    type=click.Choice(["auto", "live", "log", "none"]),
    default="auto",
    show_default=True,
    help="Live display on a terminal, log lines elsewhere (auto).",
)
@click.option(
    "--log-interval",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds between progress lines in log mode.",
)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation on a terminal.")
@click.option(
    "--configuration-set",
    envvar="SMARTMAIL_CONFIGURATION_SET",
    show_envvar=True,
    help="SES configuration set for every message (events, dedicated IPs).",
)
@click.option(
    "--allow-partial",
    is_flag=True,
    help="SES: when the rows exceed what is left of the 24-hour quota, send what fits "
    "and leave the rest for a later run (default: refuse to start).",
)
def send_cmd(**kw: Any) -> None:
    """Validate every row, then send one message per row.

    Nothing is sent if pre-flight validation finds a problem that stops the run.
    """
    setup_logging(kw["debug"])
    source, template, options = _prepare(kw, preview=0)
    options.workers = kw["workers"]
    options.max_connect_failures = kw["max_connect_failures"]
    options.limit = kw["limit"]
    options.test_to = kw["test_to"]
    options.check()
    options.failed_csv = Path(kw["failed_csv"] or _default_failed_csv(source))
    ledger = _ledger(kw, options, lock=True)
    # Pre-flight and the send pass read one private copy, taken now: an edit while the
    # prompt waits changes nothing, and an S3 object is downloaded once.
    source = source.snapshot()
    click.get_current_context().call_on_close(source.close)
    transport = _transport(kw)
    checked = preflight(
        source,
        template,
        options,
        allow_utf8_local=transport.allow_utf8_local,
        journal=ledger,
        keep_rendered=options.render_cache_chars,
    )
    if not checked.ok:
        transport.close()
        raise PreflightError(checked.fatal, checked.fatal_count)
    _print_problems(checked)
    _fit_quota(kw, transport, checked, options)
    _confirm(kw["yes"], checked, options, transport)
    if ledger is not None:
        ledger.begin(_campaign_record(options.campaign, kw, source, template, transport))
    limiter = _limiter(kw["rate"], kw["burst"], transport)
    stop = threading.Event()
    received: list[int] = []

    def pause(seconds: float) -> None:
        stop.wait(seconds)

    retry = RetryPolicy(max_retries=kw["max_retries"], initial=kw["retry_wait"], sleep=pause)
    with _signals(stop, received):
        summary = send_campaign(
            source,
            template,
            transport,
            options=options,
            limiter=limiter,
            retry=retry,
            journal=ledger,
            progress=_progress(kw["progress_mode"], kw["log_interval"]),
            stop=stop,
            checked=checked,
        )
    if ledger is not None:
        ledger.close()
    _finish_summary(summary, kw["report_path"])
    _ledger_notes(summary)
    raise SystemExit(_exit_code(summary, received))


@cli.command("quota")
@click.option(
    "--transport",
    "transport_url",
    envvar="SMARTMAIL_TRANSPORT",
    show_envvar=True,
    required=True,
    help="ses://REGION or ses+smtp://REGION.",
)
@click.option(
    "--from",
    "sender",
    metavar="ADDRESS",
    help="Also check that SES lets this sender address (or its domain) send.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--debug", is_flag=True, envvar=DEBUG_ENV, help="Show tracebacks and debug logs.")
def quota_cmd(transport_url: str, sender: str | None, as_json: bool, debug: bool) -> None:
    """Show the SES account's sending limits and usage, and check a sender identity.

    Exits 2 when the sender given with --from is not verified.
    """
    import json

    from rich.table import Table

    from .quota import account_report, region_from_url

    setup_logging(debug)
    report = account_report(region_from_url(transport_url), sender)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        table = Table(title="SES account", show_header=False, title_justify="left")
        table.add_column("what", style="bold")
        table.add_column("value", justify="right")
        for name, value in report.rows():
            table.add_row(name, value)
        out_console.print(table)
        for warning in report.warnings:
            err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if not report.ok:
        raise SystemExit(EXIT_USAGE)


# --- suppression list and provider feedback ------------------------------------------------------


def _feedback_state_option(func: F) -> F:
    option = click.option(
        "--state",
        "state_path",
        type=click.Path(dir_okay=False),
        envvar=STATE_ENV,
        show_envvar=True,
        help="State database. Default: $XDG_STATE_HOME/smartmail/smartmail.db.",
    )
    return option(func)


@cli.group("suppress")
def suppress_group() -> None:
    """The suppression list: addresses that are never sent to again.

    Bounces and complaints are added by `smartmail events`; `send` and `dry-run` skip every
    address on the list.
    """


@suppress_group.command("add")
@click.argument("addresses_", metavar="ADDRESS...", nargs=-1, required=True)
@click.option(
    "--reason",
    type=click.Choice(REASONS),
    default="manual",
    show_default=True,
    help="Why the address is suppressed.",
)
@click.option("--detail", default="", help="A note kept with the entry.")
@_feedback_state_option
def suppress_add_cmd(
    addresses_: tuple[str, ...], reason: str, detail: str, state_path: str | None
) -> None:
    """Suppress addresses (an address already on the list keeps its first reason)."""
    valid = _valid_addresses(addresses_)
    conn = connect(state_path)
    with transaction(conn):
        added = sum(SuppressionList(conn).add(a, reason, detail) for a in valid)
    click.echo(f"suppressed {added} address(es); {len(valid) - added} already on the list")


@suppress_group.command("remove")
@click.argument("addresses_", metavar="ADDRESS...", nargs=-1, required=True)
@_feedback_state_option
def suppress_remove_cmd(addresses_: tuple[str, ...], state_path: str | None) -> None:
    """Take addresses off the list, so they can be sent to again."""
    conn = connect(state_path)
    with transaction(conn):
        removed = sum(SuppressionList(conn).remove(a) for a in addresses_)
    click.echo(f"removed {removed} address(es); {len(addresses_) - removed} were not on the list")


@suppress_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@_feedback_state_option
def suppress_list_cmd(as_json: bool, state_path: str | None) -> None:
    """Show every suppressed address, its reason and since when."""
    entries = list(SuppressionList(connect(state_path)))
    if as_json:
        click.echo(json.dumps([asdict(e) for e in entries], indent=2))
        return
    table = Table(title=f"suppressed addresses: {len(entries)}", title_justify="left")
    for column in ("address", "reason", "detail"):
        table.add_column(column, overflow="fold")
    table.add_column("since", no_wrap=True)
    for e in entries:
        table.add_row(escape(e.address), e.reason, escape(e.detail), e.created_at)
    out_console.print(table)


@suppress_group.command("import")
@click.argument("csv_path", metavar="CSV")
@click.option(
    "--column",
    default="email",
    show_default=True,
    help="Column holding the addresses (case-insensitive).",
)
@click.option(
    "--reason",
    type=click.Choice(REASONS),
    help="Reason for every row. Default: the file's reason column, else manual.",
)
@click.option("--encoding", default="utf-8-sig", show_default=True, help="CSV encoding.")
@_feedback_state_option
def suppress_import_cmd(
    csv_path: str, column: str, reason: str | None, encoding: str, state_path: str | None
) -> None:
    """Suppress every address in a CSV (a path or s3://bucket/key); safe to repeat.

    Bad rows are reported with file, row and column and skipped; the exit status is then 1.
    """
    result = import_csv(
        SuppressionList(connect(state_path)),
        csv_path,
        column=column,
        reason=reason,
        encoding=encoding,
    )
    for problem in result.problems[:20]:
        err_console.print(f"[yellow]warning:[/] {escape(problem)}", soft_wrap=True)
    if result.problem_count > 20:
        err_console.print(f"... and {result.problem_count - 20} more bad row(s)")
    click.echo(
        f"imported {result.rows} row(s): {result.added} newly suppressed, "
        f"{result.already} already on the list, {result.problem_count} bad row(s) skipped"
    )
    if result.problem_count:
        raise SystemExit(EXIT_SOME_FAILED)


@suppress_group.command("export")
@click.argument("csv_path", metavar="[CSV|-]", default="-")
@_feedback_state_option
def suppress_export_cmd(csv_path: str, state_path: str | None) -> None:
    """Write the list as CSV (email, reason, detail, created_at) to a file or stdout (-)."""
    suppressions = SuppressionList(connect(state_path))
    if csv_path == "-":
        suppressions.export_csv(sys.stdout)
        return
    try:
        with open(csv_path, "w", newline="", encoding="utf-8") as fh:
            count = suppressions.export_csv(fh)
    except OSError as exc:
        raise ConfigError(f"{csv_path}: cannot write ({exc.strerror})") from None
    err_console.print(f"exported {count} address(es) to {csv_path}")


@cli.command("events")
@click.option(
    "--queue",
    "queue_url",
    required=True,
    metavar="SQS_URL",
    help="The SQS queue subscribed to the SES feedback SNS topic.",
)
@click.option(
    "--max-messages",
    type=click.IntRange(1),
    default=100,
    show_default=True,
    help="Stop after receiving this many messages.",
)
@click.option(
    "--wait-seconds",
    type=click.IntRange(0, SQS_MAX_WAIT),
    default=5,
    show_default=True,
    help="Long-poll wait; an empty queue ends the run after it.",
)
@click.option(
    "--visibility-timeout",
    type=click.IntRange(0, SQS_MAX_VISIBILITY),
    help="Seconds a received message stays hidden. Default: the queue's setting.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_feedback_state_option
@click.option("--debug", is_flag=True, envvar=DEBUG_ENV, help="Show tracebacks and debug logs.")
def events_cmd(
    queue_url: str,
    max_messages: int,
    wait_seconds: int,
    visibility_timeout: int | None,
    as_json: bool,
    state_path: str | None,
    debug: bool,
) -> None:
    """Apply SES bounces, complaints and deliveries from an SQS queue; bounded, for cron.

    Permanent bounces and complaints suppress their recipients. Each message is deleted only
    once applied; one that cannot be read is reported and left on the queue for its
    dead-letter policy, and the exit status is then 1.
    """
    setup_logging(debug)
    summary = consume(
        queue_url,
        connect(state_path),
        max_messages=max_messages,
        wait_seconds=wait_seconds,
        visibility_timeout=visibility_timeout,
        on_problem=lambda line: err_console.print(f"[red]error:[/] {escape(line)}", soft_wrap=True),
    )
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2, sort_keys=True))
    else:
        out_console.print(_events_table(summary))
    if not summary.ok:
        raise SystemExit(EXIT_SOME_FAILED)


def _valid_addresses(values: tuple[str, ...]) -> list[str]:
    valid: list[str] = []
    for value in values:
        try:
            valid.append(validate_address(value))
        except AddressError as exc:
            raise ConfigError(f"{exc}; nothing was added") from None
    return valid


def _events_table(summary: ConsumeSummary) -> Table:
    table = Table(title="smartmail events", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", justify="right", overflow="fold")
    table.add_row("queue", summary.queue)
    table.add_row("received", str(summary.received))
    for kind, count in sorted(summary.applied.items()):
        table.add_row(f"  applied: {kind}", str(count))
    table.add_row("already applied (re-delivered)", str(summary.duplicates))
    table.add_row("suppressed (new)", str(summary.suppressed))
    table.add_row("deliveries updated", str(summary.deliveries_marked))
    table.add_row("deleted from the queue", str(summary.deleted))
    table.add_row("malformed (left on the queue)", str(len(summary.malformed)))
    if summary.errors:
        table.add_row("not applied (left on the queue)", str(len(summary.errors)))
    if summary.delete_failed:
        table.add_row("applied, not deleted", str(len(summary.delete_failed)))
    return table


# --- helpers -----------------------------------------------------------------------------------


def _prepare(
    kw: dict[str, Any], *, preview: int, source: RecipientSource | None = None
) -> tuple[RecipientSource, MessageTemplate, SendOptions]:
    location = source.name if source else _source_location(kw["source"], kw["bucket"], kw["key"])
    spec = SourceSpec(
        location=location,
        encoding=kw["encoding"],
        delimiter=_delimiter(kw["delimiter"]),
        to_column=kw["to_column"],
    )
    source = source or RecipientSource(spec)
    template = MessageTemplate.load(
        kw["template_path"],
        html_path=kw["html_template"],
        extra_headers=unsubscribe.headers(kw.get("unsubscribe_url"), kw.get("unsubscribe_mailto")),
    )
    campaign = kw["campaign"] or default_campaign_id(describe(spec), template.source_text)
    tags = _tags(kw["tags"])
    tags.setdefault("campaign", campaign)
    options = SendOptions(
        on_invalid=kw["on_invalid"],
        on_malformed=kw["on_malformed"],
        on_duplicate=kw["on_duplicate"],
        preview=preview,
        campaign=campaign,
        tags=tags,
    )
    return source, template, options


def _source_location(source: str | None, bucket: str | None, key: str | None) -> str:
    if bucket or key:
        if source:
            raise ConfigError("give the recipients either as SOURCE or as --bucket/--key, not both")
        if not (bucket and key):
            raise ConfigError("--bucket and --key go together")
        return f"s3://{bucket}/{key}"
    if not source:
        raise ConfigError("no recipients: give a CSV path, s3://bucket/key, or --bucket and --key")
    return source


def _delimiter(value: str | None) -> str | None:
    if value in ("\\t", "tab", "TAB"):
        return "\t"
    return value


def _tags(pairs: tuple[str, ...]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ConfigError(f"--tag {pair!r}: expected KEY=VALUE")
        tags[key] = value
    return tags


def _transport(kw: dict[str, Any]) -> Transport:
    url = kw["transport_url"]
    if not url:
        raise ConfigError(
            "no transport: give --transport (e.g. smtp://localhost:587 or file://outbox)"
        )
    options = TransportOptions(
        smtp_security=kw["smtp_security"],
        smtp_user=kw["smtp_user"],
        smtp_password=os.environ.get(PASSWORD_ENV),
        timeout=kw["timeout"],
        messages_per_connection=kw["messages_per_connection"],
        ca_file=kw["smtp_ca_file"],
        configuration_set=kw.get("configuration_set"),
        allow_plaintext_auth=bool(kw.get("allow_plaintext_auth")),
        tags=_tags(kw["tags"]),
    )
    return get_transport(url, options)


def _limiter(rate: float | None, burst: int, transport: Transport) -> Limiter:
    rate = rate if rate is not None else transport.default_rate()
    return TokenBucket(rate, burst) if rate else Unlimited()


def _fit_quota(
    kw: dict[str, Any], transport: Transport, checked: PreflightResult, options: SendOptions
) -> None:
    """SES: refuse a run that does not fit the 24-hour quota, or trim it with --allow-partial."""
    from .quota import QuotaSource, plan_limit, rows_to_send

    if not isinstance(transport, QuotaSource):
        return
    try:
        quota = transport.send_quota()
    except ConfigError as exc:
        if kw["rate"] is None:
            raise ConfigError(f"{exc}; or give --rate to send without it") from None
        err_console.print(f"[yellow]warning:[/] 24-hour quota not checked: {exc}", highlight=False)
        return
    to_send = rows_to_send(checked.valid, options.limit, options.test_to)
    limit = plan_limit(to_send, quota, allow_partial=kw["allow_partial"])
    if limit is not None:
        options.limit = limit
        err_console.print(
            f"--allow-partial: sending {limit} of {to_send} now (what is left of the SES "
            "24-hour quota); the rest stays unsent for a later run",
            highlight=False,
        )


def _default_failed_csv(source: RecipientSource) -> str:
    stem = Path(source.name.rstrip("/")).stem or "recipients"
    return f"{stem}.failed.csv"


def _progress(mode: str, interval: float) -> ProgressDisplay:
    if mode == "auto":
        mode = "live" if err_console.is_terminal else "log"
    if mode == "live":
        return RichProgress(err_console)
    if mode == "log":
        return LogProgress(sys.stderr, interval)
    return NullProgress()


def _confirm(
    yes: bool, checked: PreflightResult, options: SendOptions, transport: Transport
) -> None:
    if yes or not sys.stdin.isatty():
        return
    count = checked.valid if options.limit is None else min(options.limit, checked.valid)
    target = f"to {options.test_to} (test)" if options.test_to else "to their recipients"
    if options.test_to and options.limit is None:
        count = min(1, checked.valid)
    click.confirm(f"Send {count} message(s) {target} via {transport.url}?", abort=True, err=True)


class _signals:
    """SIGINT/SIGTERM stop taking rows and let in-flight sends finish; a second one aborts."""

    def __init__(self, stop: threading.Event, received: list[int]) -> None:
        self.stop = stop
        self.received = received
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stop.is_set() and self.received:
            raise KeyboardInterrupt
        self.received.append(signum)
        self.stop.set()
        name = signal.Signals(signum).name
        err_console.print(
            f"[yellow]{name}: finishing the messages in flight, then stopping "
            f"(again to abort at once)[/]"
        )

    def __enter__(self) -> _signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _exit_code(summary: Summary, received: list[int]) -> int:
    if received:
        return EXIT_TERMINATED if received[0] == signal.SIGTERM else EXIT_INTERRUPTED
    if summary.stopped:
        return EXIT_STOPPED
    if summary.failed or summary.lost_replies:
        return EXIT_SOME_FAILED
    return EXIT_OK


def _print_problems(checked: PreflightResult, most: int = 20) -> None:
    for problem in checked.problems[:most]:
        err_console.print(f"[yellow]warning:[/] {escape(str(problem))}", highlight=False)
    if checked.problem_count > most:
        err_console.print(f"... and {checked.problem_count - most} more problem(s)")


def _finish_summary(summary: Summary, report_path: str | None) -> None:
    summary.print(out_console)
    if report_path:
        Path(report_path).write_text(summary.to_json() + "\n", encoding="utf-8")


def setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if debug:
        os.environ[DEBUG_ENV] = "1"
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def main(argv: list[str] | None = None) -> None:
    """Entry point: one line per error, documented exit codes, tracebacks only when debugging."""
    try:
        cli.main(args=argv, prog_name="smartmail", standalone_mode=False)
    except SmartmailError as exc:
        if _debug():
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise SystemExit(exc.exit_code) from None
    except click.exceptions.Abort:
        err_console.print("Aborted: nothing was sent.")
        raise SystemExit(EXIT_INTERRUPTED) from None
    except click.ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("Interrupted.")
        raise SystemExit(EXIT_INTERRUPTED) from None
    except BrokenPipeError:
        raise SystemExit(EXIT_SOME_FAILED) from None


def reference() -> str:
    """The CLI reference in Markdown, generated from --help (docs/cli.md; a test keeps it fresh)."""
    lines = [
        "# smartmail command reference",
        "",
        "Generated from `--help` by `make docs`; a test fails when it drifts.",
        "",
    ]
    commands: list[tuple[str, click.Command]] = [("smartmail", cli)]
    for name, command in sorted(cli.commands.items()):
        commands.append((f"smartmail {name}", command))
        if isinstance(command, click.Group):
            for sub, subcommand in sorted(command.commands.items()):
                commands.append((f"smartmail {name} {sub}", subcommand))
    for full_name, command in commands:
        with click.Context(
            command, info_name=full_name, terminal_width=100, help_option_names=["-h", "--help"]
        ) as ctx:
            text = command.get_help(ctx)
        lines += [f"## {full_name}", "", "```", text, "```", ""]
    return "\n".join(lines)


# --- the ledger: status, retry and their helpers -----------------------------------------------

# Options of `send` that are about one run, not the campaign: never stored for `retry`.
_PER_RUN = frozenset(
    {
        "source",
        "bucket",
        "key",
        "yes",
        "report_path",
        "failed_csv",
        "test_to",
        "limit",
        "progress_mode",
        "log_interval",
        "debug",
        "state_path",
        "no_state",
        "preview",
        "campaign",
    }
)
_PATHS = frozenset({"template_path", "html_template", "smtp_ca_file"})
_SECRET_WORDS = ("password", "secret", "token")
_STATE_HELP = "State database. Default: $XDG_STATE_HOME/smartmail/smartmail.db."


@cli.command("status")
@click.argument("campaign", required=False)
@click.option(
    "--state",
    "state_path",
    type=click.Path(dir_okay=False),
    envvar=state.STATE_ENV,
    show_envvar=True,
    help=_STATE_HELP,
)
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def status_cmd(campaign: str | None, state_path: str | None, as_json: bool) -> None:
    """List campaigns and their delivery counts.

    Sent, failed, skipped, pending and in doubt from the ledger; delivered, bounced and
    complained from the provider's feedback (`smartmail events`).
    """
    path = Path(state_path) if state_path else state.default_state_path()
    found: list[campaigns.CampaignStatus] = []
    if path.exists():
        conn = state.connect(path)
        try:
            found = campaigns.statuses(conn, path, campaign)
        finally:
            conn.close()
    if campaign and not found:
        raise ConfigError(f"no campaign {campaign!r} in {path}; `smartmail status` lists them")
    if as_json:
        click.echo(json.dumps([c.to_dict() for c in found], indent=2))
        return
    if not found:
        out_console.print(f"no campaigns in {path}")
        return
    table = Table(title=f"campaigns in {path}", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("campaign", no_wrap=True)
    table.add_column("last run (UTC)", no_wrap=True)
    for name in (
        "sent",
        "failed",
        "skipped",
        "pending",
        "in doubt",
        "delivered",
        "bounced",
        "complained",
    ):
        table.add_column(name, justify="right")
    for c in found:
        doubt = f"{c.in_flight} sending" if c.running else str(c.in_doubt)
        table.add_row(
            c.campaign + (" (running)" if c.running else ""),
            (c.last_run or "")[:16].replace("T", " "),
            *(str(n) for n in (c.sent, c.failed, c.skipped, c.pending)),
            doubt,
            *(str(n) for n in (c.delivered, c.bounced, c.complained)),
        )
    # Off a terminal (cron mail, a pipe) there is no width to respect: do not squeeze the table.
    console = out_console if out_console.is_terminal else Console(width=160, highlight=False)
    console.print(table)


@cli.command("retry")
@click.argument("campaign")
@click.option(
    "--in-doubt",
    is_flag=True,
    help="Send the rows left in doubt by a run that died mid-send instead of the failed "
    "ones. Some of them may already have arrived once.",
)
@click.option(
    "--state",
    "state_path",
    type=click.Path(dir_okay=False),
    envvar=state.STATE_ENV,
    show_envvar=True,
    help=_STATE_HELP,
)
@click.option("--transport", "transport_url", help="Default: the campaign's transport.")
@click.option(
    "--smtp-security",
    type=click.Choice(["starttls", "tls", "none"]),
    help="Default: the campaign's.",
)
@click.option(
    "--smtp-user",
    envvar="SMARTMAIL_SMTP_USER",
    show_envvar=True,
    help=f"Default: the campaign's; the password is read from ${PASSWORD_ENV}.",
)
@click.option(
    "--smtp-ca-file", type=click.Path(dir_okay=False, exists=True), help="Default: the campaign's."
)
@click.option("--timeout", type=float, help="Default: the campaign's.")
@click.option("--workers", type=click.IntRange(1, 256), help="Default: the campaign's.")
@click.option(
    "--rate", type=click.FloatRange(min=0, min_open=True), help="Default: the campaign's."
)
@click.option("--max-retries", type=click.IntRange(0, 20), help="Default: the campaign's.")
@click.option(
    "--max-connect-failures", type=click.IntRange(1, 1000), help="Default: the campaign's."
)
@click.option(
    "--allow-plaintext-auth",
    is_flag=True,
    default=None,
    help="Default: the campaign's. See send.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False),
    help="Also write the summary as JSON to this file.",
)
@click.option(
    "--failed-csv",
    type=click.Path(dir_okay=False),
    help="Where to export rows that fail again. Default: SOURCE-NAME.failed.csv.",
)
@click.option(
    "--progress",
    "progress_mode",
    type=click.Choice(["auto", "live", "log", "none"]),
    default="auto",
    show_default=True,
    help="As for send.",
)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation on a terminal.")
@click.option("--debug", is_flag=True, envvar=DEBUG_ENV, help="Show tracebacks and debug logs.")
def retry_cmd(campaign: str, in_doubt: bool, state_path: str | None, **given: Any) -> None:
    """Re-send the failed rows of a campaign (or, with --in-doubt, the in-doubt ones).

    The rows come from the ledger (the values each row had when it was attempted), and the
    template and send options are the campaign's, as stored by its last `send`; secrets come
    from the environment again. Addresses suppressed since are skipped.
    """
    setup_logging(given["debug"])
    which: campaigns.Which = "in-doubt" if in_doubt else "failed"
    ledger = Ledger(state_path or state.default_state_path(), campaign, resend=which)
    click.get_current_context().call_on_close(ledger.close)
    record = campaigns.load(ledger.conn(), campaign)
    if record is None:
        raise ConfigError(
            f"no campaign {campaign!r} in {ledger.path}; `smartmail status` lists them"
        )
    if not record.settings.get("template_path"):
        raise ConfigError(
            f"campaign {campaign!r} has no stored template and options (it was not sent by "
            "`smartmail send`); send it again with `smartmail send`"
        )
    ledger.acquire()
    rows = campaigns.retry_rows(ledger.conn(), campaign, which)
    if not rows:
        out_console.print(f"nothing to retry: campaign {campaign} has no {which} rows")
        return
    kw = _send_defaults()
    kw.update(record.settings)
    kw.update({k: v for k, v in given.items() if v is not None})
    kw["campaign"] = campaign
    stored = campaigns.LedgerSource(record.source, rows, kw["to_column"])
    source, template, options = _prepare(kw, preview=0, source=stored)
    if record.template_hash and record.template_hash != _template_hash(template):
        err_console.print(
            "[yellow]warning:[/] the template changed since the campaign was sent; "
            "the retry uses it as it is now"
        )
    options.workers = kw["workers"]
    options.max_connect_failures = kw["max_connect_failures"]
    options.check()
    options.failed_csv = Path(kw["failed_csv"] or campaigns.failed_csv_name(record.source))
    transport = _transport(kw)
    checked = preflight(
        source,
        template,
        options,
        allow_utf8_local=transport.allow_utf8_local,
        journal=ledger,
        keep_rendered=options.render_cache_chars,
    )
    _print_problems(checked)
    if not checked.ok:
        transport.close()
        raise PreflightError(checked.fatal, checked.fatal_count)
    _fit_quota(kw, transport, checked, options)
    _confirm(kw["yes"], checked, options, transport)
    ledger.begin(None)
    stop = threading.Event()
    received: list[int] = []
    retry = RetryPolicy(
        max_retries=kw["max_retries"], initial=kw["retry_wait"], sleep=lambda s: _wait(stop, s)
    )
    with _signals(stop, received):
        summary = send_campaign(
            source,
            template,
            transport,
            options=options,
            limiter=_limiter(kw["rate"], kw["burst"], transport),
            retry=retry,
            journal=ledger,
            progress=_progress(kw["progress_mode"], kw["log_interval"]),
            stop=stop,
            checked=checked,
        )
    ledger.close()
    _finish_summary(summary, kw["report_path"])
    raise SystemExit(_exit_code(summary, received))


def _ledger(kw: dict[str, Any], options: SendOptions, *, lock: bool) -> Ledger | None:
    """The campaign's ledger, locked for a send. None with --no-state, and for --test-to: a
    proof sent to one address must not count as sending the campaign."""
    if kw["no_state"] or options.test_to:
        return None
    if lock and options.on_duplicate == "all":
        raise ConfigError(
            "--on-duplicate all cannot work with the ledger, which keeps one delivery per "
            "address and campaign; add --no-state to send to every duplicate row"
        )
    ledger = Ledger(kw["state_path"] or state.default_state_path(), options.campaign)
    click.get_current_context().call_on_close(ledger.close)
    if lock:
        ledger.acquire()
    return ledger


def _wait(stop: threading.Event, seconds: float) -> None:
    """A backoff sleep that ends early when the run is stopping."""
    stop.wait(seconds)


def _template_hash(template: MessageTemplate) -> str:
    return hashlib.sha256(template.source_text.encode()).hexdigest()[:16]


def _campaign_record(
    campaign: str,
    kw: dict[str, Any],
    source: RecipientSource,
    template: MessageTemplate,
    transport: Transport,
) -> CampaignRecord:
    """What `retry` needs to send again the same way: every campaign-wide option of this
    `send` (paths made absolute), never a secret (those come from the environment)."""
    settings: dict[str, Any] = {}
    for name, value in kw.items():
        if name in _PER_RUN or any(word in name for word in _SECRET_WORDS):
            continue
        if name in _PATHS and value:
            value = os.path.abspath(value)
        if isinstance(value, tuple):
            value = list(value)
        if value is None or isinstance(value, str | int | float | bool | list):
            settings[name] = value
    settings["to_column"] = source.to_column
    where = source.name if source.spec.is_s3 else os.path.abspath(source.name)
    return CampaignRecord(campaign, where, _template_hash(template), transport.url, settings)


def _send_defaults() -> dict[str, Any]:
    """The defaults of every `send` option, so a retry of an older campaign has them all."""
    with send_cmd.make_context("send", [], resilient_parsing=True) as ctx:
        return dict(ctx.params)


def _ledger_notes(summary: Summary) -> None:
    """One line each for what the ledger held back, so a cron mail says it plainly."""
    already = summary.skip_reasons.get("already sent", 0)
    if already:
        done = not (summary.sent or summary.failed or summary.unsent or summary.in_doubt)
        rest = "; nothing new to send" if done else ""
        out_console.print(f"already sent: {already} (campaign {summary.campaign}){rest}")
    if summary.in_doubt:
        out_console.print(
            f"in doubt: {summary.in_doubt} (the answer was lost after sending, or a run died "
            f"mid-send; they may have arrived: `smartmail retry {summary.campaign} --in-doubt` "
            "sends them again)"
        )
