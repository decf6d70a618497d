"""Tests for handler.sandbox: the size estimates and the bounded environment on its own."""

from __future__ import annotations

import time

import pytest
from jinja2 import StrictUndefined, UndefinedError
from jinja2.sandbox import SecurityError

from handler.sandbox import (
    BoundedSandbox,
    LimitError,
    approx_len,
    format_estimate,
    printf_estimate,
    replace_estimate,
)


def make_env(max_chars: int = 1000) -> BoundedSandbox:
    return BoundedSandbox(max_chars=max_chars, timer=time.monotonic, undefined=StrictUndefined)


def test_replace_estimate() -> None:
    for text, old, new, count in [("banana", "a", "xyz", -1), ("abc", "", "--", -1),
                                  ("aaaa", "a", "bb", 2)]:
        assert replace_estimate(text, old, new, count) == len(text.replace(old, new, count))
    assert replace_estimate("banana", "an", "", -1) == 6  # shrinking is not worth counting
    assert replace_estimate("abc", 1, "x", -1) == 0  # the real call raises TypeError


@pytest.mark.parametrize(("template", "values"), [
    ("%s and %s", ("ab", "cd")),
    ("%-10s|%5.2f|%%", ("x", 3.14159)),
    ("%(a)s %(a)s %(b)d", {"a": "xyz", "b": 7}),
    ("%*d", (6, 1)),
])
def test_printf_estimate_is_an_upper_bound(template: str, values: object) -> None:
    assert printf_estimate(template, values, 1000) >= len(template % values)  # type: ignore[operator]


@pytest.mark.parametrize(("template", "values"), [
    ("{0} {1} {0}", ["ab", "cdef"]),
    ("{:>12}|{:.3f}", ["x", 2.5]),
    ("{0:{1}}", ["x", 9]),
    ("{0[x]}", [{"x": "deep"}]),
])
def test_format_estimate_is_an_upper_bound(template: str, values: list[object]) -> None:
    assert format_estimate(template, values, 1000) >= len(template.format(*values))


def test_estimates_see_huge_widths_and_counts() -> None:
    assert printf_estimate("%99999999999s", "x", 1000) > 1000
    assert printf_estimate("%*s", (10**6, "x"), 1000) > 1000
    assert format_estimate("{:{}}", ["x", 10**6], 1000) > 1000
    assert format_estimate("{0}" * 100, ["x" * 20], 1000) > 1000
    assert format_estimate("{", ["x"], 1000) == 0  # malformed: format itself raises


def test_approx_len_stops_at_the_limit_on_shared_structures() -> None:
    inner = ["x" * 100] * 1000
    outer = [inner] * 1000  # 100 MB as text, a few KB in memory
    started = time.monotonic()
    assert approx_len(outer, 10_000) == 10_001
    assert time.monotonic() - started < 0.5
    assert approx_len({"a": [1, 2], "b": "xyz"}, 1000) >= len(str({"a": [1, 2], "b": "xyz"}))


def test_bounded_sandbox_limits_literals_and_namespaces() -> None:
    env = make_env(max_chars=100)
    assert env.from_string("{{ [1, 2] + [3] }}").render() == "[1, 2, 3]"
    with pytest.raises(LimitError):
        env.from_string("{% set a = ['x' * 40] %}{{ [a, a, a] }}").render()
    with pytest.raises(LimitError):
        env.from_string("{% set ns = namespace(s='x' * 60) %}{% set ns.s = ns.s ~ ns.s %}").render()


def test_bounded_sandbox_keeps_the_security_checks() -> None:
    env = make_env()
    with pytest.raises(SecurityError):
        env.from_string("{{ ''.__class__ }}").render()
    with pytest.raises(SecurityError):
        env.from_string("{% set d = {} %}{{ d.update(a=1) }}").render()
    assert "lipsum" not in env.globals


def test_dict_keys_come_first_and_methods_stay_checked() -> None:
    env = make_env()
    context = {"d": {"reference": "ENQ-ABC234", "items": "two scans", "nested": {"x": 1}}}
    assert env.from_string("{{ d.reference }} {{ d.items }} {{ d.nested.x }}").render(
        context) == "ENQ-ABC234 two scans 1"
    plain = {"d": {"a": 1, "b": 2}}  # no key of that name: the method, as before
    assert env.from_string("{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}").render(
        plain) == "a=1;b=2;"
    assert env.from_string("{{ d.get('a') }}").render(plain) == "1"
    with pytest.raises(SecurityError):  # a mutating method is still refused
        env.from_string("{{ d.update(c=3) }}").render(plain)
    with pytest.raises(SecurityError):
        env.from_string("{{ d.__class__ }}").render(plain)
    with pytest.raises(UndefinedError):  # a missing key is still undefined (strict here)
        env.from_string("{{ d.missing }}").render(plain)
    assert plain == {"d": {"a": 1, "b": 2}}


def test_deadline_is_per_block_and_restored() -> None:
    now = [0.0]
    env = BoundedSandbox(max_chars=1000, timer=lambda: now[0])
    template = env.from_string("{% for i in range(3) %}{{ i }}{% endfor %}")
    with env.deadline(5.0, 5.0):
        assert template.render() == "012"
        now[0] = 6.0
        with pytest.raises(LimitError, match="longer than 5 s"):
            template.render()
    assert template.render() == "012"  # no deadline outside the block
