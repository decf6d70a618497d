"""Read YAML while keeping where every value came from, for `file:line:col` errors.

PyYAML's composer gives nodes with start marks; `Reader` turns them into plain values and
reports type errors at the node; `Problems` collects every error so a check can list them all
at once; `suggest` adds a difflib "did you mean".
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

import yaml

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

NULL_TAG = "tag:yaml.org,2002:null"
BOOL_TAG = "tag:yaml.org,2002:bool"
INT_TAG = "tag:yaml.org,2002:int"


@dataclass(frozen=True, slots=True, order=True)
class Where:
    """A 1-based position in a rule file."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


class Problems:
    """Every problem found while loading, sorted by file order then position."""

    def __init__(self, file_order: Iterable[str] = ()) -> None:
        self._order = {name: i for i, name in enumerate(file_order)}
        self._items: list[tuple[Where, str]] = []

    def add(self, where: Where, message: str) -> None:
        self._items.append((where, message))

    def __len__(self) -> int:
        return len(self._items)

    def lines(self) -> list[str]:
        def key(item: tuple[Where, str]) -> tuple[int, str, int, int]:
            w = item[0]
            return (self._order.get(w.file, len(self._order)), w.file, w.line, w.col)

        return [f"{w}: {msg}" for w, msg in sorted(self._items, key=key)]


def suggest(word: str, known: Iterable[str]) -> str:
    """` (did you mean 'x'?)` when a known word is close, else ""."""
    close = difflib.get_close_matches(word, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def compose(file: str, text: str, problems: Problems) -> yaml.Node | None:
    """The document's root node, or None (empty file, or a syntax error reported)."""
    try:
        return yaml.compose(text, Loader=_Loader)  # type: ignore[no-any-return]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Where(file, mark.line + 1, mark.column + 1) if mark else Where(file, 1, 1)
        context = f" ({exc.context})" if exc.context else ""
        problems.add(where, f"YAML syntax error: {exc.problem}{context}")
    except yaml.YAMLError as exc:
        problems.add(Where(file, 1, 1), f"YAML error: {exc}")
    return None


def describe(node: yaml.Node) -> str:
    """What a node is, in words an administrator understands ("a list", "true/false")."""
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag == NULL_TAG:
        return "nothing"
    if node.tag in (BOOL_TAG, INT_TAG):
        return str(node.value)
    return f"'{node.value}'"


class Reader:
    """Typed access to the nodes of one file; every mistake goes to `problems`."""

    def __init__(self, file: str, problems: Problems) -> None:
        self.file = file
        self.problems = problems

    def at(self, node: yaml.Node) -> Where:
        return Where(self.file, node.start_mark.line + 1, node.start_mark.column + 1)

    def error(self, node: yaml.Node, message: str) -> None:
        self.problems.add(self.at(node), message)

    def mapping(self, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node, yaml.Node]] | None:
        """(key, key node, value node) in file order; duplicate keys are reported."""
        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"{what} must be a mapping (key: value), got {describe(node)}")
            return None
        pairs: list[tuple[str, yaml.Node, yaml.Node]] = []
        seen: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.error(key_node, f"keys in {what} must be plain words")
                continue
            key = str(key_node.value)
            if key in seen:
                line = self.at(seen[key]).line
                self.error(key_node, f"duplicate key '{key}' in {what} (first at line {line})")
                continue
            seen[key] = key_node
            pairs.append((key, key_node, value_node))
        return pairs

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node] | None:
        if not isinstance(node, yaml.SequenceNode):
            self.error(node, f"{what} must be a list, got {describe(node)}")
            return None
        return list(node.value)

    def text(self, node: yaml.Node, what: str) -> str | None:
        """A scalar as written (so `no` and `999` stay words); None after an error."""
        if not isinstance(node, yaml.ScalarNode) or node.tag == NULL_TAG:
            self.error(node, f"{what} must be a word or text, got {describe(node)}")
            return None
        return str(node.value)

    def optional_text(self, node: yaml.Node, what: str) -> tuple[bool, str | None]:
        """(ok, value): YAML null or the word `none` give (True, None)."""
        if isinstance(node, yaml.ScalarNode) and (
            node.tag == NULL_TAG or str(node.value).lower() == "none"
        ):
            return True, None
        value = self.text(node, what)
        return value is not None, value

    def boolean(self, node: yaml.Node, what: str) -> bool | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == BOOL_TAG:
            return str(node.value).lower() in ("true", "yes", "on", "y")
        self.error(node, f"{what} must be true or false, got {describe(node)}")
        return None

    def integer(self, node: yaml.Node, what: str, *, minimum: int = 0) -> int | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == INT_TAG:
            try:
                value = int(str(node.value).replace("_", ""), 0)
            except ValueError:
                value = None
            if value is not None and value >= minimum:
                return value
        self.error(node, f"{what} must be a whole number >= {minimum}, got {describe(node)}")
        return None

    def texts(
        self, node: yaml.Node, what: str, *, allow_empty: bool = False
    ) -> list[tuple[str, yaml.Node]]:
        """One word or a list of words, each with its node."""
        if isinstance(node, yaml.SequenceNode):
            out: list[tuple[str, yaml.Node]] = []
            for item in node.value:
                value = self.text(item, f"each item of {what}")
                if value is not None:
                    out.append((value, item))
            if not node.value and not allow_empty:
                self.error(node, f"{what} is an empty list")
            return out
        value = self.text(node, what)
        return [(value, node)] if value is not None else []

    def unknown_key(self, key: str, key_node: yaml.Node, kind: str, known: Iterable[str]) -> None:
        self.error(key_node, f"unknown {kind} '{key}'{suggest(key, known)}")
