"""The outcome of classifying one inbound message: pure data, stored with the enquiry.

`Facts` are what `classify` may know about the world (gathered from the database before it
runs); `Decision` is what it concludes, with a `RuleHit` trace of every rule it considered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Facts:
    is_reply: bool = False
    """The message belongs to an existing enquiry (thread headers, or SMS from an open number)."""
    earlier_enquiries: int = 0
    """How many enquiries this contact opened before this message (see the next field)."""
    earlier_enquiries_at_least: bool = False
    """The count stopped at `RuleSet.earlier_enquiries_cap`: there may be more, and no rule
    can tell them apart (counting a referrer's thousands of enquiries cost ~1 ms a message)."""
    acks_last_24h: int = 0
    """Automatic acknowledgements already sent to this sender in the rate-limit window."""
    sms_opted_out: bool = False
    email_suppressed: bool = False
    """A hard bounce stopped mail to this address."""


@dataclass(frozen=True, slots=True)
class ReminderSpec:
    """A reminder recorded with the decision: `after` (e.g. "2d", "4h") from intake."""

    name: str
    after: str
    template: str
    to: str = "team"  # "team" | "patient"
    unless: str = "answered"  # condition that cancels it


@dataclass(frozen=True, slots=True)
class RuleHit:
    rule: str
    matched: bool
    reasons: tuple[str, ...] = ()
    """Why it matched or failed: e.g. "body contains 'chest pain'", "channel is not sms"."""


@dataclass(frozen=True, slots=True)
class Decision:
    rule: str
    """Name of the (last) rule that decided; "default" when none matched."""
    category: str
    priority: str
    """"urgent" | "high" | "normal" | "low"."""
    teams: tuple[str, ...]
    reply_template: str | None
    notify_template: str | None
    tags: tuple[str, ...] = ()
    reminders: tuple[ReminderSpec, ...] = ()
    trace: tuple[RuleHit, ...] = ()
    ruleset_version: str = ""

    @property
    def team(self) -> str:
        return self.teams[0] if self.teams else ""

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (what `dataclasses.asdict` gives, without its deep copies: this
        runs for every inbound message)."""
        return {
            "rule": self.rule, "category": self.category, "priority": self.priority,
            "teams": self.teams, "reply_template": self.reply_template,
            "notify_template": self.notify_template, "tags": self.tags,
            "reminders": tuple({"name": r.name, "after": r.after, "template": r.template,
                                "to": r.to, "unless": r.unless} for r in self.reminders),
            "trace": tuple({"rule": h.rule, "matched": h.matched, "reasons": h.reasons}
                           for h in self.trace),
            "ruleset_version": self.ruleset_version,
        }


@dataclass(frozen=True, slots=True)
class ReplyPlan:
    """What the guards allow after the rules decided: reply or not, and why not."""

    send_reply: bool
    reason: str = ""
    notes: tuple[str, ...] = field(default=())
