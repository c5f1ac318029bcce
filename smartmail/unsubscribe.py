"""One-click unsubscribe: the List-Unsubscribe (RFC 2369) and List-Unsubscribe-Post (RFC 8058)
headers, which Gmail and Yahoo require of bulk senders.

The URL is a Jinja2 template rendered per row like any header, so each recipient gets their
own link. `List-Unsubscribe-Post: List-Unsubscribe=One-Click` is only allowed beside an https
URL (RFC 8058), so it is itself a template that renders empty, and is then left out, when a
row's URL is not https. A rendered URL is checked (absolute, ASCII, no spaces or angle
brackets) so a blank or broken link fails its row instead of going out to thousands.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from . import addresses
from .errors import ConfigError

# Above this many recipients, dry-run warns when there is no List-Unsubscribe header: the
# Gmail and Yahoo bulk-sender rules start at 5,000 messages a day.
UNSUBSCRIBE_WARN_THRESHOLD = 5000
LIST_UNSUBSCRIBE = "List-Unsubscribe"
LIST_UNSUBSCRIBE_POST = "List-Unsubscribe-Post"
ONE_CLICK = "List-Unsubscribe=One-Click"
MAX_URI = 900
_ITEM = re.compile(r"\s*<([^<>]*)>\s*")


def headers(url_template: str | None, mailto: str | None) -> list[tuple[str, str]]:
    """The extra header templates for `MessageTemplate(extra_headers=...)`; none without options."""
    items: list[str] = []
    url = (url_template or "").strip()
    if url:
        items.append(f"<{url}>")
    if mailto:
        try:
            address = addresses.validate(mailto, allow_utf8_local=False)
        except addresses.AddressError as exc:
            raise ConfigError(f"--unsubscribe-mailto: {exc}") from None
        uri = f"mailto:{address}?subject=unsubscribe"
        items.append(f"<{{% raw %}}{uri}{{% endraw %}}>" if "{" in uri else f"<{uri}>")
    if not items:
        return []
    result = [(LIST_UNSUBSCRIBE, ", ".join(items))]
    if url:
        one_click = (
            f"{{% set u %}}{url}{{% endset %}}"
            f"{{% if u.strip().lower().startswith('https://') %}}{ONE_CLICK}{{% endif %}}"
        )
        result.append((LIST_UNSUBSCRIBE_POST, one_click))
    return result


def check_header(value: str) -> str | None:
    """What is wrong with a rendered List-Unsubscribe value, or None when it is sendable."""
    pos = 0
    uris: list[str] = []
    while pos < len(value):
        match = _ITEM.match(value, pos)
        if match is None:
            return f"expected <URL> or <mailto:...> items separated by commas, got {value[:80]!r}"
        uris.append(match.group(1))
        pos = match.end()
        if pos < len(value):
            if value[pos] != ",":
                return f"expected a comma between items, got {value[:80]!r}"
            pos += 1
    if not uris:
        return "empty value"
    for uri in uris:
        problem = _check_uri(uri)
        if problem:
            return problem
    return None


def _check_uri(uri: str) -> str | None:
    if not uri:
        return "the unsubscribe URL rendered empty"
    if len(uri) > MAX_URI:
        return f"the unsubscribe URL is longer than {MAX_URI} characters"
    if not uri.isascii() or any(c.isspace() for c in uri):
        return (
            f"the unsubscribe URL {uri[:80]!r} has spaces or non-ASCII characters "
            "(percent-encode values with |urlencode)"
        )
    parts = urlsplit(uri)
    if parts.scheme.lower() in ("https", "http"):
        if not parts.hostname:
            return f"the unsubscribe URL {uri[:80]!r} has no host"
        return None
    if parts.scheme.lower() == "mailto":
        return None if "@" in parts.path else f"{uri[:80]!r} is not a mailto: address"
    return f"the unsubscribe URL {uri[:80]!r} is not an https:// (or mailto:) URL"


def missing_warning(
    recipients: int, header_names: Iterable[str], threshold: int = UNSUBSCRIBE_WARN_THRESHOLD
) -> str | None:
    """The dry-run warning for a large campaign without a List-Unsubscribe header."""
    if recipients <= threshold:
        return None
    if any(name.lower() == LIST_UNSUBSCRIBE.lower() for name in header_names):
        return None
    return (
        f"{recipients} recipients and no List-Unsubscribe header: Gmail and Yahoo require "
        "one-click unsubscribe from bulk senders (add --unsubscribe-url)"
    )
