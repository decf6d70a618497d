"""The `tests:` examples inside rule files: an example message with its expected outcome.

`read_tests` validates them at load (like the rules themselves); `handler rules test` runs
them through `classify` (see `rules_cli.run_rule_tests`).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import yaml

from handler.calendars import DEFAULT_TIMEZONE
from handler.decision import Facts
from handler.inbound import Attachment, Channel, InboundMessage
from handler.yamlnodes import Reader, Where, suggest

TEST_KEYS = (
    "name", "channel", "from", "to", "subject", "body", "headers", "attachments", "is_reply",
    "earlier_enquiries", "now", "expect",
)
EXPECT_KEYS = ("rule", "category", "team", "teams", "priority", "reply", "notify", "tags")
ATTACHMENT_KEYS = ("filename", "content_type", "size")
DEFAULT_NOW = datetime(2026, 11, 25, 11, 0, tzinfo=UTC)
"""Wednesday 25 November 2026, 11:00 in London: inside office hours."""
DEFAULT_EMAIL_FROM = "patient@example.com"
DEFAULT_SMS_FROM = "+447700900123"
DEFAULT_MAILBOX = "enquiries@clinic.example"
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")


@dataclass(frozen=True, slots=True)
class RuleTest:
    """One `tests:` example: a message, the facts around it, and the expected outcome."""

    name: str
    where: Where
    message: InboundMessage
    facts: Facts
    now: datetime
    expect: tuple[tuple[str, Any], ...]
    """(field, expected) for rule, category, team, teams, priority, reply, notify, tags."""


def make_message(
    *, channel: str = "email", sender: str = "", mailbox: str = "", subject: str = "",
    body: str = "", headers: dict[str, str] | None = None,
    attachments: tuple[Attachment, ...] = (), external_id: str = "example",
) -> InboundMessage:
    """An InboundMessage for examples and dry runs (email unless channel is "sms")."""
    ch = Channel(channel)
    sms = ch is Channel.SMS
    sender = sender or (DEFAULT_SMS_FROM if sms else DEFAULT_EMAIL_FROM)
    mailbox = mailbox or ("" if sms else DEFAULT_MAILBOX)
    return InboundMessage(
        channel=ch, external_id=external_id, sender=sender if sms else sender.lower(),
        mailbox=mailbox.lower(), recipients=(mailbox.lower(),) if mailbox else (),
        subject=subject, text=body,
        headers={k.lower(): v for k, v in (headers or {}).items()}, attachments=attachments,
        envelope_from=None if sms else sender.lower(),
    )


def _parse_now(r: Reader, node: yaml.Node) -> datetime | None:
    text = r.text(node, "now")
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text.strip().replace(" ", "T", 1))
    except ValueError:
        r.error(node, f"now '{text}' must be a date and time like 2026-11-28T22:15 "
                "(London time unless it ends in Z or +01:00)")
        return None
    return when if when.tzinfo else when.replace(tzinfo=ZoneInfo(DEFAULT_TIMEZONE))


def _attachments(r: Reader, node: yaml.Node) -> tuple[Attachment, ...]:
    out = []
    for item in r.sequence(node, "attachments") or []:
        values: dict[str, Any] = {}
        for key, key_node, value in r.mapping(item, "an attachment") or []:
            if key not in ATTACHMENT_KEYS:
                r.unknown_key(key, key_node, "attachment key", ATTACHMENT_KEYS)
            elif key == "size":
                values[key] = r.integer(value, "size")
            else:
                values[key] = r.text(value, key)
        out.append(Attachment(
            filename=values.get("filename") or "attachment",
            content_type=(values.get("content_type") or "application/octet-stream").lower(),
            size=values.get("size") or 1000, sha256="",
        ))
    return tuple(out)


def _expect(
    r: Reader, node: yaml.Node, rules: Collection[str], teams: Collection[str],
    priorities: Sequence[str],
) -> tuple[tuple[str, Any], ...]:
    out: list[tuple[str, Any]] = []
    for key, key_node, value in r.mapping(node, "expect") or []:
        if key not in EXPECT_KEYS:
            r.unknown_key(key, key_node, "expectation", EXPECT_KEYS)
        elif key in ("reply", "notify"):
            ok, name = r.optional_text(value, key)
            if ok:
                out.append((key, name))
        elif key in ("teams", "tags"):
            items = r.texts(value, key, allow_empty=key == "tags")
            out.append((key, tuple(v for v, _ in items)))
            for name, item in items if key == "teams" else []:
                if name not in teams:
                    r.error(item, f"unknown team '{name}'{suggest(name, teams)}")
        else:
            text = r.text(value, key)
            if text is None:
                continue
            known = {"rule": [*rules, "default"], "team": teams, "priority": priorities}.get(key)
            if known is not None and text not in known:
                r.error(value, f"unknown {key} '{text}'{suggest(text, known)}")
            out.append((key, text))
    if not out:
        r.error(node, "expect needs at least one of " + ", ".join(EXPECT_KEYS))
    return tuple(out)


def _read_test(
    r: Reader, node: yaml.Node, index: int, rules: Collection[str], teams: Collection[str],
    priorities: Sequence[str],
) -> RuleTest | None:
    pairs = r.mapping(node, "a test")
    if pairs is None:
        return None
    given = {key: value for key, _, value in pairs}
    for key, key_node, _ in pairs:
        if key not in TEST_KEYS:
            r.unknown_key(key, key_node, "test key", TEST_KEYS)
    name = r.text(given["name"], "name") if "name" in given else None
    if name is None or "expect" not in given:
        r.error(node, "a test needs 'name' and 'expect'")
        return None
    channel = r.text(given["channel"], "channel") if "channel" in given else "email"
    if channel not in ("email", "sms"):
        r.error(given["channel"], f"channel must be email or sms, got '{channel}'")
        return None
    texts = {key: (r.text(given[key], key) or "") for key in ("from", "to", "subject", "body")
             if key in given}
    sender = texts.get("from", "").strip()
    if channel == "sms" and sender and not _E164.match(sender):
        r.error(given["from"], f"an SMS test needs 'from' as a +44... number, got '{sender}'")
    if channel == "email" and sender and "@" not in sender:
        r.error(given["from"], f"an email test needs 'from' as an address, got '{sender}'")
    if channel == "sms" and "subject" in given:
        r.error(given["subject"], "an SMS has no subject")
    headers: dict[str, str] = {}
    if "headers" in given:
        for key, _, value in r.mapping(given["headers"], "headers") or []:
            headers[key] = r.text(value, f"header {key}") or ""
    facts = Facts(
        is_reply=bool("is_reply" in given and r.boolean(given["is_reply"], "is_reply")),
        earlier_enquiries=(r.integer(given["earlier_enquiries"], "earlier_enquiries") or 0)
        if "earlier_enquiries" in given else 0,
    )
    now = _parse_now(r, given["now"]) if "now" in given else DEFAULT_NOW
    message = make_message(
        channel=channel, sender=sender, mailbox=texts.get("to", ""),
        subject=texts.get("subject", ""), body=texts.get("body", ""), headers=headers,
        attachments=_attachments(r, given["attachments"]) if "attachments" in given else (),
        external_id=f"rule-test-{index}",
    )
    expect = _expect(r, given["expect"], rules, teams, priorities)
    return RuleTest(name, r.at(node), message, facts, now or DEFAULT_NOW, expect)


def read_tests(
    sections: Sequence[tuple[Reader, yaml.Node, yaml.Node]], rules: Collection[str],
    teams: Collection[str], priorities: Sequence[str],
) -> list[RuleTest]:
    """Every `tests:` entry of every file, validated against the rules and teams loaded."""
    tests: list[RuleTest] = []
    names: dict[str, Where] = {}
    for r, _, node in sections:
        for item in r.sequence(node, "tests") or []:
            test = _read_test(r, item, len(tests) + 1, rules, teams, priorities)
            if test is None:
                continue
            if test.name in names:
                r.error(item, f"duplicate test name '{test.name}' (first at {names[test.name]})")
                continue
            names[test.name] = test.where
            tests.append(test)
    return tests
