"""What travels on the send queue: a job of a few rows, and the campaign's template bundle.

A job is versioned JSON, small, and names everything else by reference:

    {"v": 1, "campaign": "weekly", "template": {"sha256": "…", "s3": "s3://b/templates/….json"},
     "columns": ["email", "name"], "rows": [[2, {"email": "…", "name": "…"}], …]}

`template.s3` is absent when the bundle is kept inline in the campaign's record in the state
store. The campaign's config (transport, tags, retries…) is in that record too, stored once by
`enqueue`: a job never carries a template or a setting, so a million rows cost a million
rows, not a million templates.

The template bundle is the template text, its HTML part, and the attachments folder's files,
content-addressed by the SHA-256 of its canonical JSON, so a worker on another machine renders
exactly what pre-flight rendered, and a job can never be sent with a template that changed
after it was queued.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import ConfigError
from .sources import Row

JOB_VERSION = 1
BUNDLE_VERSION = 1
MAX_MESSAGE_BYTES = 256 * 1024
"""SQS's limit for one message, and for the whole of one SendMessageBatch call."""
ROWS_PER_JOB = 10
MAX_BUNDLE_BYTES = 20 * 1024 * 1024
"""Templates and attachments together; beyond this the campaign belongs in its own tooling."""


class JobError(ConfigError):
    """A queue message that is not a job this smartmail can run (a poison message)."""


@dataclass(frozen=True)
class TemplateRef:
    """Where a worker finds a campaign's template bundle: S3 (content-addressed) or inline."""

    sha256: str
    s3: str | None = None

    def to_dict(self) -> dict[str, str]:
        return {"sha256": self.sha256, **({"s3": self.s3} if self.s3 else {})}


