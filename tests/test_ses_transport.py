"""ses://: what SES receives (moto in process), and every SES error in its right place (Stubber).

moto keeps the raw MIME it was given, so the tests parse it back and check what a recipient
would see. moto never throttles, so throttling, quota and pause errors come from botocore's
Stubber on the very client each worker session makes (hooked through `aws.CLIENT_HOOKS`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
)
from moto import mock_aws

from smartmail import (
    MessageTemplate,
    Outcome,
    OutgoingMessage,
    RecipientSource,
    RetryPolicy,
    SendOptions,
    SourceSpec,
    Summary,
    TokenBucket,
    aws,
    send_campaign,
)
from smartmail.errors import (
    ConfigError,
    ConnectionFailedError,
    InDoubtError,
    PermanentError,
    StopRunError,
    ThrottledError,
    TransientError,
)
from smartmail.sources import Row
from smartmail.transports import TransportOptions, get_transport
from smartmail.transports.ses import SesTransport, classify_client_error, sanitise_tag

from .aws_helpers import REGION, StubPlan, parse, ses_backend, verify_sender
from .conftest import free_port, make_csv, write

pytestmark = pytest.mark.usefixtures("aws_env")

NO_WAIT = RetryPolicy(max_retries=3, initial=0.0, maximum=0.0, jitter=0.0)
NOT_VERIFIED = (
    "Email address is not verified. The following identities failed the check in region "
    "US-EAST-1: {}"
)


class ListJournal:
    """Keeps every outcome, to see the provider id each row got."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []

    def skip_reason(self, recipient: str, row: Row) -> str | None:
        return None

    def sending(self, message: OutgoingMessage) -> None:
        return None

    def record(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)


def no_sleep(seconds: float) -> None:
    return None


def send(
    csv: Path,
    template: Path,
    *,
    workers: int = 1,
    retry: RetryPolicy = NO_WAIT,
    journal: ListJournal | None = None,
    rate: float = 1000.0,
    **transport_kw: Any,
) -> tuple[Summary, TokenBucket]:
    transport = get_transport(f"ses://{REGION}", TransportOptions(**transport_kw))
    limiter = TokenBucket(rate, sleep=no_sleep)
    summary = send_campaign(
        RecipientSource(SourceSpec(str(csv))),
        MessageTemplate.load(template),
        transport,
        options=SendOptions(workers=workers, tags={"campaign": "spring"}),
        limiter=limiter,
        retry=retry,
        journal=journal,
    )
    return summary, limiter


# --- what SES receives ------------------------------------------------------------------------


@mock_aws
def test_each_row_reaches_ses_as_the_exact_mime_with_html_and_attachment(tmp_path: Path) -> None:
    verify_sender()
    write(tmp_path / "price list.pdf", "%PDF-1.4 not really a pdf\n")
    template = write(
        tmp_path / "offer.txt",
        "From: Acme <news@acme.example>\nTo: {{ name }} <{{ email }}>\n"
        "Subject: Offer for {{ name }}\nAttachment: price list.pdf\n\n"
        "Hi {{ name }}, code {{ code }}.\n",
    )
    write(tmp_path / "offer.html", "<p>Hi <b>{{ name }}</b>, code {{ code }}.</p>\n")
    csv = make_csv(tmp_path / "r.csv", 3)
    journal = ListJournal()

    summary, _ = send(csv, template, workers=2, journal=journal)

    assert (summary.sent, summary.failed, summary.unsent) == (3, 0, 0)
    received = {m.destinations[0]: m for m in ses_backend().sent_messages}
    assert sorted(received) == [f"user{i}@example.org" for i in range(3)]
    message = received["user1@example.org"]
    assert message.source == "news@acme.example"
    mime = parse(message.raw_data)
    assert mime["Subject"] == "Offer for User 1"
    assert mime["To"] == "User 1 <user1@example.org>"
    assert mime.get_content_type() == "multipart/mixed"
    body = mime.get_body(("plain",))
    html = mime.get_body(("html",))
    assert body is not None and "code C00001" in body.get_content()
    assert html is not None and "<b>User 1</b>" in html.get_content()
    (attachment,) = list(mime.iter_attachments())
    assert attachment.get_filename() == "price list.pdf"
    assert attachment.get_content() == b"%PDF-1.4 not really a pdf\n"
    # The id recorded for each row is the one SES gave, which SES events carry.
    ids = {o.recipient: o.message_id for o in journal.outcomes}
    assert ids["user1@example.org"] == message.id


