"""YAML with line numbers, and a small declarative checker for located values.

``parse_yaml`` composes the document with the safe loader and turns it into
``Node`` objects that remember their 1-based line, so every error can name the
line where the offending key or value stands. Duplicate keys, which PyYAML
silently accepts, are reported at the duplicate's own line.

The second half is the schema toolkit shared by ``config`` and ``profiles``:
a section is a table of ``Field``s; checking a mapping against it reports
unknown keys (with a suggestion), missing keys and bad values, collecting every
issue instead of stopping at the first.
"""
from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import ConstructorError

from bridge.core.errors import ConfigIssue

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Sentinel:
    def __init__(self, name: str):
        self._name = name

    def __repr__(self) -> str:
        return self._name


INVALID: Any = _Sentinel("INVALID")  # a value already reported as wrong: checks stay silent on it
REQUIRED: Any = _Sentinel("REQUIRED")  # Field default meaning "the key must be present"


@dataclass(frozen=True, eq=False)
class Node:
    """One YAML value and where it stands."""

    value: Any  # a scalar; list[Node] for a sequence; dict[key, Node] for a mapping
    line: int  # 1-based line where the value starts
    key_lines: Mapping[Any, int] = field(default_factory=dict)  # mapping only: line of each key

    @property
    def is_mapping(self) -> bool:
        return isinstance(self.value, dict)

    @property
    def is_sequence(self) -> bool:
        return isinstance(self.value, list)


