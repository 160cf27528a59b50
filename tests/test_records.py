"""``fast_init``: the frozen records of the hot path keep every dataclass behaviour with a faster ``__init__``."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from server.core.lifecycle import Decision, Outcome, Status
from server.core.models import Execution, NewExecution, Reason, StateChange
from server.core.records import fast_init


@dataclasses.dataclass(frozen=True)
class Plain:
    a: int
    b: str
    c: tuple[int, ...] = ()
    d: str | None = dataclasses.field(default=None, compare=False)


@fast_init
@dataclasses.dataclass(frozen=True)
class Fast:
    a: int
    b: str
    c: tuple[int, ...] = ()
    d: str | None = dataclasses.field(default=None, compare=False)


def test_it_builds_what_the_generated_init_builds() -> None:
    for args, kwargs in [((1, "x"), {}), ((1,), {"b": "y", "d": "z"}), ((), {"a": 2, "b": "w", "c": (3,)})]:
        plain, fast = Plain(*args, **kwargs), Fast(*args, **kwargs)  # type: ignore[arg-type]
        assert vars(fast) == vars(plain)
        assert repr(fast) == repr(plain).replace("Plain", "Fast")
        assert hash(fast) == hash(Fast(*args, **kwargs))  # type: ignore[arg-type]
    assert Fast(1, "x", d="p") == Fast(1, "x", d="q")  # compare=False still holds
    assert Fast(1, "x") != Fast(1, "y")
    assert str(inspect.signature(Fast)) == str(inspect.signature(Plain))
    assert dataclasses.replace(Fast(1, "x"), b="r") == Fast(1, "r")


def test_it_stays_frozen_and_refuses_bad_calls_as_before() -> None:
    fast = Fast(1, "x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.a = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        Fast(1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Fast(1, "x", e=3)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Fast(1, "x", (), None, 5)  # type: ignore[call-arg]


def test_it_refuses_classes_whose_init_does_more() -> None:
    @dataclasses.dataclass
    class NotFrozen:
        a: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class Slotted:
        a: int

    @dataclasses.dataclass(frozen=True)
    class PostInit:
        a: int

        def __post_init__(self) -> None:
            pass

    @dataclasses.dataclass(frozen=True)
    class Factory:
        a: list[int] = dataclasses.field(default_factory=list)

    @dataclasses.dataclass(frozen=True)
    class KwOnly:
        a: int = dataclasses.field(kw_only=True)

    @dataclasses.dataclass(frozen=True)
    class NoInit:
        a: int = dataclasses.field(default=0, init=False)

    for cls in (NotFrozen, Slotted, PostInit, Factory, KwOnly, NoInit, int):
        with pytest.raises(TypeError):
            fast_init(cls)


def test_the_hot_records_use_it_and_still_work() -> None:
    for cls in (Execution, NewExecution, StateChange, Decision, Reason):
        assert cls.__init__.__qualname__ == f"{cls.__qualname__}.__init__"
        assert "__dataclass_builtins_object__" not in cls.__init__.__code__.co_names
    e = StateChange(1, "x", "t", "a", Status.SENT, Status.QUEUED, 5, reason=Reason("c", "d"))
    assert (e.late, e.result_json, e.note, e.reason) == (False, None, "", Reason("c", "d"))
    assert Decision(Outcome.CHANGE, Status.SENT, "n") == Decision(Outcome.CHANGE, Status.SENT, "n")