@mock_aws
def test_configuration_set_and_tags_go_with_every_message_in_the_form_ses_accepts(
    tmp_path: Path, template_file: Path, capture_ses: list[dict[str, Any]]
) -> None:
    verify_sender()
    csv = make_csv(tmp_path / "r.csv", 2)
    transport = get_transport(f"ses://{REGION}", TransportOptions(configuration_set="marketing"))
    summary = send_campaign(
        RecipientSource(SourceSpec(str(csv))),
        MessageTemplate.load(template_file),
        transport,
        options=SendOptions(
            workers=1, tags={"campaign": "spring sale.2024", "owner/team": "x" * 300}
        ),
        retry=NO_WAIT,
    )
    assert summary.sent == 2
    assert len(capture_ses) == 2
    raw = {m.id: m.raw_data.encode() for m in ses_backend().sent_messages}
    for params in capture_ses:
        assert params["ConfigurationSetName"] == "marketing"
        assert params["FromEmailAddress"] == "news@acme.example"
        assert params["Content"]["Raw"]["Data"] in raw.values()
        assert params["EmailTags"] == [
            {"Name": "campaign", "Value": "spring_sale_2024"},
            {"Name": "owner_team", "Value": "x" * 256},
        ]
    assert {p["Destination"]["ToAddresses"][0] for p in capture_ses} == {
        "user0@example.org",
        "user1@example.org",
    }


def test_tag_sanitising_keeps_only_what_ses_allows() -> None:
    assert sanitise_tag("Été 2024/Q1") == "_t__2024_Q1"
    assert sanitise_tag("") == "_"
    assert sanitise_tag("ok-Name_9") == "ok-Name_9"


@mock_aws
def test_international_domain_goes_as_idna_and_non_ascii_local_part_is_refused(
    tmp_path: Path, template_file: Path
) -> None:
    verify_sender()
    csv = write(
        tmp_path / "r.csv",
        "email,name,code\nanna@bücher.example,Anna,C1\njosé@example.org,José,C2\n",
    )
    journal = ListJournal()
    summary, _ = send(csv, template_file, journal=journal)
    assert (summary.sent, summary.skipped) == (1, 1)
    (skipped,) = [o for o in journal.outcomes if o.status == "skipped"]
    assert skipped.row.number == 3
    assert "non-ASCII local part" in skipped.reason and "SMTPUTF8" in skipped.reason
    (message,) = ses_backend().sent_messages
    assert message.destinations[0] == "anna@xn--bcher-kva.example"


@mock_aws
def test_the_workers_share_one_client_made_once_per_run(
    tmp_path: Path, template_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    verify_sender()
    made: list[str] = []
    monkeypatch.setattr(
        aws,
        "CLIENT_HOOKS",
        [*aws.CLIENT_HOOKS, lambda c: made.append(c.meta.service_model.service_name)],
    )
    summary, _ = send(make_csv(tmp_path / "r.csv", 12), template_file, workers=3)
    assert summary.sent == 12
    # boto3 clients are thread-safe; one per worker cost memory and CPU for nothing.
    assert made.count("sesv2") == 1


@mock_aws
def test_default_rate_is_the_accounts_max_send_rate() -> None:
    transport = SesTransport(REGION)
    assert transport.default_rate() == 1.0  # moto's fixed sandbox quota
    quota = transport.send_quota()
    assert (quota.max_24_hour_send, quota.sandboxed) == (200.0, True)


@pytest.mark.parametrize(
    "url",
    ["ses://", "ses://us-east-1:443", "ses://not_a_region", "ses://us-east-1/extra"],
)
def test_bad_ses_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        get_transport(url)


# --- classification -----------------------------------------------------------------------------


def client_error(code: str, message: str, status: int = 400) -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "SendEmail")


SENDER = "news@acme.example"


