"""Read a rule's `when:` block into compiled conditions, reporting every mistake with its place.

One function per condition key; `read_when` dispatches on the key and combines several keys
in one mapping with AND. Word lists go into the rule set's shared `PhraseIndex`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from handler import conditions as c
from handler.calendars import Calendar
from handler.parse_email import SELECTED_HEADERS
from handler.parse_sms import SMS_HEADERS
from handler.textmatch import PhraseIndex, phrase_words
from handler.yamlnodes import Reader, suggest

CHANNELS = ("email", "sms")
ACTION_KEYS = frozenset(
    {"category", "priority", "team", "tags", "reply", "notify", "reminders", "stop", "continue"}
)
_PHONE_PREFIX = re.compile(r"^\+\d{1,14}$")
_DOMAIN = re.compile(r"^[a-z0-9-]+(\.[a-z0-9-]+)+$")
_MIME = re.compile(r"^[a-z0-9.+-]+/([a-z0-9.+-]+|\*)$")


@dataclass(frozen=True, slots=True)
class WhenContext:
    """What a `when:` block may refer to, and where word lists are registered."""

    phrases: PhraseIndex
    team_calendars: Mapping[str, Calendar | None]
    calendars: Mapping[str, Calendar]


Reader_ = Callable[[Reader, yaml.Node, WhenContext], "c.Condition | None"]


def _channel(r: Reader, node: yaml.Node, ctx: WhenContext) -> c.Condition | None:
    chosen: set[str] = set()
    ok = True
    for value, item in r.texts(node, "channel"):
        v = value.strip().lower()
        if v not in CHANNELS:
            r.error(item, f"unknown channel '{value}'{suggest(v, CHANNELS)}: use email or sms")
            ok = False
        chosen.add(v)
    return c.ChannelIs(frozenset(chosen)) if ok and chosen else None


def _from(r: Reader, node: yaml.Node, ctx: WhenContext) -> c.Condition | None:
    senders: set[str] = set()
    ok = True
    for value, item in r.texts(node, "from"):
        v = value.strip().lower()
        if "@" not in v and not v.startswith("+"):
            r.error(item, f"'{value}' is neither an email address nor a +44... phone number "
                    "(use from_domain for a whole domain)")
            ok = False
        senders.add(v)
    return c.SenderIs(frozenset(senders)) if ok and senders else None


def _from_domain(r: Reader, node: yaml.Node, ctx: WhenContext) -> c.Condition | None:
    domains: list[str] = []
    ok = True
    for value, item in r.texts(node, "from_domain"):
        v = value.strip().lower().lstrip("@")
        if not _DOMAIN.match(v):
            r.error(item, f"'{value}' is not a domain like bupa.com")
            ok = False
        domains.append(v)
    return c.SenderDomainIs(tuple(domains), c.quote_list(domains)) if ok and domains else None


def _from_phone_prefix(r: Reader, node: yaml.Node, ctx: WhenContext) -> c.Condition | None:
    prefixes: list[str] = []
    ok = True
    for value, item in r.texts(node, "from_phone_prefix"):
        v = value.strip().replace(" ", "")
        if not _PHONE_PREFIX.match(v):
            r.error(item, f"'{value}' is not a phone prefix like +447 (+ and digits)")
            ok = False
        prefixes.append(v)
    return c.SenderPhonePrefix(tuple(prefixes)) if ok and prefixes else None


def _mailbox(r: Reader, node: yaml.Node, ctx: WhenContext) -> c.Condition | None:
    boxes = {value.strip().lower() for value, _ in r.texts(node, "mailbox")}
    return c.MailboxIs(frozenset(boxes)) if boxes else None


def _phrases(r: Reader, node: yaml.Node, ctx: WhenContext, what: str) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    seen: set[int] = set()
    for value, item in r.texts(node, what):
        words = phrase_words(value)
        if not words:
            r.error(item, f"phrase '{value}' has no letters or digits")
            continue
        pid = ctx.phrases.add(words)
        if pid not in seen:
            seen.add(pid)
            out.append((pid, value.strip()))
    return out


def _words(field: str) -> Reader_:
    def read(r: Reader, node: yaml.Node, ctx: WhenContext) -> c.Condition | None:
        if not isinstance(node, yaml.MappingNode):
            phrases = _phrases(r, node, ctx, field)
            return c.Words.build(field, "any", tuple(phrases)) if phrases else None
        parts: list[c.Condition] = []
        pairs = r.mapping(node, field) or []
        for mode, key_node, value in pairs:
            if mode not in ("any", "all"):
                r.unknown_key(mode, key_node, f"key in '{field}'", ("any", "all"))
                return None
            phrases = _phrases(r, value, ctx, f"{field}.{mode}")
            if not phrases:
                return None
            parts.append(c.Words.build(field, mode, tuple(phrases)))
        if not parts:
            r.error(node, f"'{field}' needs 'any:' or 'all:' with a list of words")
            return None
        return parts[0] if len(parts) == 1 else c.AllOf(tuple(parts))

    return read


def nested_repeat(pattern: str) -> bool:
    """Does `pattern` repeat, without bound, something that itself repeats without bound
    (`(a+)+`, `(\\w+\\s?)+:`)? Python's regular expressions backtrack, and such a pattern
    can take exponential time on text that almost matches: the patient's text, on every
    message. Possessive and atomic forms do not backtrack and are left alone."""
    from re import _constants as sre  # CPython's own parser of patterns
    from re import _parser

    repeats = (sre.MAX_REPEAT, sre.MIN_REPEAT)

    def walk(items: Any, inside: bool) -> bool:
        for op, av in items:
            if op in repeats:
                unbounded = av[1] == sre.MAXREPEAT
                if (unbounded and inside) or walk(av[2], inside or unbounded):
                    return True
                continue
            children = ([av[-1]] if op == sre.SUBPATTERN else list(av[1]) if op == sre.BRANCH
                        else [av[1]] if op in (sre.ASSERT, sre.ASSERT_NOT) else [])
            if any(walk(child, inside) for child in children):
                return True
        return False  # atomic groups and possessive repeats never backtrack into themselves

    try:
        return walk(_parser.parse(pattern), False)
    except Exception:  # an interpreter whose internals differ: no opinion
        return False


def _regex(r: Reader, node: yaml.Node, ctx: WhenContext) -> c.Condition | None:
    parts: list[c.Condition] = []
    ok = True
    fields = ("subject", "body", "text", "from")
    for field, key_node, value in r.mapping(node, "regex") or []:
        if field not in fields:
            r.unknown_key(field, key_node, "regex field", fields)
            ok = False
            continue
        patterns = []
        for text, item in r.texts(value, f"regex.{field}"):
            try:
                patterns.append(re.compile(text, re.IGNORECASE))
            except re.error as exc:
                r.error(item, f"bad regular expression '{text}': {exc.msg} at position {exc.pos}")
                ok = False
                continue
            if nested_repeat(text):
                r.error(item, f"regular expression '{text}' repeats something that itself "
                              "repeats (like (\\w+\\s?)+): on some messages that takes "
                              "minutes; write it without the nesting, or make the inner "
                              "repeat possessive (\\w++) or atomic ((?>...))")
                ok = False
        if patterns:
            parts.append(c.Matches(field, tuple(patterns)))
    if not ok or not parts:
        if ok:
            r.error(node, "regex needs a field: subject, body, text or from")
        return None
    return parts[0] if len(parts) == 1 else c.AllOf(tuple(parts))


def _has_attachment(r: Reader, node: yaml.Node, ctx: WhenContext) -> c.Condition | None:
    want = r.boolean(node, "has_attachment")
    return None if want is None else c.HasAttachment(want)


def _attachment_type(r: Reader, node: yaml.Node, ctx: WhenContext) -> c.Condition | None:
    patterns: list[str] = []
    ok = True
    for value, item in r.texts(node, "attachment_type"):
        v = value.strip().lower()
        if not (v.startswith(".") and len(v) > 1) and not _MIME.match(v):
            r.error(item, f"'{value}' is neither a type like application/pdf or image/* "
                    "nor a file ending like .pdf")
            ok = False
        patterns.append(v)
    return c.AttachmentType(tuple(patterns)) if ok and patterns else None


def _is_reply(r: Reader, node: yaml.Node, ctx: WhenContext) -> c.Condition | None:
    want = r.boolean(node, "is_reply")
    return None if want is None else c.IsReply(want)


def _earlier(r: Reader, node: yaml.Node, ctx: WhenContext) -> c.Condition | None:
    if not isinstance(node, yaml.MappingNode):
        n = r.integer(node, "earlier_enquiries")
        return None if n is None else c.EarlierEnquiries.build(n, n)
    bounds: dict[str, int | None] = {"min": None, "max": None}
    for key, key_node, value in r.mapping(node, "earlier_enquiries") or []:
        if key not in bounds:
            r.unknown_key(key, key_node, "key in 'earlier_enquiries'", bounds)
            return None
        bounds[key] = r.integer(value, f"earlier_enquiries.{key}")
        if bounds[key] is None:
            return None
    if bounds["min"] is None and bounds["max"] is None:
        r.error(node, "earlier_enquiries needs a number, or min: and/or max:")
        return None
    return c.EarlierEnquiries.build(bounds["min"], bounds["max"])


KEPT_HEADERS = frozenset((*SELECTED_HEADERS, *SMS_HEADERS))
"""What intake keeps of a message's headers (email) or form fields (SMS): all a rule can test."""


