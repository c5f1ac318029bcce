"""Text from a CSV file made safe to print: escape sequences never reach the terminal.

A recipients file is untrusted input, and much of what smartmail prints can hold its values
(errors naming a value, previews, warnings, the summary's reasons). A value such as
`\\x1b]0;pwned\\x07` would retitle the window, `\\x1b[2J` clear the screen, a bidi override
reorder a line. Every such character is shown as a visible escape (`\\x1b`) instead: the user
still sees that it is there, and the terminal does nothing with it.
"""

from __future__ import annotations

import re

# C0 controls but TAB and LF, DEL, C1 controls, the Unicode line and paragraph separators, and
# the bidirectional formatting characters (the "Trojan Source" ones).
_UNSAFE = re.compile(
    "[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)
_UNSAFE_KEEP_LF = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, *, newlines: bool = False) -> str:
    """`text` with every control character escaped; LF kept only when `newlines` is true
    (a preview), else escaped too (an error or a warning is one line)."""
    pattern = _UNSAFE_KEEP_LF if newlines else _UNSAFE
    return pattern.sub(_visible, text)
