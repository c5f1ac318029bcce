"""The command line: parses options, calls the library, prints, turns errors into one line and
an exit code.

Nothing else in smartmail imports Click, and the campaign pipeline is the library's
(`smartmail.campaign`): this module only translates options, asks for confirmation and prints.
Exit codes (the README's table): 0 all sent, 1 some rows failed, 2 nothing was sent (usage
error, pre-flight problem, unwritable output, every row skipped, confirmation declined),
3 campaign locked by another run, 4 run stopped by the provider (quota, paused account),
5 stopped by an internal or state problem after sending began (or its --report could not be
written at the end), 130 interrupted (SIGINT), 143 terminated (SIGTERM); 5 wins over 130/143
(`_Signals.exit_code`). A reader of stdout or stderr that goes away (`| head -1`) changes none
of them (`_quiet_when_unread`).

Start-up time matters (`smartmail --help` from cron and shells): module-level imports are
Click and light modules only; boto3, tenacity, Jinja2 and the engine are imported inside the
commands that use them. The CLI's own lines, rules and tables are plain text (terminal.py,
tables.py); rich is loaded only for the live progress display and the `status` and
`suppress list` tables.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import click

from . import __version__, logs
from .campaign import EXIT_INCOMPLETE, CampaignRun, Hooks, Plan, Secrets
from .config import (
    ON_DUPLICATE,
    ON_INVALID,
    ON_MALFORMED,
    SMTP_SECURITY,
    CampaignConfig,
    RunOptions,
    parse_tags,
)
from .errors import (
    EXIT_INTERRUPTED,
    EXIT_SOME_FAILED,
    EXIT_STOPPED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    ConfigError,
    SmartmailError,
)
from .tables import Table
from .terminal import Terminal, cell_width, printable

if TYPE_CHECKING:
    from rich.console import Console

    from .campaigns import CampaignStatus
    from .engine import PreflightResult
    from .events import ConsumeSummary
    from .progress import ProgressDisplay
    from .report import Summary
    from .state_dynamodb import DynamoState
    from .state_store import SqliteState

F = TypeVar("F", bound=Callable[..., Any])
# Parameter types are stateless: one of each, not one per option (each click.Path looks up
# its translated name through gettext, with file system lookups, when made).
_PATH = click.Path()
_FILE = click.Path(dir_okay=False)
_EXISTING_FILE = click.Path(dir_okay=False, exists=True)
_FOLDER = click.Path(file_okay=False)
PASSWORD_ENV = "SMARTMAIL_SMTP_PASSWORD"
DEBUG_ENV = "SMARTMAIL_DEBUG"
# Copies of library constants needed to declare options, so that `--help` does not import
# sqlite3 and the feedback code (a test checks they match the library's).
STATE_ENV = "SMARTMAIL_STATE"  # smartmail.state.STATE_ENV
SQS_MAX_WAIT = 20  # smartmail.events.SQS_MAX_WAIT
SQS_MAX_VISIBILITY = 43200  # smartmail.events.SQS_MAX_VISIBILITY
SUPPRESSION_REASONS = ("bounce", "complaint", "unsubscribe", "manual")  # suppression.REASONS
STATE_METAVAR = "PATH|dynamodb://TABLE"
STATE_HELP = (
    "State: a SQLite file, or dynamodb://TABLE[?region=R] shared by many machines. "
    "Default: $XDG_STATE_HOME/smartmail/smartmail.db."
)

_consoles: dict[str, Console] = {}


def err_console() -> Console:
    """rich on stderr, for the live progress display."""
    if "err" not in _consoles:
        from rich.console import Console

        _consoles["err"] = Console(stderr=True, highlight=False, soft_wrap=True)
    return _consoles["err"]


def out_console() -> Console:
    """rich on stdout, for the `status` and `suppress list` tables."""
    if "out" not in _consoles:
        from rich.console import Console

        _consoles["out"] = Console(highlight=False)
    return _consoles["out"]


def print_rich(renderable: Any, console: Console | None = None) -> None:
    """A rich table on stdout. Off a terminal (a pipe, a file, cron mail) rich pads every line
    to the table's width: noise there, which `diff` and `grep ' $'` trip on, so it goes. A
    terminal gets rich's output as it is."""
    console = console or out_console()
    if console.is_terminal:
        console.print(renderable)
        return
    with console.capture() as captured:
        console.print(renderable)
    term = Terminal(sys.stdout)
    for line in captured.get().splitlines():
        term.line(line.rstrip())


def say(text: str) -> None:
    """A line on stdout, made printable (it may hold CSV data)."""
    Terminal(sys.stdout).line(printable(text))


def say_err(text: str = "", *, lead: str = "", style: str = "") -> None:
    """A line on stderr, however long (an error is one line): `lead` is ours, shown in `style`
    on a terminal; `text` may hold CSV data and is made printable."""
    term = Terminal(sys.stderr)
    line = printable(text)
    if lead:
        line = f"{term.styled(lead, style)} {line}" if line else term.styled(lead, style)
    term.line(line)


def warn(text: str) -> None:
    say_err(text, lead="warning:", style="yellow")