def _header(r: Reader, node: yaml.Node, ctx: WhenContext) -> c.Condition | None:
    parts: list[c.Condition] = []
    for name, name_node, value in r.mapping(node, "header") or []:
        header = name.strip().lower()
        if header not in KEPT_HEADERS:
            # intake keeps only these: a rule on any other header would never match
            r.error(name_node, f"header {name!r} is not kept when mail arrives, so this could "
                               f"never match; rules can test: {', '.join(sorted(KEPT_HEADERS))}")
            return None
        if isinstance(value, yaml.ScalarNode) and value.tag == "tag:yaml.org,2002:bool":
            parts.append(c.HeaderIs(header, r.boolean(value, f"header.{name}"), frozenset()))
            continue
        values = {v.strip().lower() for v, _ in r.texts(value, f"header.{name}")}
        if not values:
            return None
        parts.append(c.HeaderIs(header, None, frozenset(values)))
    if not parts:
        r.error(node, "header needs at least one 'name: value' (true = present, false = absent)")
        return None
    return parts[0] if len(parts) == 1 else c.AllOf(tuple(parts))


def _hours(inside: bool) -> Reader_:
    key = "in_business_hours" if inside else "outside_business_hours"

    def read(r: Reader, node: yaml.Node, ctx: WhenContext) -> c.Condition | None:
        name = r.text(node, key)
        if name is None:
            return None
        if name in ctx.team_calendars:
            calendar = ctx.team_calendars[name]
            if calendar is None:
                r.error(node, f"team '{name}' has no 'hours' calendar in teams.yaml")
                return None
            return c.InHours(calendar, inside, f"team {name}")
        if name in ctx.calendars:
            return c.InHours(ctx.calendars[name], inside, f"calendar {name}")
        known = [*ctx.team_calendars, *ctx.calendars]
        r.error(node, f"unknown team or calendar '{name}'{suggest(name, known)}")
        return None

    return read


