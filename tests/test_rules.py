"""Loading, validating and compiling rule files (handler.rules), and the shipped rule set."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from textwrap import dedent

import pytest

from handler.decision import ReminderSpec
from handler.rules import (
    BUILTIN_DEFAULTS,
    RulesError,
    RuleSet,
    check_rules,
    load_ruleset,
    parse_ruleset,
)
from handler.rules_actions import parse_after
from handler.rules_cli import run_rule_tests

SHIPPED = Path(__file__).resolve().parent.parent / "rules"

TEAMS = """\
calendars:
  office:
    hours: {mon-fri: "09:00-17:00"}
teams:
  - {id: coordinator, email: coordinator@clinic.example, hours: office}
  - {id: breast, email: breast-team@clinic.example}
  - {id: on-call, email: on-call@clinic.example, sms: "+447700900999"}
"""

# The template names of the shared contract (email and SMS forms of each patient template).
PATIENT_TEMPLATES = {
    "ack-general", "ack-breast", "ack-urology", "ack-lung", "ack-colorectal",
    "ack-haematology", "ack-gynaecology", "ack-skin", "ack-existing-patient", "safety-net",
    "ack-press", "ack-insurer", "reminder-patient-documents", "help",
}
KNOWN = {
    "email": PATIENT_TEMPLATES | {"notify-team", "notify-urgent", "reminder-team-unanswered"},
    "sms": PATIENT_TEMPLATES | {"notify-team", "notify-urgent"},
}


def load(routing: str, *, known: dict[str, set[str]] | None = None) -> RuleSet:
    return parse_ruleset(
        [("rules/teams.yaml", TEAMS), ("rules/routing.yaml", dedent(routing))],
        known_templates=known,
    )


def errors_of(routing: str, *, known: dict[str, set[str]] | None = None) -> list[str]:
    with pytest.raises(RulesError) as caught:
        load(routing, known=known)
    assert str(caught.value) == "\n".join(caught.value.errors)
    return caught.value.errors


# --- what a valid file compiles to ------------------------------------------------------

def test_a_valid_file_compiles_with_teams_defaults_and_rules() -> None:
    rs = load("""\
        defaults:
          reply: ack-general
        rules:
          - name: breast
            description: Breast cancer wording.
            when: {text: [breast, mastectomy]}
            team: breast
            priority: high
            reply: ack-breast
            tags: [site-breast]
            reminders:
              - {name: team-unanswered, after: 1d, template: reminder-team-unanswered}
        """)
    assert [r.name for r in rs.rules] == ["breast"]
    rule = rs.rules[0]
    assert rule.description == "Breast cancer wording."
    assert rule.actions.teams == ("breast",)
    assert rule.actions.reminders == (
        ReminderSpec("team-unanswered", "1d", "reminder-team-unanswered", "team", "answered"),
    )
    assert rule.stop is True
    assert set(rs.teams) == {"coordinator", "breast", "on-call"}
    assert rs.teams["on-call"].sms == "+447700900999"
    assert rs.teams["coordinator"].hours is not None and rs.teams["breast"].hours is None
    assert rs.defaults.category == "general" and rs.defaults.teams == ("coordinator",)
    assert rs.templates_used == {"ack-breast", "ack-general", "notify-team",
                                 "reminder-team-unanswered"}
    assert len(rs.version) == 16


def test_builtin_defaults_apply_without_a_defaults_section() -> None:
    rs = load("rules: []\n")
    assert rs.defaults == BUILTIN_DEFAULTS
    assert rs.rules == ()


def test_patient_reminders_default_to_unless_patient_replied() -> None:
    rs = load("""\
        rules:
          - name: a
            reminders:
              - {name: docs, after: 3d, template: reminder-patient-documents, to: patient}
        """)
    assert rs.rules[0].actions.reminders[0].unless == "patient-replied"


@pytest.mark.parametrize(("text", "seconds"), [
    ("30m", 1800), ("4h", 14400), ("2d", 172800), ("1w", 604800), (" 3 d ", 259200),
    ("0d", None), ("2x", None), ("d", None), ("1.5d", None),
])
def test_parse_after(text: str, seconds: int | None) -> None:
    assert parse_after(text) == seconds


def test_version_is_a_content_hash() -> None:
    a = load("rules: []\n")
    b = load("rules: []\n")
    c = load("rules: []  # changed\n")
    assert a.version == b.version != c.version


# --- validation: each mistake with its exact place -----------------------------------------

def test_unknown_action_with_suggestion() -> None:
    assert errors_of("""\
        rules:
          - name: a
            priorty: high
        """) == ["rules/routing.yaml:3:5: unknown action 'priorty' (did you mean 'priority'?)"]


def test_unknown_condition_and_misplaced_keys() -> None:
    assert errors_of("""\
        rules:
          - name: a
            when:
              chanel: sms
              priority: high
            channel: sms
            team: breast
        """) == [
        "rules/routing.yaml:4:7: unknown condition 'chanel' (did you mean 'channel'?)",
        "rules/routing.yaml:5:7: 'priority' is an action, not a condition: move it out of "
        "'when:'",
        "rules/routing.yaml:6:5: 'channel' is a condition: put it under 'when:'",
    ]


def test_wrong_types() -> None:
    assert errors_of("""\
        rules:
          - name: a
            when: {has_attachment: maybe, earlier_enquiries: -1, text: {any: []}}
            priority: [high]
            continue: sometimes
            tags: Urgent
        """) == [
        "rules/routing.yaml:3:28: has_attachment must be true or false, got 'maybe'",
        "rules/routing.yaml:3:54: earlier_enquiries must be a whole number >= 0, got -1",
        "rules/routing.yaml:3:70: text.any is an empty list",
        "rules/routing.yaml:4:15: priority must be a word or text, got a list",
        "rules/routing.yaml:5:15: continue must be true or false, got 'sometimes'",
        "rules/routing.yaml:6:11: tag 'Urgent' must be lower-case words joined by '-'",
    ]


def test_bad_priority_value_suggests_the_right_one() -> None:
    assert errors_of("""\
        rules:
          - name: a
            priority: urgnt
        """) == ["rules/routing.yaml:3:15: priority must be one of urgent, high, normal, low, "
                 "got 'urgnt' (did you mean 'urgent'?)"]


def test_bad_regex() -> None:
    assert errors_of("""\
        rules:
          - name: a
            when:
              regex: {body: "T[0-4"}
        """) == ["rules/routing.yaml:4:21: bad regular expression 'T[0-4': unterminated "
                 "character set at position 1"]


def test_unknown_team_with_suggestion() -> None:
    assert errors_of("""\
        rules:
          - name: a
            team: [breast, on-cal]
        """) == ["rules/routing.yaml:3:20: unknown team 'on-cal' (did you mean 'on-call'?)"]


def test_unknown_template_only_checked_when_templates_are_known() -> None:
    routing = """\
        rules:
          - name: a
            reply: ack-brest
        """
    assert load(routing).templates_used >= {"ack-brest"}
    assert errors_of(routing, known=KNOWN) == [
        "rules/routing.yaml:3:12: unknown template 'ack-brest' (did you mean 'ack-breast'?)"
    ]


def test_template_missing_on_a_channel_it_is_needed_for() -> None:
    known = {"email": KNOWN["email"], "sms": KNOWN["sms"] - {"ack-breast", "notify-urgent"}}
    routing = """\
        rules:
          - name: email-only
            when: {channel: email}
            reply: ack-breast
          - name: any-channel
            reply: ack-breast
            team: on-call
            notify: notify-urgent
        """
    assert errors_of(routing, known=known) == [
        "rules/routing.yaml:6:12: template 'ack-breast' has no sms version, needed for the "
        "reply of rule 'any-channel'",
        "rules/routing.yaml:8:13: template 'notify-urgent' has no sms version, needed for the "
        "staff notification of rule 'any-channel'",
    ]


def test_duplicate_rule_name() -> None:
    assert errors_of("""\
        rules:
          - name: breast
            when: {text: [breast]}
          - name: breast
            when: {text: [mastectomy]}
        """) == ["rules/routing.yaml:4:11: duplicate rule name 'breast' (first at "
                 "rules/routing.yaml:2:11)"]


def test_rule_after_a_catch_all_can_never_match() -> None:
    assert errors_of("""\
        rules:
          - name: everything
            team: coordinator
          - name: breast
            when: {text: [breast]}
            team: breast
        """) == ["rules/routing.yaml:4:5: rule 'breast' can never match: catch-all rule "
                 "'everything' (rules/routing.yaml:2:5) matches every message and stops first"]


def test_catch_all_that_continues_or_covers_one_channel_is_fine() -> None:
    rs = load("""\
        rules:
          - name: tag-all
            tags: [seen]
            continue: true
          - name: all-sms
            when: {channel: sms}
          - name: later
            when: {text: [breast]}
        """)
    assert [r.name for r in rs.rules] == ["tag-all", "all-sms", "later"]
    assert errors_of("""\
        rules:
          - name: both-channels
            when: {channel: [email, sms]}
          - name: later
        """) == ["rules/routing.yaml:4:5: rule 'later' can never match: catch-all rule "
                 "'both-channels' (rules/routing.yaml:2:5) matches every message and stops first"]


def test_reminder_mistakes() -> None:
    assert errors_of("""\
        rules:
          - name: a
            reminders:
              - {name: chase, after: 2x, template: reminder-team-unanswered, to: teem}
              - {name: chase, after: 1d, template: reminder-team-unanswered, unles: closed}
              - {after: 1d}
        """) == [
        "rules/routing.yaml:4:30: after '2x' must be a number and a unit: 30m, 4h, 2d or 1w",
        "rules/routing.yaml:4:74: reminder 'to' must be team or patient, got 'teem' "
        "(did you mean 'team'?)",
        "rules/routing.yaml:5:70: unknown reminder key 'unles' (did you mean 'unless'?)",
        "rules/routing.yaml:6:9: reminder needs name, template",
    ]


def test_stop_and_continue_contradicting_and_rules_that_do_nothing() -> None:
    assert errors_of("""\
        rules:
          - name: a
            stop: true
            continue: true
          - name: b
            when: {text: [x]}
            continue: true
        """) == [
        "rules/routing.yaml:4:15: 'stop' and 'continue' contradict each other: use one",
        "rules/routing.yaml:5:5: rule 'b' does nothing: it has no actions and continues",
    ]


def test_names_and_missing_name() -> None:
    assert errors_of("""\
        rules:
          - name: Breast_Rule
            when: {text: [x]}
          - name: default
            when: {text: [y]}
          - when: {text: [z]}
        """) == [
        "rules/routing.yaml:2:11: rule name 'Breast_Rule' must be lower-case words joined by "
        "'-' (and not 'default')",
        "rules/routing.yaml:4:11: rule name 'default' must be lower-case words joined by '-' "
        "(and not 'default')",
        "rules/routing.yaml:6:5: rule has no 'name'",
    ]


def test_condition_values_are_checked() -> None:
    assert errors_of("""\
        rules:
          - name: a
            when:
              channel: fax
              from: someone
              from_domain: "not a domain"
              from_phone_prefix: "07700"
              attachment_type: [pdf]
              in_business_hours: brest
              outside_business_hours: breast
              text: ["!!!"]
              earlier_enquiries: {least: 1}
        """) == [
        "rules/routing.yaml:4:16: unknown channel 'fax': use email or sms",
        "rules/routing.yaml:5:13: 'someone' is neither an email address nor a +44... phone "
        "number (use from_domain for a whole domain)",
        "rules/routing.yaml:6:20: 'not a domain' is not a domain like bupa.com",
        "rules/routing.yaml:7:26: '07700' is not a phone prefix like +447 (+ and digits)",
        "rules/routing.yaml:8:25: 'pdf' is neither a type like application/pdf or image/* nor "
        "a file ending like .pdf",
        "rules/routing.yaml:9:26: unknown team or calendar 'brest' (did you mean 'breast'?)",
        "rules/routing.yaml:10:31: team 'breast' has no 'hours' calendar in teams.yaml",
        "rules/routing.yaml:11:14: phrase '!!!' has no letters or digits",
        "rules/routing.yaml:12:27: unknown key in 'earlier_enquiries' 'least'",
    ]


def test_yaml_syntax_error_has_a_position() -> None:
    errors = errors_of("rules:\n  - name: a\n    when: {text: [x, y}\n")
    assert len(errors) == 1
    assert errors[0].startswith("rules/routing.yaml:3:23: YAML syntax error:")


def test_unknown_section_and_duplicate_keys() -> None:
    assert errors_of("""\
        rulez: []
        rules:
          - name: a
            team: breast
            team: coordinator
        """) == [
        "rules/routing.yaml:1:1: unknown section 'rulez' (did you mean 'rules'?)",
        "rules/routing.yaml:5:5: duplicate key 'team' in a rule (first at line 4)",
    ]


def test_team_and_calendar_mistakes_without_knock_on_errors() -> None:
    teams = dedent("""\
        calendars:
          office:
            hours: {mon-fri: "09:00-17:00", sun: "18:00-08:00", funday: closed}
            holidays: [2026-13-01]
            timezone: Europe/Londn
        teams:
          - {id: coordinator, email: coordinator@clinic.example, hours: ofice}
          - {id: on-call, email: on-call, sms: "07700 900999"}
          - {id: breast}
        """)
    with pytest.raises(RulesError) as caught:
        parse_ruleset([("rules/teams.yaml", teams),
                       ("rules/routing.yaml", "rules:\n  - name: a\n    team: coordinator\n")])
    assert caught.value.errors == [
        "rules/teams.yaml:3:42: bad opening hours '18:00-08:00': use HH:MM-HH:MM with the end "
        "after the start (up to 24:00), or 'closed'",
        "rules/teams.yaml:3:57: bad day 'funday': use mon..sun, a range like mon-fri, or daily",
        "rules/teams.yaml:4:16: bad holiday date '2026-13-01': use YYYY-MM-DD",
        "rules/teams.yaml:5:15: unknown timezone 'Europe/Londn' (use a name like Europe/London)",
        "rules/teams.yaml:7:65: unknown calendar 'ofice' (did you mean 'office'?)",
        "rules/teams.yaml:8:26: 'on-call' is not an email address",
        "rules/teams.yaml:8:40: sms '07700 900999' must be a phone number in +44... (E.164) form",
        "rules/teams.yaml:9:5: team needs email",
    ]


def test_default_team_must_exist() -> None:
    with pytest.raises(RulesError) as caught:
        parse_ruleset([("rules/routing.yaml", "teams:\n  - {id: breast, email: b@x.example}\n")])
    assert caught.value.errors == [
        "rules/routing.yaml:1:1: the default team 'coordinator' is not defined in 'teams' "
        "(add it, or set defaults: team:)"
    ]


def test_every_problem_is_reported_in_one_go() -> None:
    errors = errors_of("""\
        defaults: {priority: meh}
        rules:
          - name: a
            priorty: high
          - name: a
            team: nobody
            when: {regex: {body: "("}}
        tests:
          - name: t
            expect: {rule: b}
        """)
    assert [e.split(":")[1] for e in errors] == ["1", "4", "5", "6", "7", "10"]
    assert "duplicate rule name 'a'" in errors[2]


def test_test_cases_are_validated() -> None:
    assert errors_of("""\
        rules:
          - name: breast
            when: {text: [breast]}
            team: breast
        tests:
          - name: one
            body: breast
            expect: {rule: brest, team: breast, priority: hihg, colour: red}
          - name: one
            expect: {rule: breast}
          - name: sms with an address
            channel: sms
            from: someone@example.com
            subject: Hi
            expect: {rule: breast}
          - body: no name
        """) == [
        "rules/routing.yaml:8:20: unknown rule 'brest' (did you mean 'breast'?)",
        "rules/routing.yaml:8:51: unknown priority 'hihg' (did you mean 'high'?)",
        "rules/routing.yaml:8:57: unknown expectation 'colour'",
        "rules/routing.yaml:9:5: duplicate test name 'one' (first at rules/routing.yaml:6:5)",
        "rules/routing.yaml:13:11: an SMS test needs 'from' as a +44... number, got "
        "'someone@example.com'",
        "rules/routing.yaml:14:14: an SMS has no subject",
        "rules/routing.yaml:16:5: a test needs 'name' and 'expect'",
    ]


# --- loading from a directory --------------------------------------------------------------

def test_load_ruleset_reads_yaml_files_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "teams.yaml").write_text(TEAMS)
    (tmp_path / "20-later.yaml").write_text("rules:\n  - name: second\n    when: {text: [b]}\n")
    (tmp_path / "10-first.yml").write_text("rules:\n  - name: first\n    when: {text: [a]}\n")
    (tmp_path / ".#10-first.yml").write_text("not: [valid")  # an editor's lock file
    (tmp_path / "notes.txt").write_text("ignored")
    rs = load_ruleset(tmp_path)
    assert [r.name for r in rs.rules] == ["first", "second"]
    assert [p.name for p in rs.files] == ["10-first.yml", "20-later.yaml", "teams.yaml"]
    assert check_rules(tmp_path) == []


def test_load_ruleset_errors_name_the_file_as_given(tmp_path: Path) -> None:
    (tmp_path / "teams.yaml").write_text(TEAMS)
    (tmp_path / "routing.yaml").write_text("rules:\n  - name: a\n    priorty: high\n")
    assert check_rules(tmp_path) == [
        f"{tmp_path}/routing.yaml:3:5: unknown action 'priorty' (did you mean 'priority'?)"
    ]


def test_missing_or_empty_rules_directory(tmp_path: Path) -> None:
    assert check_rules(tmp_path / "nope") == [f"{tmp_path / 'nope'}: no such directory"]
    assert check_rules(tmp_path) == [f"{tmp_path}: no rule files (*.yaml)"]


def test_unreadable_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "routing.yaml").write_bytes(b"rules: [\xff]\n")
    [error] = check_rules(tmp_path)
    assert error.startswith(f"{tmp_path}/routing.yaml:1:1: cannot read:")


# --- the shipped rule set --------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped() -> RuleSet:
    return load_ruleset(SHIPPED, known_templates=KNOWN)


def test_shipped_rules_are_valid_with_the_contract_templates(shipped: RuleSet) -> None:
    assert check_rules(SHIPPED, known_templates=KNOWN) == []
    assert shipped.templates_used <= KNOWN["email"]
    assert set(shipped.teams) == {
        "breast", "urology", "lung", "colorectal", "haematology", "gynaecology", "skin",
        "coordinator", "on-call", "communications", "finance",
    }
    assert shipped.rules[0].name == "red-flag"
    assert shipped.teams["on-call"].sms and shipped.teams["on-call"].hours is not None


def test_shipped_examples_all_pass(shipped: RuleSet) -> None:
    results = run_rule_tests(shipped)
    failures = [f"{r.name}: {'; '.join(r.failures)}" for r in results if not r.passed]
    assert failures == []
    assert len(results) >= 30


def test_shipped_examples_cover_every_team_red_flags_replies_and_spam(shipped: RuleSet) -> None:
    results = run_rule_tests(shipped)
    teams = {r.decision.team for r in results}
    assert teams >= set(shipped.teams)
    expected = {key: set() for key in ("rule", "reply", "category")}
    for test in shipped.tests:
        for key, value in test.expect:
            if key in expected:
                expected[key].add(value)
    assert {"red-flag", "marketing-spam", "press", "insurer", "existing-patient",
            "reply-in-thread", "general-enquiry"} <= expected["rule"]
    assert {None, "safety-net", "ack-press", "ack-insurer", "ack-existing-patient"} \
        <= expected["reply"]
    assert "spam" in expected["category"]
    red_flags = [r for r in results if r.decision.rule == "red-flag"]
    assert len(red_flags) >= 10
    assert {r.decision.reply_template for r in red_flags} == {"safety-net"}
    assert any(t.message.channel.value == "sms" for t in shipped.tests)


def test_shipped_red_flag_rule_is_urgent_and_first(shipped: RuleSet) -> None:
    rule = shipped.rules[0]
    assert rule.actions.priority == "urgent"
    assert rule.actions.teams == ("on-call",)
    assert rule.actions.reply == "safety-net" and rule.actions.notify == "notify-urgent"
    assert rule.stop


def test_shipped_office_calendar_knows_bank_holidays(shipped: RuleSet) -> None:
    office = shipped.calendars["office"]
    assert office.is_open(datetime(2026, 11, 25, 11, 0, tzinfo=UTC))
    assert not office.is_open(datetime(2026, 12, 25, 11, 0, tzinfo=UTC))  # Christmas Day
    assert not office.is_open(datetime(2026, 11, 29, 11, 0, tzinfo=UTC))  # Sunday
    assert shipped.calendars["always"].is_open(datetime(2026, 12, 25, 3, 0, tzinfo=UTC))


def test_a_header_intake_does_not_keep_cannot_be_tested() -> None:
    """Only the headers intake stores reach the rules: a condition on any other would pass
    the rule file's own tests (which keep every header) and never match in production."""
    errors = errors_of("""\
        rules:
          - name: a
            when: {header: {importance: high, precedence: bulk}}
            category: general
        """)
    assert len(errors) == 1
    assert errors[0].startswith("rules/routing.yaml:3:21: header 'importance' is not kept when "
                                "mail arrives, so this could never match; rules can test: ")
    assert "precedence" in errors[0] and "from-country" in errors[0]
    load("""\
        rules:
          - name: a
            when: {header: {List-Id: true, from-country: US}}
            category: general
        """)


def test_a_regex_that_can_backtrack_for_minutes_is_refused() -> None:
    """(\\w+\\s?)+: took 92 ms on 18 letters of patient text and ~4x more for every two
    more: a message could hang classification. Possessive or atomic forms are fine."""
    errors = errors_of("""\
        rules:
          - name: a
            when: {regex: {body: ['(\\w+\\s?)+:', 'ref[- ]?\\d+', '(?>\\w+\\s?)+:']}}
            category: general
        """)
    assert len(errors) == 1
    assert errors[0].startswith("rules/routing.yaml:3:27: regular expression '(\\w+\\s?)+:' "
                                "repeats something that itself repeats")
