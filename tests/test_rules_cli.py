"""What `handler rules test`, `handler route` and `handler rules replay` compute and print."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from textwrap import dedent

from handler.bench_rules import generate_rules_yaml, main, measure
from handler.classify import classify
from handler.decision import Facts
from handler.rule_cases import make_message
from handler.rules import RuleSet, parse_ruleset
from handler.rules_cli import (
    decision_from_json,
    format_replay,
    format_test_table,
    replay,
    route_dry_run,
    run_rule_tests,
)

NOW = datetime(2026, 11, 25, 11, 0, tzinfo=UTC)
TEAMS = """\
teams:
  - {id: coordinator, email: coordinator@clinic.example}
  - {id: breast, email: breast-team@clinic.example}
  - {id: on-call, email: on-call@clinic.example}
"""
ROUTING = """\
rules:
  - name: red-flag
    when: {text: [chest pain]}
    team: on-call
    priority: urgent
    reply: safety-net
  - name: breast
    when: {text: [breast, mastectomy]}
    team: breast
    reply: ack-breast
tests:
  - name: chest pain by text
    channel: sms
    from: "+447700900123"
    body: Chest pain since this morning
    expect: {rule: red-flag, team: on-call, priority: urgent, reply: safety-net}
  - name: breast
    subject: Second opinion
    body: I have been offered a mastectomy.
    expect: {rule: breast, team: breast, reply: ack-breast, tags: []}