def print_table(table: Table) -> None:
    table.print(Terminal(sys.stdout))


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
            type=_PATH,
            help="Message template: header block, blank line, body.",
        ),
        click.option(
            "--html-template",
            type=_PATH,
            help="HTML part. Default: the template's name with .html, when that file exists.",
        ),
        click.option(
            "--attachments-dir",
            type=_FOLDER,
            metavar="DIR",
            help="Folder attachments may come from. Default: the template's folder; a path "
            "leading anywhere else is refused.",
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
            help="A row that cannot be sent as it is (bad address, control character in a "
            "header, attachment outside its folder): skip it, or abort.",
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
            type=click.Choice(SMTP_SECURITY),
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
            type=_EXISTING_FILE,
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
            type=_PATH,
            metavar=STATE_METAVAR,
            envvar=STATE_ENV,
            show_envvar=True,
            help="Ledger and suppression list: a SQLite file (one machine; a run locks its "
            "campaign), or dynamodb://TABLE[?region=R] shared by many machines (rows claimed "
            "one by one). Default: $XDG_STATE_HOME/smartmail/smartmail.db.",
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


def run_options(func: F) -> F:
    """What `send` and `retry` share about one run: its outputs, progress and confirmation."""
    options = [
        click.option(
            "--report",
            "report_path",
            type=_PATH,
            help="Also write the summary as JSON to this file.",
        ),
        click.option(
            "--failed-csv",
            type=_PATH,
            help="Where to write failed and unsent rows for re-sending. "
            "Default: SOURCE-NAME.failed.csv in the current folder.",
        ),
        click.option(
            "--progress",
            "progress_mode",
            type=click.Choice(["auto", "live", "log", "none"]),
            default="auto",
            show_default=True,
            help="Live display on a terminal, log lines elsewhere (auto).",
        ),
        click.option(
            "--log-interval",
            type=click.FloatRange(min=0.1),
            default=10.0,
            show_default=True,
            help="Seconds between progress lines in log mode.",
        ),
        click.option(
            "-y", "--yes", is_flag=True, help="Do not ask for confirmation on a terminal."
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
    type=_PATH,
    help="Also write the summary as JSON to this file.",
)
def dry_run_cmd(preview: int, report_path: str | None, **kw: Any) -> None:
    """Validate and render every row and show previews; send nothing.

    Exits 0 only if every row is valid.
    """
    setup_logging(kw["debug"], when_needed=True)
    options = RunOptions(
        report_path=report_path,
        state_path=kw["state_path"],
        no_state=kw["no_state"],
        preview=preview,
    )
    result = CampaignRun(_config(kw), options, _hooks(), secrets=_secrets()).check()
    out = Terminal(sys.stdout)
    for message in result.checked.previews:
        out.rule(f"row {message.row.number}: to {', '.join(message.recipients)}")
        text = message.data.decode("utf-8", "replace").replace("\r\n", "\n")
        out.line(printable(text, newlines=True))
    out.rule()
    _print_problems(result.checked)
    for warning in result.summary.warnings:
        warn(warning)
    print_summary(result.summary)
    _ledger_notes(result.summary)
    if result.report_error is not None:
        say_err(result.report_error, lead="error:", style="bold red")
    raise SystemExit(result.exit_code)


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
    help="Messages per second of this process (all its --workers together). Default: the "
    "transport's (SES: the account's rate divided by --expected-workers; none for SMTP).",
)
@click.option(
    "--expected-workers",
    type=click.IntRange(1, 10000),
    default=1,
    show_default=True,
    help="How many smartmail processes (machines, queue workers) send on this account at "
    "once; without --rate each takes this share of the SES account's rate.",
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
@run_options
@click.option(
    "--configuration-set",
    envvar="SMARTMAIL_CONFIGURATION_SET",
    show_envvar=True,
    help="SES configuration set for every message (events, dedicated IPs).",
)
@click.option(
    "--allow-partial",
    is_flag=True,
    help="SES: when the messages' recipients exceed what is left of the 24-hour quota, send "
    "what fits and leave the rest for a later run (default: refuse to start).",
)
def send_cmd(**kw: Any) -> None:
    """Validate every row, then send one message per row.

    Nothing is sent if pre-flight validation finds a problem that stops the run.
    """
    setup_logging(kw["debug"])
    options = RunOptions(
        limit=kw["limit"],
        test_to=kw["test_to"],
        report_path=kw["report_path"],
        failed_csv=kw["failed_csv"],
        state_path=kw["state_path"],
        no_state=kw["no_state"],
    )
    _run(_config(kw), options, kw)


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
    type=_PATH,
    metavar=STATE_METAVAR,
    envvar=STATE_ENV,
    show_envvar=True,
    help=STATE_HELP,
)
@click.option("--transport", "transport_url", help="Default: the campaign's transport.")
@click.option(
    "--smtp-security",
    type=click.Choice(SMTP_SECURITY),
    help="Default: the campaign's.",
)
@click.option(
    "--smtp-user",
    envvar="SMARTMAIL_SMTP_USER",
    show_envvar=True,
    help=f"Default: the campaign's; the password is read from ${PASSWORD_ENV}.",
)
@click.option("--smtp-ca-file", type=_EXISTING_FILE, help="Default: the campaign's.")
@click.option("--timeout", type=float, help="Default: the campaign's.")
@click.option("--workers", type=click.IntRange(1, 256), help="Default: the campaign's.")
@click.option(
    "--rate", type=click.FloatRange(min=0, min_open=True), help="Default: the campaign's."
)
@click.option("--expected-workers", type=click.IntRange(1, 10000), help="Default: the campaign's.")
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
@run_options
@click.option("--debug", is_flag=True, envvar=DEBUG_ENV, help="Show tracebacks and debug logs.")
def retry_cmd(campaign: str, in_doubt: bool, state_path: str | None, **given: Any) -> None:
    """Re-send the failed rows of a campaign (or, with --in-doubt, the in-doubt ones).

    The rows come from the ledger (the values each row had when it was attempted), and the
    template and send options are the campaign's, as stored by its last `send`; secrets come
    from the environment again. Addresses suppressed since are skipped.
    """
    from .campaign import load_config

    setup_logging(given["debug"])
    config = load_config(state_path, campaign).replace(
        transport=given["transport_url"],
        smtp_security=given["smtp_security"],
        smtp_user=given["smtp_user"],
        smtp_ca_file=given["smtp_ca_file"],
        timeout=given["timeout"],
        workers=given["workers"],
        rate=given["rate"],
        expected_workers=given["expected_workers"],
        max_retries=given["max_retries"],
        max_connect_failures=given["max_connect_failures"],
        allow_plaintext_auth=given["allow_plaintext_auth"],
    )
    options = RunOptions(
        report_path=given["report_path"],
        failed_csv=given["failed_csv"],
        state_path=state_path,
        resend="in-doubt" if in_doubt else "failed",
    )
    _run(config, options, given)


def _config(kw: dict[str, Any]) -> CampaignConfig:
    """`send`'s and `dry-run`'s options as the campaign's config."""
    return CampaignConfig(
        template=kw["template_path"],
        source=_source_location(kw["source"], kw["bucket"], kw["key"]),
        transport=kw["transport_url"],
        campaign=kw["campaign"],
        html_template=kw["html_template"],
        attachments_dir=kw["attachments_dir"],
        encoding=kw["encoding"],
        delimiter=_delimiter(kw["delimiter"]),
        to_column=kw["to_column"],
        unsubscribe_url=kw["unsubscribe_url"],
        unsubscribe_mailto=kw["unsubscribe_mailto"],
        smtp_security=kw["smtp_security"],
        smtp_user=kw["smtp_user"],
        smtp_ca_file=kw["smtp_ca_file"],
        timeout=kw["timeout"],
        messages_per_connection=kw["messages_per_connection"],
        configuration_set=kw.get("configuration_set"),
        tags=parse_tags(kw["tags"]),
        workers=kw.get("workers", 4),
        rate=kw.get("rate"),
        expected_workers=kw.get("expected_workers", 1),
        burst=kw.get("burst", 1),
        max_retries=kw.get("max_retries", 3),
        retry_wait=kw.get("retry_wait", 1.0),
        on_invalid=kw["on_invalid"],
        on_malformed=kw["on_malformed"],
        on_duplicate=kw["on_duplicate"],
        allow_partial=kw.get("allow_partial", False),
        max_connect_failures=kw.get("max_connect_failures", 5),
        allow_plaintext_auth=bool(kw.get("allow_plaintext_auth")),
    )


def _hooks(kw: dict[str, Any] | None = None) -> Hooks:
    hooks = Hooks(warn=warn)
    if kw is not None:
        hooks.progress = _progress(kw["progress_mode"], kw["log_interval"])
        if not kw["yes"] and sys.stdin.isatty():
            hooks.confirm = _confirm
    return hooks


def _secrets() -> Secrets:
    return Secrets(smtp_password=os.environ.get(PASSWORD_ENV))


def _run(config: CampaignConfig, options: RunOptions, kw: dict[str, Any]) -> None:
    """`send` and `retry`: one pipeline, with this terminal's prompt, progress and signals."""
    from .campaign import NothingToSendError

    hooks = _hooks(kw)
    runner = CampaignRun(config, options, hooks, secrets=_secrets())
    signals = _Signals(runner)
    # Until the first message, Ctrl-C ends the run at once (nothing was sent); from then on it
    # finishes the messages in flight.
    hooks.sending = lambda plan: signals.install()
    try:
        with signals:
            result = runner.run()
    except NothingToSendError as exc:
        print_summary(exc.summary)
        raise
    except SmartmailError as exc:
        # Raised before the first message: say so, whichever layer found the problem.
        if "nothing was sent" not in str(exc) and "nothing sent" not in str(exc):
            exc.args = (f"{exc}; nothing was sent",)
        raise
    if result.note:
        say(result.note)
        if result.report_error is not None:
            say_err(f"{result.report_error}; nothing was sent", lead="error:", style="bold red")
        raise SystemExit(result.exit_code)
    print_summary(result.summary)
    _ledger_notes(result.summary)
    for problem, after_sending in (
        (
            result.error,
            "the run stopped after sending began (the summary above says what was sent; "
            "`smartmail status` shows the campaign)",
        ),
        (
            result.report_error,
            "the run itself is recorded (the summary above; the ledger and failed rows as usual)",
        ),
    ):
        if problem is not None:
            what = "nothing was sent" if result.nothing_sent else after_sending
            if signals.received:  # the exit code may be 5 rather than 130/143: say both
                what += f"; the run was also interrupted ({_signal_name(signals.received[0])})"
            say_err(f"{problem}; {what}", lead="error:", style="bold red")
    raise SystemExit(signals.exit_code(result.exit_code))


def _confirm(plan: Plan) -> bool:
    target = f"to {plan.test_to} (test)" if plan.test_to else "to their recipients"
    extra = ""
    if plan.recipients != plan.messages and not plan.test_to:
        extra = f" ({plan.recipients} envelope recipients)"
    question = printable(f"Send {plan.messages} message(s){extra} {target} via {plan.transport}?")
    # Nothing is in flight at the prompt: Ctrl-C or Ctrl-D there means "no" (exit 2).
    from .campaign import DeclinedError

    try:
        return click.confirm(question, default=False, err=True)
    except click.exceptions.Abort:
        # A terminal that hung up (SIGHUP ignored) before the read began reads as end of
        # input, not EIO: it is no answer all the same, which its ioctls still tell.
        if _terminal_hung_up():
            raise DeclinedError(
                "no answer: the terminal went away (Input/output error); nothing was sent"
            ) from None
        click.echo("", err=True)
        return False
    except OSError as exc:  # the terminal hung up (EIO) with SIGHUP ignored: no answer
        reason = exc.strerror or type(exc).__name__
        raise DeclinedError(
            f"no answer: the terminal went away ({reason}); nothing was sent"
        ) from None


def _terminal_hung_up() -> bool:
    """Whether standard input is a terminal that hung up: Linux then fails its ioctls with
    EIO, while a live one (Ctrl-D, Ctrl-C at the prompt) answers them."""
    import errno
    import termios

    try:
        termios.tcgetattr(sys.stdin.fileno())
    except termios.error as exc:
        return bool(exc.args) and exc.args[0] == errno.EIO
    except (OSError, ValueError, AttributeError):
        return False
    return False


def _signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _say_err_within(seconds: float, text: str = "", *, lead: str = "", style: str = "") -> None:
    """`say_err` on a thread of its own, waited for at most `seconds`: from the signals'
    thread, whose next signal (an abort) must not wait on a stderr nobody reads (`| logger`
    stuck: a full pipe blocks a write for ever). Nothing it raises reaches the caller."""

    def write() -> None:
        with contextlib.suppress(Exception):  # stderr may be gone
            say_err(text, lead=lead, style=style)
            sys.stderr.flush()

    thread = threading.Thread(target=write, name="smartmail-say", daemon=True)
    thread.start()
    thread.join(seconds)


class _SignalThread:
    """SIGINT and SIGTERM handlers that only write the signal's number to a pipe; `act(signum)`
    runs on a thread of its own, for each in turn.

    A handler runs on the main thread wherever it was interrupted: inside a ledger commit
    that holds the lock an abort's flush needs, inside `Event.set` (whose lock setting a stop
    event needs), as a thread is started or joined, with stderr gone (`| tee`, which the same
    Ctrl-C ends). Writing to a non-blocking pipe takes no lock and cannot block.
    `signal` is imported where used: its enums cost every start-up (a dry run) ~0.4 ms.
    """

    # Set by the first `install()` of a command (send and retry at their first message, a
    # worker as it starts): a later Ctrl-C (Python's own, once they are put back) must not
    # say that nothing was sent. Reset by `_main`.
    began = False

    def __init__(self, act: Callable[[int], None]) -> None:
        self.act = act
        self.previous: dict[int, Any] = {}
        self._pipe: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None

    def install(self) -> None:
        """Take over SIGINT and SIGTERM, except one whose handler was installed from C (an
        embedding host's: `getsignal` gives None). Python cannot put such a handler back, so
        taking it over would leave the host with ours, or the default, for good; the host's
        handler then decides what that signal does to the run."""
        import signal

        if threading.current_thread() is not threading.main_thread() or self._pipe is not None:
            return
        _SignalThread.began = True
        self._pipe = os.pipe()
        os.set_blocking(self._pipe[1], False)  # a handler never waits: a full pipe drops
        self._thread = threading.Thread(
            target=self._read, args=(self._pipe[0],), name="smartmail-signals", daemon=True
        )
        self._thread.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not None:
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._pipe is not None:
            with contextlib.suppress(OSError):
                os.write(self._pipe[1], bytes([signum]))

    def _read(self, wake: int) -> None:
        while True:
            try:
                data = os.read(wake, 16)
            except OSError:
                return
            if not data:  # `close()`: the handlers are gone
                return
            for signum in data:
                try:
                    self.act(signum)
                except Exception as exc:
                    # Ending here would leave every later signal unread: a second Ctrl-C
                    # would do nothing. Say so, and act on the next one.
                    _say_err_within(
                        1.0,
                        f"{_signal_name(signum)}: could not act on it "
                        f"({type(exc).__name__}: {exc})",
                        lead="warning:",
                        style="yellow",
                    )

    def close(self) -> None:
        """Restore the handlers; what was written before is acted on before this returns."""
        import signal

        previous, self.previous = self.previous, {}
        try:
            # SIGINT last: Python's own handler raises KeyboardInterrupt at the next check,
            # which would otherwise come out of putting SIGTERM's back and leave ours there.
            # (`signal.signal` runs a pending handler before it replaces it: what came
            # before is written to the pipe, which is still open.)
            for sig in sorted(previous, key=lambda sig: sig == signal.SIGINT):
                signal.signal(sig, previous[sig])
        finally:
            if self._pipe is not None and self._thread is not None:
                os.close(self._pipe[1])
                self._thread.join()
                os.close(self._pipe[0])
                self._pipe = None


class _Signals:
    """SIGINT/SIGTERM stop taking rows and let in-flight sends finish; a second one aborts at
    once, after saying what was sent (messages still in flight stay in doubt in the ledger).
    Both act on a thread of their own (`_SignalThread`), never inside the handler."""

    def __init__(self, runner: CampaignRun) -> None:
        self.runner = runner
        self.received: list[int] = []
        self.handlers = _SignalThread(self._act)

    def _act(self, signum: int) -> None:
        import signal

        name = signal.Signals(signum).name
        if self.received:
            self._abort(signum, name)  # never returns
        self.received.append(signum)
        self.runner.stop()
        _say_err_within(
            1.0,
            lead=f"{name}: finishing the messages in flight, then stopping "
            "(again to abort at once)",
            style="yellow",
        )

    def _abort(self, signum: int, name: str) -> None:
        import signal

        code = EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED
        try:
            summary = self.runner.abort_summary()
            campaign = self.runner.campaign or "?"
            if summary is None:
                counts = "the counts could not be read in time"
            else:
                counts = (
                    f"sent {summary.sent}, failed {summary.failed}, skipped {summary.skipped}, "
                    f"not sent {summary.rows - summary.sent - summary.failed - summary.skipped}"
                )
            _say_err_within(
                2.0,
                f"{counts}; messages in flight may have arrived and are left in doubt "
                f"(`smartmail status {campaign}`; `smartmail retry {campaign} --in-doubt` "
                "sends them again)",
                lead=f"{name} again: aborted.",
                style="bold red",
            )

            def flush() -> None:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()

            flushing = threading.Thread(target=flush, name="smartmail-flush", daemon=True)
            flushing.start()
            flushing.join(1.0)  # a stdout nobody reads does not hold the abort up either
        finally:
            # Whatever failed (stderr gone, as when `| tee` died of the same Ctrl-C, or
            # blocked), the abort ends the process: otherwise the run would go on as after
            # one signal.
            report = sys.modules.get("smartmail.report")  # not imported here: never loaded
            if report is not None:
                with contextlib.suppress(Exception):
                    report.remove_unfinished()  # a --report being written: the last stays
            os._exit(code)

    def exit_code(self, code: int) -> int:
        """130/143 after a signal, except over 5: a cron wrapper must learn that the ledger
        could not record or the report was not written, which "interrupted, re-run" hides."""
        if self.received and code != EXIT_INCOMPLETE:
            import signal

            return EXIT_TERMINATED if self.received[0] == signal.SIGTERM else EXIT_INTERRUPTED
        return code

    def install(self) -> None:
        self.handlers.install()

    def __enter__(self) -> _Signals:
        return self

    def __exit__(self, *exc: object) -> None:
        # A signal written just before the end is acted on; an abort among them ends the
        # process here, before anything more from this run is shown.
        self.handlers.close()


def print_summary(summary: Summary) -> None:
    """The summary table (every cell is made printable by the table), warnings last."""
    table = Table("smartmail dry-run" if summary.dry_run else "smartmail summary")
    for what, value in summary.table_rows():
        table.add_row(what, value)
    for warning in summary.warnings:
        table.add_row("warning", warning, style="yellow")
    print_table(table)


def _print_problems(checked: PreflightResult, most: int = 20) -> None:
    for problem in checked.problems[:most]:
        warn(str(problem))
    if checked.problem_count > most:
        say_err(f"... and {checked.problem_count - most} more problem(s)")


def _ledger_notes(summary: Summary) -> None:
    """One line each for what the ledger held back, so a cron mail says it plainly."""
    campaign = printable(summary.campaign)
    already = summary.skip_reasons.get("already sent", 0)
    if already:
        done = not (summary.sent or summary.failed or summary.unsent or summary.in_doubt)
        rest = "; nothing new to send" if done else ""
        say(f"already sent: {already} (campaign {campaign}){rest}")
    if summary.in_doubt:
        say(
            f"in doubt: {summary.in_doubt} (the answer was lost after sending, or a run died "
            f"mid-send; they may have arrived: `smartmail retry {campaign} --in-doubt` sends "
            "them again)"
        )


def setup_logging(debug: bool, *, when_needed: bool = False) -> None:
    """Log lines on stderr: printable (they can quote CSV values), and one line each unless
    debugging (a traceback is for --debug / SMARTMAIL_DEBUG=1).

    `when_needed` (a dry run, which loads no library that logs but boto3): set up when
    something first logs (`logs.defer`), so a run that logs nothing never loads `logging`.
    """
    if debug:
        os.environ[DEBUG_ENV] = "1"
    if when_needed and not debug:
        logs.defer(lambda: _configure_logging(debug))
    else:
        _configure_logging(debug)


def _configure_logging(debug: bool) -> None:
    import logging

    class Printable(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return printable(super().format(record), newlines=debug)

        def formatException(self, ei: Any) -> str:
            return super().formatException(ei) if debug else ""

        def formatStack(self, stack_info: str) -> str:
            return super().formatStack(stack_info) if debug else ""

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Printable("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, handlers=[handler])
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def main(argv: list[str] | None = None) -> None:
    """Entry point: one line per error, documented exit codes, tracebacks only when debugging."""
    # Pre-flight keeps thousands of rendered messages alive while rendering allocates a lot:
    # at the default threshold (700 allocations) the cycle collector re-examined them so
    # often that it took a quarter of pre-flight's time. A run makes no cyclic garbage to
    # speak of (none in a 20,000-row pre-flight), so collecting less often costs no memory.
    gc.set_threshold(10_000, 10, 10)
    with _quiet_when_unread():
        _main(argv)


def entry() -> None:
    """The process's entry point (the `smartmail` script, `python -m smartmail`): `main()`,
    then a quick exit.

    Python's own exit tears down every module and object one by one: 20-35 ms after a send
    (the rendered messages pre-flight kept, click, jinja2, smtplib), against about 5 ms for a
    bare smtplib loop; a dry run's whole start-up is ~100 ms. By then everything is written
    and closed (the ledger, the report, the failed rows), so the exit runs what `atexit`
    holds (logging's flush, a coverage tool's save), flushes stdout and stderr, and ends the
    process without the teardown. Only when no other non-daemon thread is left: one still
    running (a library's) gets Python's exit, which waits for it; so does a profiler or a
    tracer that runs the command (cProfile saves its statistics once the program returns).
    `main()` itself returns or raises as before, for callers in process (tests, embedding
    hosts).
    """
    try:
        main()
        code: int = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:  # a message: Python prints it to stderr and exits 1
            raise
    others = [
        t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon
    ]
    # A profiler or tracer running the command (`python -m cProfile -o OUT -m smartmail`,
    # `trace`, a debugger) does its work once the program has ended: writing the statistics,
    # the counts. It gets Python's exit, which returns to it first.
    watched = sys.getprofile() is not None or sys.gettrace() is not None
    if others or watched:
        raise SystemExit(code)
    _exit_now(code)


def _exit_now(code: int) -> None:
    """`atexit`'s functions, stdout and stderr flushed, then `os._exit(code)`."""
    import atexit

    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            # A reader gone (`| head -1`) is not an error (`_quiet_when_unread`).
            with contextlib.suppress(Exception):
                if stream is not None:
                    stream.flush()
        os._exit(code)


@contextlib.contextmanager
def _quiet_when_unread() -> Iterator[None]:
    """A reader of stdout or stderr that goes away (`smartmail status | head -1`) is not an
    error: output there stops, unseen, and the command ends as it would have (a send records
    every row), with its own exit status (`terminal.quiet_when_unread`).

    Output lost otherwise (stdout on a full disk, `> /dev/full`, closed, `>&-`, or a terminal
    hung up while SIGHUP is ignored: EIO) does not stop the command either, but is not
    silent: once the command has ended, one line on stderr says so (whatever the exit status,
    a traceback too), and a status that would have been 0 becomes 2 (nothing was sent), or 5
    when sending began (and 1 and 4 become 5, as for a `--report` not written)."""
    from .terminal import output_lost, quiet_when_unread

    originals: list[tuple[str, Any, Any]] = []
    lost: OSError | None = None
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is getattr(sys, f"__{name}__"):  # not a test's capture, nor a caller's
            if stream is None:  # the descriptor was closed before Python started
                quiet: Any = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
                if name == "stdout":
                    lost = OSError(f"standard {name[3:]}put is closed")
            else:
                quiet = quiet_when_unread(stream)
            if quiet is not None:
                originals.append((name, stream, quiet))
                setattr(sys, name, quiet)
    try:
        try:
            yield
        finally:
            for name, stream, quiet in originals:
                with contextlib.suppress(Exception):
                    quiet.flush()
                if name == "stdout":
                    lost = lost or output_lost(quiet)
                setattr(sys, name, stream)
                if stream is None:
                    quiet.close()
    except SystemExit as exc:
        # As for a --report not written: 0, 1 and 4 become 5 once sending began (a wrapper
        # must learn of it), 0 becomes 2 before; any other status stays.
        moved = (0, None, EXIT_SOME_FAILED, EXIT_STOPPED) if _SignalThread.began else (0, None)
        if lost is None:
            raise
        lost_exit = _output_lost(lost)  # said in any case: the user must learn of it
        if exc.code not in moved:
            raise
        raise lost_exit from None
    except BaseException:
        # A bug's traceback (Python's exit 1) says nothing of stdout: the lost output is said
        # too, as for any other ending.
        if lost is not None:
            _output_lost(lost)
        raise
    if lost is not None:
        raise _output_lost(lost)


def _state_error(exc: Exception) -> str:
    """One line for an error SQLite raised: which state file, what it said, what to do."""
    import sqlite3

    from .state import opened

    files = opened()
    where = ", ".join(str(f) for f in files) if files else "the state database"
    what = f"the state database cannot be used ({exc})"
    check = "check it with `sqlite3 FILE 'PRAGMA integrity_check'`"
    # Only a damaged file may be given up on: told to move aside a ledger that is merely
    # read-only, busy or on a full disk, a user would have the next run send every row again.
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if isinstance(exc, sqlite3.ProgrammingError | sqlite3.InterfaceError):
        # smartmail's misuse of the API, not the file: nothing to check or restore.
        what = f"internal error: {type(exc).__name__}: {exc}"
        advice = f"a bug in smartmail, not a problem with the file ({DEBUG_ENV}=1 shows where)"
    elif code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        advice = (
            f"{check}; restore it from a backup, or move it aside (a new one starts empty: "
            "what it recorded is not known to the next run)"
        )
    elif code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM):
        advice = "it is read-only to this user: make it, and its folder, writable, and run again"
    elif code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        advice = "another process has held it for 30 seconds: run again once that one ends"
    elif code == sqlite3.SQLITE_FULL:
        advice = "its disk is full: make room, and run again"
    else:
        advice = f"{check}, and its disk"
    if _SignalThread.began:
        advice = "sending began: " + advice
    return f"{where}: {what}; {advice}"


def _output_lost(error: OSError) -> SystemExit:
    """The exit of a command that ran to its end with its output lost: one line on stderr
    (when it can be written), and 2 or 5 (`_quiet_when_unread`)."""
    reason = error.strerror or str(error)
    sent = "; sending began: `smartmail status` shows what was sent" if _SignalThread.began else ""
    with contextlib.suppress(Exception):
        say_err(
            f"standard output could not be written ({reason}): what the command printed is "
            f"lost{sent}",
            lead="error:",
            style="bold red",
        )
    return SystemExit(EXIT_INCOMPLETE if _SignalThread.began else EXIT_USAGE)


def _main(argv: list[str] | None) -> None:
    # A character stdout's encoding lacks (a non-ASCII address under PYTHONIOENCODING=ascii or
    # a Latin-1 terminal) is printed as its escape, as Python's own stderr does: never a
    # traceback, whoever writes it (our tables, click.echo, rich's status and suppress tables).
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        with contextlib.suppress(ValueError, OSError):
            reconfigure(errors="backslashreplace")
    _SignalThread.began = False
    try:
        cli.main(args=argv, prog_name="smartmail", standalone_mode=False)
    except SmartmailError as exc:
        if _debug():  # the traceback, and still the documented exit code
            import traceback

            sys.stderr.write(printable(traceback.format_exc(), newlines=True))
        say_err(str(exc), lead="error:", style="bold red")
        raise SystemExit(exc.exit_code) from None
    except click.exceptions.Abort:
        if _SignalThread.began:  # after the run's own handlers: sends may have been made
            say_err("Interrupted after sending began: `smartmail status` shows what was sent.")
        else:
            say_err("Aborted: nothing was sent.")
        raise SystemExit(EXIT_INTERRUPTED) from None
    except click.ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        say_err("Interrupted.")
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as exc:
        if type(exc).__module__ != "sqlite3":
            raise
        # SQLite's own error where no layer above said what it was doing: a state file
        # damaged (a disk fault, a copy taken mid-write) or made unreadable meanwhile.
        if _debug():
            import traceback

            sys.stderr.write(printable(traceback.format_exc(), newlines=True))
        say_err(_state_error(exc), lead="error:", style="bold red")
        raise SystemExit(EXIT_INCOMPLETE if _SignalThread.began else EXIT_USAGE) from None


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


# --- helpers -----------------------------------------------------------------------------------


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


def _progress(mode: str, interval: float) -> ProgressDisplay:
    from .progress import LogProgress, NullProgress, RichProgress

    if mode == "auto":
        mode = "live" if Terminal(sys.stderr).is_terminal else "log"
    if mode == "live":
        return RichProgress(err_console())
    if mode == "log":
        return LogProgress(sys.stderr, interval)
    return NullProgress()


@cli.command("status")
@click.argument("campaign", required=False)
@click.option(
    "--state",
    "state_path",
    type=_FILE,
    metavar=STATE_METAVAR,
    envvar=STATE_ENV,
    show_envvar=True,
    help=STATE_HELP,
)
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def status_cmd(campaign: str | None, state_path: str | None, as_json: bool) -> None:
    """List campaigns and their delivery counts.

    Sent, failed, skipped, pending and in doubt from the ledger; delivered, bounced and
    complained from the provider's feedback (`smartmail events`).
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table as RichTable
    from rich.text import Text

    from .state_store import not_there, open_state, resolve_campaign

    state = open_state(state_path, read_only=True)  # the old smartmail's cron job still reads it
    try:
        # The name as this command prints it finds the campaign too (ids may hold controls).
        found = state.statuses(campaign and resolve_campaign(state, campaign))
    finally:
        state.close()
    path = str(state)
    if campaign and not found:
        raise ConfigError(
            f"no campaign {campaign!r} in {path}{not_there(state)}; `smartmail status` lists them"
        )
    if as_json:
        click.echo(json.dumps([c.to_dict() for c in found], indent=2))
        return
    if not found:
        say(f"no campaigns in {path}{not_there(state)}")
        return
    rows = [_status_cells(c) for c in found]
    # Off a terminal (cron mail, a pipe) there is no width to respect: do not squeeze the table.
    console = out_console()
    if not console.is_terminal:
        console = Console(width=160, highlight=False)
    # A count column is as wide as its longest header word and its widest count, and never
    # shrunk: a count cut to "…" tells the user nothing. Only the campaign and the date give
    # way; where even that cannot make room, each campaign is a few lines instead.
    widths = [
        max(*(len(word) for word in name.split()), *(len(cells[2 + i]) for cells in rows))
        for i, name in enumerate(_STATUS_COUNTS)
    ]
    # Room for the counts, some of the name, the date on two lines, and the borders and
    # padding (3 a column, plus 1).
    name_width = min(max(cell_width(cells[0]) for cells in rows), 16)
    wanted = 3 * (len(widths) + 2) + 1 + sum(widths) + name_width + len("2026-12-07")
    if wanted > console.width:
        _print_status_blocks(f"campaigns in {path}", rows)
        return
    # The path as it is, as the blocks show it: a string title is rich markup ("[/archive]"
    # in a folder's name was a traceback).
    title = Text(printable(f"campaigns in {path}"), style="table.title")
    table = RichTable(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("campaign", overflow="fold")
    table.add_column("last run (UTC)")
    for name, width in zip(_STATUS_COUNTS, widths, strict=True):
        header = Text(name, no_wrap=False)  # "in doubt" may take two lines
        table.add_column(header, justify="right", no_wrap=True, min_width=width)
    for cells in rows:
        table.add_row(Text(cells[0]), *cells[1:])
    print_rich(table, console)


_STATUS_COUNTS = (
    "sent",
    "failed",
    "skipped",
    "pending",
    "in doubt",
    "delivered",
    "bounced",
    "complained",
)


def _status_cells(c: CampaignStatus) -> list[str]:
    """One campaign's cells in `status`: its name (printable), last run, and the counts."""
    doubt = str(c.in_doubt)
    if c.running:
        # A shared ledger can have both: rows a live worker is sending, rows a dead one left.
        doubt = f"{c.in_flight} sending"
        if c.in_doubt:
            doubt = f"{c.in_doubt} + {doubt}"
    return [
        printable(c.campaign) + (" (running)" if c.running else ""),
        (c.last_run or "")[:16].replace("T", " "),
        *(str(n) for n in (c.sent, c.failed, c.skipped, c.pending)),
        doubt,
        *(str(n) for n in (c.delivered, c.bounced, c.complained)),
    ]


def _print_status_blocks(title: str, rows: list[list[str]]) -> None:
    """`status` on a terminal too narrow for its table (its ten columns want 110 or so):
    each campaign on a few lines of "label count", every count whole beside its label."""
    term = Terminal(sys.stdout)
    term.line(term.styled(printable(title), "italic"))
    for name, last_run, *counts in rows:
        term.line()
        term.line(term.styled(name, "bold"))
        items = [f"last run {last_run}"] if last_run else []
        items += [f"{label} {n}" for label, n in zip(_STATUS_COUNTS, counts, strict=True)]
        line = ""
        for item in items:
            if line and cell_width(line) + 2 + cell_width(item) > term.width:
                term.line(line)
                line = ""
            line = f"{line}  {item}"
        term.line(line)


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
    from .quota import account_report, region_from_url

    setup_logging(debug)
    report = account_report(region_from_url(transport_url), sender)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        table = Table("SES account")
        for name, value in report.rows():
            table.add_row(name, value)
        print_table(table)
        for warning in report.warnings:
            warn(warning)
    if not report.ok:
        raise SystemExit(EXIT_USAGE)


# --- suppression list and provider feedback ------------------------------------------------------


def _feedback_state_option(func: F) -> F:
    option = click.option(
        "--state",
        "state_path",
        type=_FILE,
        metavar=STATE_METAVAR,
        envvar=STATE_ENV,
        show_envvar=True,
        help=STATE_HELP,
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
    type=click.Choice(SUPPRESSION_REASONS),
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
    with _open_state(state_path) as state, state.feedback.transaction():
        suppressions = state.suppressions
        added = sum(suppressions.add(a, reason, detail) for a in valid)
    click.echo(f"suppressed {added} address(es); {len(valid) - added} already on the list")


@suppress_group.command("remove")
@click.argument("addresses_", metavar="ADDRESS...", nargs=-1, required=True)
@_feedback_state_option
def suppress_remove_cmd(addresses_: tuple[str, ...], state_path: str | None) -> None:
    """Take addresses off the list, so they can be sent to again."""
    with _open_state(state_path) as state, state.feedback.transaction():
        suppressions = state.suppressions
        removed = sum(suppressions.remove(a) for a in addresses_)
    click.echo(f"removed {removed} address(es); {len(addresses_) - removed} were not on the list")


@suppress_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@_feedback_state_option
def suppress_list_cmd(as_json: bool, state_path: str | None) -> None:
    """Show every suppressed address, its reason and since when."""
    from rich.markup import escape
    from rich.table import Table as RichTable

    from .state_store import not_there

    with _open_state(state_path, read_only=True) as state:
        entries = list(state.suppressions)
    if as_json:
        click.echo(json.dumps([e._asdict() for e in entries], indent=2))
        return
    if not_there(state):
        say(f"no suppressed addresses in {state}{not_there(state)}")
        return
    table = RichTable(title=f"suppressed addresses: {len(entries)}", title_justify="left")
    for column in ("address", "reason", "detail"):
        table.add_column(column, overflow="fold")
    table.add_column("since", no_wrap=True)
    for e in entries:
        table.add_row(
            escape(printable(e.address)), e.reason, escape(printable(e.detail)), e.created_at
        )
    print_rich(table)


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
    type=click.Choice(SUPPRESSION_REASONS),
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
    from .suppression import import_csv

    with _open_state(state_path) as state:
        result = import_csv(
            state.suppressions, csv_path, column=column, reason=reason, encoding=encoding
        )
    for problem in result.problems[:20]:
        warn(problem)
    if result.problem_count > 20:
        say_err(f"... and {result.problem_count - 20} more bad row(s)")
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
    with _open_state(state_path, read_only=True) as state:
        suppressions = state.suppressions
        if csv_path == "-":
            suppressions.export_csv(sys.stdout)
            return
        try:
            with open(csv_path, "w", newline="", encoding="utf-8") as fh:
                count = suppressions.export_csv(fh)
        except OSError as exc:
            raise ConfigError(f"{csv_path}: cannot write ({exc.strerror})") from None
    say_err(f"exported {count} address(es) to {csv_path}")


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
    from .events import consume

    setup_logging(debug)
    with _open_state(state_path) as state:
        summary = consume(
            queue_url,
            state.feedback,
            max_messages=max_messages,
            wait_seconds=wait_seconds,
            visibility_timeout=visibility_timeout,
            on_problem=lambda line: say_err(line, lead="error:", style="red"),
        )
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2, sort_keys=True))
    else:
        print_table(_events_table(summary))
    if not summary.ok:
        raise SystemExit(EXIT_SOME_FAILED)


@contextlib.contextmanager
def _open_state(
    state_path: str | None, *, read_only: bool = False
) -> Iterator[SqliteState | DynamoState]:
    """The state `--state` names (a SQLite file or dynamodb://TABLE), closed afterwards.
    `read_only` for a command that only reads (see `SqliteState`)."""
    from .state_store import open_state

    state = open_state(state_path, read_only=read_only)
    try:
        yield state
    finally:
        state.close()


def _valid_addresses(values: tuple[str, ...]) -> list[str]:
    from .addresses import AddressError
    from .addresses import validate as validate_address

    valid: list[str] = []
    for value in values:
        try:
            valid.append(validate_address(value))
        except AddressError as exc:
            raise ConfigError(f"{exc}; nothing was added") from None
    return valid


def _events_table(summary: ConsumeSummary) -> Table:
    table = Table("smartmail events")
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


# --- the send queue: enqueue and worker (smartmail.workqueue) ---------------------------------


@cli.command("enqueue")
@common_options
@transport_options
@click.option(
    "--queue",
    "queue_url",
    required=True,
    envvar="SMARTMAIL_QUEUE_URL",
    show_envvar=True,
    help="URL of the SQS send queue.",
)
@click.option(
    "--state",
    "state_path",
    envvar=STATE_ENV,
    show_envvar=True,
    help="The shared state: dynamodb://TABLE[?region=R] (workers claim rows in it).",
)
@click.option(
    "--template-bucket",
    metavar="BUCKET",
    envvar="SMARTMAIL_TEMPLATE_BUCKET",
    show_envvar=True,
    help="Store the template (and attachments) in s3://BUCKET/templates/SHA256.json. "
    "Default: inline in the campaign's record, when under 64 KB.",
)
@click.option(
    "--rows-per-job",
    type=click.IntRange(1, 1000),
    default=10,
    show_default=True,
    help="Rows in each queue message.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=4,
    show_default=True,
    help="Parallel senders within each job, in each worker.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    help="Messages per second for each worker (workers can override it). Default: the "
    "transport's, divided by --expected-workers.",
)
@click.option(
    "--expected-workers",
    type=click.IntRange(1, 10000),
    default=1,
    show_default=True,
    help="How many workers send on this account at once; without --rate each takes this "
    "share of the SES account's rate.",
)
@click.option(
    "--max-retries",
    type=click.IntRange(0, 20),
    default=3,
    show_default=True,
    help="Retries of a transient failure, in the worker.",
)
@click.option(
    "--retry-wait",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="First backoff wait in seconds, in the worker.",
)
@click.option(
    "--configuration-set",
    envvar="SMARTMAIL_CONFIGURATION_SET",
    show_envvar=True,
    help="SES configuration set for every message (events, dedicated IPs).",
)
def enqueue_cmd(queue_url: str, template_bucket: str | None, rows_per_job: int, **kw: Any) -> None:
    """Validate every row as `send` does, then queue the rows as jobs for `smartmail worker`
    or the Lambda sender.

    Nothing is queued if pre-flight finds a problem. Running it again for the same campaign
    queues only rows that were neither queued nor sent before.
    """
    from .state_store import open_state
    from .workqueue import enqueue_campaign

    setup_logging(kw["debug"])
    state = open_state(kw["state_path"])

    import time

    shown = [0.0]

    def progress(done: int, total: int) -> None:
        # A line every few seconds (a million rows are 10,000 batches), and the last one.
        now = time.monotonic()
        if done == total or now - shown[0] >= 5:
            shown[0] = now
            say_err(f"queued {done} of {total} row(s)")

    result = enqueue_campaign(
        _config(kw),
        queue_url,
        state,
        template_bucket=template_bucket,
        rows_per_job=rows_per_job,
        warn=warn,
        progress=progress,
    )
    table = Table("smartmail enqueue")
    table.add_row("campaign", result.campaign)
    table.add_row("source", result.source)
    table.add_row("template", result.template.s3 or f"inline, sha256 {result.template.sha256[:12]}")
    table.add_row("rows", str(result.rows))
    table.add_row("queued (rows)", str(result.queued_rows))
    table.add_row("jobs", str(result.jobs))
    table.add_row("already queued", str(result.already_queued))
    table.add_row("skipped", str(result.skipped))
    for reason, count in sorted(result.skip_reasons.items()):
        table.add_row(f"  {reason}", str(count))
    table.add_row("elapsed", f"{result.elapsed_seconds:.1f} s")
    print_table(table)
    if not result.queued_rows:
        say(f"nothing new to queue (campaign {result.campaign})")


@cli.command("worker")
@click.option(
    "--queue",
    "queue_url",
    required=True,
    envvar="SMARTMAIL_QUEUE_URL",
    show_envvar=True,
    help="URL of the SQS send queue.",
)
@click.option(
    "--state",
    "state_path",
    envvar=STATE_ENV,
    show_envvar=True,
    help="The shared state: dynamodb://TABLE[?region=R], as given to enqueue.",
)
@click.option("--max-jobs", type=click.IntRange(1), help="Exit after taking this many jobs.")
@click.option(
    "--idle-exit",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Exit when the queue has been empty this long. Default: run until stopped.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    help="This worker's messages per second (its share of the account's). Default: the "
    "campaign's (its --rate, or the account's rate / its --expected-workers).",
)
@click.option(
    "--visibility-timeout",
    type=click.IntRange(1, SQS_MAX_VISIBILITY),
    metavar="SECONDS",
    help="How long a job stays hidden from other workers; extended while it is worked on. "
    "Default: the queue's.",
)
@click.option("--debug", is_flag=True, envvar=DEBUG_ENV, help="Show tracebacks and debug logs.")
def worker_cmd(
    queue_url: str,
    state_path: str | None,
    max_jobs: int | None,
    idle_exit: float | None,
    rate: float | None,
    visibility_timeout: int | None,
    debug: bool,
) -> None:
    """Send queued jobs (long polling), deleting each job once its rows' outcomes are in
    the ledger. Run as many as the rate allows, on one machine or many.

    SIGTERM or Ctrl-C finishes the job in hand, then exits; a second one stops that job too
    (messages in flight finish; the rest of the job goes back to the queue).

    Exit status: 0, or 1 when rows failed or a job could not be run; 4 when the provider or
    the SES quota stopped a job (its rows wait on the queue), 5 when the state failed (also
    over a signal's 130/143).
    """
    import signal

    from .state_store import open_state
    from .workqueue import JobOutcome, run_worker

    setup_logging(debug)
    state = open_state(state_path)
    stop, abort = threading.Event(), threading.Event()
    received: list[int] = []

    def act(signum: int) -> None:  # on a thread of its own, not in the handler
        received.append(signum)
        name = signal.Signals(signum).name
        if stop.is_set():
            abort.set()
            line = f"{name} again: stopping the job in hand (the rest goes back)"
        else:
            stop.set()
            line = f"{name}: finishing the job in hand, then exiting (again: stop it)"
        _say_err_within(1.0, lead=line, style="yellow")

    def report(outcome: JobOutcome | None, line: str) -> None:
        say_err(line)

    handlers = _SignalThread(act)
    handlers.install()
    try:
        summary = run_worker(
            queue_url,
            state,
            max_jobs=max_jobs,
            idle_exit=idle_exit,
            rate=rate,
            visibility=visibility_timeout,
            secrets=_secrets(),
            stop=stop,
            abort=abort,
            on_job=report,
        )
    finally:
        handlers.close()
    say(
        f"worker: {summary.jobs} job(s) taken, {summary.done} done, {summary.left} left for "
        f"redelivery, {summary.failed_jobs} could not be run; {summary.sent} sent, "
        f"{summary.failed} failed, {summary.skipped} skipped"
        + (f" ({summary.stopped})" if summary.stopped else "")
    )
    # As for `send`: 5 (the state failing) wins over a signal's 130/143, and 4 or 5 over 1.
    if received and summary.code != EXIT_INCOMPLETE:
        raise SystemExit(EXIT_TERMINATED if received[0] == signal.SIGTERM else EXIT_INTERRUPTED)
    if summary.code:
        raise SystemExit(summary.code)
    if summary.failed or summary.failed_jobs:
        raise SystemExit(EXIT_SOME_FAILED)
