"""Message templates: an RFC 822-style header block, a blank line, then the body, all Jinja2.

    From: Acme News <news@acme.example>
    To: {{ name }} <{{ email }}>
    Subject: Hello {{ name }}
    Attachment: invoices/{{ invoice }}.pdf

    Dear {{ name }}, ...

The HTML part comes from `--html-template PATH`, or else from a file beside the template with
the same name and the suffix `.html` (`welcome.txt` -> `welcome.html`) when one exists. Each
header value and each part is compiled once per run in a sandbox with `StrictUndefined`, so a
misspelt variable stops the run instead of sending a blank; only the HTML part is autoescaped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from . import addresses, unsubscribe
from .errors import InvalidRowError, Location, TemplateError
from .sources import Row

ADDRESS_HEADERS = ("from", "to", "cc", "bcc", "reply-to")
ATTACHMENT_HEADER = "attachment"
_SEP = "\x00"
_HEADER_NAME = re.compile(r"[!-9;-~]+\Z")

Renderer = Callable[[Mapping[str, Any]], str]


@dataclass(frozen=True, slots=True)
class RenderedMessage:
    """One row's message, rendered and validated, not yet encoded as MIME."""

    row: Row
    recipient: str
    sender: str
    headers: list[tuple[str, str]]
    envelope_to: list[str]
    text: str
    html: str | None = None
    attachments: list[Path] = field(default_factory=list)


def _env(autoescape: bool) -> SandboxedEnvironment:
    return SandboxedEnvironment(
        undefined=jinja2.StrictUndefined,
        autoescape=autoescape,
        keep_trailing_newline=True,
    )


def _compile(env: SandboxedEnvironment, source: str, where: str) -> Renderer:
    """Compile once; a value with no Jinja syntax renders without calling Jinja at all."""
    if "{" not in source:
        return lambda _ctx: source
    try:
        template = env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(where, f"line {exc.lineno}: {exc.message}") from None
    # Jinja keeps a template's globals as a ChainMap over the environment's, and copies it
    # (slowly, key by key) into every render's context: ~1/3 of a render's cost here. The
    # environment never changes after compiling, so a flat copy renders the same, faster.
    template.globals = dict(template.globals)
    return template.render


def parse_header_block(text: str, where: str) -> tuple[list[tuple[str, str]], str]:
    """Split a template into (headers, body); continuation lines are unfolded."""
    headers: list[tuple[str, str]] = []
    lines = text.split("\n")
    index = 0
    for index, line in enumerate(lines):
        line = line.rstrip("\r")
        if not line.strip():
            break
        if line[0] in " \t":
            if not headers:
                raise TemplateError(
                    f"{where}, line {index + 1}", "continuation line before any header"
                )
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {line.strip()}")
            continue
        name, colon, value = line.partition(":")
        if not colon or not _HEADER_NAME.match(name.strip()):
            raise TemplateError(
                f"{where}, line {index + 1}",
                f"expected 'Name: value' in the header block, got {line[:60]!r}",
                "the header block ends at the first blank line",
            )
        headers.append((name.strip(), value.strip()))
    else:
        index = len(lines)
    body = "\n".join(lines[index + 1 :])
    return headers, body


