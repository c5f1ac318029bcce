"""Secrets never appear in output: not in an echoed transport URL, however mistyped, and a
login never goes in clear to another machine unless the user says so."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest

from smartmail.errors import EXIT_USAGE, ConfigError, StopRunError
from smartmail.transports import TransportOptions, get_transport
from smartmail.transports.base import redact

from .conftest import SMTP_USER, SmtpServer, make_csv
from .test_ledger import run_cli

SECRET = "Hunter2-S3cr/et99"


@pytest.mark.parametrize(
    "url",
    [
        f"smpt://mailer:{SECRET}@mail.example.com:587",  # typo in the scheme
        f"foo://mailer:{SECRET}@mail.example.com",  # unknown scheme
        f"smtp://mailer:{SECRET}@mail.example.com:587",
        f"smtp://mailer:{SECRET}@mail.example.com:notaport",
        f"ses://mailer:{SECRET}@us-east-1",
        f"ses+smtp://mailer:{SECRET}@us-east-1",
        f"file://mailer:{SECRET}@outbox",
        f"mailer:{SECRET}@mail.example.com",  # no scheme at all
        f"smtp://{SECRET}@mail.example.com",  # the password typed as the user
        f"smtp://mailer:{SECRET}@[::1:587",  # not a URL urlsplit can parse
    ],
)
def test_a_password_in_the_url_is_never_echoed(
    url: str, tmp_path: Path, template_file: Path
) -> None:
    csv = make_csv(tmp_path / "r.csv", 1)
    code, out = run_cli(["send", str(csv), "-t", str(template_file), "--transport", url,
                         "--no-state", "--yes", "--progress", "none"])  # fmt: skip
    assert code == EXIT_USAGE, out
    assert "error" in out.lower() or "transport" in out.lower()
    for piece in (SECRET, "Hunter2", "S3cr", "et99"):
        assert piece not in out, out


def test_redact_keeps_what_helps_and_masks_the_rest() -> None:
    assert redact("smtp://mail.example.com:587") == "smtp://mail.example.com:587"
    assert redact("smtp://mailer@mail.example.com") == "smtp://mailer@mail.example.com"
    assert redact("smpt://mailer:pw@host:25") == "smpt://mailer:***@host:25"
    assert redact("x://mai ler:pw@host") == "x://***:***@host"
    assert redact("mailer:pw@host") == "***@host"


def test_a_wrong_password_is_not_echoed(
    tls_smtp_server: SmtpServer, tmp_path: Path, template_file: Path
) -> None:
    csv = make_csv(tmp_path / "r.csv", 2)
    code, out = run_cli(
        ["send", str(csv), "-t", str(template_file), "--transport", tls_smtp_server.url,
         "--smtp-user", SMTP_USER, "--smtp-ca-file", str(tls_smtp_server.ca_file),
         "--no-state", "--yes", "--progress", "none", "--report", str(tmp_path / "r.json"),
         "--failed-csv", str(tmp_path / "f.csv")],
        env={"SMARTMAIL_SMTP_PASSWORD": SECRET},
    )  # fmt: skip
    assert code == 4, out
    assert "refused the login" in out
    everything = out + (tmp_path / "r.json").read_text()
    assert SECRET not in everything and "Hunter2" not in everything


def test_login_in_clear_to_another_host_is_refused_unless_allowed(
    tmp_path: Path, template_file: Path
) -> None:
    csv = make_csv(tmp_path / "r.csv", 1)
    args = ["send", str(csv), "-t", str(template_file), "--transport",
            "smtp://mail.example.com:25", "--smtp-security", "none", "--smtp-user", "mailer",
            "--no-state", "--yes", "--progress", "none"]  # fmt: skip
    code, out = run_cli(args, env={"SMARTMAIL_SMTP_PASSWORD": SECRET})
    assert code == EXIT_USAGE
    assert "in clear" in out and "--allow-plaintext-auth" in out and SECRET not in out
    # Forced: the transport is built (it connects only when sending, so no network here).
    forced = TransportOptions(
        smtp_security="none", smtp_user="mailer", smtp_password=SECRET, allow_plaintext_auth=True
    )
    assert get_transport("smtp://mail.example.com:25", forced).url == "smtp://mail.example.com:25"


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "127.0.0.2"])
def test_login_in_clear_to_this_machine_is_allowed(host: str) -> None:
    options = TransportOptions(smtp_security="none", smtp_user="mailer", smtp_password=SECRET)
    assert get_transport(f"smtp://{host}:2525", options).url.startswith("smtp://")


def test_login_in_clear_is_refused_for_an_address_too() -> None:
    options = TransportOptions(smtp_security="none", smtp_user="mailer", smtp_password=SECRET)
    with pytest.raises(ConfigError, match="in clear"):
        get_transport("smtp://192.0.2.10:25", options)


def test_transport_options_never_show_the_password() -> None:
    options = TransportOptions(smtp_user="mailer", smtp_password=SECRET)
    for shown in (repr(options), str(options), f"{options}", f"{options!r}", repr([options])):
        assert SECRET not in shown and "Hunter2" not in shown, shown
        assert "smtp_user='mailer'" in shown and "smtp_password=<hidden>" in shown
    assert options.smtp_password == SECRET  # still there for the transport to log in with
    assert "smtp_password=None" in repr(TransportOptions())


def test_a_refused_login_raises_an_error_without_the_password(
    tls_smtp_server: SmtpServer,
) -> None:
    options = TransportOptions(
        smtp_user=SMTP_USER, smtp_password=SECRET, ca_file=tls_smtp_server.ca_file
    )
    transport = get_transport(tls_smtp_server.url, options)
    with pytest.raises(StopRunError, match="refused the login") as caught:
        transport.connect()  # type: ignore[attr-defined]
    shown = "".join(traceback.format_exception(caught.value)) + repr(caught.value.args)
    assert SECRET not in shown and "Hunter2" not in shown
