"""Quiet hours for outbound SMS: when a non-urgent text may go out, in the clinic's time zone.

Pure functions: the window is parsed once from the setting ("21:00-08:00"; "" or "off"
disables it) and `release_time` says, for a given moment, when the window ends (or None when
sending is allowed now). Windows may wrap midnight; daylight-saving changes are handled by
computing the end in local time and converting back to UTC.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_WINDOW_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*[-–]\s*(\d{1,2}):(\d{2})\s*$")
_DISABLED = {"", "off", "none", "no"}


@dataclass(frozen=True, slots=True)
class QuietHours:
    start: time
    end: time
    zone: ZoneInfo


def parse_quiet_hours(text: str, timezone: str) -> QuietHours | None:
    """"21:00-08:00" in `timezone` -> QuietHours; None when disabled. Raises ValueError."""
    if text.strip().lower() in _DISABLED:
        return None
    m = _WINDOW_RE.match(text)
    if not m:
        raise ValueError(f"quiet_hours {text!r}: use HH:MM-HH:MM, e.g. 21:00-08:00 (or off)")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
        raise ValueError(f"quiet_hours {text!r}: not a time of day")
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"timezone {timezone!r}: unknown time zone") from None
    start, end = time(h1, m1), time(h2, m2)
    if start == end:
        return None
    return QuietHours(start, end, zone)


def release_time(now: datetime, quiet: QuietHours | None) -> datetime | None:
    """The UTC moment the quiet period containing `now` ends, or None if `now` is not quiet."""
    if quiet is None:
        return None
    local = now.astimezone(quiet.zone)
    t = local.time().replace(tzinfo=None)
    if quiet.start < quiet.end:  # e.g. 12:00-14:00, inside one day
        if not quiet.start <= t < quiet.end:
            return None
        end_day = local.date()
    else:  # wraps midnight, e.g. 21:00-08:00
        if quiet.end <= t < quiet.start:
            return None
        end_day = local.date() + timedelta(days=1) if t >= quiet.start else local.date()
    end = datetime.combine(end_day, quiet.end, tzinfo=quiet.zone)
    return end.astimezone(UTC)
