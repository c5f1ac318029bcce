"""smartmail: personalised bulk email from a CSV, through SMTP, Amazon SES or a local outbox.

The library is usable without the CLI; one call runs a campaign as `smartmail send` does
(lock, pre-flight, quota plan, send, summary):

    from smartmail import CampaignConfig, RunOptions, run_campaign
    config = CampaignConfig(template="welcome.txt", source="recipients.csv",
                            transport="file://outbox")
    result = run_campaign(config, RunOptions())
    print(result.summary.sent, result.exit_code)

The lower-level parts (`preflight`, `send_campaign`, sources, templates, transports) stay
available. Names are imported on first use, so `import smartmail` (and `smartmail --help`)
stays fast: the engine, Jinja2, rich and boto3 load only when a campaign needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .campaign import (
        CampaignConfig,
        CampaignResult,
        CampaignRun,
        DryRunResult,
        Hooks,
        Plan,
        RunOptions,
        Secrets,
        dry_run_campaign,
        load_config,
        run_campaign,
    )
    from .engine import (
        Journal,
        PreflightResult,
        SendOptions,
        dry_run_summary,
        preflight,
        send_campaign,
    )
    from .errors import SmartmailError
    from .message import OutgoingMessage, build
    from .ratelimit import TokenBucket, Unlimited
    from .report import Outcome, Summary
    from .retry import RetryPolicy
    from .sources import RecipientSource, Row, SourceSpec
    from .templates import MessageTemplate, RenderedMessage
    from .transports import Transport, TransportOptions, get_transport

__version__ = "0.1.0"

_WHERE = {
    "CampaignConfig": "campaign",
    "CampaignResult": "campaign",
    "CampaignRun": "campaign",
    "DryRunResult": "campaign",
    "Hooks": "campaign",
    "Plan": "campaign",
    "RunOptions": "campaign",
    "Secrets": "campaign",
    "dry_run_campaign": "campaign",
    "load_config": "campaign",
    "run_campaign": "campaign",
    "Journal": "engine",
    "PreflightResult": "engine",
    "SendOptions": "engine",
    "dry_run_summary": "engine",
    "preflight": "engine",
    "send_campaign": "engine",
    "SmartmailError": "errors",
    "OutgoingMessage": "message",
    "build": "message",
    "TokenBucket": "ratelimit",
    "Unlimited": "ratelimit",
    "Outcome": "report",
    "Summary": "report",
    "RetryPolicy": "retry",
    "RecipientSource": "sources",
    "Row": "sources",
    "SourceSpec": "sources",
    "MessageTemplate": "templates",
    "RenderedMessage": "templates",
    "Transport": "transports",
    "TransportOptions": "transports",
    "get_transport": "transports",
}

__all__ = [
    "CampaignConfig",
    "CampaignResult",
    "CampaignRun",
    "DryRunResult",
    "Hooks",
    "Journal",
    "MessageTemplate",
    "Outcome",
    "OutgoingMessage",
    "Plan",
    "PreflightResult",
    "RecipientSource",
    "RenderedMessage",
    "RetryPolicy",
    "Row",
    "RunOptions",
    "Secrets",
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
    "dry_run_campaign",
    "dry_run_summary",
    "get_transport",
    "load_config",
    "preflight",
    "run_campaign",
    "send_campaign",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'smartmail' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