@pytest.mark.parametrize(
    ("code", "message", "status", "expected"),
    [
        ("Throttling", "Maximum sending rate exceeded.", 400, ThrottledError),
        ("ThrottlingException", "Rate exceeded", 400, ThrottledError),
        ("TooManyRequestsException", "Maximum sending rate exceeded.", 429, ThrottledError),
        ("SomethingNew", "slow down", 429, ThrottledError),
        ("Throttling", "Daily message quota exceeded.", 400, StopRunError),
        ("LimitExceededException", "Daily message quota exceeded.", 400, StopRunError),
        ("AccountSendingPausedException", "Account sending paused.", 400, StopRunError),
        ("SendingPausedException", "Sending paused for this account.", 400, StopRunError),
        ("AccountSuspendedException", "Account suspended.", 400, StopRunError),
        (
            "ConfigurationSetDoesNotExist",
            "Configuration set <x> does not exist.",
            400,
            StopRunError,
        ),
        ("ConfigurationSetSendingPausedException", "paused", 400, StopRunError),
        ("MailFromDomainNotVerifiedException", "not verified", 400, StopRunError),
        ("NotFoundException", "Configuration set <x> does not exist.", 404, StopRunError),
        ("AccessDeniedException", "not authorized to perform ses:SendEmail", 403, StopRunError),
        ("MessageRejected", NOT_VERIFIED.format(SENDER), 400, StopRunError),
        ("MessageRejected", NOT_VERIFIED.format("ACME.EXAMPLE"), 400, StopRunError),
        ("MessageRejected", "Email address is not verified.", 400, StopRunError),
        (
            "MessageRejected",
            f"Did not have authority to send from email {SENDER}",
            400,
            StopRunError,
        ),
        ("MessageRejected", NOT_VERIFIED.format("someone@example.org"), 400, PermanentError),
        (
            "MessageRejected",
            "Message length is more than 10485760 bytes long.",
            400,
            PermanentError,
        ),
        ("InvalidParameterValue", "Missing final '@domain'", 400, PermanentError),
        ("BadRequestException", "Illegal address", 400, PermanentError),
        ("InternalFailure", "internal error", 500, TransientError),
        ("ServiceUnavailable", "try later", 503, TransientError),
    ],
)
def test_ses_api_errors_are_classified_by_code(
    code: str, message: str, status: int, expected: type[Exception]
) -> None:
    error = classify_client_error(client_error(code, message, status), SENDER)
    assert type(error) is expected
    assert error.code == code
    assert code in str(error) and "RequestId" not in str(error)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        # No connection: the request never left; retried, and counted by the circuit breaker.
        (
            EndpointConnectionError(endpoint_url="https://email.us-east-1.amazonaws.com"),
            ConnectionFailedError,
        ),
        (
            ConnectTimeoutError(endpoint_url="https://email.us-east-1.amazonaws.com"),
            ConnectionFailedError,
        ),
        # The request was written, the answer lost: SES may have the message. Never retried.
        (ReadTimeoutError(endpoint_url="https://email.us-east-1.amazonaws.com"), InDoubtError),
        (
            ConnectionClosedError(endpoint_url="https://email.us-east-1.amazonaws.com"),
            InDoubtError,
        ),
        (NoCredentialsError(), StopRunError),
        (ParamValidationError(report="Invalid type for parameter"), PermanentError),
    ],
)
def test_connection_and_client_side_errors_are_classified(
    exc: Exception, expected: type[Exception]
) -> None:
    assert type(classify_client_error(exc, SENDER)) is expected


# --- the engine acting on SES errors (Stubber on the session's own client) ----------------------


def test_throttling_slows_the_shared_limiter_and_is_retried(
    tmp_path: Path, template_file: Path, stub_ses: StubPlan
) -> None:
    stub_ses.error("TooManyRequestsException", "Maximum sending rate exceeded.", 429)
    stub_ses.ok("id-0").ok("id-1").ok("id-2")
    summary, _ = send(make_csv(tmp_path / "r.csv", 3), template_file, rate=1000.0)
    assert (summary.sent, summary.failed, summary.retries) == (3, 0, 1)
    assert (summary.throttles, summary.slowdowns) == (1, 1)
    assert summary.rate_configured == 1000.0
    assert summary.rate_lowest == 500.0
    stub_ses.stubbers[0].assert_no_pending_responses()


