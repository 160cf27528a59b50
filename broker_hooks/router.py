"""Topic -> matching subscription filters, without looking at the filters that do not match.

amqtt 0.12.1 (``Broker._run_broadcast``) tests every filter any client holds against
every published topic, so a message costs O(subscribed devices). :class:`TopicRouter`
indexes the filters instead: filters without wildcards in a set (one lookup), wildcard
filters in a trie keyed by topic level, so a match costs O(levels x matching branches)
whatever the size of the fleet.

Matching is amqtt's ``Broker._matches`` (pinned in ``tests/test_broker_fastpath.py``):
``+`` matches exactly one level (an empty one too), ``#`` matches the rest of the topic
including nothing (``a/#`` matches ``a``), and a topic starting with ``$`` is not matched
by filters starting with ``+`` or ``#`` [MQTT-4.7.2-1]. The router holds filter strings
only; who subscribed with which QoS stays in amqtt's ``Broker._subscriptions``.
"""

from __future__ import annotations


class _Node:
    """One level of the wildcard trie: the filters whose prefix ends here."""

    __slots__ = ("children", "filter", "hash", "plus")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.plus: _Node | None = None
        # The filter "<prefix>/#" (or "#" at the root), and the filter that ends exactly here.
        self.hash: str | None = None
        self.filter: str | None = None

    def empty(self) -> bool:
        return not self.children and self.plus is None and self.hash is None and self.filter is None


def is_wildcard(topic_filter: str) -> bool:
    """Whether a filter has a ``+`` or ``#`` level (else it matches only the identical topic)."""
    return "+" in topic_filter or "#" in topic_filter


class TopicRouter:
    """The set of subscribed filters, indexed for matching a topic name.

    Filters must be valid (amqtt's ``add_subscription`` refuses the others with 0x80).
    Adding a filter twice, or discarding one that is not there, does nothing.
    """

    def __init__(self) -> None:
        self._exact: set[str] = set()
        self._root = _Node()
        self._wildcards: set[str] = set()

    def __len__(self) -> int:
        return len(self._exact) + len(self._wildcards)

    def __contains__(self, topic_filter: object) -> bool:
        return topic_filter in self._exact or topic_filter in self._wildcards

    def clear(self) -> None:
        """Forget every filter."""
        self._exact.clear()
        self._wildcards.clear()
        self._root = _Node()

    def add(self, topic_filter: str) -> None:
        """Index a filter."""
        if not is_wildcard(topic_filter):
            self._exact.add(topic_filter)
            return
        if topic_filter in self._wildcards:
            return
        self._wildcards.add(topic_filter)
        node = self._root
        levels = topic_filter.split("/")
        for level in levels[:-1]:
            node = self._child(node, level)
        last = levels[-1]
        if last == "#":
            node.hash = topic_filter
        else:
            self._child(node, last).filter = topic_filter

    @staticmethod
    def _child(node: _Node, level: str) -> _Node:
        if level == "+":
            if node.plus is None:
                node.plus = _Node()
            return node.plus
        child = node.children.get(level)
        if child is None:
            child = node.children[level] = _Node()
        return child

    def discard(self, topic_filter: str) -> None:
        """Remove a filter (and the trie branch only it used)."""
        if not is_wildcard(topic_filter):
            self._exact.discard(topic_filter)
            return
        if topic_filter not in self._wildcards:
            return
        self._wildcards.discard(topic_filter)
        levels = topic_filter.split("/")
        last = levels[-1]
        path: list[tuple[_Node, str]] = []
        node = self._root
        for level in levels if last != "#" else levels[:-1]:
            nxt = node.plus if level == "+" else node.children.get(level)
            if nxt is None:  # pragma: no cover - the filter was indexed, so its path exists
                return
            path.append((node, level))
            node = nxt
        if last == "#":
            node.hash = None
        else:
            node.filter = None
        # Prune the nodes nothing goes through any more, deepest first.
        while path and node.empty():
            parent, level = path.pop()
            if level == "+":
                parent.plus = None
            else:
                del parent.children[level]
            node = parent

    def match(self, topic: str) -> list[str]:
        """Every indexed filter that matches a topic name, each once."""
        found: list[str] = []
        if topic in self._exact:
            found.append(topic)
        if not self._wildcards:
            return found
        root = self._root
        # [MQTT-4.7.2-1] "$..." topics are not matched by filters starting with a wildcard.
        dollar = topic.startswith("$")
        nodes = [root]
        for level in topic.split("/"):
            following: list[_Node] = []
            for node in nodes:
                if dollar and node is root:
                    child = node.children.get(level)
                    if child is not None:
                        following.append(child)
                    continue
                if node.hash is not None:
                    found.append(node.hash)  # "<prefix>/#" matches one level or more below the prefix
                child = node.children.get(level)
                if child is not None:
                    following.append(child)
                if node.plus is not None:
                    following.append(node.plus)
            if not following:
                return found
            nodes = following
        for node in nodes:
            if node.filter is not None:
                found.append(node.filter)
            if node.hash is not None:
                found.append(node.hash)  # "a/#" also matches "a" itself
        return found
