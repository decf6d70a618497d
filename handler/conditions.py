"""Compiled rule conditions: each tests a `MessageView` and says why, in words.

A condition returns `(matched, reasons)`; the reasons ("body contains 'chest pain'",
"channel is email, rule wants sms") go into the decision's trace. Conditions read only the
message, the `Facts` and `now` (all in `MessageView`); word lists were scanned once beforehand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from handler.calendars import Calendar
from handler.decision import Facts
from handler.inbound import InboundMessage
from handler.textmatch import MAX_SCAN_CHARS, FieldScan

Result = tuple[bool, tuple[str, ...]]
SHOW_PHRASES = 4
"""How many phrases a trace reason quotes before "(+N more)"."""


@dataclass(slots=True)
class MessageView:
    """One message as conditions see it: words already scanned, facts gathered, time given."""

    msg: InboundMessage
    facts: Facts
    now: datetime
    subject: FieldScan
    body: FieldScan

    def scans(self, field: str) -> tuple[tuple[str, FieldScan], ...]:
        if field == "subject":
            return (("subject", self.subject),)
        if field == "body":
            return (("body", self.body),)
        return (("subject", self.subject), ("body", self.body))  # "text": either

    def raw(self, field: str) -> str:
        if field == "subject":
            return self.msg.subject
        if field == "body":
            return self.msg.text[:MAX_SCAN_CHARS]
        if field == "from":
            return self.msg.sender
        return f"{self.msg.subject}\n{self.msg.text[:MAX_SCAN_CHARS]}"


class Condition(Protocol):
    """Anything with `evaluate`: the classes below, compiled by handler.rules_when."""

    def evaluate(self, v: MessageView) -> Result: ...


def quote_list(labels: list[str] | tuple[str, ...], limit: int = SHOW_PHRASES) -> str:
    shown = ", ".join(f"'{label}'" for label in labels[:limit])
    more = len(labels) - limit
    return f"{shown} (+{more} more)" if more > 0 else shown


@dataclass(frozen=True, slots=True)
class Always:
    def evaluate(self, v: MessageView) -> Result:
        return True, ("no conditions: matches every message",)


@dataclass(frozen=True, slots=True)
class ChannelIs:
    channels: frozenset[str]

    def check(self, channel: str) -> Result:
        if channel in self.channels:
            return True, (f"channel is {channel}",)
        return False, (f"channel is {channel}, rule wants {' or '.join(sorted(self.channels))}",)

    def evaluate(self, v: MessageView) -> Result:
        return self.check(v.msg.channel.value)


@dataclass(frozen=True, slots=True)
class SenderIs:
    senders: frozenset[str]

    def evaluate(self, v: MessageView) -> Result:
        if v.msg.sender.lower() in self.senders:
            return True, ("sender is one of the addresses listed in 'from'",)
        return False, ("sender is not one of the addresses listed in 'from'",)


@dataclass(frozen=True, slots=True)
class SenderDomainIs:
    domains: tuple[str, ...]
    shown: str = ""

    def evaluate(self, v: MessageView) -> Result:
        if "@" not in v.msg.sender:
            return False, ("sender is not an email address, rule wants a domain",)
        domain = v.msg.sender.rpartition("@")[2].lower()
        for d in self.domains:
            if domain == d or domain.endswith("." + d):
                return True, (f"sender domain {domain} is {d} or below it",)
        return False, (f"sender domain {domain} is not {self.shown}",)


@dataclass(frozen=True, slots=True)
class SenderPhonePrefix:
    prefixes: tuple[str, ...]

    def evaluate(self, v: MessageView) -> Result:
        sender = v.msg.sender
        if not sender.startswith("+"):
            return False, ("sender is not a phone number, rule wants a number prefix",)
        for p in self.prefixes:
            if sender.startswith(p):
                return True, (f"sender number starts with {p}",)
        return False, (f"sender number starts with none of {quote_list(self.prefixes)}",)


@dataclass(frozen=True, slots=True)
class MailboxIs:
    mailboxes: frozenset[str]

    def evaluate(self, v: MessageView) -> Result:
        ours = [v.msg.mailbox, *v.msg.recipients]
        for box in ours:
            if box and box.lower() in self.mailboxes:
                return True, (f"sent to {box.lower()}",)
        got = v.msg.mailbox or "no known mailbox"
        return False, (f"sent to {got}, rule wants {quote_list(sorted(self.mailboxes))}",)


@dataclass(frozen=True, slots=True)
class Words:
    """Subject, body or text (either) contains any / all of a list of phrases."""

    field: str
    mode: str  # "any" | "all"
    phrases: tuple[tuple[int, str], ...]
    """(phrase id, phrase as written), in written order."""
    pids: frozenset[int]
    miss_reason: str

    @staticmethod
    def build(field: str, mode: str, phrases: tuple[tuple[int, str], ...]) -> Words:
        labels = [label for _, label in phrases]
        if mode == "any":
            miss = f"{field} contains none of {quote_list(labels)}"
        else:
            miss = f"{field} lacks {quote_list(labels)}"
        return Words(field, mode, phrases, frozenset(pid for pid, _ in phrases), miss)

    def _label(self, pid: int) -> str:
        return next(label for p, label in self.phrases if p == pid)

    def evaluate(self, v: MessageView) -> Result:
        plain: dict[int, str] = {}  # pid -> where found
        negated: dict[int, str] = {}  # pid -> negating word
        for where, scan in v.scans(self.field):
            found = scan.found
            if not found:
                continue
            for pid in self.pids.intersection(found):
                negator = found[pid]
                if negator is None:
                    plain.setdefault(pid, where)
                else:
                    negated.setdefault(pid, negator)
        if not plain and not negated:
            return False, (self.miss_reason,)  # the gate's reason, word for word
        notes = tuple(
            f"'{self._label(pid)}' appears only after '{word}' (negated, not counted)"
            for pid, word in negated.items()
            if pid not in plain
        )
        if self.mode == "any":
            if plain:
                by_where: dict[str, list[str]] = {w: [] for w, _ in v.scans(self.field)}
                for pid, label in self.phrases:
                    if pid in plain:
                        by_where[plain[pid]].append(label)
                return True, tuple(
                    f"{w} contains {quote_list(ls)}" for w, ls in by_where.items() if ls
                )
            return False, (self.miss_reason, *notes)
        missing = [label for pid, label in self.phrases if pid not in plain]
        if not missing:
            labels = [label for _, label in self.phrases]
            return True, (f"{self.field} contains all of {quote_list(labels)}",)
        return False, (f"{self.field} lacks {quote_list(missing)}", *notes)


@dataclass(frozen=True, slots=True)
class Matches:
    """A regular expression (case-insensitive) found in subject, body, text or sender."""

    field: str
    patterns: tuple[re.Pattern[str], ...]

    def evaluate(self, v: MessageView) -> Result:
        raw = v.raw(self.field)
        for pattern in self.patterns:
            if pattern.search(raw):
                return True, (f"{self.field} matches /{pattern.pattern}/",)
        shown = " or ".join(f"/{p.pattern}/" for p in self.patterns)
        return False, (f"{self.field} does not match {shown}",)


@dataclass(frozen=True, slots=True)
class HasAttachment:
    want: bool

    def evaluate(self, v: MessageView) -> Result:
        n = len(v.msg.attachments)
        said = f"message has {n} attachment{'s' if n != 1 else ''}"
        if (n > 0) == self.want:
            return True, (said,)
        return False, (f"{said}, rule wants {'some' if self.want else 'none'}",)


def _type_matches(pattern: str, content_type: str, filename: str) -> bool:
    if pattern.startswith("."):
        return filename.lower().endswith(pattern)
    if pattern.endswith("/*"):
        return content_type.lower().startswith(pattern[:-1])
    return content_type.lower() == pattern


@dataclass(frozen=True, slots=True)
class AttachmentType:
    patterns: tuple[str, ...]

    def evaluate(self, v: MessageView) -> Result:
        for a in v.msg.attachments:
            for p in self.patterns:
                if _type_matches(p, a.content_type, a.filename):
                    return True, (f"an attachment is {a.content_type or 'untyped'} (wanted {p})",)
        return False, (f"no attachment is {quote_list(self.patterns)}",)


@dataclass(frozen=True, slots=True)
class IsReply:
    want: bool

    def evaluate(self, v: MessageView) -> Result:
        said = "a reply in an existing thread" if v.facts.is_reply else "a new enquiry"
        if v.facts.is_reply == self.want:
            return True, (f"message is {said}",)
        wanted = "a reply" if self.want else "a new enquiry"
        return False, (f"message is {said}, rule wants {wanted}",)


@dataclass(frozen=True, slots=True)
class EarlierEnquiries:
    minimum: int
    maximum: int | None
    wants: str = ""

    @staticmethod
    def build(minimum: int | None, maximum: int | None) -> EarlierEnquiries:
        if minimum == maximum:
            wants = str(minimum)
        else:
            wants = " and ".join(f"{word} {bound}" for word, bound in
                                 (("at least", minimum), ("at most", maximum)) if bound is not None)
        return EarlierEnquiries(minimum or 0, maximum, wants)

    @property
    def counts_needed(self) -> int:
        """Counting stops here: every larger count gives this condition's answer for it."""
        return max(self.minimum, self.maximum or 0) + 1

    def evaluate(self, v: MessageView) -> Result:
        n = v.facts.earlier_enquiries
        at_least = "at least " if v.facts.earlier_enquiries_at_least else ""
        said = f"contact has {at_least}{n} earlier enquir{'y' if n == 1 else 'ies'}"
        if n >= self.minimum and (self.maximum is None or n <= self.maximum):
            return True, (said,)
        return False, (f"{said}, rule wants {self.wants}",)