def test_daily_quota_stops_the_run_and_leaves_the_rest_unsent(
    tmp_path: Path, template_file: Path, stub_ses: StubPlan
) -> None:
    stub_ses.ok("id-0").ok("id-1").error("Throttling", "Daily message quota exceeded.")
    journal = ListJournal()
    summary, _ = send(make_csv(tmp_path / "r.csv", 5), template_file, journal=journal)
    assert (summary.sent, summary.failed, summary.unsent) == (2, 0, 3)
    assert summary.stopped is not None and "Daily message quota exceeded" in summary.stopped
    assert summary.retries == 0  # never retried: it cannot succeed today
    unsent = sorted(o.recipient for o in journal.outcomes if o.status == "unsent")
    assert unsent == ["user2@example.org", "user3@example.org", "user4@example.org"]
    stub_ses.stubbers[0].assert_no_pending_responses()


def test_unverified_sender_stops_the_run_before_anything_is_sent(
    tmp_path: Path, template_file: Path, stub_ses: StubPlan
) -> None:
    stub_ses.error("MessageRejected", NOT_VERIFIED.format(SENDER))
    summary, _ = send(make_csv(tmp_path / "r.csv", 4), template_file)
    assert (summary.sent, summary.failed, summary.unsent) == (0, 0, 4)
    assert summary.stopped is not None and "verify the sender" in summary.stopped


def test_missing_configuration_set_stops_the_run(
    tmp_path: Path, template_file: Path, stub_ses: StubPlan
) -> None:
    stub_ses.error("NotFoundException", "Configuration set <nope> does not exist.", 404)
    summary, _ = send(make_csv(tmp_path / "r.csv", 3), template_file, configuration_set="nope")
    assert (summary.sent, summary.unsent) == (0, 3)
    assert stub_ses.params[0]["ConfigurationSetName"] == "nope"


def test_a_rejected_message_fails_its_row_only_and_is_never_retried(
    tmp_path: Path, template_file: Path, stub_ses: StubPlan
) -> None:
    stub_ses.ok("id-0")
    stub_ses.error("MessageRejected", "Message length is more than 10485760 bytes long.")
    stub_ses.error("MessageRejected", NOT_VERIFIED.format("user2@example.org"))  # sandbox
    stub_ses.error("InvalidParameterValue", "Local address contains control or whitespace")
    stub_ses.ok("id-4")
    journal = ListJournal()
    summary, _ = send(make_csv(tmp_path / "r.csv", 5), template_file, journal=journal)
    assert (summary.sent, summary.failed, summary.unsent, summary.retries) == (2, 3, 0, 0)
    failed = {o.recipient: o.reason for o in journal.outcomes if o.status == "failed"}
    assert sorted(failed) == ["user1@example.org", "user2@example.org", "user3@example.org"]
    assert all(reason.startswith("permanent: SES ") for reason in failed.values())
    stub_ses.stubbers[0].assert_no_pending_responses()


def test_server_errors_are_retried(tmp_path: Path, template_file: Path, stub_ses: StubPlan) -> None:
    stub_ses.error("InternalFailure", "An internal error occurred.", 500).ok("id-0")
    summary, _ = send(make_csv(tmp_path / "r.csv", 1), template_file)
    assert (summary.sent, summary.retries, summary.throttles) == (1, 1, 0)


def test_an_unreachable_endpoint_is_retried_then_stops_the_run_with_rows_unsent(
    tmp_path: Path, template_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    retry = RetryPolicy(max_retries=1, initial=0.0, maximum=0.0, jitter=0.0)
    summary, _ = send(make_csv(tmp_path / "r.csv", 2), template_file, retry=retry, timeout=2.0)
    # The first row used its retry; nothing got through meanwhile, so it is an outage: the
    # run stops and neither row is failed (the next run sends them).
    assert (summary.sent, summary.failed, summary.unsent, summary.retries) == (0, 0, 2, 1)
    assert summary.stopped and "could not reach the provider" in summary.stopped