def parse_yaml(text: str, file: str) -> tuple[Node | None, list[ConfigIssue]]:
    """Parse one YAML document; ``None`` for an empty or unparsable one.

    Issues cover malformed YAML (then the node is ``None``), duplicate keys and
    values no safe constructor accepts; parsing goes on past the latter two.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        if mark is exc.problem_mark and exc.context_mark is not None and mark.index >= len(text.rstrip()):
            mark = exc.context_mark  # "but got <stream end>": the unclosed construct is the useful place
        line = mark.line + 1 if mark is not None else None
        detail = exc.problem or "syntax error"
        if exc.context:
            detail = f"{detail} ({exc.context})"
        return None, [ConfigIssue(file, line, "", f"invalid YAML: {_one_line(detail)}")]
    except yaml.reader.ReaderError as exc:  # a character YAML forbids: no mark, only an offset
        line = text.count("\n", 0, exc.position) + 1
        return None, [ConfigIssue(file, line, "", f"invalid YAML: {_one_line(str(exc.reason))} "
                                                  f"(character {exc.character!r})")]
    except yaml.YAMLError as exc:
        return None, [ConfigIssue(file, None, "", f"invalid YAML: {_one_line(str(exc))}")]
    if root is None:
        return None, []
    walker = _Walker(file)
    return walker.node(root), walker.issues


def plain(node: Node | None) -> Any:
    """The node as plain Python values (dicts, lists, scalars), lines dropped."""
    if node is None:
        return None
    if node.is_mapping:
        return {k: plain(v) for k, v in node.value.items()}
    if node.is_sequence:
        return [plain(v) for v in node.value]
    return node.value


def _one_line(text: str) -> str:
    return " ".join(text.split())


class _Walker:
    """Turns composed yaml nodes into ``Node``s, reporting what PyYAML lets through."""

    def __init__(self, file: str):
        self.file = file
        self.issues: list[ConfigIssue] = []
        self._constructor = yaml.SafeLoader("")  # only its scalar constructors are used
        self._done: dict[int, Node] = {}  # aliases share nodes: convert each once
        self._active: set[int] = set()  # guards against recursive aliases

    def _report(self, line: int, path: str, message: str) -> None:
        self.issues.append(ConfigIssue(self.file, line, path, message))

    def node(self, n: yaml.Node, path: str = "") -> Node:
        key = id(n)
        if key in self._done:
            return self._done[key]
        line = n.start_mark.line + 1
        if key in self._active:
            self._report(line, path, "recursive alias is not supported")
            return Node(INVALID, line)
        self._active.add(key)
        if isinstance(n, yaml.MappingNode):
            result = self._mapping(n, line, path)
        elif isinstance(n, yaml.SequenceNode):
            result = Node([self.node(child, f"{path}[{i}]") for i, child in enumerate(n.value)], line)
        else:
            result = Node(self._scalar(n, line, path), line)
        self._active.discard(key)
        self._done[key] = result
        return result

    def _scalar(self, n: yaml.Node, line: int, path: str) -> Any:
        try:
            return self._constructor.construct_object(n, deep=True)
        except ConstructorError as exc:
            self._report(line, path, f"invalid value: {_one_line(exc.problem or str(exc))}")
            return INVALID

    def _mapping(self, n: yaml.MappingNode, line: int, path: str) -> Node:
        values: dict[Any, Node] = {}
        key_lines: dict[Any, int] = {}
        merged: list[Node] = []
        for key_node, value_node in n.value:
            key_line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE_TAG:
                merged.append(self.node(value_node, path))
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self._report(key_line, path, "a mapping key must be a plain value, not a list or mapping")
                continue
            key = self._scalar(key_node, key_line, path)
            if key is INVALID:
                continue
            child_path = f"{path}.{key}" if path else str(key)
            if key in values:
                self._report(key_line, child_path, f"duplicate key '{key}' (first at line {key_lines[key]})")
                continue  # the first occurrence stands
            values[key] = self.node(value_node, child_path)
            key_lines[key] = key_line
        for source in merged:  # '<<: *defaults' — explicit keys win over merged ones
            for mapping in source.value if source.is_sequence else [source]:
                if not mapping.is_mapping:
                    self._report(mapping.line, path, "'<<' merges only mappings")
                    continue
                for key, value in mapping.value.items():
                    if key not in values:
                        values[key] = value
                        key_lines[key] = mapping.key_lines[key]
        return Node(values, line, key_lines)


# --- checking located values against declarative field tables -------------------------


class Invalid(Exception):
    """A value fails a check; the message is one line, for the user."""


@dataclass
class Ctx:
    """Where we are while checking: the file, the dotted key path, and the issues so far."""

    file: str
    issues: list[ConfigIssue]
    path: str = ""

    def child(self, key: Any) -> Ctx:
        if isinstance(key, int) and not isinstance(key, bool):
            path = f"{self.path}[{key}]"
        else:
            path = f"{self.path}.{key}" if self.path else str(key)
        return Ctx(self.file, self.issues, path)

    def report(self, line: int | None, message: str) -> None:
        self.issues.append(ConfigIssue(self.file, line, self.path, message))


Check = Callable[[Node, Ctx], Any]  # returns the checked value, or INVALID after reporting


@dataclass(frozen=True)
class Field:
    """One key of a section: how to check it, its default, and the model attribute it feeds."""

    check: Check
    default: Any = REQUIRED
    attr: str | None = None  # dataclass field name when it differs from the key


Schema = Mapping[str, Field]


@dataclass
class Record:
    """A checked mapping: values by key (defaults filled in) and the line of each."""

    values: dict[str, Any]
    lines: dict[str, int]  # line of each value; the mapping's own line for defaulted keys
    line: int  # line of the mapping itself
    given: frozenset[str]  # keys written in the file

    @property
    def ok(self) -> bool:
        return all(v is not INVALID for v in self.values.values())

    def valid(self, key: str) -> bool:
        return self.values.get(key, INVALID) is not INVALID

    def kwargs(self, schema: Schema) -> dict[str, Any]:
        """Values keyed by the model's attribute names, ready for ``Model(**kwargs)``."""
        return {f.attr or key: self.values[key] for key, f in schema.items()}


