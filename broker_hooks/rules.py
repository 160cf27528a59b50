"""A small rule engine: a rule binds a topic pattern to a decoder and a lifecycle action.

A topic dialect (EMQX, Kaa, ...) is a set of rules. When a device publishes,
the broker finds the first rule whose pattern matches the topic, runs its
decoder on the payload and hands the decoded message, tagged with the rule's
action, to the control plane. Adding a dialect adds rules; the lifecycle does
not change.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class DecodeError(ValueError):
    """A device payload or topic that a rule cannot accept; ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class LifecycleAction(enum.Enum):
    """The action every dialect may use: a device's status report for one execution.

    A dialect with other kinds of messages declares its own actions (any :class:`enum.Enum`, e.g. the
    Kaa dialect's ``KaaAction``) and registers a handler for each with the control plane.
    """

    DEVICE_REPORT = "device_report"


class TopicPattern:
    """A topic template such as ``$emqx/commands/things/{thing}/executions/{execution}/response``.

    Each ``{name}`` captures exactly one non-empty level.
    """

    def __init__(self, template: str) -> None:
        self.template = template
        self._levels = template.split("/")
        self._names = {i: lvl[1:-1] for i, lvl in enumerate(self._levels) if lvl.startswith("{") and lvl.endswith("}")}
        self.prefix = template.split("{", 1)[0]

    def match(self, topic: str) -> dict[str, str] | None:
        """The captured levels, or None when ``topic`` does not fit the template."""
        return self._capture(topic, wildcards=False)

    def format(self, **values: str) -> str:
        """Fill the template."""
        return self.template.format(**values)

    @property
    def names(self) -> frozenset[str]:
        """The placeholder names of the template."""
        return frozenset(self._names.values())

    def match_filter(self, topic_filter: str) -> dict[str, str] | None:
        """The captured levels of a subscription filter that fits the template, else None.

        A placeholder level may be ``+`` (captured as ``"+"``) or a concrete value; every other level
        must be exactly the template's, and ``#`` never fits (it would widen the filter past the template).
        """
        if "#" in topic_filter:
            return None
        return self._capture(topic_filter, wildcards=True)

    def _capture(self, text: str, *, wildcards: bool) -> dict[str, str] | None:
        # With ``wildcards`` (a filter) a placeholder level may be ``+``, never part of one.
        if not text.startswith(self.prefix):
            return None
        levels = text.split("/")
        if len(levels) != len(self._levels):
            return None
        captured: dict[str, str] = {}
        for i, (want, got) in enumerate(zip(self._levels, levels, strict=True)):
            name = self._names.get(i)
            if name is not None:
                if not got or (wildcards and "+" in got and got != "+"):
                    return None
                captured[name] = got
            elif want != got:
                return None
        return captured

    def as_filter(self, **values: str) -> str:
        """The template as a subscription filter: given names filled, the rest ``+``."""
        return "/".join(values.get(self._names[i], "+") if i in self._names else lvl for i, lvl in enumerate(self._levels))


Decoder = Callable[[Mapping[str, str], bytes], Any]


@dataclass(frozen=True)
class Rule:
    """Topic pattern -> decoder -> lifecycle action."""

    name: str
    pattern: TopicPattern
    decode: Decoder
    action: enum.Enum  # LifecycleAction.DEVICE_REPORT or one of the dialect's own actions


THING = "thing"


@dataclass(frozen=True)
class Dialect:
    """A topic dialect (EMQX, Kaa, ...): its inbound rules and the topics a device may use.

    ``device_publish`` and ``device_subscribe`` are the only topics a device may publish to and the only
    filters it may subscribe with; each has a ``{thing}`` level that must be the device's own id (its
    MQTT client id). In a subscribe pattern every other placeholder level may be ``+`` or a concrete value.
    ``dollar_prefixes`` are the ``$`` topic prefixes the dialect owns (publishes to other ``$`` topics are
    dropped before any rule or ACL runs). A dialect whose topics carry the credential instead of the
    client id (Kaa: the endpoint token) declares no device topics here and brings its own
    ``acl.ScopedAcl``.
    """

    name: str
    rules: tuple[Rule, ...]
    device_publish: tuple[TopicPattern, ...]
    device_subscribe: tuple[TopicPattern, ...]
    dollar_prefixes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for pattern in (*self.device_publish, *self.device_subscribe):
            if THING not in pattern.names:
                raise ValueError(f"dialect {self.name}: device topic {pattern.template!r} has no {{{THING}}} level")
        for pub in self.device_publish:
            for sub in self.device_subscribe:
                # A device must never be able to publish where devices receive service requests.
                if pub.match(sub.format(**dict.fromkeys(sub.names, "x"))) is not None:
                    raise ValueError(f"dialect {self.name}: device may publish to {sub.template!r}, a subscribe topic")


@dataclass(frozen=True)
class Inbound:
    """A decoded device message, ready for the control plane (``qos``: the publish's QoS, for replies)."""

    rule: str
    action: enum.Enum
    client_id: str
    topic: str
    message: Any
    qos: int = 0


class RuleSet:
    """Rules of one or more dialects, tried in order."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)

    @classmethod
    def of(cls, dialects: Sequence[Dialect]) -> RuleSet:
        """The rules of ``dialects``, in order."""
        return cls([rule for dialect in dialects for rule in dialect.rules])

    def route(self, client_id: str, topic: str, payload: bytes, qos: int = 0) -> Inbound | None:
        """Decode a publish (received at ``qos``) with the first matching rule.

        Returns:
            The decoded message, or None when no rule claims the topic.

        Raises:
            DecodeError: a rule claims the topic but cannot decode it.
        """
        for rule in self.rules:
            captured = rule.pattern.match(topic)
            if captured is not None:
                return Inbound(rule.name, rule.action, client_id, topic, rule.decode(captured, payload), qos)
        return None

    def claims(self, topic: str) -> bool:
        """Whether any rule's pattern matches ``topic``."""
        return any(rule.pattern.match(topic) is not None for rule in self.rules)
