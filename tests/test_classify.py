"""classify(): every condition and action, stacking, the trace, business hours, and the
shortcut that skips rules which cannot match (checked against evaluating every rule)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from textwrap import dedent, indent

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handler.classify import Stack, classify, scan_message
from handler.decision import Decision, Facts, ReminderSpec, RuleHit
from handler.inbound import Attachment, InboundMessage
from handler.rule_cases import make_message
from handler.rules import RuleSet, load_ruleset, parse_ruleset

SHIPPED = Path(__file__).resolve().parent.parent / "rules"
WEDNESDAY_11 = datetime(2026, 11, 25, 11, 0, tzinfo=UTC)

TEAMS = """\
calendars:
  office:
    hours: {mon-fri: "09:00-17:00", sat: "09:00-12:30"}
    holidays: [2026-12-25]
  new-york:
    timezone: America/New_York
    hours: {mon-fri: "09:00-17:00"}
teams:
  - {id: coordinator, email: coordinator@clinic.example, hours: office}
  - {id: breast, email: breast-team@clinic.example}
  - {id: lung, email: lung-team@clinic.example}
  - {id: on-call, email: on-call@clinic.example, sms: "+447700900999"}
"""


def ruleset(routing: str) -> RuleSet:
    return parse_ruleset([("teams.yaml", TEAMS), ("routing.yaml", dedent(routing))])


def email(body: str = "", subject: str = "", **kwargs: object) -> InboundMessage:
    return make_message(subject=subject, body=body, **kwargs)  # type: ignore[arg-type]


def sms(body: str, sender: str = "+447700900123") -> InboundMessage:
    return make_message(channel="sms", sender=sender, body=body)


def check(
    when: str, msg: InboundMessage, facts: Facts | None = None, now: datetime = WEDNESDAY_11
) -> tuple[bool, tuple[str, ...]]:
    """Whether a one-rule set with this `when:` (YAML) matches, and the reasons why."""
    rs = ruleset(f"rules:\n  - name: r\n    when:\n{indent(dedent(when), '      ')}"
                 "    team: breast\n")
    decision = classify(msg, rs, facts or Facts(), now)
    [hit] = decision.trace
    assert hit.rule == "r"
    assert (decision.rule == "r") == hit.matched
    return hit.matched, hit.reasons


# --- conditions ------------------------------------------------------------------------------

def test_channel() -> None:
    assert check("channel: sms\n", sms("hi")) == (True, ("channel is sms",))
    assert check("channel: sms\n", email("hi")) == (False, ("channel is email, rule wants sms",))
    assert check("channel: [email, sms]\n", email("hi"))[0]


def test_from_address() -> None:
    assert check("from: Jane@Example.com\n", email(sender="jane@example.com"))[0]
    assert check("from: ['+447700900123']\n", sms("hi"))[0]
    assert check("from: jane@example.com\n", email(sender="john@example.com")) == (
        False, ("sender is not one of the addresses listed in 'from'",))


def test_from_domain_matches_the_domain_and_below_it_only() -> None:
    when = "from_domain: [bupa.com, '@axa.co.uk']\n"
    assert check(when, email(sender="claims@bupa.com")) == (
        True, ("sender domain bupa.com is bupa.com or below it",))
    assert check(when, email(sender="x@mail.bupa.com"))[0]
    assert check(when, email(sender="x@axa.co.uk"))[0]
    assert check(when, email(sender="x@notbupa.com")) == (
        False, ("sender domain notbupa.com is not 'bupa.com', 'axa.co.uk'",))
    assert check(when, sms("hi")) == (
        False, ("sender is not an email address, rule wants a domain",))


def test_from_phone_prefix() -> None:
    when = "from_phone_prefix: ['+447', '+353']\n"
    assert check(when, sms("hi", "+447700900123")) == (True, ("sender number starts with +447",))
    assert check(when, sms("hi", "+12025550123")) == (
        False, ("sender number starts with none of '+447', '+353'",))
    assert check(when, email("hi"))[0] is False


def test_mailbox_matches_our_address_or_any_recipient() -> None:
    when = "mailbox: Press@Clinic.example\n"
    assert check(when, email(mailbox="press@clinic.example")) == (
        True, ("sent to press@clinic.example",))
    assert not check(when, email(mailbox="enquiries@clinic.example"))[0]
    msg = replace(email(mailbox="enquiries@clinic.example"),
                  recipients=("enquiries@clinic.example", "press@clinic.example"))
    assert check(when, msg)[0]


def test_words_any_reports_every_phrase_found_and_where() -> None:
    when = "text: [mastectomy, HER2, lumpectomy]\n"
    ok, reasons = check(when, email("Offered a mastectomy or a lumpectomy.", subject="HER2+"))
    assert ok
    assert reasons == ("subject contains 'HER2'", "body contains 'mastectomy', 'lumpectomy'")
    assert check(when, email("nothing here")) == (
        False, ("text contains none of 'mastectomy', 'HER2', 'lumpectomy'",))


def test_words_list_long_lists_are_shortened_in_the_trace() -> None:
    assert check("body: [a1, a2, a3, a4, a5, a6]\n", email("zzz")) == (
        False, ("body contains none of 'a1', 'a2', 'a3', 'a4' (+2 more)",))


def test_subject_and_body_are_separate_fields() -> None:
    msg = email("my lung results", subject="Question")
    assert check("subject: [lung]\n", msg)[0] is False
    assert check("body: [lung]\n", msg)[0] is True
    assert check("text: [lung]\n", msg)[0] is True
    assert check("subject: [question]\n", msg)[0] is True


def test_words_all() -> None:
    when = "text: {all: [severe headache, confused]}\n"
    assert check(when, email("A severe headache and he is confused.")) == (
        True, ("text contains all of 'severe headache', 'confused'",))
    assert check(when, email("A severe headache.")) == (False, ("text lacks 'confused'",))
    assert check(when, email("fine")) == (
        False, ("text lacks 'severe headache', 'confused'",))


def test_words_any_and_all_together() -> None:
    when = "body: {any: [fever, temperature], all: [chemo, cycle]}\n"
    assert check(when, email("fever during my third cycle of chemo"))[0]
    assert not check(when, email("fever during chemo"))[0]


@pytest.mark.parametrize("body", [
    "I CAN'T BREATHE", "i cant breathe", "I cannot breathe", "I can not breathe",
    "I can\u2019t breathe", "I can't\r\nbreathe", "I can't... breathe!", "I can't  \t breathe",
])
def test_words_are_case_apostrophe_punctuation_and_line_break_tolerant(body: str) -> None:
    assert check("body: [can't breathe]\n", email(body))[0]


@pytest.mark.parametrize(("phrase", "body", "matched"), [
    ("lung", "my lungs", False),            # whole words: plurals must be listed
    ("lung", "lung-cancer", True),           # hyphens are spaces
    ("psa", "psalm 23", False),
    ("her2", "HER2-positive", True),
    ("self harm", "self-harm", True),
    ("leukaemia", "LEUKAEMIA", True),
    ("leucemie", "leucémie", True),           # accents are ignored
    ("chest pain", "chest\npain", True),
    ("ca125", "CA-125", False),               # list both spellings
    ("38", "temperature of 38.4", True),
])
def test_whole_words(phrase: str, body: str, matched: bool) -> None:
    assert check(f"body: ['{phrase}']\n", email(body))[0] is matched


def test_negated_phrase_does_not_count_and_the_trace_says_so() -> None:
    assert check("body: [chest pain]\n", email("I have no chest pain at all")) == (
        False, ("body contains none of 'chest pain'",
                "'chest pain' appears only after 'no' (negated, not counted)"))
    assert not check("body: [suicidal]\n", email("I am not suicidal"))[0]
    # "without" does not negate: "can't climb the stairs without chest pain" is a symptom
    assert check("body: [chest pain]\n", email("can't climb the stairs without chest pain"))[0]


@pytest.mark.parametrize("body", [
    "Are you open? No. Chest pain started an hour ago.",   # punctuation ends the negation
    "No, chest pain since this morning",
    "Any symptoms? No\nchest pain is new",                  # so does a line break
    "Any better? No - chest pain is worse",                  # and a dash between words
    "Any better? No \u2014 chest pain is worse",
    "Any better? No | chest pain is worse",
    "no chest pain yesterday but chest pain today",          # one plain mention is enough
    "I do not have chest pain... actually I do have chest pain",
    "I don't know, the chest pain is bad",
])
def test_negation_never_hides_a_plain_mention(body: str) -> None:
    assert check("body: [chest pain]\n", email(body))[0]


def test_regex() -> None:
    assert check("regex: {body: 'T[0-4]N[0-3]M[01]'}\n", email("staged t2n0m0")) == (
        True, ("body matches /T[0-4]N[0-3]M[01]/",))
    assert check("regex: {subject: '^re:', from: '@nhs\\.net$'}\n",
                 email("x", subject="Re: hi", sender="gp@nhs.net"))[0]
    assert check("regex: {text: ['^x$', 'ENQ-\\d+']}\n", email("about enq-123")) == (
        True, ("text matches /ENQ-\\d+/",))
    assert check("regex: {body: '^help$'}\n", email("no help")) == (
        False, ("body does not match /^help$/",))


def test_attachments() -> None:
    pdf = Attachment("Scan Report.PDF", "application/pdf", 2000, "")
    dicom = Attachment("img.dcm", "application/octet-stream", 9000, "")
    photo = Attachment("mole.jpg", "image/jpeg", 3000, "")
    assert check("has_attachment: true\n", email("x", attachments=(pdf,))) == (
        True, ("message has 1 attachment",))
    assert check("has_attachment: true\n", email("x")) == (
        False, ("message has 0 attachments, rule wants some",))
    assert check("has_attachment: false\n", email("x"))[0]
    assert check("attachment_type: application/pdf\n", email("x", attachments=(pdf,))) == (
        True, ("an attachment is application/pdf (wanted application/pdf)",))
    assert check("attachment_type: [image/*]\n", email("x", attachments=(pdf, photo)))[0]
    assert check("attachment_type: [.dcm]\n", email("x", attachments=(dicom,)))[0]
    assert check("attachment_type: [.pdf]\n", email("x", attachments=(pdf,)))[0]
    assert check("attachment_type: [image/*, .dcm]\n", email("x", attachments=(pdf,))) == (
        False, ("no attachment is 'image/*', '.dcm'",))


def test_new_enquiry_or_reply() -> None:
    assert check("is_reply: true\n", email("x"), Facts(is_reply=True)) == (
        True, ("message is a reply in an existing thread",))
    assert check("is_reply: true\n", email("x")) == (
        False, ("message is a new enquiry, rule wants a reply",))
    assert check("is_reply: false\n", email("x")) == (True, ("message is a new enquiry",))


def test_earlier_enquiries() -> None:
    assert check("earlier_enquiries: {min: 1}\n", email("x"), Facts(earlier_enquiries=2)) == (
        True, ("contact has 2 earlier enquiries",))
    assert check("earlier_enquiries: {min: 1}\n", email("x")) == (
        False, ("contact has 0 earlier enquiries, rule wants at least 1",))
    assert check("earlier_enquiries: 0\n", email("x"))[0]
    assert check("earlier_enquiries: {min: 1, max: 3}\n", email("x"),
                 Facts(earlier_enquiries=4)) == (
        False, ("contact has 4 earlier enquiries, rule wants at least 1 and at most 3",))
    assert check("earlier_enquiries: 1\n", email("x"), Facts(earlier_enquiries=1)) == (
        True, ("contact has 1 earlier enquiry",))


def test_headers_present_absent_or_equal() -> None:
    msg = email("x", headers={"Precedence": "Bulk", "List-Unsubscribe": "<mailto:u@x>"})
    assert check("header: {list-unsubscribe: true}\n", msg) == (
        True, ("header list-unsubscribe is present",))
    assert check("header: {x-spam-flag: false}\n", msg) == (
        True, ("header x-spam-flag is absent",))
    assert check("header: {Precedence: [bulk, junk]}\n", msg) == (
        True, ("header precedence is 'bulk'",))
    assert check("header: {precedence: list}\n", msg) == (
        False, ("header precedence is 'bulk', rule wants 'list'",))
    assert check("header: {x-mailer: outlook}\n", msg) == (False, ("header x-mailer is absent",))


@pytest.mark.parametrize(("now", "inside"), [
    (datetime(2026, 11, 25, 9, 0, tzinfo=UTC), True),     # Wed 09:00 GMT
    (datetime(2026, 11, 25, 8, 59, tzinfo=UTC), False),
    (datetime(2026, 11, 25, 17, 0, tzinfo=UTC), False),   # closing time is exclusive
    (datetime(2026, 11, 28, 12, 0, tzinfo=UTC), True),    # Saturday morning
    (datetime(2026, 11, 28, 12, 30, tzinfo=UTC), False),
    (datetime(2026, 11, 29, 11, 0, tzinfo=UTC), False),   # Sunday
    (datetime(2026, 12, 25, 11, 0, tzinfo=UTC), False),   # holiday (a Friday)
    (datetime(2026, 7, 1, 8, 30, tzinfo=UTC), True),      # 09:30 BST
    (datetime(2026, 7, 1, 16, 30, tzinfo=UTC), False),    # 17:30 BST
])
def test_business_hours_of_a_team_in_london_time(now: datetime, inside: bool) -> None:
    assert check("in_business_hours: coordinator\n", email("x"), now=now)[0] is inside
    assert check("outside_business_hours: coordinator\n", email("x"), now=now)[0] is not inside


def test_business_hours_trace_and_calendar_by_name() -> None:
    now = datetime(2026, 11, 25, 18, 40, tzinfo=UTC)
    assert check("outside_business_hours: coordinator\n", email("x"), now=now) == (
        True, ("Wed 18:40 Europe/London is outside the hours of team coordinator",))
    # 14:00 in London is 09:00 in New York
    assert check("in_business_hours: new-york\n", email("x"),
                 now=datetime(2026, 11, 25, 14, 0, tzinfo=UTC)) == (
        True, ("Wed 09:00 America/New_York is inside the hours of calendar new-york",))
    assert check("in_business_hours: coordinator\n", email("x"),
                 now=datetime(2026, 12, 25, 11, 0, tzinfo=UTC)) == (
        False, ("Fri 11:00 Europe/London (holiday) is outside the hours of team coordinator",))


def test_all_any_not() -> None:
    when = """\
        any:
          - all:
              - channel: sms
              - text: [call me]
          - not: {text: [breast, lung]}
        """
    assert check(when, sms("please call me")) == (
        True, ("channel is sms", "body contains 'call me'"))
    assert check(when, email("weather")) == (
        True, ("not [text contains none of 'breast', 'lung']",))
    assert check(when, email("please call me about my breast")) == (
        False, ("channel is email, rule wants sms", "not [body contains 'breast']"))


def test_several_conditions_in_one_mapping_must_all_hold() -> None:
    when = "text: [breast]\nhas_attachment: true\n"
    assert check(when, email("breast")) == (
        False, ("body contains 'breast'", "message has 0 attachments, rule wants some"))


def test_channel_is_checked_first_whatever_the_written_order() -> None:
    assert check("text: [breast]\nchannel: sms\n", email("breast")) == (
        False, ("channel is email, rule wants sms",))


def test_no_when_matches_everything() -> None:
    assert check("{}\n", email("x")) == (True, ("no conditions: matches every message",))


# --- actions, first match and stacking ------------------------------------------------------

def test_actions_are_recorded_in_the_decision() -> None:
    rs = ruleset("""\
        rules:
          - name: breast
            when: {text: [breast]}
            category: second-opinion
            priority: high
            team: [breast, coordinator]
            tags: [site-breast, new]
            reply: ack-breast
            notify: notify-team
            reminders:
              - {name: team-unanswered, after: 1d, template: reminder-team-unanswered}
              - {name: documents, after: 3d, template: reminder-patient-documents, to: patient}
        """)
    d = classify(email("breast lump"), rs, Facts(), WEDNESDAY_11)
    assert d == Decision(
        rule="breast", category="second-opinion", priority="high",
        teams=("breast", "coordinator"), reply_template="ack-breast",
        notify_template="notify-team", tags=("site-breast", "new"),
        reminders=(
            ReminderSpec("team-unanswered", "1d", "reminder-team-unanswered", "team", "answered"),
            ReminderSpec("documents", "3d", "reminder-patient-documents", "patient",
                         "patient-replied"),
        ),
        trace=(RuleHit("breast", True, ("body contains 'breast'",)),),
        ruleset_version=rs.version,
    )
    assert d.team == "breast"
    assert d.to_json()["trace"] == (
        {"rule": "breast", "matched": True, "reasons": ("body contains 'breast'",)},
    )


def test_reply_and_notify_none() -> None:
    rs = ruleset("""\
        rules:
          - name: spam
            when: {text: [seo services]}
            reply: none
            notify: ~
        """)
    d = classify(email("cheap SEO services"), rs, Facts(), WEDNESDAY_11)
    assert d.reply_template is None and d.notify_template is None


def test_defaults_apply_when_nothing_matches() -> None:
    rs = ruleset("""\
        defaults: {category: general, priority: low, team: coordinator, reply: ack-general,
                   notify: notify-team,
                   reminders: [{name: chase, after: 2d, template: reminder-team-unanswered}]}
        rules:
          - name: breast
            when: {text: [breast]}
            team: breast
        """)
    d = classify(email("parking?"), rs, Facts(), WEDNESDAY_11)
    assert (d.rule, d.category, d.priority, d.teams, d.reply_template, d.notify_template) == (
        "default", "general", "low", ("coordinator",), "ack-general", "notify-team")
    assert [r.name for r in d.reminders] == ["chase"]
    assert d.trace == (RuleHit("breast", False, ("text contains none of 'breast'",)),)
    # a matching rule that sets only the team takes the other fields from the defaults
    d = classify(email("breast"), rs, Facts(), WEDNESDAY_11)
    assert (d.rule, d.teams, d.priority, d.reply_template) == (
        "breast", ("breast",), "low", "ack-general")
    assert [r.name for r in d.reminders] == ["chase"]


FIRST_MATCH = """\
    rules:
      - name: urgent
        when: {text: [chest pain]}
        team: on-call
        priority: urgent
        reply: safety-net
      - name: lung
        when: {text: [lung]}
        team: lung
        reply: ack-lung
      - name: everything
        team: coordinator
    """


def test_first_match_wins_and_later_rules_are_not_considered() -> None:
    rs = ruleset(FIRST_MATCH)
    d = classify(email("lung cancer and chest pain"), rs, Facts(), WEDNESDAY_11)
    assert d.rule == "urgent" and d.teams == ("on-call",) and d.reply_template == "safety-net"
    assert [h.rule for h in d.trace] == ["urgent"]
    d = classify(email("lung cancer"), rs, Facts(), WEDNESDAY_11)
    assert d.rule == "lung"
    assert [(h.rule, h.matched) for h in d.trace] == [("urgent", False), ("lung", True)]
    d = classify(email("hello"), rs, Facts(), WEDNESDAY_11)
    assert d.rule == "everything"
    assert [h.matched for h in d.trace] == [False, False, True]


def test_continue_stacks_teams_tags_reminders_and_fills_unset_fields() -> None:
    rs = ruleset("""\
        rules:
          - name: tag-sms
            when: {channel: sms}
            tags: [sms]
            priority: low
            continue: true
          - name: insured
            when: {text: [bupa]}
            tags: [insured, sms]
            team: coordinator
            category: insured-patient
            reminders: [{name: chase, after: 1d, template: reminder-team-unanswered}]
            continue: true
          - name: lung
            when: {text: [lung]}
            team: lung
            category: second-opinion
            priority: high
            reply: ack-lung
            reminders:
              - {name: chase, after: 4h, template: reminder-team-unanswered}
              - {name: docs, after: 3d, template: reminder-patient-documents, to: patient}
          - name: never-reached
            when: {text: [lung]}
            team: breast
        """)
    d = classify(sms("bupa member with lung cancer"), rs, Facts(), WEDNESDAY_11)
    assert d.rule == "lung"                         # the last rule that matched
    assert d.teams == ("coordinator", "lung")       # added up in rule order
    assert d.team == "coordinator"
    assert d.tags == ("sms", "insured")             # duplicates dropped
    assert d.category == "insured-patient"          # first rule to set it wins
    assert d.priority == "high"                     # the most urgent any rule set
    assert d.reply_template == "ack-lung"           # set by the only rule that sets it
    assert [(r.name, r.after) for r in d.reminders] == [("chase", "1d"), ("docs", "3d")]
    assert [h.rule for h in d.trace] == ["tag-sms", "insured", "lung"]


def test_only_continuing_rules_matched_then_defaults_fill_in() -> None:
    rs = ruleset("""\
        rules:
          - name: tag-sms
            when: {channel: sms}
            tags: [sms]
            reply: none
            continue: true
          - name: lung
            when: {text: [lung]}
            team: lung
        """)
    d = classify(sms("hello"), rs, Facts(), WEDNESDAY_11)
    assert (d.rule, d.tags, d.teams, d.reply_template, d.category) == (
        "tag-sms", ("sms",), ("coordinator",), None, "general")


def test_stack_priority_never_drops() -> None:
    stack = Stack()
    rs = ruleset("rules: []\n")
    for priority in ("normal", "urgent", "low"):
        stack.add(replace(rs.defaults, priority=priority, sets=frozenset({"priority"})))
    assert stack.decide(rs.defaults, "x", [], "v").priority == "urgent"


def test_classify_is_pure() -> None:
    rs = ruleset(FIRST_MATCH)
    msg, facts = email("lung and chest pain"), Facts()
    assert classify(msg, rs, facts, WEDNESDAY_11) == classify(msg, rs, facts, WEDNESDAY_11)
    assert msg == email("lung and chest pain")


# --- the shortcut gives exactly what evaluating every rule gives ------------------------------

def classify_slowly(msg: InboundMessage, rs: RuleSet, facts: Facts, now: datetime) -> Decision:
    """The reference: evaluate every rule in order, no skipping."""
    view = scan_message(msg, rs, facts, now)
    stack, trace, decided = Stack(), [], "default"
    for rule in rs.rules:
        matched, reasons = rule.condition.evaluate(view)
        trace.append(RuleHit(rule.name, matched, reasons))
        if matched:
            stack.add(rule.actions)
            decided = rule.name
            if rule.stop:
                break
    return stack.decide(rs.defaults, decided, trace, rs.version)


def _vocabulary(rs: RuleSet) -> list[str]:
    words = ["no", "not", "without", "can't", "the", "my", ".", ",", "\n", "cancer", "hello"]
    for test in rs.tests:
        words += test.message.text.split()[:12]
    return words


def test_shortcut_equals_full_evaluation_on_the_shipped_examples() -> None:
    rs = load_ruleset(SHIPPED)
    for test in rs.tests:
        fast = classify(test.message, rs, test.facts, test.now)
        assert fast == classify_slowly(test.message, rs, test.facts, test.now), test.name


def test_shortcut_equals_full_evaluation_on_random_messages() -> None:
    rs = load_ruleset(SHIPPED)
    vocabulary = _vocabulary(rs)
    texts = st.lists(st.sampled_from(vocabulary), max_size=25).map(" ".join)

    @settings(max_examples=300, deadline=None)
    @given(subject=texts, body=texts, channel=st.sampled_from(["email", "sms"]),
           is_reply=st.booleans(), earlier=st.integers(0, 2), hour=st.integers(0, 23))
    def same(subject: str, body: str, channel: str, is_reply: bool, earlier: int,
             hour: int) -> None:
        msg = make_message(channel=channel, subject="" if channel == "sms" else subject,
                           body=body)
        facts = Facts(is_reply=is_reply, earlier_enquiries=earlier)
        now = WEDNESDAY_11.replace(hour=hour)
        assert classify(msg, rs, facts, now) == classify_slowly(msg, rs, facts, now)

    same()


def test_rules_whose_words_are_absent_are_skipped_without_evaluation() -> None:
    rs = ruleset(FIRST_MATCH)
    lung = rs.rules[1]
    assert lung.gate is not None
    plan = rs.plans["email"]
    assert plan.misses[1] == RuleHit("lung", False, ("text contains none of 'lung'",))
    assert 2 in plan.always  # the catch-all has no words to skip it by


def test_decision_json_matches_asdict() -> None:
    import dataclasses

    from handler.decision import Decision, ReminderSpec, RuleHit

    decision = Decision(
        rule="breast", category="breast", priority="normal", teams=("breast", "on-call"),
        reply_template="ack-breast", notify_template=None, tags=("insured",),
        reminders=(ReminderSpec("team-unanswered", "1d", "reminder-team-unanswered"),),
        trace=(RuleHit("red-flag", False, ("no red-flag wording",)),
               RuleHit("breast", True, ("body contains 'her2'",))),
        ruleset_version="abc")
    assert decision.to_json() == dataclasses.asdict(decision)


def test_a_reply_is_not_judged_by_the_lines_it_quotes() -> None:
    """A patient answering "thanks" under our own safety advice ("> if you get chest pain,
    call 999") must not page on-call again; a new message quoting a letter still counts."""
    quoted = "Thanks, that is helpful.\n\n> If you get chest pain, call 999.\n"
    reply = replace(email(quoted), in_reply_to="ack-1@clinic.example")
    assert not check("body: [chest pain]\n", reply)[0]
    assert check("body: [chest pain]\n", email(quoted))[0]  # not a reply: scanned whole
    fresh = replace(email("Chest pain again tonight.\n> earlier: fine\n"),
                    in_reply_to="ack-1@clinic.example")
    assert check("body: [chest pain]\n", fresh)[0]  # the reply's own words still count
