"""smartmail: personalised bulk email from a CSV, through SMTP, Amazon SES or a local outbox.

The library is usable without the CLI:

    from smartmail import RecipientSource, SourceSpec, MessageTemplate, get_transport, send_campaign
    source = RecipientSource(SourceSpec("recipients.csv"))
    template = MessageTemplate.load("welcome.txt")
    summary = send_campaign(source, template, get_transport("file://outbox"))
"""

from .engine import Journal, PreflightResult, SendOptions, dry_run_summary, preflight, send_campaign
from .errors import SmartmailError
from .message import OutgoingMessage, build
from .ratelimit import TokenBucket, Unlimited
from .report import Outcome, Summary
from .retry import RetryPolicy
from .sources import RecipientSource, Row, SourceSpec
from .templates import MessageTemplate, RenderedMessage
from .transports import Transport, TransportOptions, get_transport

__version__ = "0.1.0"

__all__ = [
    "Journal",
    "MessageTemplate",
    "Outcome",
    "OutgoingMessage",
    "PreflightResult",
    "RecipientSource",
    "RenderedMessage",
    "RetryPolicy",
    "Row",
    "SendOptions",
    "SmartmailError",
    "SourceSpec",
    "Summary",
    "TokenBucket",
    "Transport",
    "TransportOptions",
    "Unlimited",
    "__version__",
    "build",
    "dry_run_summary",
    "get_transport",
    "preflight",
    "send_campaign",
]
