"""The hardened Jinja2 sandbox that admin-edited templates run in.

Jinja's `ImmutableSandboxedEnvironment` blocks attribute escapes but not resource blow-ups
(`'a' * 10**9`, nested loops, padding to a billion characters). `BoundedSandbox` adds the
limits: no intermediate value longer than the output cap, no giant integers, and a deadline
checked in every loop iteration, call, intercepted operator and filter.
"""

from __future__ import annotations

import functools
import re
import string
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from contextlib import contextmanager
from typing import Any

from jinja2 import nodes, pass_context
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

MAX_INT_BITS = 4096
"""Integers in templates stay below 2**4096 (about 1,200 digits)."""

LOOP_GUARD = "_loop_guard"
"""Filter wrapped around every `{% for %}` iterable by the code generator."""

_CONTAINERS = (list, tuple, set, frozenset, Mapping, Namespace)
_PADDING_METHODS = frozenset({"center", "ljust", "rjust", "zfill"})
_COUNT_FILTERS = frozenset({"batch", "slice", "truncate", "center", "tojson"})
_PRINTF_RE = re.compile(
    r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?([a-zA-Z%])"
)
_DIGITS_RE = re.compile(r"\d+")


class LimitError(Exception):
    """A template tried to build too large a value or to run for too long."""


