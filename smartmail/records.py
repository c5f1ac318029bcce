"""`__repr__` and `__eq__` for smartmail's dataclasses, written once instead of per class.

`@dataclass` compiles an `__init__`, a `__repr__` and an `__eq__` from source for every class
it makes; for the 13 dataclasses a dry run loads, the `__repr__` and `__eq__` alone are ~15 M
instructions at import, 3 % of a 10-row dry run's start-up (docs/benchmarks.md, round 6).
A class declared `@dataclass(repr=False, eq=False)` over one of these bases behaves as if
`@dataclass` had written them:

- `Described`: the `__repr__` `@dataclass` writes: `Name(field=value!r, ...)` over the fields
  with `repr=True`, `...` for an object already being shown (a cycle). For classes declared
  `eq=False` (compared by identity).
- `Record`: that `__repr__`, and the `__eq__` of `@dataclass(eq=True)`: an object of the same
  class with equal fields (those with `compare=True`) is equal, anything else NotImplemented;
  and `__hash__` None, as `@dataclass` makes a mutable class with `eq`: unhashable.

`dataclasses.fields`, `replace` and `asdict` work as before: the classes are dataclasses.
`tests/test_records.py` checks each class against one `@dataclass` makes with its fields.
"""

from __future__ import annotations

import dataclasses
from _thread import get_ident
from typing import Any

_shown: set[tuple[int, int]] = set()  # objects whose repr is being made, per thread
_repr_names: dict[type, tuple[str, ...]] = {}
_compare_names: dict[type, tuple[str, ...]] = {}


def _names(cls: type, cache: dict[type, tuple[str, ...]], attribute: str) -> tuple[str, ...]:
    names = cache.get(cls)
    if names is None:
        names = tuple(f.name for f in dataclasses.fields(cls) if getattr(f, attribute))
        cache[cls] = names
    return names


class Described:
    """The `__repr__` of a dataclass (see the module's docstring)."""

    __slots__ = ()

    def __repr__(self) -> str:
        key = id(self), get_ident()
        if key in _shown:
            return "..."
        _shown.add(key)
        try:
            names = _names(type(self), _repr_names, "repr")
            shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
            return f"{type(self).__qualname__}({shown})"
        finally:
            _shown.discard(key)


class Record(Described):
    """The `__repr__`, `__eq__` and (no) `__hash__` of a dataclass with `eq=True`."""

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]  # unhashable, as a mutable dataclass with eq

    def __eq__(self, other: Any) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        names = _names(type(self), _compare_names, "compare")
        return tuple(getattr(self, n) for n in names) == tuple(getattr(other, n) for n in names)