def _combine(kind: str) -> Reader_:
    def read(r: Reader, node: yaml.Node, ctx: WhenContext) -> c.Condition | None:
        items = r.sequence(node, f"'{kind}'")
        if items is None:
            return None
        if not items:
            r.error(node, f"'{kind}' is an empty list")
            return None
        children = [read_when(r, item, ctx, f"each item of '{kind}'") for item in items]
        if any(child is None for child in children):
            return None
        kids = tuple(child for child in children if child is not None)
        return c.AllOf(kids) if kind == "all" else c.AnyOf(kids)

    return read


def _not(r: Reader, node: yaml.Node, ctx: WhenContext) -> c.Condition | None:
    child = read_when(r, node, ctx, "'not'")
    return None if child is None else c.Not(child)


CONDITIONS: dict[str, Reader_] = {
    "channel": _channel,
    "from": _from,
    "from_domain": _from_domain,
    "from_phone_prefix": _from_phone_prefix,
    "mailbox": _mailbox,
    "subject": _words("subject"),
    "body": _words("body"),
    "text": _words("text"),
    "regex": _regex,
    "has_attachment": _has_attachment,
    "attachment_type": _attachment_type,
    "is_reply": _is_reply,
    "earlier_enquiries": _earlier,
    "header": _header,
    "in_business_hours": _hours(True),
    "outside_business_hours": _hours(False),
    "all": _combine("all"),
    "any": _combine("any"),
    "not": _not,
}


def read_when(
    r: Reader, node: yaml.Node, ctx: WhenContext, what: str = "'when'"
) -> c.Condition | None:
    """A mapping of conditions, all of which must hold; None after reporting errors."""
    pairs = r.mapping(node, what)
    if pairs is None:
        return None
    if not pairs:
        return c.Always()
    parts: list[c.Condition | None] = []
    for key, key_node, value in pairs:
        read = CONDITIONS.get(key)
        if read is None:
            if key in ACTION_KEYS:
                r.error(key_node, f"'{key}' is an action, not a condition: move it out of 'when:'")
            else:
                r.unknown_key(key, key_node, "condition", CONDITIONS)
            parts.append(None)
            continue
        parts.append(read(r, value, ctx))
    if any(p is None for p in parts):
        return None
    kids = tuple(p for p in parts if p is not None)
    return kids[0] if len(kids) == 1 else c.AllOf(kids)


def channels_of(condition: c.Condition) -> frozenset[str]:
    """The channels a condition can match at all (from a top-level `channel:`)."""
    if isinstance(condition, c.ChannelIs):
        return condition.channels
    if isinstance(condition, c.AllOf):
        for child in condition.children:
            if isinstance(child, c.ChannelIs):
                return child.channels
    return frozenset(CHANNELS)


def is_catch_all(condition: c.Condition) -> bool:
    """True when the condition holds for every message (no conditions, or every channel)."""
    if isinstance(condition, c.Always):
        return True
    return isinstance(condition, c.ChannelIs) and condition.channels >= set(CHANNELS)
