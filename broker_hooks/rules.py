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
    """What the control plane does with a decoded message."""

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
        if not topic.startswith(self.prefix):
            return None
        levels = topic.split("/")
        if len(levels) != len(self._levels):
            return None
        captured: dict[str, str] = {}
        for i, (want, got) in enumerate(zip(self._levels, levels, strict=True)):
            name = self._names.get(i)
            if name is not None:
                if not got:
                    return None
                captured[name] = got
            elif want != got:
                return None
        return captured

    def format(self, **values: str) -> str:
        """Fill the template."""
        return self.template.format(**values)

    def as_filter(self, **values: str) -> str:
        """The template as a subscription filter: given names filled, the rest ``+``."""
        return "/".join(
            values.get(self._names[i], "+") if i in self._names else lvl for i, lvl in enumerate(self._levels)
        )


Decoder = Callable[[Mapping[str, str], bytes], Any]


@dataclass(frozen=True)
class Rule:
    """Topic pattern -> decoder -> lifecycle action."""

    name: str
    pattern: TopicPattern
    decode: Decoder
    action: LifecycleAction


@dataclass(frozen=True)
class Inbound:
    """A decoded device message, ready for the control plane."""

    rule: str
    action: LifecycleAction
    client_id: str
    topic: str
    message: Any


class RuleSet:
    """Rules of one or more dialects, tried in order."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)

    def route(self, client_id: str, topic: str, payload: bytes) -> Inbound | None:
        """Decode a publish with the first matching rule.

        Returns:
            The decoded message, or None when no rule claims the topic.

        Raises:
            DecodeError: a rule claims the topic but cannot decode it.
        """
        for rule in self.rules:
            captured = rule.pattern.match(topic)
            if captured is not None:
                return Inbound(rule.name, rule.action, client_id, topic, rule.decode(captured, payload))
        return None

    def claims(self, topic: str) -> bool:
        """Whether any rule's pattern matches ``topic``."""
        return any(rule.pattern.match(topic) is not None for rule in self.rules)