"""


def ruleset(routing: str = ROUTING) -> RuleSet:
    return parse_ruleset([("teams.yaml", TEAMS), ("routing.yaml", dedent(routing))])


def test_rule_tests_pass_and_print_a_table() -> None:
    results = run_rule_tests(ruleset())
    assert [(r.name, r.passed) for r in results] == [("chest pain by text", True),
                                                     ("breast", True)]
    assert results[0].where == "routing.yaml:12:5"
    assert results[0].decision.rule == "red-flag"
    table = format_test_table(results)
    lines = table.splitlines()
    assert lines[0].split() == ["result", "test", "rule", "category", "team", "priority", "reply"]
    assert lines[2].split() == ["PASS", "chest", "pain", "by", "text", "red-flag", "general",
                                "on-call", "urgent", "safety-net"]
    assert lines[-1] == "2 passed, 0 failed, 2 tests"


def test_a_wrong_expectation_fails_with_reasons_and_trace() -> None:
    routing = ROUTING.replace("expect: {rule: breast, team: breast, reply: ack-breast, tags: []}",
                              "expect: {rule: breast, team: lung, reply: none, tags: [x]}")
    routing = routing.replace("  - {id: on-call", "  - {id: lung, email: l@clinic.example}\n"
                              "  - {id: on-call")
    rs = parse_ruleset([("teams.yaml", TEAMS.replace(
        "  - {id: on-call", "  - {id: lung, email: l@clinic.example}\n  - {id: on-call")),
        ("routing.yaml", routing)])
    results = run_rule_tests(rs)
    assert [r.passed for r in results] == [True, False]
    assert results[1].failures == (
        "team: expected lung, got breast",
        "reply: expected none, got ack-breast",
        "tags: expected to include [x], got []",
    )
    table = format_test_table(results)
    assert "FAIL    breast" in table
    assert "FAIL breast (routing.yaml:17:5)" in table
    assert "  team: expected lung, got breast" in table
    assert "MATCH breast     subject contains" not in table  # the trace shows the body hit
    assert "MATCH breast    body contains 'mastectomy'" in table
    assert table.endswith("1 passed, 1 failed, 2 tests")


def test_route_dry_run_prints_the_decision_and_every_rule_considered() -> None:
    msg = make_message(subject="Second opinion", body="No chest pain. Mastectomy next week?")
    out = route_dry_run(msg, ruleset(), Facts(), NOW)
    assert "  rule:      breast" in out
    assert "  teams:     breast" in out
    assert "  reply:     ack-breast" in out
    assert "Trace (2 of 2 rules considered, in order):" in out
    assert ("  no    red-flag  text contains none of 'chest pain'; 'chest pain' appears only "
            "after 'no' (negated, not counted)") in out
    assert "  MATCH breast    body contains 'mastectomy'" in out


def test_route_dry_run_when_nothing_matches() -> None:
    out = route_dry_run(make_message(channel="sms", body="parking?"), ruleset(), Facts(), NOW)
    assert "  rule:      default" in out
    assert "(no rule matched: the defaults apply)" in out


def test_decision_json_round_trip() -> None:
    rs = ruleset(ROUTING + dedent("""\
        defaults:
          reminders: [{name: chase, after: 1d, template: reminder-team-unanswered}]
        """))
    decision = classify(make_message(body="breast"), rs, Facts(), NOW)
    assert decision.reminders
    assert decision_from_json(decision.to_json()) == decision
    assert decision_from_json({"rule": "x"}).teams == ()


def test_replay_reports_what_would_change_with_both_traces() -> None:
    before_rules = ruleset()
    candidate = ruleset(ROUTING.replace("when: {text: [breast, mastectomy]}",
                                        "when: {text: [breast]}"))
    messages = [
        make_message(body="chest pain"),
        make_message(body="breast lump"),
        make_message(body="mastectomy scheduled"),
        make_message(body="parking"),
    ]
    stored = []
    for i, msg in enumerate(messages):
        when = NOW - timedelta(days=i)
        decision = classify(msg, before_rules, Facts(), when)
        stored.append((f"ENQ-{i}", decision.to_json(), msg, Facts(), when))
    report = replay(stored, candidate)
    assert report.total == 4
    assert report.candidate_version == candidate.version
    assert [c.reference for c in report.changed] == ["ENQ-2"]
    change = report.changed[0]
    assert change.changes == ("teams: [breast] -> [coordinator]",
                              "reply: ack-breast -> ack-general")
    assert (change.before.rule, change.after.rule) == ("breast", "default")
    assert report.teams_before == {"on-call": 1, "breast": 2, "coordinator": 1}
    assert report.teams_after == {"on-call": 1, "breast": 1, "coordinator": 2}
    assert report.versions_before == {before_rules.version: 4}
    text = format_replay(report)
    assert f"Replayed 4 enquiries with candidate rules {candidate.version}" in text
    assert "1 would change." in text
    assert "breast       2       1      -1" in text
    assert "coordinator  1       2      +1" in text
    assert "ENQ-2 (2026-11-23 11:00): rule breast -> default" in text
    assert "    MATCH breast    body contains 'mastectomy'" in text  # before
    assert "    no    breast    text contains none of 'breast'" in text  # after
    assert "before:" not in format_replay(report, show_traces=False)


def test_replay_ignores_a_renamed_rule_with_the_same_outcome() -> None:
    renamed = ruleset(ROUTING.replace("name: breast", "name: breast-team").replace(
        "rule: breast,", "rule: breast-team,"))
    msg = make_message(body="breast")
    stored = [("ENQ-1", classify(msg, ruleset(), Facts(), NOW).to_json(), msg, Facts(), NOW)]
    assert replay(stored, renamed).changed == ()


def test_replay_decides_as_of_when_the_enquiry_arrived() -> None:
    teams = TEAMS.replace("{id: coordinator, email: coordinator@clinic.example}",
                          "{id: coordinator, email: coordinator@clinic.example, hours: office}")
    rs = parse_ruleset([("teams.yaml", "calendars:\n  office: {hours: {mon-fri: '09:00-17:00'}}\n"
                         + teams),
                        ("routing.yaml", "rules:\n  - name: night\n    when: "
                         "{outside_business_hours: coordinator}\n    tags: [night]\n")])
    msg = make_message(body="hello")
    night = NOW.replace(hour=23)
    stored = [("ENQ-1", replace(classify(msg, rs, Facts(), night)).to_json(), msg, Facts(),
               night)]
    assert replay(stored, rs).changed == ()


def test_bench_generates_valid_rule_sets_and_measures() -> None:
    rs = parse_ruleset([("generated.yaml", generate_rules_yaml(50))])
    assert len(rs.rules) == 50
    rate, median_us, count = measure(rs, seconds=0.05)
    assert rate > 0 and median_us > 0 and count > 0


def test_bench_main_prints_a_row_per_size_and_the_ratio(capsys: object) -> None:
    assert main(["0.02"]) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["10", "100", "1000"]
    assert "ratio 1,000 / 100 rules (median):" in out
