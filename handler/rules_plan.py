"""How `classify` avoids evaluating rules that cannot match, so 1,000 rules cost little more
than 100: every phrase of every rule is found in one scan of the message, and a rule whose
words are absent (or that is for the other channel) gets a precomputed trace entry instead.

The shortcut never changes a decision or a trace: a skipped rule's entry is exactly what
evaluating it would have said (tests/test_classify.py checks this against full evaluation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from handler import conditions as c
from handler.decision import RuleHit

if TYPE_CHECKING:
    from handler.rules import Rule


@dataclass(frozen=True, slots=True)
class Gate:
    """If none of these phrases occurs in its field, the condition fails with exactly
    `reasons`, so `classify` can skip it and put a precomputed trace entry instead."""

    phrases: tuple[tuple[str, frozenset[int]], ...]
    """(field, phrase ids) pairs."""
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ChannelPlan:
    """How `classify` skips, for messages on one channel, the rules that cannot match.

    A rule for another channel, or whose gate words are absent, gets its `misses` entry in the
    trace without being evaluated (the entry is exactly what evaluating it would say)."""

    misses: tuple[RuleHit | None, ...]
    """Per rule: its trace entry when skipped; None for rules evaluated every time."""
    always: frozenset[int]
    """Rules evaluated for every message on this channel (no gate to skip them by)."""
    gates: dict[str, dict[int, tuple[int, ...]]]
    """field ("subject", "body", "text") -> phrase id -> indexes of the rules it opens."""


def gate_of(condition: c.Condition) -> Gate | None:
    """The gate of a condition: a word list (any or all); an `all` whose first part has a
    gate (it fails there first); an `any` all of whose parts have gates. Else None."""
    if isinstance(condition, c.Words):
        return Gate(((condition.field, condition.pids),), (condition.miss_reason,))
    if isinstance(condition, c.AllOf) and condition.children:
        return gate_of(condition.children[0])
    if isinstance(condition, c.AnyOf):
        gates = [gate_of(child) for child in condition.children]
        if all(g is not None for g in gates):
            return Gate(
                tuple(p for g in gates if g for p in g.phrases),
                tuple(r for g in gates if g for r in g.reasons),
            )
    return None


def rule_gate(condition: c.Condition) -> Gate | None:
    """The gate after a leading `channel:` (which `plan_channel` checks separately)."""
    if isinstance(condition, c.AllOf) and isinstance(condition.children[0], c.ChannelIs):
        return gate_of(c.AllOf(condition.children[1:]))
    return gate_of(condition)


def plan_channel(rules: Sequence[Rule], channel: str) -> ChannelPlan:
    """Precompute, for messages on `channel`, each rule's trace entry when it is skipped."""
    misses: list[RuleHit | None] = []
    always: set[int] = set()
    gates: dict[str, dict[int, tuple[int, ...]]] = {"subject": {}, "body": {}, "text": {}}
    for index, rule in enumerate(rules):
        first = rule.condition.children[0] if isinstance(rule.condition, c.AllOf) else None
        channel_check = rule.condition if isinstance(rule.condition, c.ChannelIs) else first
        said: tuple[str, ...] = ()
        if isinstance(channel_check, c.ChannelIs):
            ok, said = channel_check.check(channel)
            if not ok:
                misses.append(RuleHit(rule.name, False, said))
                continue
        if rule.gate is None:
            misses.append(None)
            always.add(index)
            continue
        misses.append(RuleHit(rule.name, False, (*said, *rule.gate.reasons)))
        for field_name, pids in rule.gate.phrases:
            by_pid = gates[field_name]
            for pid in pids:
                by_pid[pid] = (*by_pid.get(pid, ()), index)
    return ChannelPlan(tuple(misses), frozenset(always), gates)
