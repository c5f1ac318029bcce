"""What reaches the user's terminal: text from a CSV file made safe to print, and the stream's
own manners (is it a terminal, does it take ANSI styles and colours, how wide is it).

A recipients file is untrusted input, and much of what smartmail prints can hold its values
(errors naming a value, previews, warnings, the summary's reasons). A value such as
`\\x1b]0;pwned\\x07` would retitle the window, `\\x1b[2J` clear the screen, a bidi override
reorder a line. Every such character is shown as a visible escape (`\\x1b`) instead: the user
still sees that it is there, and the terminal does nothing with it.

The CLI's own lines, rules and tables are written without rich (~20 ms of start-up for a
dry run that prints a few lines): `Terminal` decides styling the way rich does, so output looks
the same. ANSI styles only on a terminal (FORCE_COLOR set and not empty, or TTY_COMPATIBLE=1,
count as one; TTY_COMPATIBLE=0 as not), none for TERM=dumb or unknown, and no colours when
NO_COLOR is set (bold and italic stay, as rich and no-color.org have it). The width is the
terminal's, or $COLUMNS, else 80.
"""

from __future__ import annotations

import io
import os
from typing import IO, TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from collections.abc import Mapping

    from _typeshed import ReadableBuffer

# C0 controls but TAB (LF is kept only in a preview), DEL, C1 controls, the Unicode line and
# paragraph separators, the bidirectional formatting characters (the "Trojan Source" ones), and
# the invisible ones nothing needs (zero width space, word joiner, BOM): "spring" and
# "spring\u200b" are two campaigns and must not look like one. Each with its visible escape.
# (The zero width joiner and non-joiner stay: emoji and several scripts are spelled with them.)
# A translation table, not a regular expression: compiling this character class cost ~0.7 ms
# of every start-up, and printing is never the hot path.
_UNSAFE_CODES = (
    *range(0x00, 0x09),
    *range(0x0A, 0x20),
    *range(0x7F, 0xA0),
    0x2028,
    0x2029,
    0x200B,
    0x200E,
    0x200F,
    0x2060,
    0xFEFF,
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
)
_ESCAPES = {code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" for code in _UNSAFE_CODES}
_ESCAPES_KEEP_LF = {code: escape for code, escape in _ESCAPES.items() if code != 0x0A}


def printable(text: str, *, newlines: bool = False) -> str:
    """`text` with every control character escaped; LF kept only when `newlines` is true
    (a preview), else escaped too (an error or a warning is one line)."""
    return text.translate(_ESCAPES_KEEP_LF if newlines else _ESCAPES)


def cell_width(text: str) -> int:
    """Columns `text` takes on a terminal: 2 for East Asian wide characters, 0 for combining
    marks (what rich counts; `text` is printable, so it holds no controls)."""
    if text.isascii():
        return len(text)
    import unicodedata

    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in text
    )


_SGR = {
    "bold": "1",
    "dim": "2",
    "italic": "3",
    "red": "31",
    "green": "32",
    "yellow": "33",
    "cyan": "36",
    "bright_green": "92",
}
_COLOURS = {"red", "green", "yellow", "cyan", "bright_green"}


