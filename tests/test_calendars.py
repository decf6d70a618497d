"""Business-hours calendars (handler.calendars)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import yaml

from handler.calendars import Calendar, read_calendar
from handler.yamlnodes import Problems, Reader


def read(text: str) -> tuple[Calendar | None, list[str]]:
    problems = Problems()
    calendar = read_calendar(Reader("calendars.yaml", problems), "office", yaml.compose(text))
    return calendar, problems.lines()


def test_weekly_hours_ranges_lists_and_closed_days() -> None:
    calendar, errors = read(
        "hours:\n  mon-thu: '09:00-17:00'\n  fri: ['08:00-12:00', '13:00-16:00']\n"
        "  sat: closed\n  sun: '00:00-24:00'\nholidays: [2026-12-25]\n"
    )
    assert errors == []
    assert calendar is not None
    assert calendar.week[0] == ((540, 1020),)
    assert calendar.week[4] == ((480, 720), (780, 960))
    assert calendar.week[5] == ()
    assert calendar.week[6] == ((0, 1440),)
    assert calendar.holidays == frozenset({date(2026, 12, 25)})
    assert calendar.timezone == ZoneInfo("Europe/London")
    friday = datetime(2026, 11, 27, 12, 30, tzinfo=UTC)
    assert not calendar.is_open(friday)  # lunch
    assert calendar.is_open(friday.replace(hour=13))
    assert calendar.is_open(datetime(2026, 11, 29, 23, 59, tzinfo=UTC))  # Sunday, all day
    assert not calendar.is_open(datetime(2026, 12, 25, 10, 0, tzinfo=UTC))  # holiday
    assert calendar.describe(friday) == "Fri 12:30 Europe/London"


def test_local_time_follows_summer_time_and_naive_means_utc() -> None:
    calendar, _ = read("hours: {daily: '09:00-10:00'}\n")
    assert calendar is not None
    assert calendar.is_open(datetime(2026, 7, 1, 8, 30, tzinfo=UTC))      # 09:30 BST
    assert not calendar.is_open(datetime(2026, 1, 5, 8, 30, tzinfo=UTC))  # 08:30 GMT
    assert calendar.is_open(datetime(2026, 1, 5, 9, 30))                  # naive = UTC


def test_mistakes_are_reported_with_positions() -> None:
    calendar, errors = read(
        "timezone: Mars/Olympus\nhours:\n  mon-fri: '9-5'\n  tue: '10:00-11:00'\n"
        "holidays: [tomorrow]\ncolour: blue\n"
    )
    assert calendar is None
    assert errors == [
        "calendars.yaml:1:11: unknown timezone 'Mars/Olympus' (use a name like Europe/London)",
        "calendars.yaml:3:12: bad opening hours '9-5': use HH:MM-HH:MM with the end after the "
        "start (up to 24:00), or 'closed'",
        "calendars.yaml:5:12: bad holiday date 'tomorrow': use YYYY-MM-DD",
        "calendars.yaml:6:1: unknown calendar key 'colour'",
    ]
    _, errors = read("hours:\n  mon-fri: '09:00-17:00'\n  wed: '10:00-11:00'\n")
    assert errors == ["calendars.yaml:3:3: wed is already given by 'mon-fri'"]
    _, errors = read("timezone: Europe/London\n")
    assert errors == ["calendars.yaml:1:1: calendar 'office' has no 'hours'"]
