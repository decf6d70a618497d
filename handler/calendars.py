"""Business-hours calendars: weekly opening hours in a timezone, minus holiday dates.

`Calendar.is_open(now)` is pure (time is a parameter); `read_calendar` builds one from its
YAML node in `rules/calendars.yaml`, reporting mistakes with their position.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from handler.yamlnodes import Reader

DEFAULT_TIMEZONE = "Europe/London"
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_RANGE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")

Span = tuple[int, int]
"""Opening minutes within a day, [start, end), 0..1440."""


@dataclass(frozen=True, slots=True)
class Calendar:
    id: str
    timezone: ZoneInfo
    week: tuple[tuple[Span, ...], ...]
    """Seven entries, Monday first."""
    holidays: frozenset[date] = frozenset()

    def local(self, now: datetime) -> datetime:
        aware = now if now.tzinfo is not None else now.replace(tzinfo=UTC)
        return aware.astimezone(self.timezone)

    def is_open(self, now: datetime) -> bool:
        local = self.local(now)
        if local.date() in self.holidays:
            return False
        minute = local.hour * 60 + local.minute
        return any(start <= minute < end for start, end in self.week[local.weekday()])

    @functools.lru_cache(maxsize=64)  # noqa: B019 - few calendars; a group shares one `now`
    def describe(self, now: datetime) -> str:
        """E.g. "Wed 18:40 Europe/London (holiday)" for trace reasons."""
        local = self.local(now)
        note = " (holiday)" if local.date() in self.holidays else ""
        return f"{local:%a %H:%M} {self.timezone.key}{note}"


def _days(spec: str) -> list[int] | None:
    spec = spec.strip().lower()
    if spec in ("daily", "every day", "mon-sun"):
        return list(range(7))
    if "-" in spec:
        first, _, last = spec.partition("-")
        if first.strip() in DAYS and last.strip() in DAYS:
            a, b = DAYS.index(first.strip()), DAYS.index(last.strip())
            return list(range(a, b + 1)) if a <= b else None
        return None
    return [DAYS.index(spec)] if spec in DAYS else None


def _span(text: str) -> Span | None:
    m = _RANGE.match(text)
    if not m:
        return None
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if m1 > 59 or m2 > 59 or h1 > 23 or end > 1440 or start >= end:
        return None
    return start, end


def _read_spans(r: Reader, node: yaml.Node, day_spec: str) -> list[Span] | None:
    if isinstance(node, yaml.ScalarNode) and str(node.value).strip().lower() == "closed":
        return []
    spans: list[Span] = []
    for text, item in r.texts(node, f"hours for '{day_spec}'"):
        span = _span(text)
        if span is None:
            r.error(
                item,
                f"bad opening hours '{text}': use HH:MM-HH:MM with the end after the start "
                "(up to 24:00), or 'closed'",
            )
            return None
        spans.append(span)
    return spans


def _read_date(r: Reader, node: yaml.Node) -> date | None:
    text = r.text(node, "each holiday")
    if text is None:
        return None
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        r.error(node, f"bad holiday date '{text}': use YYYY-MM-DD")
        return None


def read_calendar(r: Reader, cal_id: str, node: yaml.Node) -> Calendar | None:
    pairs = r.mapping(node, f"calendar '{cal_id}'")
    if pairs is None:
        return None
    zone = ZoneInfo(DEFAULT_TIMEZONE)
    week: list[list[Span]] = [[] for _ in DAYS]
    holidays: set[date] = set()
    ok, have_hours = True, False
    for key, key_node, value in pairs:
        if key == "timezone":
            name = r.text(value, "timezone")
            try:
                zone = ZoneInfo(name or "")
            except (ZoneInfoNotFoundError, ValueError):
                r.error(value, f"unknown timezone '{name}' (use a name like Europe/London)")
                ok = False
        elif key == "hours":
            have_hours = True
            seen: dict[int, str] = {}
            for day_spec, day_node, spans_node in r.mapping(value, "hours") or []:
                days = _days(day_spec)
                if days is None:
                    r.error(day_node, f"bad day '{day_spec}': use mon..sun, a range like "
                            "mon-fri, or daily")
                    ok = False
                    continue
                spans = _read_spans(r, spans_node, day_spec)
                if spans is None:
                    ok = False
                    continue
                for d in days:
                    if d in seen:
                        r.error(day_node, f"{DAYS[d]} is already given by '{seen[d]}'")
                        ok = False
                    seen[d] = day_spec
                    week[d] = sorted(spans)
        elif key == "holidays":
            for item in r.sequence(value, "holidays") or []:
                day = _read_date(r, item)
                if day is None:
                    ok = False
                else:
                    holidays.add(day)
        else:
            r.unknown_key(key, key_node, "calendar key", ("timezone", "hours", "holidays"))
            ok = False
    if not have_hours:
        r.error(node, f"calendar '{cal_id}' has no 'hours'")
        ok = False
    if not ok:
        return None
    return Calendar(cal_id, zone, tuple(tuple(day) for day in week), frozenset(holidays))
