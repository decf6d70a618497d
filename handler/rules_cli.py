"""What the `handler rules ...` and `handler route` commands compute and print.

Pure-ish functions over a loaded `RuleSet`: run the `tests:` examples (`run_rule_tests`),
explain one message (`route_dry_run`), and re-decide stored enquiries with a candidate rule
set (`replay`). None of them touches the database or sends anything; the CLI gathers input.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from handler.classify import classify
from handler.decision import Decision, Facts, ReminderSpec, RuleHit
from handler.inbound import InboundMessage
from handler.rule_cases import RuleTest, make_message
from handler.rules import RuleSet

__all__ = [
    "ReplayChange", "ReplayReport", "TestResult", "decision_from_json", "format_decision",
    "format_replay", "format_test_table", "format_trace", "make_message", "replay",
    "route_dry_run", "run_rule_test", "run_rule_tests",
]

OUTCOME_FIELDS = ("category", "priority", "teams", "reply", "notify", "tags", "reminders")
"""What `replay` compares: the rule's name alone changing is not a change of outcome."""


# --- rule-file tests ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TestResult:
    __test__ = False  # not a pytest class, despite the name

    name: str
    where: str
    passed: bool
    failures: tuple[str, ...]
    decision: Decision


def _actual(decision: Decision, key: str) -> Any:
    return {
        "rule": decision.rule, "category": decision.category, "team": decision.team,
        "teams": decision.teams, "priority": decision.priority,
        "reply": decision.reply_template, "notify": decision.notify_template,
        "tags": decision.tags,
    }[key]


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return "[" + ", ".join(value) + "]" if value else "[]"
    return str(value)


def run_rule_test(test: RuleTest, ruleset: RuleSet) -> TestResult:
    decision = classify(test.message, ruleset, test.facts, test.now)
    failures = []
    for key, expected in test.expect:
        actual = _actual(decision, key)
        if key == "tags":
            missing = [t for t in expected if t not in actual]
            if missing:
                failures.append(f"tags: expected to include {_show(tuple(missing))}, "
                                f"got {_show(actual)}")
        elif actual != expected:
            failures.append(f"{key}: expected {_show(expected)}, got {_show(actual)}")
    return TestResult(test.name, str(test.where), not failures, tuple(failures), decision)