class _GuardedCodeGenerator(CodeGenerator):
    """Compiles templates with two extra checks: every `{% for %}` iterable goes through the
    loop guard (the clock is read on each iteration), and every list, tuple and dict literal
    through `bounded_literal` (shared references can't nest into a huge structure)."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        for loop in node.find_all(nodes.For):
            guarded = nodes.Filter(loop.iter, LOOP_GUARD, [], [], None, None,
                                   lineno=loop.iter.lineno)
            loop.iter = guarded.set_environment(self.environment)
        super().visit_Template(node, frame)

    def visit_List(self, node: nodes.List, frame: Frame) -> None:
        self.write("environment.bounded_literal(")
        super().visit_List(node, frame)
        self.write(")")

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self.write("environment.bounded_literal(")
        super().visit_Dict(node, frame)
        self.write(")")

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
        if node.ctx != "load":  # an assignment target such as `{% for a, b in ... %}`
            super().visit_Tuple(node, frame)
            return
        self.write("environment.bounded_literal(")
        super().visit_Tuple(node, frame)
        self.write(")")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """An immutable sandbox with size and time limits (see the module docstring)."""

    code_generator_class = _GuardedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(
        self,
        *,
        max_chars: int,
        timer: Callable[[], float],
        filters: Mapping[str, Callable[..., Any]] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.max_chars = max_chars
        self._timer = timer
        self._state = threading.local()
        self.globals.pop("lipsum", None)  # a text generator nobody needs in a clinic email
        self.globals["namespace"] = self._bounded_namespace()
        self.filters.update(filters or {})
        self.filters = {name: self._guard_filter(name, f) for name, f in self.filters.items()}
        self.filters[LOOP_GUARD] = _loop_guard
        # tests run once per item inside select/reject, which loop in C: read the clock there
        self.tests = {name: self._guard_test(t) for name, t in self.tests.items()}

    # -- limits -------------------------------------------------------------------------------

    @contextmanager
    def deadline(self, at: float, seconds: float) -> Iterator[None]:
        """Every check made while the block runs fails once `timer()` passes `at`."""
        previous = getattr(self._state, "deadline", None)
        self._state.deadline = (at, seconds)
        try:
            yield
        finally:
            self._state.deadline = previous

    def check_time(self) -> None:
        deadline = getattr(self._state, "deadline", None)
        if deadline is not None and self._timer() > deadline[0]:
            raise LimitError(f"rendering took longer than {deadline[1]:g} s")

    def check_size(self, value: Any) -> None:
        """Refuses a value whose text form would be longer than the cap, or a giant number."""
        if _is_int(value):
            if value.bit_length() > MAX_INT_BITS:
                raise LimitError(f"number larger than 2**{MAX_INT_BITS}")
        elif isinstance(value, str | bytes):
            self.check_estimate(len(value))
        elif isinstance(value, _CONTAINERS):
            self.check_estimate(approx_len(value, self.max_chars))

    def bounded_literal(self, value: Any) -> Any:
        self.check_size(value)
        return value

    def check_estimate(self, size: int) -> None:
        if size > self.max_chars:
            raise LimitError(
                f"value of {size:,} characters or items; the limit is {self.max_chars:,}"
            )

    def guard_iteration(self, iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            self.check_time()
            yield item

    # -- sandbox hooks --------------------------------------------------------------------------

    def getattr(self, obj: Any, attribute: str) -> Any:
        """`{{ enquiry.reference }}` on the plain dicts every template context is made of: the
        key first. Jinja tries the attribute first, and on a dict that fails with an
        AttributeError each time (about half of all rendering time). A dict's key is what
        `enquiry['reference']` gives without any check, so nothing new is reachable; a key
        named like a dict method (`d.items`) now gives the value, as an administrator means,
        and without such a key the method is looked up and checked as before."""
        if type(obj) is dict:
            try:
                return obj[attribute]
            except KeyError:
                pass
        return super().getattr(obj, attribute)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        self.check_time()
        if operator == "*":
            self._check_multiply(left, right)
        elif operator == "**":
            if (_is_int(left) and _is_int(right) and right > 0 and abs(left) > 1
                    and left.bit_length() * right > MAX_INT_BITS):
                raise LimitError(f"number larger than 2**{MAX_INT_BITS}")
        elif operator == "+":
            if not (isinstance(left, int | float) or isinstance(right, int | float)):
                self.check_estimate(self._measure(left) + self._measure(right))
        elif operator == "%" and isinstance(left, str | bytes):
            self.check_estimate(printf_estimate(left, right, self.max_chars))
        return self.binop_table[operator](left, right)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        __self.check_time()
        for argument in (*args, *kwargs.values()):
            __self.check_size(argument)  # recursive macros can't double their arguments
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str | bytes):
            args = __self._check_text_method(owner, getattr(__obj, "__name__", ""), args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        __self.check_size(result)
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        template: str = value.__self__
        is_map = value.__name__ == "format_map"

        def bounded_format(*args: Any, **kwargs: Any) -> str:
            self.check_time()
            values = list(args[0].values()) if is_map and args and isinstance(
                args[0], Mapping) else [*args, *kwargs.values()]
            self.check_estimate(format_estimate(template, values, self.max_chars))
            result = wrapper(*args, **kwargs)
            self.check_size(result)
            return result

        return functools.update_wrapper(bounded_format, wrapper)

    # -- helpers ------------------------------------------------------------------------------

    def _check_multiply(self, left: Any, right: Any) -> None:
        if _is_int(left) and _is_int(right):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise LimitError(f"number larger than 2**{MAX_INT_BITS}")
            return
        seq, count = (left, right) if _is_int(right) else (right, left)
        if _is_int(count) and count > 0:
            self.check_estimate(self._measure(seq) * count)

    def _measure(self, value: Any) -> int:
        if isinstance(value, str | bytes):
            return len(value)
        return approx_len(value, self.max_chars) if isinstance(value, _CONTAINERS) else 0

    def _check_text_method(
        self, text: str | bytes, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, ...]:
        """Refuses str/bytes method calls whose result would break the size cap."""
        if name in _PADDING_METHODS:
            width = _arg(args, kwargs, 0, "width", 0)
            if _is_int(width):
                self.check_estimate(max(len(text), width))
        elif name == "expandtabs":
            tabsize = _arg(args, kwargs, 0, "tabsize", 8)
            if _is_int(tabsize):
                tab = "\t" if isinstance(text, str) else b"\t"
                self.check_estimate(len(text) + text.count(tab) * max(tabsize, 0))  # type: ignore[arg-type]
        elif name == "replace" and len(args) >= 2:
            self.check_estimate(replace_estimate(text, args[0], args[1],
                                                 _arg(args, kwargs, 2, "count", -1)))
        elif name == "join" and args:
            items = args[0] if isinstance(args[0], Sized) else list(self.guard_iteration(args[0]))
            separators = len(text) * max(len(items) - 1, 0)
            self.check_estimate(separators + approx_len(items, self.max_chars))
            args = (items, *args[1:])  # a generator can only be read once
        elif name == "translate" and args and isinstance(args[0], Mapping):
            widest = max((approx_len(v, self.max_chars) for v in args[0].values()), default=1)
            self.check_estimate(len(text) * max(widest, 1))
        return args

    def _guard_filter(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        offset = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0
        estimate = _FILTER_ESTIMATES.get(name)
        counts = name in _COUNT_FILTERS

        @functools.wraps(func)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            self.check_time()
            value = args[offset]
            if isinstance(value, Iterator):
                # lazy input (map/select chains): check the clock while it is consumed
                value = self.guard_iteration(value)
                if name in ("join", "sum"):
                    value = list(value)
                args = (*args[:offset], value, *args[offset + 1:])
            if counts:
                for extra in (*args[offset + 1:], *kwargs.values()):
                    if _is_int(extra) and abs(extra) > self.max_chars:
                        raise LimitError(f"{name}: {extra:,} is too large; the limit is "
                                         f"{self.max_chars:,}")
            if estimate is not None:
                self.check_estimate(estimate(self.max_chars, value, args[offset + 1:], kwargs))
            result = func(*args, **kwargs)
            self.check_size(result)
            return result

        return guarded

    def _guard_test(self, func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            self.check_time()
            return func(*args, **kwargs)

        return guarded

    def _bounded_namespace(self) -> type[Namespace]:
        env = self

        class BoundedNamespace(Namespace):
            """`namespace()` whose attributes obey the size cap (loops can't grow them)."""

            def __setitem__(self, name: str, value: Any) -> None:
                env.check_size(value)
                super().__setitem__(name, value)

        return BoundedNamespace


@pass_context  # pass_context also keeps the optimizer from evaluating it at compile time
def _loop_guard(context: Context, iterable: Any) -> Any:
    env = context.environment
    if isinstance(env, BoundedSandbox):
        return env.guard_iteration(iterable)
    return iterable


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _arg(args: tuple[Any, ...], kwargs: Mapping[str, Any], index: int, name: str,
         default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def approx_len(value: Any, limit: int) -> int:
    """About `len(str(value))`, counted without building it; gives up (returns limit + 1)
    as soon as the count passes `limit`, so shared references can't make it slow."""
    total = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        total += 2
        if isinstance(item, str | bytes):
            total += len(item) + 2  # quotes when shown inside a container
        elif _is_int(item):
            total += item.bit_length() // 3 + 1
        elif isinstance(item, bool | float | type(None)):
            total += 30
        elif depth > 8:
            total += 100
        elif isinstance(item, Namespace):
            stack.append((object.__getattribute__(item, "_Namespace__attrs"), depth + 1))
        elif isinstance(item, Mapping):
            stack.extend((part, depth + 1) for pair in item.items() for part in pair)
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend((part, depth + 1) for part in item)
        else:
            total += 100
        if total > limit:
            return limit + 1
    return total


def replace_estimate(text: Any, old: Any, new: Any, count: Any) -> int:
    """Upper bound for `len(text.replace(old, new, count))` (exact when it grows)."""
    try:
        found = len(text) + 1 if len(old) == 0 else text.count(old)
        if _is_int(count) and count >= 0:
            found = min(found, count)
        return int(len(text) + found * max(len(new) - len(old), 0))
    except TypeError:
        return 0  # the real call will raise the same error


def printf_estimate(template: str | bytes, values: Any, limit: int) -> int:
    """Upper bound for `template % values`."""
    text = template.decode("latin-1") if isinstance(template, bytes) else template
    fields = 0
    widest = 0
    for match in _PRINTF_RE.finditer(text):
        if match.group(3) == "%":
            continue
        fields += 1
        for number in match.group(1, 2):
            if number and number != "*":
                widest = max(widest, _number(number, limit))
    if isinstance(values, Mapping):
        parts: list[Any] = list(values.values())
    else:
        parts = list(values) if isinstance(values, tuple) else [values]
    for part in parts:
        if _is_int(part) and abs(part) > limit:  # a '*' width or precision
            return limit + 1
    return len(text) + fields * (widest + max((approx_len(p, limit) for p in parts), default=0))


def format_estimate(template: str, values: list[Any], limit: int) -> int:
    """Upper bound for `template.format(*values)` (fields may repeat, so count them)."""
    fields = 0
    widest = 0
    pending = [template]
    try:
        while pending:
            for _, field, spec, _ in string.Formatter().parse(pending.pop()):
                if field is None:
                    continue
                fields += 1
                if spec:
                    pending.append(spec)  # nested fields: "{:{width}}"
                    for number in _DIGITS_RE.findall(spec):
                        widest = max(widest, _number(number, limit))
    except ValueError:
        return 0  # malformed: str.format raises the same error
    for part in values:
        if _is_int(part) and abs(part) > limit:  # a nested width
            return limit + 1
    longest = max((approx_len(v, limit) for v in values), default=0)
    return len(template) + fields * (widest + longest)


def _number(digits: str, limit: int) -> int:
    return limit + 1 if len(digits) > 9 else int(digits)


# Output-size estimates for the built-in filters that can amplify their input:
# (limit, value, positional args after the value, keyword args) -> estimated length.
def _center_size(limit: int, value: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> int:
    width = _arg(args, kw, 0, "width", 80)
    return max(len(str(value)), width) if _is_int(width) else 0


def _indent_size(limit: int, value: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> int:
    width = _arg(args, kw, 0, "width", 4)
    text = str(value)
    per_line = width if _is_int(width) else len(str(width))
    return len(text) + (text.count("\n") + 1) * max(per_line, 0)


def _join_size(limit: int, value: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> int:
    separator = str(_arg(args, kw, 0, "d", ""))
    count = len(value) if isinstance(value, Sized) else 0
    return len(separator) * max(count - 1, 0) + approx_len(value, limit)


def _replace_size(limit: int, value: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> int:
    old, new = _arg(args, kw, 0, "old", ""), _arg(args, kw, 1, "new", "")
    return replace_estimate(str(value), str(old), str(new), _arg(args, kw, 2, "count", None))


def _format_size(limit: int, value: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> int:
    return printf_estimate(str(value), kw or args, limit)


def _wordwrap_size(limit: int, value: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> int:
    width = _arg(args, kw, 0, "width", 79)
    wrap = _arg(args, kw, 2, "wrapstring", None) or "\n"
    text = str(value)
    lines = len(text) // max(width, 1) + 1 if _is_int(width) else len(text)
    return len(text) + lines * len(str(wrap))


def _tojson_size(limit: int, value: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> int:
    indent = _arg(args, kw, 0, "indent", None)
    per_level = indent if _is_int(indent) else len(str(indent or ""))
    return approx_len(value, limit) * (1 + max(per_level, 0))


def _sum_size(limit: int, value: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> int:
    start = _arg(args, kw, 1, "start", 0)
    if not isinstance(start, int | float):
        # adding lists or strings one by one is quadratic: numbers only
        raise LimitError("sum adds numbers only")
    return 0


_FILTER_ESTIMATES: dict[str, Callable[[int, Any, tuple[Any, ...], dict[str, Any]], int]] = {
    "center": _center_size,
    "indent": _indent_size,
    "join": _join_size,
    "replace": _replace_size,
    "format": _format_size,
    "wordwrap": _wordwrap_size,
    "tojson": _tojson_size,
    "sum": _sum_size,
}
