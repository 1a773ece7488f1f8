"""A located YAML walker: configuration files validated with ``FILE:LINE: KEY: problem``.

The document is composed into YAML nodes (``yaml.compose``) and walked with
:class:`YamlValue`, so each value keeps its position and its key path: an error
reads ``gateway.yaml:12: routes[0].upstream.id: 'orders' is not a SPIFFE ID ...``.
Unknown keys are errors (with a "did you mean" hint: a typo must not silently turn
a check off), and so are duplicate keys. Every failure is a :class:`ConfigError`
whose ``details`` carry ``line``, ``field`` (the key path) and ``path``.

::

    root = YamlValue(compose(text, source, empty="needs 'listen'"), "", FailAt(source))
    top = root.mapping(("listen", "routes"), required=("listen",))
    listen = top.get("listen").string()

The schema of each file (what keys mean, which values are valid) stays with the
package that reads it; this module knows YAML and positions only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterator
from difflib import get_close_matches
from typing import Any, NoReturn

import yaml

from trustmesh.errors import ConfigError

__all__ = ["FailAt", "YamlMapping", "YamlValue", "compose"]


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class FailAt:
    """Raises ConfigError as ``FILE:LINE: KEY: problem``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __call__(self, node: yaml.Node | None, key: str, problem: str) -> NoReturn:
        line = node.start_mark.line + 1 if node is not None else 0
        where = f"{self.source}:{line}" if line else self.source
        raise ConfigError(f"{where}: {key}: {problem}", field=key, line=line, path=self.source)


_KIND = {
    yaml.ScalarNode: "a single value",
    yaml.SequenceNode: "a list",
    yaml.MappingNode: "a mapping",
}


class YamlValue:
    """One YAML node with its key path, and typed accessors that fail with a position."""

    __slots__ = ("fail", "key", "node")

    def __init__(self, node: yaml.Node, key: str, fail: FailAt) -> None:
        self.node = node
        self.key = key
        self.fail = fail

    def error(self, problem: str) -> NoReturn:
        self.fail(self.node, self.key, problem)

    @property
    def line(self) -> int:
        return int(self.node.start_mark.line) + 1

    def scalar(self) -> Any:
        """The value as YAML's safe loader reads it (refused unless a single value)."""
        if not isinstance(self.node, yaml.ScalarNode):
            self.error(f"expected a single value, got {_KIND.get(type(self.node), 'something')}")
        try:
            return yaml.constructor.SafeConstructor().construct_object(self.node)
        except yaml.YAMLError as exc:
            self.error(f"cannot read the value ({getattr(exc, 'problem', exc)})")

    def is_null(self) -> bool:
        return isinstance(self.node, yaml.ScalarNode) and self.scalar() is None

    def string(self) -> str:
        value = self.scalar()
        if not isinstance(value, str) or not value.strip():
            self.error(f"expected a non-empty string, got {value!r}")
        return value.strip()

    def boolean(self) -> bool:
        value = self.scalar()
        if not isinstance(value, bool):
            self.error(f"expected true or false, got {value!r}")
        return value

    def integer(self, *, minimum: int = 0) -> int:
        value = self.scalar()
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(f"expected a whole number, got {value!r}")
        if value < minimum:
            self.error(f"must be at least {minimum}, got {value}")
        return value

    def number(self, *, positive: bool = True) -> float:
        value = self.scalar()
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            self.error(f"expected a number, got {value!r}")
        if positive and value <= 0:
            self.error(f"must be greater than 0, got {value}")
        return float(value)

    def duration(self, *, allow_zero: bool = False) -> float:
        """Seconds: a number, or text such as ``500ms``, ``2s``, ``1.5m``, ``1h``."""
        value = self.scalar()
        seconds: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str):
            match = _DURATION.fullmatch(value.strip().lower())
            if match:
                seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        if seconds is None or math.isnan(seconds) or math.isinf(seconds):
            self.error(f"expected a duration such as 500ms, 10s, 5m or 1h, got {value!r}")
        if seconds < 0 or (seconds == 0 and not allow_zero):
            self.error(f"must be {'0 or more' if allow_zero else 'greater than 0'}, got {value!r}")
        return seconds

    def items(self) -> list[YamlValue]:
        if not isinstance(self.node, yaml.SequenceNode):
            self.error(f"expected a list, got {_KIND.get(type(self.node), 'something')}")
        return [YamlValue(n, f"{self.key}[{i}]", self.fail) for i, n in enumerate(self.node.value)]

    def strings(self) -> tuple[str, ...]:
        return tuple(item.string() for item in self.items())

    def mapping(self, allowed: Collection[str], *, required: Collection[str] = ()) -> YamlMapping:
        if not isinstance(self.node, yaml.MappingNode):
            self.error(f"expected a mapping, got {_KIND.get(type(self.node), 'something')}")
        children: dict[str, YamlValue] = {}
        for key_node, value_node in self.node.value:
            key_value = YamlValue(key_node, self.key, self.fail).scalar()
            key = str(key_value)
            path = f"{self.key}.{key}" if self.key else key
            if key in children:
                self.fail(key_node, path, f"duplicate key (first at line {children[key].line})")
            if key not in allowed:
                hint = get_close_matches(key, list(allowed), n=1)
                known = f"did you mean {hint[0]!r}?" if hint else f"known: {', '.join(allowed)}"
                self.fail(key_node, path, f"unknown key; {known}")
            children[key] = YamlValue(value_node, path, self.fail)
        for key in required:
            if key not in children:
                where = f"{self.key}.{key}" if self.key else key
                self.fail(self.node, where, "is required")
        return YamlMapping(self, children)


class YamlMapping:
    """The children of a mapping node, by key; null values read as absent."""

    __slots__ = ("children", "value")

    def __init__(self, value: YamlValue, children: dict[str, YamlValue]) -> None:
        self.value = value
        self.children = children

    def get(self, key: str) -> YamlValue | None:
        child = self.children.get(key)
        if child is None or child.is_null():
            return None
        return child

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.children)


def compose(text: str, source: str, *, empty: str) -> yaml.Node:
    """Compose ``text`` into YAML nodes; an empty document fails with ``(file): is empty; EMPTY``.

    Raises:
        ConfigError: ``SOURCE:LINE: (yaml): problem`` for text that is not YAML.
    """
    fail = FailAt(source)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(
            f"{source}:{line}: (yaml): {problem}", field="(yaml)", line=line, path=source
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: (yaml): {exc}", field="(yaml)", path=source) from None
    if node is None:
        fail(None, "(file)", f"is empty; {empty}")
    return node