def show(value: Any) -> str:
    """A value as the user wrote it, for messages."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def read_mapping(node: Node, ctx: Ctx, schema: Schema, *, null_is_empty: bool = False) -> Record | Any:
    """Check a mapping against ``schema``; every problem is reported, INVALID if not a mapping."""
    if node.value is INVALID:
        return INVALID
    if node.value is None and null_is_empty:
        node = Node({}, node.line)
    if not node.is_mapping:
        ctx.report(node.line, f"expected a mapping with keys {', '.join(schema)}, got {show(node.value)}")
        return INVALID
    for key, line in node.key_lines.items():
        if key not in schema:
            ctx.child(str(key)).report(line, _unknown_key(key, schema))
    values: dict[str, Any] = {}
    lines: dict[str, int] = {}
    for key, spec in schema.items():
        if key in node.value:
            child = node.value[key]
            values[key] = spec.check(child, ctx.child(key)) if child.value is not INVALID else INVALID
            lines[key] = child.line
        else:
            if spec.default is REQUIRED:
                ctx.child(key).report(node.line, f"missing required key '{key}'")
            values[key] = INVALID if spec.default is REQUIRED else spec.default
            lines[key] = node.line
    return Record(values, lines, node.line, frozenset(k for k in node.value if k in schema))


def _unknown_key(key: Any, schema: Schema) -> str:
    close = difflib.get_close_matches(str(key), list(schema), n=1, cutoff=0.6)
    if close:
        return f"unknown key '{key}'; did you mean '{close[0]}'?"
    return f"unknown key '{key}'; expected one of: {', '.join(schema)}"


def record_of(schema: Schema, *, null_is_empty: bool = False) -> Check:
    """A nested section (``opcua: {...}``) or a list item (``- {name: ..., ...}``)."""
    return lambda node, ctx: read_mapping(node, ctx, schema, null_is_empty=null_is_empty)


def list_of(item: Check, *, what: str, non_empty: bool = True) -> Check:
    def check(node: Node, ctx: Ctx) -> Any:
        if not node.is_sequence:
            ctx.report(node.line, f"expected a list of {what}s, got {show(node.value)}")
            return INVALID
        if non_empty and not node.value:
            ctx.report(node.line, f"must list at least one {what}")
            return INVALID
        return [item(child, ctx.child(i)) for i, child in enumerate(node.value)]

    return check


def scalar(convert: Callable[[Any], Any]) -> Check:
    """Lift a plain converter that raises ``Invalid`` into a check that reports at the value's line."""

    def check(node: Node, ctx: Ctx) -> Any:
        try:
            return convert(node.value)
        except Invalid as exc:
            ctx.report(node.line, str(exc))
            return INVALID

    return check


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    def convert(value: Any) -> int:
        if not _is_int(value):
            raise Invalid(f"expected an integer, got {show(value)}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise Invalid(f"{value} is out of range {_range_text(lo, hi)}")
        return value

    return scalar(convert)


def _range_text(lo: int | None, hi: int | None) -> str:
    if hi is None:
        return f">= {lo}"
    if lo is None:
        return f"<= {hi}"
    return f"{lo}..{hi}"


def number(*, gt: float | None = None, ge: float | None = None, nonzero: bool = False) -> Check:
    """A finite float; YAML ints are accepted (``timeout: 1``)."""

    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Invalid(f"expected a number, got {show(value)}")
        if not math.isfinite(value):
            raise Invalid(f"expected a finite number, got {value}")
        if gt is not None and not value > gt:
            raise Invalid(f"must be greater than {gt:g}, got {value}")
        if ge is not None and not value >= ge:
            raise Invalid(f"must be {ge:g} or more, got {value}")
        if nonzero and value == 0:
            raise Invalid("must not be 0")
        return float(value)

    return scalar(convert)


def boolean() -> Check:
    def convert(value: Any) -> bool:
        if not isinstance(value, bool):
            raise Invalid(f"expected true or false, got {show(value)}")
        return value

    return scalar(convert)


def text(pattern: str | None = None, hint: str = "", *, allow_empty: bool = False) -> Check:
    """A string, optionally matching ``pattern`` (``hint`` says in words what is allowed)."""
    compiled = re.compile(pattern) if pattern else None

    def convert(value: Any) -> str:
        if not isinstance(value, str):
            raise Invalid(f"expected a string, got {show(value)}")
        if not value and not allow_empty:
            raise Invalid("must not be empty")
        if compiled is not None and not compiled.fullmatch(value):
            raise Invalid(f"{value!r} is not allowed: {hint}")
        return value

    return scalar(convert)


def one_of(choices: Mapping[Any, Any], what: str) -> Check:
    """A value from a fixed set, as written (``N``, ``1``, ``input``) → its model value."""
    listing = ", ".join(str(c) for c in choices)

    def convert(value: Any) -> Any:
        for written, result in choices.items():
            if type(value) is type(written) and value == written:  # keeps true from matching 1
                return result
        raise Invalid(f"unknown {what} {show(value)}; expected one of {listing}")

    return scalar(convert)