def run_rule_tests(ruleset: RuleSet) -> list[TestResult]:
    """Run every `tests:` example of the rule set, in file order."""
    return [run_rule_test(test, ruleset) for test in ruleset.tests]


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    rows = [list(header), *map(list, rows)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_test_table(results: Sequence[TestResult]) -> str:
    """A pass/fail table, the reasons for each failure, and a summary line."""
    rows = [
        ("PASS" if r.passed else "FAIL", r.name, r.decision.rule, r.decision.category,
         r.decision.team, r.decision.priority, _show(r.decision.reply_template))
        for r in results
    ]
    lines = _table(("result", "test", "rule", "category", "team", "priority", "reply"), rows)
    failed = [r for r in results if not r.passed]
    for r in failed:
        lines.append("")
        lines.append(f"FAIL {r.name} ({r.where})")
        lines += [f"  {f}" for f in r.failures]
        lines += ["  trace:", *("    " + line for line in format_trace(r.decision.trace))]
    lines.append("")
    lines.append(f"{len(results) - len(failed)} passed, {len(failed)} failed, "
                 f"{len(results)} tests")
    return "\n".join(lines)


# --- dry run -----------------------------------------------------------------------------

def _reminder(spec: ReminderSpec) -> str:
    return f"{spec.name} after {spec.after} to {spec.to} ({spec.template}, unless {spec.unless})"


def format_decision(decision: Decision) -> list[str]:
    rows = [
        ("rule", decision.rule), ("category", decision.category),
        ("priority", decision.priority), ("teams", ", ".join(decision.teams)),
        ("reply", _show(decision.reply_template)), ("notify", _show(decision.notify_template)),
        ("tags", ", ".join(decision.tags) or "-"),
        ("reminders", "; ".join(_reminder(s) for s in decision.reminders) or "-"),
    ]
    return [f"  {key + ':':<11}{value}" for key, value in rows]


def format_trace(trace: Sequence[RuleHit]) -> list[str]:
    """One line per rule considered: MATCH or no, the rule, and why."""
    width = max((len(hit.rule) for hit in trace), default=0)
    return [
        f"{'MATCH' if hit.matched else 'no':<6}{hit.rule:<{width}}  {'; '.join(hit.reasons)}"
        for hit in trace
    ]


def route_dry_run(msg: InboundMessage, ruleset: RuleSet, facts: Facts, now: datetime) -> str:
    """The decision for `msg` and the trace of every rule considered (nothing is stored)."""
    decision = classify(msg, ruleset, facts, now)
    lines = [
        f"Message: {msg.channel.value}, {len(msg.text)} characters, "
        f"{len(msg.attachments)} attachment(s); new enquiry: {not facts.is_reply}, "
        f"earlier enquiries: {'at least ' if facts.earlier_enquiries_at_least else ''}"
        f"{facts.earlier_enquiries}; at {now.isoformat()}",
        f"Decision (rules {ruleset.version}):",
        *format_decision(decision),
        f"Trace ({len(decision.trace)} of {len(ruleset.rules)} rules considered, in order):",
        *("  " + line for line in format_trace(decision.trace)),
    ]
    if decision.rule == "default":
        lines.append("  (no rule matched: the defaults apply)")
    return "\n".join(lines)


# --- replay ------------------------------------------------------------------------------

def decision_from_json(data: Mapping[str, Any]) -> Decision:
    """Rebuild a stored `Decision.to_json()` (tolerant of keys missing in older rows)."""
    return Decision(
        rule=str(data.get("rule", "")),
        category=str(data.get("category", "")),
        priority=str(data.get("priority", "")),
        teams=tuple(data.get("teams", ())),
        reply_template=data.get("reply_template"),
        notify_template=data.get("notify_template"),
        tags=tuple(data.get("tags", ())),
        reminders=tuple(ReminderSpec(**r) for r in data.get("reminders", ())),
        trace=tuple(
            RuleHit(h["rule"], bool(h["matched"]), tuple(h.get("reasons", ())))
            for h in data.get("trace", ())
        ),
        ruleset_version=str(data.get("ruleset_version", "")),
    )


def _outcome(d: Decision) -> dict[str, Any]:
    return {
        "category": d.category, "priority": d.priority, "teams": d.teams,
        "reply": d.reply_template, "notify": d.notify_template, "tags": d.tags,
        "reminders": tuple(f"{r.name} after {r.after}" for r in d.reminders),
    }


@dataclass(frozen=True, slots=True)
class ReplayChange:
    reference: str
    created_at: datetime
    before: Decision
    after: Decision
    changes: tuple[str, ...]
    """E.g. "team: coordinator -> breast"."""


@dataclass(frozen=True, slots=True)
class ReplayReport:
    candidate_version: str
    total: int
    categories_before: Counter[str] = field(default_factory=Counter)
    categories_after: Counter[str] = field(default_factory=Counter)
    teams_before: Counter[str] = field(default_factory=Counter)
    teams_after: Counter[str] = field(default_factory=Counter)
    changed: tuple[ReplayChange, ...] = ()
    versions_before: Counter[str] = field(default_factory=Counter)


Stored = tuple[str, Mapping[str, Any], InboundMessage, Facts, datetime]
"""(reference, stored decision JSON, message, facts, created_at)."""


def replay(decisions_before: Sequence[Stored], candidate: RuleSet) -> ReplayReport:
    """Re-decide stored enquiries with `candidate` (as of when each arrived) and compare."""
    cats_before: Counter[str] = Counter()
    cats_after: Counter[str] = Counter()
    teams_before: Counter[str] = Counter()
    teams_after: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    changed: list[ReplayChange] = []
    for reference, stored, msg, facts, created_at in decisions_before:
        before = decision_from_json(stored)
        after = classify(msg, candidate, facts, created_at)
        cats_before[before.category] += 1
        cats_after[after.category] += 1
        teams_before[before.team] += 1
        teams_after[after.team] += 1
        versions[before.ruleset_version] += 1
        old, new = _outcome(before), _outcome(after)
        diffs = tuple(
            f"{key}: {_show(old[key])} -> {_show(new[key])}"
            for key in OUTCOME_FIELDS if old[key] != new[key]
        )
        if diffs:
            changed.append(ReplayChange(reference, created_at, before, after, diffs))
    return ReplayReport(
        candidate.version, len(decisions_before), cats_before, cats_after, teams_before,
        teams_after, tuple(changed), versions,
    )


def _counts(title: str, before: Counter[str], after: Counter[str]) -> list[str]:
    keys = sorted(set(before) | set(after), key=lambda k: (-max(before[k], after[k]), k))
    rows = [(k or "-", str(before[k]), str(after[k]), f"{after[k] - before[k]:+d}")
            for k in keys]
    return _table((title, "before", "after", "change"), rows)


def format_replay(report: ReplayReport, *, show_traces: bool = True) -> str:
    lines = [
        f"Replayed {report.total} enquiries with candidate rules {report.candidate_version} "
        f"(stored decisions came from rules {', '.join(sorted(report.versions_before)) or '-'})",
        f"{len(report.changed)} would change.",
        "",
        *_counts("category", report.categories_before, report.categories_after),
        "",
        *_counts("team", report.teams_before, report.teams_after),
    ]
    for change in report.changed:
        lines += ["", f"{change.reference} ({change.created_at:%Y-%m-%d %H:%M}): "
                  f"rule {change.before.rule} -> {change.after.rule}"]
        lines += [f"  {c}" for c in change.changes]
        if show_traces:
            lines += ["  before:", *("    " + t for t in format_trace(change.before.trace))]
            lines += ["  after:", *("    " + t for t in format_trace(change.after.trace))]
    return "\n".join(lines)