@dataclass(frozen=True)
class Job:
    """A few rows of one campaign, each with its row number in the list (for reports)."""

    campaign: str
    template: TemplateRef
    columns: list[str]
    rows: list[Row]

    @property
    def id(self) -> str:
        """Stable for the same rows: `campaign:first-last` row numbers."""
        first, last = self.rows[0].number, self.rows[-1].number
        return f"{self.campaign}:{first}-{last}"

    def to_json(self) -> str:
        body = {
            "v": JOB_VERSION,
            "campaign": self.campaign,
            "template": self.template.to_dict(),
            "columns": self.columns,
            "rows": [[r.number, r.values] for r in self.rows],
        }
        # ASCII only: SQS refuses some characters (U+FFFE, U+FFFF…) a CSV value may hold.
        return json.dumps(body, ensure_ascii=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Job:
        """Read a job; JobError (one line) for anything malformed or from a newer smartmail."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise JobError(f"not a smartmail job (not JSON: {exc})") from None
        if not isinstance(data, dict) or "v" not in data:
            raise JobError("not a smartmail job (no version)")
        if data["v"] != JOB_VERSION:
            raise JobError(f"a job of version {data['v']!r}; this smartmail reads {JOB_VERSION}")
        try:
            template = data["template"]
            rows = [Row(int(i), {str(k): str(v) for k, v in vs.items()}) for i, vs in data["rows"]]
            job = cls(
                campaign=str(data["campaign"]),
                template=TemplateRef(str(template["sha256"]), template.get("s3")),
                columns=[str(c) for c in data["columns"]],
                rows=rows,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise JobError(f"a malformed smartmail job ({type(exc).__name__}: {exc})") from None
        if not job.rows or not job.campaign:
            raise JobError("a smartmail job with no rows or no campaign")
        return job


def pack(
    campaign: str,
    template: TemplateRef,
    columns: list[str],
    rows: list[Row],
    *,
    rows_per_job: int = ROWS_PER_JOB,
    limit: int = MAX_MESSAGE_BYTES,
) -> list[Job]:
    """Rows into jobs of up to `rows_per_job` rows, each within `limit` bytes as JSON.

    A job over the limit is split; a single row that cannot fit is refused (ConfigError naming
    its row) before anything is queued.
    """
    jobs: list[Job] = []
    for start in range(0, len(rows), rows_per_job):
        chunk = rows[start : start + rows_per_job]
        jobs.extend(_fit(Job(campaign, template, columns, chunk), limit))
    return jobs


def _fit(job: Job, limit: int) -> list[Job]:
    if len(job.to_json().encode()) <= limit:
        return [job]
    if len(job.rows) == 1:
        raise ConfigError(
            f"row {job.rows[0].number}: too large for one queue message "
            f"({len(job.to_json().encode())} bytes; SQS takes {limit})"
        )
    half = len(job.rows) // 2
    first = Job(job.campaign, job.template, job.columns, job.rows[:half])
    rest = Job(job.campaign, job.template, job.columns, job.rows[half:])
    return _fit(first, limit) + _fit(rest, limit)


# --- the template bundle ----------------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
    """A template, its HTML part and its attachments, as one JSON document."""

    data: dict[str, Any]

    @property
    def text(self) -> str:
        return json.dumps(self.data, sort_keys=True, separators=(",", ":"))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @classmethod
    def collect(
        cls,
        template: str | os.PathLike[str],
        html: str | os.PathLike[str] | None,
        attachments_dir: str | os.PathLike[str] | None,
        *,
        only: Mapping[str, Path],
        texts: tuple[str, str | None] | None = None,
    ) -> Bundle:
        """Read the files a worker needs to render this template as pre-flight did.

        `attachments_dir` is the folder attachment paths resolve in (the template's folder
        when the template names attachments and no --attachments-dir was given); `only`, the
        paths in it the rows attach, as they give them (`linked/report.pdf`), and the files
        pre-flight resolved them to. Each file is kept under the row's path, not its target's:
        the worker renders the same rows in its copy of the folder, which holds no links. A
        path that no longer leads to that file inside the folder (a link changed since) is
        refused. `texts`: the template's and the HTML part's text as pre-flight loaded them
        (else read from the files now).
        """
        t = Path(template)
        text, html_text = texts if texts is not None else (t.read_text(encoding="utf-8"), None)
        data: dict[str, Any] = {"v": BUNDLE_VERSION, "template": {"name": t.name, "text": text}}
        if html is not None:
            h = Path(html)
            if texts is None:
                html_text = h.read_text(encoding="utf-8")
            data["html"] = {"name": h.name, "text": html_text}
        files: dict[str, str] = {}
        total = 0
        if attachments_dir is not None:
            from .message import _read_regular  # a link swapped in since is refused too

            root = Path(attachments_dir).resolve()
            encoded: dict[Path, str] = {}  # a file rows name in two spellings is read once
            sizes: dict[Path, int] = {}
            for given in sorted(only):
                real = (root / given).resolve()
                if not real.is_relative_to(root) or real != only[given]:
                    raise ConfigError(
                        f"attachment {given!r} leads outside {root} or elsewhere than when it "
                        "was checked (a symbolic link changed); nothing was queued"
                    )
                if real not in encoded:
                    content = _read_regular(str(real))
                    sizes[real] = len(content)
                    encoded[real] = base64.b64encode(content).decode()
                # Counted as stored: once for each spelling the rows use (the worker finds
                # each under the path its row gives).
                total += sizes[real]
                if total > MAX_BUNDLE_BYTES:
                    raise ConfigError(
                        f"{root}: the files the rows attach come to more than "
                        f"{MAX_BUNDLE_BYTES // (1024 * 1024)} MB in the bundle every queue "
                        "worker reads (a file the rows name in several spellings, through "
                        "links, is stored once for each); send this campaign with `smartmail "
                        "send`, or name each file one way; nothing was queued"
                    )
                files[given] = encoded[real]
            data["attachments"] = files
        return cls(data)

    @classmethod
    def from_text(cls, text: str, sha256: str) -> Bundle:
        """A stored bundle, checked against the hash it was stored under."""
        bundle = cls(json.loads(text))
        if bundle.sha256 != sha256:
            raise JobError(f"the template bundle does not match its hash {sha256[:12]}…")
        if bundle.data.get("v") != BUNDLE_VERSION:
            raise JobError(f"a template bundle of version {bundle.data.get('v')!r}")
        return bundle

    def unpack(self, folder: Path) -> dict[str, str | None]:
        """Write the files under `folder`; the config paths that point at them."""
        tdir = folder / "template"
        tdir.mkdir(parents=True, exist_ok=True)
        paths: dict[str, str | None] = {"html_template": None, "attachments_dir": None}
        tmpl = self.data["template"]
        paths["template"] = str(_write(tdir, tmpl["name"], tmpl["text"].encode()))
        if "html" in self.data:
            html = self.data["html"]
            paths["html_template"] = str(_write(tdir, html["name"], html["text"].encode()))
        else:
            # Never pick up a stray .html beside the template: render exactly what was queued.
            paths["html_template"] = None
        if "attachments" in self.data:
            adir = folder / "attachments"
            adir.mkdir(exist_ok=True)
            for name, content in self.data["attachments"].items():
                _write(adir, name, base64.b64decode(content))
            paths["attachments_dir"] = str(adir)
        return paths


def _write(root: Path, name: str, content: bytes) -> Path:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise JobError(f"a template bundle naming the file {name!r} outside its folder")
    path = root.joinpath(*rel.parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path
