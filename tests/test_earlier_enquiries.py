"""A sender's earlier enquiries are counted only as far as the rules can tell counts apart:
a referrer with thousands of enquiries must not cost a scan of all of them per message,
and no rule may decide differently because of it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session

from handler import store
from handler.app import Service
from handler.classify import classify
from handler.decision import Decision, Facts
from handler.inbound import Channel, InboundMessage
from handler.rules import EARLIER_ENQUIRIES_COUNTED, parse_ruleset

NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
TEAMS = ("teams:\n  - {id: urology, email: urology@clinic.example}\n"
         "  - {id: coordinator, email: coordinator@clinic.example}\n")


def ruleset(rules: str):  # type: ignore[no-untyped-def]
    return parse_ruleset([("test.yaml", TEAMS + "rules:\n" + rules)])


def message(number: int, sender: str = "referrals@hospital.example") -> InboundMessage:
    return InboundMessage(
        channel=Channel.EMAIL, external_id=f"earlier{number}@hospital.example", sender=sender,
        sender_name="", subject="Referral", text="Please see this patient.", html="",
        headers={}, raw=b"", recipients=("enquiries@clinic.example",), defects=(),
        envelope_from=sender, mailbox="enquiries@clinic.example")


def test_the_cap_is_what_the_largest_threshold_needs_however_deep() -> None:
    plain = ruleset("  - name: any\n    when: {text: {any: [referral]}}\n    team: urology\n")
    assert plain.earlier_enquiries_cap == EARLIER_ENQUIRIES_COUNTED
    nested = ruleset(
        "  - name: regular\n"
        "    when: {any: [{earlier_enquiries: {min: 3}},"
        " {not: {all: [{earlier_enquiries: {max: 40}}, {text: {any: [x]}}]}}]}\n"
        "    team: urology\n")
    assert nested.earlier_enquiries_cap == 41


def test_a_capped_count_decides_as_the_full_count_and_says_at_least() -> None:
    rules = ruleset("  - name: regular\n    when: {earlier_enquiries: {min: 12}}\n"
                    "    team: urology\n    category: regular\n")
    cap = rules.earlier_enquiries_cap
    assert cap == 13
    capped = classify(message(0), rules, Facts(earlier_enquiries=cap,
                                               earlier_enquiries_at_least=True), NOW)
    exact = classify(message(0), rules, Facts(earlier_enquiries=5000), NOW)
    assert capped.rule == exact.rule == "regular"
    reasons = [r for hit in capped.trace for r in hit.reasons]
    assert "contact has at least 13 earlier enquiries" in reasons
    below = classify(message(0), rules, Facts(earlier_enquiries=11), NOW)
    assert below.rule == "default"


def test_look_up_counts_up_to_the_cap_only(service: Service) -> None:
    decision = Decision(rule="test", category="general", priority="normal",
                        teams=("urology",), reply_template=None, notify_template=None)
    with Session(service.engine) as session, session.begin():
        contact = store.create_contact(session, message(0), NOW)
        for n in range(12):
            store.create_enquiry(session, message(n), contact, decision, NOW)
    thread = store.Thread(None)
    since = NOW - timedelta(days=1)
    with Session(service.engine) as session:
        for cap, counted, at_least in ((5, 5, True), (12, 12, True), (13, 12, False),
                                       (100, 12, False)):
            known = store.look_up(session, message(99), since=since, earlier_cap=cap)
            assert known.contact_id == contact.id and known.earlier_enquiries == counted
            facts = store.gather_facts(known, thread, earlier_cap=cap)
            assert (facts.earlier_enquiries, facts.earlier_enquiries_at_least) == (
                counted, at_least)


def test_look_up_counts_the_senders_own_enquiries_only(service: Service) -> None:
    """Other contacts' enquiries never count: a returning patient with two enquiries has
    two, however many the clinic holds (the capped count once counted any ten in the table)."""
    decision = Decision(rule="test", category="general", priority="normal",
                        teams=("urology",), reply_template=None, notify_template=None)
    busy, patient, newcomer = ("referrals@hospital.example", "patient@example.org",
                               "newcomer@example.org")
    with Session(service.engine) as session, session.begin():
        referrer = store.create_contact(session, message(0, busy), NOW)
        for n in range(15):
            store.create_enquiry(session, message(n, busy), referrer, decision, NOW)
        returning = store.create_contact(session, message(100, patient), NOW)
        for n in range(2):
            store.create_enquiry(session, message(101 + n, patient), returning, decision, NOW)
        store.create_contact(session, message(200, newcomer), NOW)
    since = NOW - timedelta(days=1)
    with Session(service.engine) as session:
        counts = {sender: store.look_up(session, message(999, sender), since=since,
                                        earlier_cap=10).earlier_enquiries
                  for sender in (busy, patient, newcomer)}
    assert counts == {busy: 10, patient: 2, newcomer: 0}
