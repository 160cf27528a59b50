"""A faster ``__init__`` for the frozen dataclasses every command creates several of.

A frozen dataclass's generated ``__init__`` assigns each field through
``object.__setattr__`` (so its own ``__setattr__``, which refuses, is bypassed). That costs
about a tenth of a microsecond per field, and a command builds a dozen such records (its
request, its execution, one event and one decision per state change): noticeable in the
per-command CPU of the send and report paths. :func:`fast_init` replaces the generated
``__init__`` by one with the same signature that fills the instance's ``__dict__`` directly.
Everything else of the dataclass stays: immutability (assignment still raises
``FrozenInstanceError``), equality, hashing, ``repr``, ``dataclasses.replace`` and the types
mypy sees.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")

# The generated __init__'s local name for the instance's __dict__ (no field may be named so).
_DICT = "__fast_init_dict__"


def fast_init(cls: type[T]) -> type[T]:
    """Give the frozen dataclass ``cls`` an ``__init__`` that writes ``__dict__`` instead of calling ``object.__setattr__``.

    Apply it above ``@dataclass(frozen=True)``. The class must not use ``slots``,
    ``__post_init__``, ``init=False`` or ``kw_only`` fields or ``default_factory`` (checked: each
    would need the generated ``__init__``'s extra steps).

    Raises:
        TypeError: ``cls`` is not a frozen dataclass of that plain kind.
    """
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" in cls.__dict__ or hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__}: fast_init takes a frozen dataclass without slots or __post_init__")
    fields: tuple[dataclasses.Field[Any], ...] = dataclasses.fields(cls)  # type: ignore[arg-type]
    defaults: dict[str, Any] = {}
    args: list[str] = []
    for f in fields:
        if not f.init or f.kw_only or f.default_factory is not dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: fast_init takes no init=False, kw_only or default_factory field")
        if f.default is dataclasses.MISSING:
            args.append(f.name)
        else:
            defaults[f"_default_{f.name}"] = f.default
            args.append(f"{f.name}=_default_{f.name}")
    names = [f.name for f in fields]
    if _DICT in names or "self" in names:
        raise TypeError(f"{cls.__name__}: a field is named {_DICT!r} or 'self'")
    # Generated like dataclasses generates its own __init__: one statement per field, no loop.
    body = "".join(f"    {_DICT}[{name!r}] = {name}\n" for name in names)
    source = f"def __init__(self, {', '.join(args)}):\n    {_DICT} = self.__dict__\n{body}"
    namespace: dict[str, Any] = {}
    exec(source, defaults, namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    # The generated one's annotations, so introspection (inspect.signature, help) reads the same.
    init.__annotations__ = dict(cls.__init__.__annotations__)
    init.__doc__ = cls.__init__.__doc__
    cls.__init__ = init  # type: ignore[method-assign]
    return cls
