"""The dataclasses whose `__repr__` and `__eq__` come from `records.py` behave as if
`@dataclass` had written them: each is checked against a twin `@dataclass` makes."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from smartmail import records
from smartmail.campaign import CampaignResult, DryRunResult, Hooks
from smartmail.config import CampaignConfig
from smartmail.engine import PreflightResult, SendOptions
from smartmail.ledger import CampaignRecord
from smartmail.message import OutgoingMessage
from smartmail.report import Outcome, Summary
from smartmail.sources import RowProblem, SourceSpec
from smartmail.suppression import ImportResult

CLASSES: list[type] = [
    CampaignConfig,
    Summary,
    Outcome,
    Hooks,
    CampaignResult,
    DryRunResult,
    SendOptions,
    PreflightResult,
    OutgoingMessage,
    CampaignRecord,
    SourceSpec,
    RowProblem,
    ImportResult,
]


def twin(cls: type) -> type:
    """The class `@dataclass` makes from the same fields, with its own repr and eq."""
    eq = issubclass(cls, records.Record)
    fields = [
        (f.name, Any, dataclasses.field(repr=f.repr, compare=f.compare))
        for f in dataclasses.fields(cls)
    ]
    made: type = dataclasses.make_dataclass(cls.__name__, fields, eq=eq)
    made.__qualname__ = cls.__qualname__
    return made


def values(cls: type, seed: int) -> dict[str, Any]:
    return {f.name: (f.name, seed, [seed]) for f in dataclasses.fields(cls)}


def build(cls: type, kwargs: dict[str, Any]) -> Any:
    """An instance with the given field values, whatever its __init__ computes."""
    obj: Any = object.__new__(cls)
    for name, value in kwargs.items():
        object.__setattr__(obj, name, value)
    return obj


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_repr_eq_and_hash_are_the_dataclass_ones(cls: type) -> None:
    assert dataclasses.is_dataclass(cls)
    assert issubclass(cls, records.Described)
    other = twin(cls)
    a, b, c = values(cls, 1), values(cls, 1), values(cls, 2)
    assert repr(build(cls, a)) == repr(build(other, a))
    assert (build(cls, a) == build(cls, b)) == (build(other, a) == build(other, b))
    assert (build(cls, a) == build(cls, c)) == (build(other, a) == build(other, c))
    mine, theirs = build(cls, a), build(other, a)
    assert (mine == mine) and (theirs == theirs)
    assert (mine != build(cls, c)) == (theirs != build(other, c))
    assert mine != theirs  # another class: NotImplemented both ways, then identity
    assert (type(mine).__hash__ is None) == (type(theirs).__hash__ is None)
    first = dataclasses.fields(cls)[0].name
    changed = dict(a, **{first: "other"})
    assert (build(cls, a) == build(cls, changed)) == (build(other, a) == build(other, changed))


def test_every_field_left_out_of_repr_or_compare_is_honoured() -> None:
    @dataclasses.dataclass(repr=False, eq=False)
    class Mine(records.Record):
        a: int
        hidden: int = dataclasses.field(default=0, repr=False)
        ignored: int = dataclasses.field(default=0, compare=False)

    @dataclasses.dataclass
    class Theirs:
        a: int
        hidden: int = dataclasses.field(default=0, repr=False)
        ignored: int = dataclasses.field(default=0, compare=False)

    assert repr(Mine(1, 2, 3)).replace("Mine", "X") == repr(Theirs(1, 2, 3)).replace("Theirs", "X")
    assert Mine(1, 2, 3) == Mine(1, 2, 4)
    assert Mine(1, 2, 3) != Mine(1, 5, 3)
    assert Theirs(1, 2, 3) == Theirs(1, 2, 4)


def test_a_cycle_shows_as_dots_as_in_a_dataclass() -> None:
    @dataclasses.dataclass(repr=False, eq=False)
    class Node(records.Described):
        name: str
        children: list[Any]

    @dataclasses.dataclass
    class Twin:
        name: str
        children: list[Any]

    mine, theirs = Node("a", []), Twin("a", [])
    mine.children.append(mine)
    theirs.children.append(theirs)
    assert repr(mine) == repr(theirs).replace("Twin", "Node")
    assert repr(mine).endswith(".<locals>.Node(name='a', children=[...])")


def test_dataclass_helpers_still_work() -> None:
    config = CampaignConfig(source="r.csv", template="t.txt")
    again = dataclasses.replace(config)
    assert again == config and again is not config
    assert dataclasses.asdict(config)["source"] == "r.csv"
    assert config.replace(workers=3) != config
    with pytest.raises(TypeError):
        hash(config)
    hooks = Hooks()
    assert hooks == hooks and hooks != Hooks()  # eq=False: identity
    assert hash(hooks) == hash(hooks)