@dataclass(frozen=True, slots=True)
class HeaderIs:
    """`true`: present; `false`: absent; words: equal to one of them (case-insensitive)."""

    name: str
    present: bool | None
    values: frozenset[str]

    def evaluate(self, v: MessageView) -> Result:
        value = v.msg.headers.get(self.name)
        if self.present is not None:
            said = f"header {self.name} is {'present' if value is not None else 'absent'}"
            return (value is not None) == self.present, (said,)
        if value is None:
            return False, (f"header {self.name} is absent",)
        got = value.strip().lower()
        if got in self.values:
            return True, (f"header {self.name} is '{got}'",)
        return False, (f"header {self.name} is '{got[:60]}', rule wants "
                       f"{quote_list(sorted(self.values))}",)


@dataclass(frozen=True, slots=True)
class InHours:
    calendar: Calendar
    inside: bool
    label: str  # "team coordinator" or "calendar office"

    def evaluate(self, v: MessageView) -> Result:
        is_open = self.calendar.is_open(v.now)
        when = self.calendar.describe(v.now)
        said = f"{when} is {'inside' if is_open else 'outside'} the hours of {self.label}"
        return is_open == self.inside, (said,)


@dataclass(frozen=True, slots=True)
class AllOf:
    """Every part must hold; stops at the first that fails (the trace shows up to there)."""

    children: tuple[Condition, ...]

    def evaluate(self, v: MessageView) -> Result:
        reasons: tuple[str, ...] = ()
        for child in self.children:
            ok, said = child.evaluate(v)
            reasons += said
            if not ok:
                return False, reasons
        return True, reasons


@dataclass(frozen=True, slots=True)
class AnyOf:
    """One part must hold; stops at the first that does (the trace shows why it held)."""

    children: tuple[Condition, ...]

    def evaluate(self, v: MessageView) -> Result:
        reasons: tuple[str, ...] = ()
        for child in self.children:
            ok, said = child.evaluate(v)
            if ok:
                return True, said
            reasons += said
        return False, reasons


@dataclass(frozen=True, slots=True)
class Not:
    child: Condition

    def evaluate(self, v: MessageView) -> Result:
        ok, said = self.child.evaluate(v)
        return not ok, (f"not [{'; '.join(said)}]",)


def earlier_enquiries_needed(condition: Condition) -> int:
    """How far earlier enquiries must be counted for `condition` to be decided exactly."""
    if isinstance(condition, EarlierEnquiries):
        return condition.counts_needed
    if isinstance(condition, AllOf | AnyOf):
        return max((earlier_enquiries_needed(c) for c in condition.children), default=0)
    if isinstance(condition, Not):
        return earlier_enquiries_needed(condition.child)
    return 0
