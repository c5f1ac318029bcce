"""The cache of compiled templates: used on the second run, recompiled when the template
changes, never a reason for a run to fail, and never loaded from where another user could
have written it (marshalled code is code)."""

from __future__ import annotations

import marshal
import os
import stat
from pathlib import Path
from typing import Any

import jinja2
import pytest

from smartmail import codecache
from smartmail.codecache import CodeCache
from smartmail.errors import TemplateError
from smartmail.sources import Row
from smartmail.templates import MessageTemplate

from .conftest import TEMPLATE, write

HTML = "<p>Hi <b>{{ name }}</b></p>\n"
ROW = Row(2, {"email": "ann@example.org", "name": "Ann <Lee>", "code": "C1"})


class Compiles:
    """Counts Jinja compilations (and lexers built: a cached run needs neither)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        compile_ = jinja2.Environment.compile

        def counted(env: jinja2.Environment, *args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return compile_(env, *args, **kwargs)

        monkeypatch.setattr(jinja2.Environment, "compile", counted)
        parse = jinja2.Environment.parse

        def parsed(env: jinja2.Environment, *args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return parse(env, *args, **kwargs)

        monkeypatch.setattr(jinja2.Environment, "parse", parsed)


@pytest.fixture
def compiles(monkeypatch: pytest.MonkeyPatch) -> Compiles:
    return Compiles(monkeypatch)


@pytest.fixture
def template(tmp_path: Path) -> Path:
    write(tmp_path / "msg.html", HTML)
    return write(tmp_path / "msg.txt", TEMPLATE)


def rendered(path: Path, cache: CodeCache | None) -> tuple[Any, ...]:
    message = MessageTemplate.load(path, cache=cache).render(ROW, "email")
    return (message.headers, message.head, message.text, message.html, message.envelope_to)


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.jinja"))


def test_the_default_folder_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert codecache.default_folder() == tmp_path / "cache" / "smartmail"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # ignored, as the spec says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert codecache.default_folder() == tmp_path / "home" / ".cache" / "smartmail"


def test_a_second_load_uses_the_cache_and_renders_the_same(
    template: Path, tmp_path: Path, compiles: Compiles
) -> None:
    uncached = rendered(template, None)
    compiles.count = 0
    cache = CodeCache(tmp_path / "cache" / "smartmail")
    assert rendered(template, cache) == uncached
    assert compiles.count > 0
    folder = tmp_path / "cache" / "smartmail"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    [entry] = entries(folder)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    compiles.count = 0
    assert rendered(template, cache) == uncached
    assert compiles.count == 0  # neither compiled nor parsed: the lexer is never built
    assert entries(folder) == [entry]


def test_a_changed_template_is_compiled_again(
    template: Path, tmp_path: Path, compiles: Compiles
) -> None:
    cache = CodeCache(tmp_path / "cache")
    rendered(template, cache)
    write(template, TEMPLATE.replace("your code is", "your new code is"))
    compiles.count = 0
    assert "your new code is C1" in rendered(template, cache)[2]
    assert compiles.count > 0
    (template.parent / "msg.html").write_text("<i>{{ code }}</i>\n", encoding="utf-8")
    assert rendered(template, cache)[3] == "<i>C1</i>\n"
    assert len(entries(tmp_path / "cache")) == 3


def test_the_cache_keeps_a_bounded_number_of_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(codecache, "MAX_ENTRIES", 3)
    cache = CodeCache(tmp_path / "cache")
    for n in range(6):
        text = TEMPLATE.replace("Hello", f"Hello {n}")
        MessageTemplate(text, cache=cache, base_dir=tmp_path)
    assert len(entries(tmp_path / "cache")) == 3


def test_a_cache_that_cannot_be_written_never_fails_a_run(
    template: Path, tmp_path: Path, compiles: Compiles
) -> None:
    blocker = write(tmp_path / "not-a-folder", "")  # the cache's parent is a file
    cache = CodeCache(blocker / "smartmail")
    expected = rendered(template, None)
    assert rendered(template, cache) == expected
    assert rendered(template, cache) == expected
    assert not (blocker / "smartmail").exists()


def test_a_template_with_errors_is_not_cached(tmp_path: Path) -> None:
    cache = CodeCache(tmp_path / "cache")
    bad = TEMPLATE.replace("Hello {{ name }}", "Hello {{ name | nosuchfilter }}")
    for _ in range(2):  # the second time too: the header is named, nothing was cached
        with pytest.raises(TemplateError, match="header Subject"):
            MessageTemplate(bad, cache=cache, base_dir=tmp_path)
    assert not entries(tmp_path / "cache")
    broken = TEMPLATE.replace("To: {{ name }}", "To: {% if name %}{{ name }}")
    with pytest.raises(TemplateError, match="header To"):
        MessageTemplate(broken, cache=cache, base_dir=tmp_path)
    assert not entries(tmp_path / "cache")


def _cached(template: Path, tmp_path: Path) -> tuple[CodeCache, Path]:
    cache = CodeCache(tmp_path / "cache")
    rendered(template, cache)
    [entry] = entries(tmp_path / "cache")
    return cache, entry


def _poison(entry: Path) -> None:
    """Rewrite the entry so that rendering it would give itself away."""
    value = marshal.loads(entry.read_bytes())
    value["text"] = jinja2.Environment().compile("POISONED")
    os.chmod(entry, 0o600)
    entry.write_bytes(marshal.dumps(value))


def test_a_poisoned_entry_is_what_a_cache_hit_would_run(template: Path, tmp_path: Path) -> None:
    """The check the next tests rely on: an entry that passes the checks is run as it is."""
    cache, entry = _cached(template, tmp_path)
    _poison(entry)
    assert rendered(template, cache)[2] == "POISONED"


def test_an_entry_writable_by_others_is_not_loaded(template: Path, tmp_path: Path) -> None:
    cache, entry = _cached(template, tmp_path)
    _poison(entry)
    os.chmod(entry, 0o620)  # group-writable
    assert "POISONED" not in rendered(template, cache)[2]
    os.chmod(entry, 0o602)  # world-writable
    assert "POISONED" not in rendered(template, cache)[2]


def test_a_folder_writable_by_others_is_neither_read_nor_written(
    template: Path, tmp_path: Path
) -> None:
    cache, entry = _cached(template, tmp_path)
    _poison(entry)
    folder = tmp_path / "cache"
    os.chmod(folder, 0o777)
    try:
        assert "POISONED" not in rendered(template, cache)[2]
        write(template, TEMPLATE.replace("Hi", "Hello"))
        rendered(template, cache)
        assert entries(folder) == [entry]  # nothing new written there
    finally:
        os.chmod(folder, 0o700)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs chown")
def test_an_entry_or_folder_owned_by_someone_else_is_not_loaded(
    template: Path, tmp_path: Path
) -> None:
    cache, entry = _cached(template, tmp_path)
    _poison(entry)
    os.chown(entry, 65534, 65534)
    assert "POISONED" not in rendered(template, cache)[2]
    os.chown(entry, 0, 0)
    os.chown(tmp_path / "cache", 65534, 65534)
    assert "POISONED" not in rendered(template, cache)[2]


def test_a_symbolic_link_is_not_followed(template: Path, tmp_path: Path) -> None:
    cache, entry = _cached(template, tmp_path)
    _poison(entry)
    elsewhere = tmp_path / "elsewhere"
    entry.rename(elsewhere)
    entry.symlink_to(elsewhere)
    assert "POISONED" not in rendered(template, cache)[2]
    # nor a link in place of the folder
    (tmp_path / "cache").rename(tmp_path / "real")
    (tmp_path / "real" / entry.name).unlink()
    elsewhere.rename(tmp_path / "real" / entry.name)
    (tmp_path / "cache").symlink_to(tmp_path / "real")
    assert "POISONED" not in rendered(template, cache)[2]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_a_fifo_in_place_of_an_entry_is_a_miss_not_a_hang(template: Path, tmp_path: Path) -> None:
    cache, entry = _cached(template, tmp_path)
    entry.unlink()
    os.mkfifo(entry, 0o600)
    assert rendered(template, cache) == rendered(template, None)


@pytest.mark.parametrize(
    "content", [b"", b"not marshal", marshal.dumps([1, 2]), marshal.dumps({"text": 1})]
)
def test_a_corrupt_entry_is_a_miss(template: Path, tmp_path: Path, content: bytes) -> None:
    cache, entry = _cached(template, tmp_path)
    expected = rendered(template, None)
    entry.write_bytes(content)
    assert rendered(template, cache) == expected


def test_a_dry_run_fills_the_users_cache_and_the_next_one_uses_it(
    template: Path, tmp_path: Path, compiles: Compiles, capsys: pytest.CaptureFixture[str]
) -> None:
    from smartmail.cli import main

    from .conftest import make_csv

    csv_path = make_csv(tmp_path / "r.csv", 3)
    outputs = []
    for _ in range(2):
        compiles.count = 0
        with pytest.raises(SystemExit) as done:
            main(["dry-run", str(csv_path), "-t", str(template)])
        assert done.value.code == 0
        outputs.append(capsys.readouterr().out)
    assert compiles.count == 0
    assert len(entries(Path(os.environ["XDG_CACHE_HOME"]) / "smartmail")) == 1
    assert "Hi User 0, your code is C00000." in outputs[1]
