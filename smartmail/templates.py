"""Message templates: an RFC 822-style header block, a blank line, then the body, all Jinja2.

    From: Acme News <news@acme.example>
    To: {{ mailbox(name, email) }}
    Subject: Hello {{ name }}
    Attachment: invoices/{{ invoice }}.pdf

    Dear {{ name }}, ...

The HTML part comes from `--html-template PATH`, or else from a file beside the template with
the same name and the suffix `.html` (`welcome.txt` -> `welcome.html`) when one exists. Each
header value and each part is compiled once per run in a sandbox with `StrictUndefined`, so a
misspelt variable stops the run instead of sending a blank; only the HTML part is autoescaped.

A CSV value fills the slot the template gives it and nothing else. Header values are
rendered with a Jinja `finalize` that marks every expression's output, so the parser of
address headers knows which text is data: data in a display-name position is one display
name whatever it holds (commas, `<`, `@`), data in an address position must be exactly one
address. Data holding a control character is refused in any header. Attachment paths must
stay inside one folder (the template's, or `attachments_dir`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property, lru_cache
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import CodeType
from typing import TYPE_CHECKING, Any, NamedTuple

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from . import addresses, headers, unsubscribe
from .addresses import Mailbox
from .errors import InvalidRowError, Location, TemplateError
from .sources import Row

if TYPE_CHECKING:
    from .codecache import CodeCache

ADDRESS_HEADERS = ("from", "sender", "to", "cc", "bcc", "reply-to")
ATTACHMENT_HEADER = "attachment"
# Written by the message builder for every message; a template may not set them, so none is
# ever sent twice or contradicts the body the builder makes.
OWNED_HEADERS = (
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "content-disposition",
    "date",
    "message-id",
)
# At most one of each: RFC 5322 3.6, and the one-click unsubscribe pair (RFC 8058), which the
# template and --unsubscribe-url could otherwise both give: a provider then honours one, or
# neither, and may show no unsubscribe button.
SINGLE_HEADERS = (
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "bcc",
    "subject",
    "in-reply-to",
    "references",
    "list-unsubscribe",
    "list-unsubscribe-post",
)
_SEP = "\x00"
# Part of the code cache's key: change it when `_env` or `MessageTemplate._compile` change
# what compiling a template gives (Jinja's and Python's versions are in the key already).
_CACHE_FORMAT = "smartmail-templates-1"
_WSP = " \t"  # RFC 5322 white space: what is trimmed from the ends of a header value
_OPEN, _CLOSE = "\x0e", "\x0f"  # around data in rendered header values; never in data
_DATA = re.compile(r"\x0e([^\x0e\x0f]*)\x0f")
# What a header never holds: C0 but TAB, DEL, C1 (NEL, and CSI, a terminal escape) and the
# Unicode line and paragraph separators. None of them is printable, so only a value that is
# not needs the search; the pattern is compiled then (re caches it), as a class holding
# U+2028 takes ~0.3 ms to compile, which most runs never need.
_CONTROL = "[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]"
_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}\Z")
# The two shapes nearly every address header has once rendered: data <data>, and data.
_FAST_MAILBOX = re.compile(
    r"[ \t]*(?:\x0e([^\x0e\x0f]*)\x0f)?[ \t]*<\x0e([^\x0e\x0f]*)\x0f>[ \t]*\Z"
    r"|[ \t]*\x0e([^\x0e\x0f]*)\x0f[ \t]*\Z"
)

# A charset declared in an HTML <meta>: its `charset` attribute, or the `charset=` of the
# content of an http-equiv="Content-Type" (HTML's "extracting a character encoding from a
# meta element"; nothing else in a meta declares one). The HTML part is sent in UTF-8
# (ASCII when it is all ASCII), from a file read as UTF-8, so any other name there is wrong,
# and a reader that follows the document's own declaration (or a browser the recipient
# saves it to) would show "ZoÃ«". Compiled on first use (re caches them), as few templates
# have one.
_META_TAG = r"""(?i)<meta(?=[\s/>])(?:[^>"']|"[^"]*"|'[^']*')*>"""
_META_ATTR = r"""(?i)([\s/])([^\s/>=]+)(\s*=\s*)("[^"]*"|'[^']*'|[^\s>"']+)"""
_CONTENT_CHARSET = r"""(?i)(\bcharset\s*=\s*["']?)([A-Za-z0-9._:-]+)"""

Renderer = Callable[[Mapping[str, Any]], str]
HeaderValue = str | tuple[Mailbox, ...]


class Attachment(NamedTuple):
    """A file to attach: `path`, resolved (symbolic links followed) and checked to be inside
    the attachments folder, is what is read; `name`, the last part of the path as the
    template or the row gave it, is what the recipient sees. A link `report.pdf` to
    `x-123.pdf` is sent as `report.pdf`, the name the sender chose. `given` is that whole
    path (`linked/report.pdf`), relative to the folder: where a queue worker, rendering the
    same row in its copy of the folder, looks for the file."""

    path: Path
    name: str
    given: str = ""


class RenderedMessage(NamedTuple):
    """One row's message, rendered and validated, not yet encoded as MIME.

    `headers` holds address headers as parsed mailboxes (never re-parsed, so a display name
    stays one name) and other headers as text. `head` is the encoded header block for `utf8`
    (checked against the line limits when rendering); the builder uses it when present.
    `attachments` are files inside the attachments folder, by name; `attachment_parts`, once
    pre-flight has read them (`message.check_buildable`), their encoded MIME parts, so the
    message is sent with the files as they were checked. (A NamedTuple, not a dataclass:
    immutable just the same, and the class costs start-up a tenth as much to create.)
    """

    row: Row
    recipient: str
    sender: str
    headers: list[tuple[str, HeaderValue]]
    envelope_to: list[str]
    text: str
    html: str | None = None
    attachments: Sequence[Attachment] = ()
    source: str = ""
    head: list[str] | None = None
    attachment_parts: tuple[str, ...] | None = None
    empty_subject: tuple[str | None, str] | None = None
    """(column, problem) when the Subject rendered empty: legal, so the message goes without
    one, but rarely meant, so pre-flight tells the operator."""


def mailbox(name: Any, email: Any) -> Mailbox:
    """Template helper: `{{ mailbox(name, email) }}` is one correctly quoted mailbox.

    In an address header the name is always one display name and the email one address; in
    a body it prints as `Name <email>`, quoted as RFC 5322 needs.
    """
    return Mailbox("" if name is None else str(name), str(email))


class _ControlCharacter(Exception):
    """Raised from inside a header render: an expression's output holds `char`."""

    def __init__(self, char: str) -> None:
        super().__init__(char)
        self.char = char


def _data(value: Any) -> str:
    text = value if type(value) is str else str(value)
    if not text.isprintable():
        bad = re.search(_CONTROL, text)
        if bad is not None:
            raise _ControlCharacter(bad.group())
    return text


def _mark(value: Any) -> str:
    """The `finalize` of header values: every expression's output, wrapped as data."""
    if isinstance(value, Mailbox):
        name, email = _data(value.name), _data(value.address)
        if name.strip(_WSP):
            return f"{_OPEN}{name}{_CLOSE} <{_OPEN}{email}{_CLOSE}>"
        return f"{_OPEN}{email}{_CLOSE}"
    return f"{_OPEN}{_data(value)}{_CLOSE}"


def _env(autoescape: bool, finalize: Callable[[Any], Any] | None = None) -> SandboxedEnvironment:
    env = SandboxedEnvironment(
        undefined=jinja2.StrictUndefined,
        autoescape=autoescape,
        keep_trailing_newline=True,
        finalize=finalize,
    )
    env.globals["mailbox"] = mailbox
    return env


def _parse(env: SandboxedEnvironment, source: str, where: str) -> None:
    """A syntax check only: parsing is a sixth of compiling, which the block does once."""
    if "{" not in source:
        return
    try:
        env.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(where, f"line {exc.lineno}: {exc.message}") from None


def _compile(env: SandboxedEnvironment, source: str, where: str) -> CodeType | None:
    """Jinja's code for `source`; None for a value with no Jinja syntax (nothing to compile)."""
    if "{" not in source:
        return None
    try:
        return env.compile(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(where, f"line {exc.lineno}: {exc.message}") from None


def _renderer(env: SandboxedEnvironment, source: str, code: CodeType | None) -> Renderer:
    """The render function of compiled code (as `env.from_string` makes it); a value with no
    Jinja syntax renders without calling Jinja at all."""
    if code is None:
        return lambda _ctx: source
    template = env.template_class.from_code(env, code, env.make_globals(None), None)
    # Jinja keeps a template's globals as a ChainMap over the environment's, and copies it
    # (slowly, key by key) into every render's context: ~1/3 of a render's cost here. The
    # environment never changes after compiling, so a flat copy renders the same, faster.
    template.globals = dict(template.globals)
    return template.render


def _from_cache(cache: CodeCache | None, key: str) -> dict[str, Any] | None:
    """A cached compilation with the expected shape, else None (compile it)."""
    if cache is None:
        return None
    entry = cache.get(key)
    if entry is None:
        return None
    codes_ok = all(
        isinstance(entry.get(k), (CodeType, type(None))) for k in ("block", "text", "html")
    )
    columns = entry.get("columns")
    if (
        not codes_ok
        or not isinstance(columns, tuple)
        or not all(isinstance(c, str) for c in columns)
    ):
        return None
    return entry


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


class _Header(NamedTuple):
    """A header of the template, with what can be known before any row."""

    name: str
    lower: str
    fixed: bool  # no Jinja: the same on every row
    mailboxes: tuple[Mailbox, ...] | None = None  # a fixed address header, parsed
    lines: tuple[str, str] | None = None  # a fixed header encoded: (ascii, utf8)


class MessageTemplate:
    """A compiled template: renders one row into a validated `RenderedMessage`.

    `attachments_dir`, when given, is the folder attachment paths are relative to and must
    stay inside; by default that is the template's own folder (`base_dir`).
    """

    def __init__(
        self,
        text: str,
        *,
        name: str = "<template>",
        html: str | None = None,
        html_name: str | None = None,
        base_dir: Path | None = None,
        extra_headers: list[tuple[str, str]] | None = None,
        attachments_dir: Path | None = None,
        cache: CodeCache | None = None,
    ) -> None:
        self.name = name
        self.base_dir = base_dir or Path.cwd()
        self.attachments_dir = Path(attachments_dir or self.base_dir).resolve()
        self.source_text = text + (html or "")  # the campaign's identity: as the operator wrote it
        # As loaded and checked, for a queue's bundle: never the files as they are later.
        self.text, self.html_text, self.html_name = text, html, html_name
        if html is not None:
            html = _utf8_meta(html)
        raw_headers, body = parse_header_block(text, name)
        raw_headers += extra_headers or []
        self._check_header_names(raw_headers)
        self.has_to = any(h.lower() == "to" for h, _ in raw_headers)
        header_env = _env(autoescape=False, finalize=_mark)
        plain_env = _env(autoescape=False)
        html_env = _env(autoescape=True) if html is not None else None
        # All header values render in one Jinja call (NUL-separated, as NUL can never be in a
        # header): one render per row instead of one per header.
        block = _SEP.join(v for _, v in raw_headers)
        key = ""
        if cache is not None:
            key = cache.key(_CACHE_FORMAT, block, body, "-" if html is None else f"+{html}")
        compiled = _from_cache(cache, key)
        specs: list[_Header] = []
        for h, v in raw_headers:
            where = f"{name}, header {h}"
            bad = None if v.isprintable() else re.search(_CONTROL, v)
            if bad is not None:
                raise TemplateError(where, f"holds the control character U+{ord(bad.group()):04X}")
            if compiled is None:  # a cached entry was made only once every header parsed
                _parse(header_env, v, where)  # a syntax error names its header
            specs.append(self._fixed(h, v, where))
        self._specs = specs
        if compiled is None:
            compiled = self._compile(
                raw_headers, body, html, header_env, plain_env, html_env, html_name
            )
            if cache is not None:
                cache.put(key, compiled)
        self._header_block = _renderer(header_env, block, compiled["block"])
        # The variables the headers use: the columns to blame first for a bad header value.
        self._header_columns = frozenset(compiled["columns"])
        self._text = _renderer(plain_env, body, compiled["text"])
        self._html: Renderer | None = None
        if html is not None and html_env is not None:
            self._html = _renderer(html_env, html, compiled["html"])
        self.header_names = [h for h, _ in raw_headers]
        self._subject = next(v for h, v in raw_headers if h.lower() == "subject")

    def _compile(
        self,
        raw_headers: list[tuple[str, str]],
        body: str,
        html: str | None,
        header_env: SandboxedEnvironment,
        plain_env: SandboxedEnvironment,
        html_env: SandboxedEnvironment | None,
        html_name: str | None,
    ) -> dict[str, Any]:
        """Compile the header block and the bodies: what the code cache keeps."""
        from jinja2 import meta

        name = self.name
        block = _SEP.join(v for _, v in raw_headers)
        try:
            header_code = _compile(header_env, block, name)
        except TemplateError:
            for h, v in raw_headers:  # name the header (an unknown filter, say)
                _compile(header_env, v, f"{name}, header {h}")
            raise
        return {
            "block": header_code,
            "columns": tuple(sorted(meta.find_undeclared_variables(header_env.parse(block)))),
            "text": _compile(plain_env, body, name),
            "html": (
                _compile(html_env, html, html_name or f"{name} (html)")
                if html is not None and html_env is not None
                else None
            ),
        }

    def _check_header_names(self, raw_headers: list[tuple[str, str]]) -> None:
        names = [h.lower() for h, _ in raw_headers]
        for h, _ in raw_headers:
            lower = h.lower()
            if lower in OWNED_HEADERS:
                raise TemplateError(
                    self.name,
                    f"{h}: smartmail writes this header itself for every message",
                    f"remove {h}: from the template",
                )
            if lower in SINGLE_HEADERS and names.count(lower) > 1:
                hint = "give it once, with a list"
                if lower.startswith("list-unsubscribe"):
                    hint = "give it in the template or with --unsubscribe-url/-mailto, not both"
                raise TemplateError(self.name, f"{h}: appears more than once", hint)
        if "from" not in names:
            raise TemplateError(self.name, "no From: header in the header block")
        if "subject" not in names:
            raise TemplateError(self.name, "no Subject: header in the header block")

    def _fixed(self, name: str, value: str, where: str) -> _Header:
        """Check a header with no Jinja once, at load: a problem there stops the run."""
        lower = name.lower()
        if "{" in value:
            return _Header(name, lower, fixed=False)
        if lower == ATTACHMENT_HEADER:
            for part in value.split(";"):
                if part.strip():
                    try:
                        self._attachment_path(part.strip())
                    except _Refused as exc:
                        raise TemplateError(where, str(exc)) from None
            return _Header(name, lower, fixed=True)
        if not value:
            return _Header(name, lower, fixed=True)
        mailboxes: tuple[Mailbox, ...] | None = None
        header_value: HeaderValue = value
        if lower in ADDRESS_HEADERS:
            try:
                mailboxes = _parse_mailboxes(name, value, allow_utf8_local=True)
            except _Problem as exc:
                raise TemplateError(where, exc.message) from None
            if lower in ("from", "sender") and len(mailboxes) != 1:
                raise TemplateError(where, f"{name}: must hold exactly one address")
            header_value = mailboxes
        elif lower == "list-unsubscribe":
            problem = unsubscribe.check_header(value)
            if problem:
                raise TemplateError(where, problem)
        if lower == "bcc":
            return _Header(name, lower, fixed=True, mailboxes=mailboxes)
        try:
            lines = (
                headers.encode([(name, header_value)], utf8=False)[0],
                headers.encode([(name, header_value)], utf8=True)[0],
            )
        except headers.HeaderError as exc:
            raise TemplateError(where, str(exc)) from None
        return _Header(name, lower, fixed=True, mailboxes=mailboxes, lines=lines)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        html_path: str | os.PathLike[str] | None = None,
        extra_headers: list[tuple[str, str]] | None = None,
        attachments_dir: str | os.PathLike[str] | None = None,
        cache: CodeCache | None = None,
    ) -> MessageTemplate:
        """Read a template file, and its HTML part by the documented convention. With a
        `cache` (`codecache.default_cache()`), compiled code is kept there and reused."""
        p = Path(path)
        text = _read(p)
        html_file = Path(html_path) if html_path else p.with_suffix(".html")
        html: str | None = None
        if html_path or (html_file != p and html_file.is_file()):
            html = _read(html_file)
        if attachments_dir is not None and not Path(attachments_dir).is_dir():
            raise TemplateError(str(attachments_dir), "the attachments folder does not exist")
        return cls(
            text,
            name=str(p),
            html=html,
            html_name=str(html_file) if html is not None else None,
            base_dir=p.parent,
            extra_headers=extra_headers,
            attachments_dir=Path(attachments_dir) if attachments_dir is not None else None,
            cache=cache,
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
            raise InvalidRowError(
                Location(source_name, row.number, to_column), _printable(str(exc))
            ) from None
        ctx: dict[str, Any] = dict(values)
        ctx["row"] = values
        try:
            rendered_headers = self._header_block(ctx)
            text = self._text(ctx)
            html = self._html(ctx) if self._html is not None else None
        except _ControlCharacter as exc:
            raise _control_error(exc.char, row, source_name, self._header_columns) from None
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
        where = Location(source_name, row.number)
        header_list, head, attachments, envelope, sender, empty_subject = self._headers(
            rendered_headers, row, where, recipient, allow_utf8_local
        )
        return RenderedMessage(
            row=row,
            recipient=recipient,
            sender=sender,
            headers=header_list,
            envelope_to=envelope,
            text=text,
            html=html,
            attachments=attachments,
            source=source_name,
            head=head,
            empty_subject=empty_subject,
        )

    def _headers(
        self,
        rendered: str,
        row: Row,
        where: Location,
        recipient: str,
        allow_utf8_local: bool,
    ) -> tuple[
        list[tuple[str, HeaderValue]],
        list[str],
        list[Attachment],
        list[str],
        str,
        tuple[str | None, str] | None,
    ]:
        result: list[tuple[str, HeaderValue]] = []
        empty_subject: tuple[str | None, str] | None = None
        attachments: list[Attachment] = []
        envelope: list[str] = []
        sender = ""
        if not self.has_to:
            result.append(("To", (Mailbox("", recipient),)))
            envelope.append(recipient)
        values = rendered.split(_SEP)
        if len(values) != len(self._specs):  # only a template expression can make a NUL
            raise TemplateError(where, f"template {self.name}: a header value renders a NUL")
        # Encoded as they come for 7-bit (nearly every message), again at the end when a
        # non-ASCII local part, in the envelope or in any address header written, makes it
        # SMTPUTF8 (the builder makes the same decision: message._utf8).
        head = [] if self.has_to else [f"To: {recipient}"]
        try:
            for spec, value in zip(self._specs, values, strict=True):
                lower = spec.lower
                if lower == ATTACHMENT_HEADER:
                    attachments.extend(self._attachments(value, row, where))
                    continue
                if spec.mailboxes is not None:
                    mailboxes: tuple[Mailbox, ...] | None = spec.mailboxes
                    if not allow_utf8_local and not all(
                        m.address.isascii() for m in spec.mailboxes
                    ):
                        raise TemplateError(
                            where, f"{spec.name}: a non-ASCII local part, which SES cannot send"
                        )
                elif lower in ADDRESS_HEADERS:
                    if not _strip_marks(value).strip(_WSP):
                        if lower == "from":  # else MAIL FROM:<>, a bounce's null sender
                            column = _empty_column(row, self._header_columns)
                            raise InvalidRowError(
                                Location(where.file, row.number, column),
                                f"{spec.name}: renders empty; every message needs a sender",
                            )
                        continue
                    mailboxes = _row_mailboxes(
                        spec.name,
                        value,
                        row,
                        where,
                        recipient,
                        allow_utf8_local,
                        self._header_columns,
                    )
                else:
                    mailboxes = None
                if mailboxes is not None:
                    if lower in ("from", "sender") and len(mailboxes) != 1:
                        raise InvalidRowError(where, f"{spec.name}: must hold exactly one address")
                    if lower == "from":
                        sender = mailboxes[0].address
                    elif lower in ("to", "cc", "bcc"):
                        envelope.extend(box.address for box in mailboxes)
                    result.append((spec.name, mailboxes))
                    if lower != "bcc":
                        head.append(
                            spec.lines[0]
                            if spec.lines is not None
                            else headers.address_header(spec.name, mailboxes, False)
                        )
                    continue
                text = _strip_marks(value).strip(_WSP) if not spec.fixed else value
                if not text:
                    # Legal, and sent without one, but rarely meant when a blank column did
                    # it. Left blank in the template (which must give one), it is meant.
                    if lower == "subject" and not spec.fixed:
                        column = _empty_column(row, self._subject_columns)
                        note = f"{spec.name}: renders empty; the message goes without one"
                        empty_subject = (column, note)
                    continue
                if lower == "list-unsubscribe" and not spec.fixed:
                    # No URI holds '<' or '>': from data they could only close the template's
                    # <...> item and open another (a mailto: or a one-click POST elsewhere).
                    brackets = [d for d in _DATA.findall(value) if "<" in d or ">" in d]
                    if brackets:
                        column = _column_for(brackets, row, self._header_columns)
                        raise InvalidRowError(
                            Location(where.file, row.number, column),
                            f"{spec.name}: the value holds '<' or '>', which no URL may",
                        )
                    problem = unsubscribe.check_header(text)
                    if problem:
                        raise InvalidRowError(where, f"{spec.name}: {_printable(problem)}")
                result.append((spec.name, text))
                head.append(
                    spec.lines[0]
                    if spec.lines is not None
                    else headers.unstructured(spec.name, text, False)
                )
            if not envelope:
                raise InvalidRowError(where, "the message has no recipient")
            if len(envelope) > 1:
                envelope = _distinct(envelope)
            if headers.needs_utf8(sender, envelope, result):
                head = headers.encode(result, utf8=True)
        except headers.HeaderError as exc:
            raise InvalidRowError(where, str(exc)) from None
        return result, head, attachments, envelope, sender, empty_subject

    @cached_property
    def _subject_columns(self) -> frozenset[str]:
        """The columns the Subject uses, by name or as `row['Name']`: worked out once a
        Subject renders empty (rarely), so loading a template parses nothing more."""
        from jinja2 import meta, nodes

        tree = _env(autoescape=False).parse(self._subject)
        used = set(meta.find_undeclared_variables(tree))
        for item in tree.find_all(nodes.Getitem):
            if (
                isinstance(item.node, nodes.Name)
                and item.node.name == "row"
                and isinstance(item.arg, nodes.Const)
                and isinstance(item.arg.value, str)
            ):
                used.add(item.arg.value)
        return frozenset(used)

    # --- attachments -----------------------------------------------------------------------

    def _attachments(self, value: str, row: Row, where: Location) -> list[Attachment]:
        found: list[Attachment] = []
        segments = [d.strip() for d in _DATA.findall(value) if d.strip()]
        for part in _attachment_parts(value):
            if part is None:
                texts = [d for d in segments if ";" in d]
                raise InvalidRowError(
                    Location(where.file, row.number, _column_for(texts, row, self._header_columns)),
                    "a value inside an attachment path cannot hold ';' (it would name another "
                    "file); a column may list several files only when it is the whole path",
                )
            has_data = _OPEN in part or _CLOSE in part
            text = _strip_marks(part).strip()
            if not text:
                continue
            try:
                found.append(self._attachment_path(text))
            except _Refused as exc:
                texts = [d for d in segments if d in text] or [text]
                column = _column_for(texts, row, self._header_columns)
                raise InvalidRowError(
                    Location(where.file, row.number, column if has_data else None),
                    _printable(str(exc)),
                ) from None
        return found

    def _attachment_path(self, text: str) -> Attachment:
        """An attachment by its real path and the name `text` gives it, or _Refused: the
        real path (symbolic links followed) must be a readable regular file inside the
        attachments folder. The name is the link's, not its target's."""
        root = self.attachments_dir
        shown = text[:80]
        if text.startswith("~"):
            raise _Refused(f"attachment {shown!r}: '~' is not expanded; give a path inside {root}")
        if PurePosixPath(text).is_absolute() or PureWindowsPath(text).anchor:
            raise _Refused(f"attachment {shown!r}: an absolute path; give a path inside {root}")
        if ".." in PurePosixPath(text).parts or ".." in PureWindowsPath(text).parts:
            raise _Refused(f"attachment {shown!r}: '..' is not allowed; give a path inside {root}")
        try:
            path = (root / text).resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symbolic link loop
            raise _Refused(f"attachment {shown!r}: cannot be resolved ({exc})") from None
        if not path.is_relative_to(root):
            raise _Refused(f"attachment {shown!r} leads outside {root} (a symbolic link)")
        try:
            regular = path.is_file()
            there = regular or path.exists()
        except OSError as exc:  # a name too long for the file system (ENAMETOOLONG), ...
            raise _Refused(f"attachment {shown!r} cannot be read: {exc.strerror}") from None
        if not regular:
            if there:
                raise _Refused(f"attachment {shown!r} is not a regular file")
            raise _Refused(f"attachment not found: {shown} (in {root})")
        try:
            with open(path, "rb", buffering=0):
                pass
        except OSError as exc:
            raise _Refused(f"attachment {shown!r} cannot be read: {exc.strerror}") from None
        given = PurePosixPath(text)
        return Attachment(path, given.name, given.as_posix())


class _Refused(Exception):
    """An attachment path that is not allowed or not there; the message says which."""


class _Problem(Exception):
    """An address header that does not parse or validate; `data` is the row text involved."""

    def __init__(self, message: str, data: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data or []


def _attachment_parts(value: str) -> list[str | None]:
    """Split an Attachment value into paths: at the template's own ';', and inside a value
    that fills a whole path slot (`{{ files }}` may list several). A ';' in a value that
    stands inside a path the template writes (`invoices/{{ n }}.pdf`) is None: refused,
    since the row would then choose a file the template did not let it choose."""
    parts: list[str | None] = []
    for part in re.split(r";(?![^\x0e\x0f]*\x0f)", value):
        data = _DATA.findall(part)
        if not any(";" in d for d in data):
            parts.append(part)
        elif part.strip().startswith(_OPEN) and part.strip().endswith(_CLOSE) and len(data) == 1:
            parts.extend(f"{_OPEN}{p}{_CLOSE}" for p in data[0].split(";"))
        else:
            parts.append(None)
    return parts


def _utf8_meta(html: str) -> str:
    """The HTML template with every <meta> charset declaration saying utf-8."""
    if "charset" not in html.lower():
        return html
    return re.sub(_META_TAG, _utf8_meta_tag, html)


def _utf8_meta_tag(tag: re.Match[str]) -> str:
    attrs = {
        m[2].lower(): m[4].strip("\"'").strip().lower() for m in re.finditer(_META_ATTR, tag[0])
    }
    content_type = attrs.get("http-equiv") == "content-type"

    def attr(m: re.Match[str]) -> str:
        name, value = m[2].lower(), m[4]
        if name == "charset":
            # A plain name only: one written with Jinja ({{ cs }}) is left to the template.
            value = re.sub(
                r"""\A(["']?\s*)([A-Za-z0-9._:-]+)(\s*["']?)\Z""",
                lambda c: c[0] if c[2].lower() in ("utf-8", "utf8") else f"{c[1]}utf-8{c[3]}",
                value,
            )
        elif name == "content" and content_type:
            value = re.sub(
                _CONTENT_CHARSET,
                lambda c: c[0] if c[2].lower() in ("utf-8", "utf8") else f"{c[1]}utf-8",
                value,
                count=1,
            )
        return f"{m[1]}{m[2]}{m[3]}{value}"

    return re.sub(_META_ATTR, attr, tag[0])


def _distinct(envelope: list[str]) -> list[str]:
    """Each address once, the first spelling kept, compared as the ledger keys them: one in
    To and again in Cc or Bcc would be two RCPT TOs, which a server may deliver as two
    copies (SES bills both)."""
    seen: set[str] = set()
    out: list[str] = []
    for address in envelope:
        key = addresses.normalise(address)
        if key not in seen:
            seen.add(key)
            out.append(address)
    return out


def _strip_marks(value: str) -> str:
    if _OPEN not in value and _CLOSE not in value:
        return value
    return value.replace(_OPEN, "").replace(_CLOSE, "")


def _printable(text: str) -> str:
    """A message safe for a terminal: no escape sequence from CSV data gets through."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


def _columns(row: Row, prefer: frozenset[str]) -> list[tuple[str, str]]:
    """The row's (column, value) pairs, those the headers name first."""
    items = list(row.values.items())
    return [i for i in items if i[0] in prefer] + [i for i in items if i[0] not in prefer]


def _column_for(texts: list[str], row: Row, prefer: frozenset[str]) -> str | None:
    """The column whose value the rendered `texts` came from (best effort, for the message)."""
    texts = [t.strip() for t in texts if t.strip()]
    columns = _columns(row, prefer)
    for text in texts:
        for column, value in columns:
            if value.strip() == text:
                return column
    for text in texts:
        for column, value in columns:
            if value.strip() and (value.strip() in text or text in value):
                return column
    return None


def _empty_column(row: Row, used: frozenset[str]) -> str | None:
    """The blank column a header uses: the likely reason it rendered empty."""
    return next((c for c, v in _columns(row, used) if c in used and not v.strip()), None)


def _control_error(
    char: str, row: Row, source_name: str, prefer: frozenset[str]
) -> InvalidRowError | TemplateError:
    column = next((c for c, v in _columns(row, prefer) if char in v), None)
    kind = "a line break (header injection)" if char in "\r\n" else "a control character"
    code = f"U+{ord(char):04X}"
    if column is None:
        return TemplateError(
            Location(source_name, row.number),
            f"a header expression produces {kind} ({code}); not sent",
        )
    return InvalidRowError(
        Location(source_name, row.number, column),
        f"the value holds {kind} ({code}) and is used in a header; not sent",
    )


# --- address headers ---------------------------------------------------------------------


def _row_mailboxes(
    name: str,
    value: str,
    row: Row,
    where: Location,
    recipient: str,
    allow_utf8_local: bool,
    prefer: frozenset[str],
) -> tuple[Mailbox, ...]:
    try:
        return _parse_mailboxes(name, value, allow_utf8_local, recipient)
    except _Problem as exc:
        if not exc.data:
            raise TemplateError(where, _printable(exc.message)) from None
        column = _column_for(exc.data, row, prefer)
        raise InvalidRowError(
            Location(where.file, row.number, column), _printable(exc.message)
        ) from None


def _parse_mailboxes(
    name: str, value: str, allow_utf8_local: bool, recipient: str = ""
) -> tuple[Mailbox, ...]:
    """Parse a rendered address header. Text between the data marks is data: in a display
    name it is taken as it is, in an address it must be one address. Only the template's
    own commas, quotes and angle brackets are syntax."""
    fast = _FAST_MAILBOX.match(value)
    if fast is not None:
        display, bracketed, bare = fast.groups()
        address = bracketed if bare is None else bare
        return (
            Mailbox(
                (display or "").strip(_WSP),
                _address(name, address.strip(), [address], allow_utf8_local, recipient),
            ),
        )
    result: list[Mailbox] = []
    for phrase, address, data, bracketed, remark in _split(name, value):
        if not bracketed:
            phrase, address = remark, phrase
        display = "".join(phrase).strip(_WSP)
        addr = "".join(address).strip()
        if not addr:
            if display or bracketed:
                raise _Problem(f"{name}: no address for the name {display[:60]!r}", data)
            continue
        result.append(Mailbox(display, _address(name, addr, data, allow_utf8_local, recipient)))
    if not result:
        raise _Problem(f"{name}: header has no address", _DATA.findall(value))
    return tuple(result)


def _split(name: str, value: str) -> list[tuple[list[str], list[str], list[str], bool, list[str]]]:
    """Split at the template's commas into (phrase, address, data, had <...>, comment).

    The template's own quotes and comments are honoured: the old `billing@acme.example
    (Acme Billing)` form gives its comment as the display name."""
    chunks = _DATA.split(value)  # literal, data, literal, data, ...
    out: list[tuple[list[str], list[str], list[str], bool, list[str]]] = []
    remark: list[str] = []
    phrase: list[str] = []
    address: list[str] = []
    data: list[str] = []
    state = "phrase"  # then "angle" inside <...>, "after" once it is closed
    quoted = escaped = False
    comment = 0
    for number, chunk in enumerate(chunks):
        if number % 2:  # data: never syntax
            if comment:
                continue
            if state == "angle":
                address.append(chunk)
                data.append(chunk)
            elif state == "after":
                if chunk.strip():
                    raise _Problem(f"{name}: text after the address: {chunk[:60]!r}", [chunk])
            else:
                phrase.append(chunk)
                data.append(chunk)
            continue
        for char in chunk:
            target = address if state == "angle" else phrase
            if escaped:
                if not comment:
                    target.append(char)
                escaped = False
            elif comment:
                if char == "\\":
                    escaped = True
                elif char in "()":
                    comment += 1 if char == "(" else -1
                if comment and not escaped:
                    remark.append(char)
            elif quoted:
                if char == "\\":
                    escaped = True
                elif char == '"':
                    quoted = False
                else:
                    target.append(char)
            elif state == "angle":
                if char == ">":
                    state = "after"
                elif char in '<,"':
                    raise _Problem(f"{name}: {char!r} inside <...>", data)
                else:
                    address.append(char)
            elif char == ",":
                out.append((phrase, address, data, state == "after", remark))
                phrase, address, data, state, remark = [], [], [], "phrase", []
            elif char == "(":
                comment = 1
            elif state == "after":
                if not char.isspace():
                    raise _Problem(f"{name}: text after the address: {char!r}", data)
            elif char == '"':
                quoted = True
            elif char == "<":
                state = "angle"
            else:
                phrase.append(char)
    if quoted or comment or state == "angle":
        raise _Problem(f"{name}: an unclosed quote, comment or '<'", data)
    out.append((phrase, address, data, state == "after", remark))
    return out


def _address(name: str, addr: str, data: list[str], allow_utf8_local: bool, recipient: str) -> str:
    if addr == recipient:
        return addr
    try:
        return _validate_header_address(addr, allow_utf8_local)
    except addresses.AddressError as exc:
        several = any(c in addr for c in ',;<>"') or len(addr.split()) > 1
        if data and several:
            message = f"{name}: {addr[:60]!r} is not exactly one address"
            hint = " (use mailbox(name, email) to give a name with it)" if "<" in addr else ""
            raise _Problem(message + hint, data) from None
        raise _Problem(f"{name}: {exc}", data) from None


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
    except OSError as exc:
        raise TemplateError(str(path), f"cannot read ({exc.strerror})") from None
