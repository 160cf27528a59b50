"""MQTT topic names and filters (MQTT 3.1.1 section 4.7)."""

from __future__ import annotations

MAX_LEVEL_LENGTH = 128


def level_problem(value: str) -> str | None:
    """Why ``value`` cannot be one topic level, or None when it can.

    A level used as an identifier (a thing id) must not contain separators or
    wildcards, must not start with ``$`` (reserved for broker topics) and must
    fit in :data:`MAX_LEVEL_LENGTH` characters.
    """
    if not value:
        return "must not be empty"
    if len(value) > MAX_LEVEL_LENGTH:
        return f"must be at most {MAX_LEVEL_LENGTH} characters"
    for char, name in (("/", "'/'"), ("+", "'+'"), ("#", "'#'"), ("\x00", "NUL")):
        if char in value:
            return f"must not contain {name}"
    if value.startswith("$"):
        return "must not start with '$'"
    return None


def filter_matches(topic_filter: str, topic: str) -> bool:
    """Whether a subscription filter matches a topic name.

    Filters starting with a wildcard never match ``$`` topics ([MQTT-4.7.2-1]).
    """
    if topic.startswith("$") and topic_filter.startswith(("+", "#")):
        return False
    if "+" not in topic_filter and "#" not in topic_filter:
        return topic_filter == topic
    flevels = topic_filter.split("/")
    tlevels = topic.split("/")
    for i, level in enumerate(flevels):
        if level == "#":
            return i == len(flevels) - 1
        if i >= len(tlevels) or level not in ("+", tlevels[i]):
            return False
    return len(flevels) == len(tlevels)