class MessageTemplate:
    """A compiled template: renders one row into a validated `RenderedMessage`."""

    def __init__(
        self,
        text: str,
        *,
        name: str = "<template>",
        html: str | None = None,
        html_name: str | None = None,
        base_dir: Path | None = None,
        extra_headers: list[tuple[str, str]] | None = None,
    ) -> None:
        self.name = name
        self.base_dir = base_dir or Path.cwd()
        self.source_text = text + (html or "")
        plain_env = _env(autoescape=False)
        raw_headers, body = parse_header_block(text, name)
        raw_headers += extra_headers or []
        if not any(h.lower() == "from" for h, _ in raw_headers):
            raise TemplateError(name, "no From: header in the header block")
        if not any(h.lower() == "subject" for h, _ in raw_headers):
            raise TemplateError(name, "no Subject: header in the header block")
        self.has_to = any(h.lower() == "to" for h, _ in raw_headers)
        for h, v in raw_headers:
            _compile(plain_env, v, f"{name}, header {h}")  # a syntax error names its header
        # All header values render in one Jinja call (NUL-separated, as NUL can never be in a
        # header): one render per row instead of one per header.
        self._header_block = _compile(plain_env, _SEP.join(v for _, v in raw_headers), name)
        self._text = _compile(plain_env, body, name)
        self._html: Renderer | None = None
        if html is not None:
            self._html = _compile(_env(autoescape=True), html, html_name or f"{name} (html)")
        self.header_names = [h for h, _ in raw_headers]

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        html_path: str | os.PathLike[str] | None = None,
        extra_headers: list[tuple[str, str]] | None = None,
    ) -> MessageTemplate:
        """Read a template file, and its HTML part by the documented convention."""
        p = Path(path)
        text = _read(p)
        html_file = Path(html_path) if html_path else p.with_suffix(".html")
        html: str | None = None
        if html_path or (html_file != p and html_file.is_file()):
            html = _read(html_file)
        return cls(
            text,
            name=str(p),
            html=html,
            html_name=str(html_file) if html is not None else None,
            base_dir=p.parent,
            extra_headers=extra_headers,
        )

    def render(
        self,
        row: Row,
        to_column: str,
        *,
        source_name: str = "",
        allow_utf8_local: bool = True,
    ) -> RenderedMessage:
        """Render one row. Raises InvalidRowError for a row-level problem, TemplateError else."""
        values = row.values
        raw_to = values.get(to_column, "")
        try:
            recipient = addresses.validate(raw_to, allow_utf8_local=allow_utf8_local)
        except addresses.AddressError as exc:
            raise InvalidRowError(Location(source_name, row.number, to_column), str(exc)) from None
        ctx: dict[str, Any] = dict(values)
        ctx["row"] = values
        try:
            headers, attachments, envelope, sender = self._render_headers(
                ctx, row, recipient, source_name, allow_utf8_local
            )
            text = self._text(ctx)
            html = self._html(ctx) if self._html is not None else None
        except jinja2.UndefinedError as exc:
            raise TemplateError(
                Location(source_name, row.number),
                f"template {self.name} uses an undefined variable: {exc.message}",
                "use a column of the CSV, or {{ row['Column Name'] }} for one with spaces",
            ) from None
        except jinja2.TemplateError as exc:
            raise TemplateError(
                Location(source_name, row.number), f"template {self.name}: {exc}"
            ) from None
        return RenderedMessage(
            row=row,
            recipient=recipient,
            sender=sender,
            headers=headers,
            envelope_to=envelope,
            text=text,
            html=html,
            attachments=attachments,
        )

    def _render_headers(
        self,
        ctx: Mapping[str, Any],
        row: Row,
        recipient: str,
        source_name: str,
        allow_utf8_local: bool,
    ) -> tuple[list[tuple[str, str]], list[Path], list[str], str]:
        headers: list[tuple[str, str]] = []
        attachments: list[Path] = []
        envelope: list[str] = []
        sender = ""
        if not self.has_to:
            headers.append(("To", recipient))
            envelope.append(recipient)
        values = self._header_block(ctx).split(_SEP)
        if len(values) != len(self.header_names):
            raise InvalidRowError(
                Location(source_name, row.number), "a header value contains a NUL character"
            )
        for name, value in zip(self.header_names, values, strict=True):
            value = value.strip()
            if "\r" in value or "\n" in value:
                raise InvalidRowError(
                    Location(source_name, row.number),
                    f"the rendered {name}: header contains a line break (header injection); "
                    "not sent",
                )
            lower = name.lower()
            if lower == ATTACHMENT_HEADER:
                attachments.extend(self._attachments(value, row, source_name))
                continue
            if not value:
                continue
            if lower == "list-unsubscribe":
                problem = unsubscribe.check_header(value)
                if problem:
                    raise InvalidRowError(Location(source_name, row.number), f"{name}: {problem}")
            if lower in ADDRESS_HEADERS:
                addrs = _check_addresses(name, value, row, source_name, recipient, allow_utf8_local)
                if lower == "from":
                    sender = addrs[0]
                elif lower in ("to", "cc", "bcc"):
                    envelope.extend(addrs)
            headers.append((name, value))
        if not envelope:
            raise InvalidRowError(Location(source_name, row.number), "the message has no recipient")
        return headers, attachments, envelope, sender

    def _attachments(self, value: str, row: Row, source_name: str) -> list[Path]:
        found: list[Path] = []
        for part in value.split(";"):
            part = part.strip()
            if not part:
                continue
            path = Path(part).expanduser()
            if not path.is_absolute():
                path = self.base_dir / path
            if not path.is_file():
                raise InvalidRowError(
                    Location(source_name, row.number), f"attachment not found: {path}"
                )
            found.append(path)
        return found


def _check_addresses(
    name: str, value: str, row: Row, source_name: str, recipient: str, allow_utf8_local: bool
) -> list[str]:
    """Validate every address of an address header; return the value and the bare addresses."""
    pairs = addresses.parse_list(value)
    if not pairs:
        raise InvalidRowError(Location(source_name, row.number), f"{name}: header has no address")
    result: list[str] = []
    for _display, addr in pairs:
        if addr == recipient:
            result.append(addr)
            continue
        try:
            ok = _validate_header_address(addr, allow_utf8_local)
        except addresses.AddressError as exc:
            raise InvalidRowError(
                Location(source_name, row.number), f"{name}: header: {exc}"
            ) from None
        result.append(ok)
    if name.lower() == "from" and len(result) != 1:
        raise InvalidRowError(
            Location(source_name, row.number), "From: must hold exactly one address"
        )
    return result


@lru_cache(maxsize=256)
def _validate_header_address(addr: str, allow_utf8_local: bool) -> str:
    """`addresses.validate`, cached: From and Reply-To are usually the same on every row."""
    return addresses.validate(addr, allow_utf8_local=allow_utf8_local)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise TemplateError(str(path), "no such file") from None
    except UnicodeDecodeError as exc:
        raise TemplateError(str(path), f"not valid UTF-8 ({exc.reason})") from None