class Terminal:
    """One output stream (stdout or stderr) and how to write to it."""

    def __init__(self, stream: IO[str]) -> None:
        env = os.environ
        self.stream = stream
        self.is_terminal = _is_terminal(stream, env)
        dumb = env.get("TERM", "").lower() in ("dumb", "unknown")
        self.ansi = self.is_terminal and not dumb
        self.colour = self.ansi and not env.get("NO_COLOR")
        self.width = _width(stream, env, self.ansi)
        self.encoding = getattr(stream, "encoding", None) or "utf-8"
        self.unicode = self.encoding.lower().replace("-", "").startswith("utf")

    def styled(self, text: str, style: str) -> str:
        """`text` in `style` (words of `_SGR`: "bold yellow") where the stream shows it."""
        if not (self.ansi and style and text):
            return text
        codes = [
            _SGR[word]
            for word in style.split()
            if word in _SGR and (self.colour or word not in _COLOURS)
        ]
        return f"\x1b[{';'.join(codes)}m{text}\x1b[0m" if codes else text

    def line(self, text: str = "") -> None:
        """Write one line as it is: the caller made its data printable and styled its own.

        A character the stream's encoding lacks (a name with an accent, printed under
        PYTHONIOENCODING=ascii or a Latin-1 locale) is shown as its escape (`\\xeb`), as
        Python does on stderr: a summary after sending must never end in a traceback."""
        text += "\n"
        try:
            self.stream.write(text)
        except UnicodeEncodeError:
            shown = text.encode(self.encoding, "backslashreplace").decode(self.encoding)
            self.stream.write(shown)
        self.stream.flush()

    def rule(self, title: str = "") -> None:
        """A horizontal line across the width, with `title` (made printable) in its middle."""
        char = "─" if self.unicode else "-"
        if not title:
            self.line(self.styled(char * self.width, "bright_green"))
            return
        title = printable(title)
        room = self.width - cell_width(title) - 2
        left = max(room // 2, 2)
        right = max(room - left, 2)
        line = self.styled(char * left, "bright_green")
        self.line(f"{line} {title} {self.styled(char * right, 'bright_green')}")


def _is_terminal(stream: IO[str], env: Mapping[str, str]) -> bool:
    compatible = env.get("TTY_COMPATIBLE", "")
    if compatible in ("0", "1"):
        return compatible == "1"
    force = env.get("FORCE_COLOR")
    if force is not None:
        return force != ""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such method, or closed
        return False


def _width(stream: IO[str], env: Mapping[str, str], terminal: bool) -> int:
    columns = env.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if terminal:
        try:
            return os.get_terminal_size(stream.fileno()).columns or 80
        except (AttributeError, ValueError, OSError):  # not a real file (a test's capture)
            pass
    return 80


# --- a reader that goes away -----------------------------------------------------------------


class _UntilReaderGone(io.RawIOBase):
    """Writes to a file descriptor; once its reader has gone (EPIPE: `smartmail status | head
    -1`), /dev/null takes the descriptor's place and every write succeeds, unseen.

    What a process that ignores SIGPIPE should do with output nobody reads: no traceback, no
    "Broken pipe" message, and the command carries on to its own end and exit status (a send
    records every row, and its summary goes nowhere).
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self.failed: OSError | None = None
        """The first write error that was not a reader gone (a full disk, a closed descriptor):
        the output was lost, and the command must say so at its end (`output_lost`)."""

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return os.isatty(self._fd)

    def write(self, data: ReadableBuffer) -> int:
        try:
            while True:
                try:
                    return os.write(self._fd, data)
                except BlockingIOError:
                    # A descriptor another process made non-blocking (a CI runner's pipe,
                    # node's), full for now: nothing is lost, and no caller up the stack
                    # retries (print would end in a traceback). Wait for the reader, as a
                    # write to a blocking pipe does.
                    import select

                    select.select([], [self._fd], [])
        except BrokenPipeError:
            pass
        except OSError as exc:
            # Not a reader gone, but the output is lost all the same (`> /dev/full`, a disk
            # filling up, `>&-`): the command carries on to its end (a send records every
            # row) rather than stop with a traceback, and says so then.
            if self.failed is None:
                self.failed = exc
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, self._fd)
        finally:
            os.close(null)
        return memoryview(data).nbytes


def output_lost(stream: TextIO) -> OSError | None:
    """The error that lost some of `stream`'s output, for one `quiet_when_unread` made."""
    raw = getattr(getattr(stream, "buffer", None), "raw", None)
    return raw.failed if isinstance(raw, _UntilReaderGone) else None


def quiet_when_unread(stream: TextIO | None) -> TextIO | None:
    """`stream` (the process's own stdout or stderr) as a text stream that a reader going away
    cannot break (`_UntilReaderGone`), with the same encoding, errors and buffering; None when
    it is not a file descriptor at all. A terminal too: one that hangs up while SIGHUP is
    ignored (`nohup`, `trap '' HUP`, a closed SSH session) answers every write with EIO. The
    wrapper still says it is a terminal, so colours and the live display stay."""
    if stream is None or not isinstance(stream, io.TextIOWrapper):
        return None
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return None
    stream.flush()
    return io.TextIOWrapper(
        io.BufferedWriter(_UntilReaderGone(fd)),
        encoding=stream.encoding,
        errors=stream.errors,
        line_buffering=stream.line_buffering,
        write_through=stream.write_through,
    )
