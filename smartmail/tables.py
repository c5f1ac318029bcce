"""The CLI's tables (a run's summary, the SES account, a feedback or enqueue run) as plain
text: box-drawing borders, one column per field, wrapped to the terminal's width.

They look like the rich tables they replace, without loading rich (~20 ms of a dry run's
start-up). Every cell is made printable here, whatever the caller passes: a value from a CSV
file (a campaign name, a skip reason) can never put an escape sequence on the terminal. The
only escape sequences written are the table's own styles, and only where `Terminal` allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from .terminal import Terminal, cell_width, printable

Justify = Literal["left", "right"]
# (left corner, line, joint, right corner) of the top and bottom edges, and the side.
_UNICODE = {"top": ("┌", "─", "┬", "┐"), "bottom": ("└", "─", "┴", "┘"), "side": ("│",)}
_ASCII = {"top": ("+", "-", "+", "+"), "bottom": ("+", "-", "+", "+"), "side": ("|",)}


class Table:
    """Rows of text cells under an optional title; `styles` and `justify` are per column,
    and a row can add a style of its own (a warning in yellow)."""

    def __init__(
        self,
        title: str = "",
        *,
        justify: Sequence[Justify] = ("left", "right"),
        styles: Sequence[str] = ("bold", ""),
    ) -> None:
        if len(styles) != len(justify):
            raise ValueError("one style per column")
        self.title = title
        self.justify = tuple(justify)
        self.styles = tuple(styles)
        self.rows: list[tuple[list[str], str]] = []

    def add_row(self, *cells: str, style: str = "") -> None:
        if len(cells) != len(self.justify):
            raise ValueError(f"a row of {len(self.justify)} cells, not {len(cells)}")
        self.rows.append(([printable(cell) for cell in cells], style))

    def widths(self, width: int) -> list[int]:
        """Each column's width: as wide as its widest cell, the widest shrunk first until the
        table fits in `width` (borders and padding take 3 a column, plus 1)."""
        columns = len(self.justify)
        wanted = [
            max([1, *(cell_width(cells[i]) for cells, _style in self.rows)]) for i in range(columns)
        ]
        room = max(width - 3 * columns - 1, columns)
        while sum(wanted) > room and max(wanted) > 1:
            widest = max(wanted)
            at = len(wanted) - 1 - wanted[::-1].index(widest)  # the rightmost widest
            runner_up = max([1, *(w for i, w in enumerate(wanted) if i != at)])
            wanted[at] = max(widest - min(sum(wanted) - room, max(widest - runner_up, 1)), 1)
        return wanted

    def lines(self, term: Terminal) -> list[str]:
        box = _UNICODE if term.unicode else _ASCII
        widths = self.widths(term.width)
        out: list[str] = []
        if self.title:
            out.append(term.styled(printable(self.title), "italic"))
        left, line, joint, right = box["top"]
        out.append(left + joint.join(line * (w + 2) for w in widths) + right)
        (side,) = box["side"]
        for cells, row_style in self.rows:
            wrapped = [wrap(cell, w) for cell, w in zip(cells, widths, strict=True)]
            for n in range(max(len(parts) for parts in wrapped)):
                shown = []
                for i, parts in enumerate(wrapped):
                    text = parts[n] if n < len(parts) else ""
                    pad = " " * (widths[i] - cell_width(text))
                    text = term.styled(text, f"{self.styles[i]} {row_style}".strip())
                    shown.append(pad + text if self.justify[i] == "right" else text + pad)
                out.append(f"{side} " + f" {side} ".join(shown) + f" {side}")
        left, line, joint, right = box["bottom"]
        out.append(left + joint.join(line * (w + 2) for w in widths) + right)
        return out

    def print(self, term: Terminal) -> None:
        for line in self.lines(term):
            term.line(line)


def wrap(text: str, width: int) -> list[str]:
    """`text` in lines of at most `width` columns: broken at spaces, and a word longer than a
    line folded (nothing is cut off: a path or an address stays whole across lines)."""
    if cell_width(text) <= width:
        return [text]
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        while cell_width(word) > width:
            if current:
                lines.append(current)
                current = ""
            head, word = _fold(word, width)
            lines.append(head)
        if not word:
            continue
        joined = f"{current} {word}" if current else word
        if cell_width(joined) <= width:
            current = joined
        else:
            lines.append(current)
            current = word
    if current or not lines:
        lines.append(current)
    return lines


def _fold(word: str, width: int) -> tuple[str, str]:
    """The first `width` columns of `word` (at least one character), and the rest."""
    if word.isascii():
        return word[: max(width, 1)], word[max(width, 1) :]
    used = 0
    for i, char in enumerate(word):
        used += cell_width(char)
        if used > width and i:
            return word[:i], word[i:]
    return word, ""
