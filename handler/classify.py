"""classify(msg, ruleset, facts, now) -> Decision: the pure routing decision, with its trace.

Rules are tried in order; the first match decides unless it says `continue: true`, in which
case later matches stack onto it (see `Stack`). No database, network or clock: everything a
rule may read is in the message, the `Facts` and `now`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from handler.conditions import MessageView
from handler.decision import Decision, Facts, ReminderSpec, RuleHit
from handler.inbound import InboundMessage
from handler.rules import PRIORITIES, Actions, ChannelPlan, RuleSet


@dataclass(slots=True)
class Stack:
    """The decision so far. Stacking semantics (docs/rules.md, "Stacking"):
    category, reply and notify: the first matching rule that sets them wins;
    priority: the most urgent any matching rule sets; teams, tags and reminders: added up in
    rule order (duplicates dropped); whatever no rule set comes from `defaults:`."""

    category: str | None = None
    priority: str | None = None
    reply: str | None = None
    notify: str | None = None
    teams: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    reminders: list[ReminderSpec] = field(default_factory=list)
    set_by_rules: set[str] = field(default_factory=set)

    def add(self, a: Actions) -> None:
        if "category" in a.sets and self.category is None:
            self.category = a.category
        if "reply" in a.sets and "reply" not in self.set_by_rules:
            self.reply = a.reply
        if "notify" in a.sets and "notify" not in self.set_by_rules:
            self.notify = a.notify
        if a.priority is not None and (
            self.priority is None or PRIORITIES.index(a.priority) < PRIORITIES.index(self.priority)
        ):
            self.priority = a.priority
        self.teams += [t for t in a.teams if t not in self.teams]
        self.tags += [t for t in a.tags if t not in self.tags]
        names = {r.name for r in self.reminders}
        self.reminders += [r for r in a.reminders if r.name not in names]
        self.set_by_rules |= a.sets

    def decide(
        self, defaults: Actions, rule: str, trace: list[RuleHit], version: str
    ) -> Decision:
        by_rules = self.set_by_rules
        return Decision(
            rule=rule,
            category=self.category or str(defaults.category),
            priority=self.priority or str(defaults.priority),
            teams=tuple(self.teams) or defaults.teams,
            reply_template=self.reply if "reply" in by_rules else defaults.reply,
            notify_template=self.notify if "notify" in by_rules else defaults.notify,
            tags=tuple(self.tags),
            reminders=tuple(self.reminders) if "reminders" in by_rules else defaults.reminders,
            trace=tuple(trace),
            ruleset_version=version,
        )


def scan_message(
    msg: InboundMessage, ruleset: RuleSet, facts: Facts, now: datetime
) -> MessageView:
    """Find every rule phrase in the subject and body once; conditions then only look up.
    In a reply, the lines it quotes ("> ...") are not scanned: they were read when they were
    new, and a red flag quoted back (our own safety advice, or the patient's earlier words)
    must not page the on-call clinician again. A new message's quoted lines (a forwarded
    letter) are scanned like the rest."""
    body = msg.text
    if ">" in body and msg.thread_ids:
        body = unquoted(body)
    return MessageView(
        msg, facts, now, ruleset.phrases.scan(msg.subject), ruleset.phrases.scan(body)
    )


def unquoted(text: str) -> str:
    """`text` without the lines an email reply quotes (those starting with ">")."""
    return "\n".join(line for line in text.split("\n") if not line.lstrip().startswith(">"))


def rules_to_evaluate(view: MessageView, plan: ChannelPlan) -> list[int]:
    """Indexes, in order, of the rules that could match: those with no gate, and those whose
    gate words occur in the message (plainly or negated). The others are skipped."""
    todo = set(plan.always)
    gates = plan.gates
    for field_name, scan in (("subject", view.subject), ("body", view.body)):
        own, either = gates[field_name], gates["text"]
        for pid in scan.found:
            todo.update(own.get(pid, ()))
            todo.update(either.get(pid, ()))
    return sorted(todo)


def classify(msg: InboundMessage, ruleset: RuleSet, facts: Facts, now: datetime) -> Decision:
    view = scan_message(msg, ruleset, facts, now)
    plan = ruleset.plans[msg.channel.value]
    rules, misses = ruleset.rules, plan.misses
    stack = Stack()
    trace: list[RuleHit] = []
    decided_by = "default"
    done = 0  # rules before this index are in the trace
    for index in rules_to_evaluate(view, plan):
        trace += misses[done:index]  # type: ignore[arg-type]  # skipped rules: never None
        rule = rules[index]
        matched, reasons = rule.condition.evaluate(view)
        trace.append(RuleHit(rule.name, matched, reasons))
        done = index + 1
        if matched:
            stack.add(rule.actions)
            decided_by = rule.name
            if rule.stop:
                break
    else:
        trace += misses[done:]  # type: ignore[arg-type]
    return stack.decide(ruleset.defaults, decided_by, trace, ruleset.version)
