"""Intake's cheap paths: prebuilt statements run on the DBAPI cursor store what
`Connection.execute` would have stored (JSON, UTC datetimes, bytes, SQL NULLs), raise the
same SQLAlchemy errors without parameters, one-draw references, and the intake worker
process taking a burst of frames off its socket at once."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from handler import db, store
from handler.app import Service
from handler.config import Settings
from handler.inbound import Channel, InboundMessage
from handler.intake_worker import RemoteIntake
from handler.models import Contact, Enquiry, Event, Message, OutboxItem, Reminder
from handler.service import AcceptOutcome, Intake

NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
LATER = datetime(2100, 1, 1, tzinfo=UTC)
"""Not due while the test runs: the running service's dispatcher would claim it."""


def email(number: int, *, sender: str = "") -> InboundMessage:
    sender = sender or f"patient{number}@example.net"
    return InboundMessage(
        channel=Channel.EMAIL, external_id=f"fast{number}@example.net", sender=sender,
        sender_name="Jane Doe", subject="Knee – second opinion", text="Hello ☃",
        html="<p>Hello</p>", headers={"X-Test": "1"}, raw=b"raw \x00\xff bytes",
        recipients=("enquiries@clinic.example",), defects=("MissingHeaderBodySeparator",),
        envelope_from=sender, mailbox="enquiries@clinic.example")


def test_rows_written_on_the_cursor_read_back_as_written(service: Service) -> None:
    msg = email(1)
    with Session(service.engine) as session, session.begin():
        contact = store.create_contact(session, msg, NOW)
        message_id = store.add_message(session, msg, enquiry=None, contact=contact,
                                       kind="enquiry", now=NOW)
        item = store.enqueue(session, kind="ack", channel=Channel.EMAIL, recipient=msg.sender,
                             template="ack", due_at=LATER, now=NOW,
                             domain="clinic.example", contact=contact,
                             context={"references": ["a", "b"], "n": 1})
        store.record_event(session, "fast-path", NOW, contact=contact, note="é", n=[1, 2])
        known = store.look_up(session, msg, since=NOW - timedelta(days=1), earlier_cap=10)
    assert known.stored_id == message_id and known.contact_id == contact.id
    assert known.contact_named and known.acks == 1 and not known.own_message_id

    with Session(service.engine) as session:
        stored = session.get_one(Message, message_id)
        assert (stored.sender, stored.subject, stored.text, stored.html) == (
            msg.sender, msg.subject, msg.text, msg.html)
        assert stored.recipients == ["enquiries@clinic.example"]
        assert stored.headers == {"X-Test": "1"}
        assert stored.defects == ["MissingHeaderBodySeparator"]
        assert stored.raw == b"raw \x00\xff bytes"
        assert stored.created_at == NOW and stored.created_at.tzinfo is not None
        assert session.get_one(Contact, contact.id).name == "Jane Doe"
        outbox = session.get_one(OutboxItem, item.id)
        assert outbox.context == {"references": ["a", "b"], "n": 1}
        assert outbox.due_at == LATER
        assert (outbox.status, outbox.attempts, outbox.last_error, outbox.urgent) == (
            "pending", 0, "", False)
        # left out of the INSERT: SQL NULL, not the JSON null an explicit None would store
        assert session.execute(text(
            "SELECT rendered IS NULL FROM outbox_item WHERE id = :id"), {"id": item.id}
        ).scalar() in (True, 1)
        event = session.scalars(select(Event).where(Event.kind == "fast-path")).one()
        assert event.detail == {"note": "é", "n": [1, 2]} and event.at == NOW


def test_a_constraint_violation_is_sqlalchemys_integrity_error_without_data(
    service: Service,
) -> None:
    msg = email(2)
    with Session(service.engine) as session, session.begin():
        store.add_message(session, msg, enquiry=None, contact=None, kind="enquiry", now=NOW)
    with Session(service.engine) as session, session.begin():
        with pytest.raises(IntegrityError) as raised:
            store.add_message(session, msg, enquiry=None, contact=None, kind="enquiry",
                              now=NOW)
        session.rollback()
    assert msg.sender not in str(raised.value) and "Hello" not in str(raised.value)


def test_reminders_and_events_deferred_to_the_end_of_the_group(service: Service) -> None:
    from handler.decision import ReminderSpec

    with Session(service.engine) as session, session.begin():
        contact = store.create_contact(session, email(3), NOW)
        enquiry = Enquiry(reference="ENQ-FASTAB", contact_id=contact.id, channel="email",
                          category="general", priority="normal", team="t", rule="r",
                          reply_template=None, notify_template=None, created_at=NOW,
                          updated_at=NOW, last_inbound_at=NOW)
        session.add(enquiry)
        session.flush()
        deferred = store.defer_writes(session)
        store.add_reminders(session, enquiry, [ReminderSpec(
            name="chase", after="2d", template="chase", to="patient", unless="answered")], NOW)
        store.record_event(session, "deferred-one", NOW, enquiry=enquiry)
        assert deferred.events and deferred.reminders
        deferred.write(session)
    with Session(service.engine) as session:
        reminder = session.scalars(select(Reminder)).one()
        assert (reminder.due_at, reminder.cancel_reason, reminder.cancelled_at) == (
            NOW + timedelta(days=2), "", None)
        assert session.scalars(select(Event).where(Event.kind == "deferred-one")).one()


def test_references_are_drawn_from_the_whole_alphabet() -> None:
    refs = [store.new_reference() for _ in range(3000)]
    assert all(store.REFERENCE_RE.fullmatch(r) for r in refs)
    letters = Counter(c for r in refs for c in r[4:])
    assert set(letters) == set(store._REF_ALPHABET)
    # uniform: each letter ~600 times of 18000; far from it means a biased draw
    assert min(letters.values()) > 400 and max(letters.values()) < 800
    # 3,000 draws from 30**6: ~0.006 repeats expected, one in ~160 runs has one; a narrow
    # draw (e.g. one letter's worth of randomness) would repeat hundreds of times
    assert len(refs) - len(set(refs)) <= 3


async def test_intake_submit_answers_through_the_callback(service: Service) -> None:
    outcomes: list[AcceptOutcome | BaseException] = []
    got = asyncio.Event()

    def done(result: AcceptOutcome | BaseException) -> None:
        outcomes.append(result)
        if len(outcomes) == 3:
            got.set()

    for msg in (email(4), email(5), email(4)):
        service.intake.submit(msg, done)
    await asyncio.wait_for(got.wait(), 10)
    first, second, again = outcomes
    assert isinstance(first, AcceptOutcome) and isinstance(second, AcceptOutcome)
    assert isinstance(again, AcceptOutcome) and again.duplicate
    assert again.reference == first.reference


async def test_worker_process_takes_a_burst_of_frames_at_once(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(intake_worker=True)
    await asyncio.to_thread(db.upgrade, settings)
    woken: list[int] = []
    remote = RemoteIntake(settings, local=Intake.__new__(Intake),
                          on_queued=lambda: woken.append(1))
    await remote.start()
    try:
        same = "jane@example.net"
        msgs = [email(n) for n in range(40)] + [
            email(100, sender=same), email(101, sender=same), email(100, sender=same)]
        # all written before the child reads: it takes them off the socket together
        results = await asyncio.gather(*(remote.accept(m) for m in msgs))
        assert all(isinstance(r, AcceptOutcome) for r in results)
        assert len({r.reference for r in results[:40]}) == 40
        first, second, again = results[40:]
        assert first.kind == second.kind == "enquiry" and first.reference != second.reference
        assert again.duplicate and again.reference == first.reference
        assert woken
        # end of file while messages are in flight: they are answered before the child exits
        pending = [asyncio.ensure_future(remote.accept(email(n))) for n in range(200, 210)]
        await asyncio.sleep(0)
    finally:
        await remote.stop()
    assert all(isinstance(p.result(), AcceptOutcome) for p in pending)
    engine = db.make_engine(settings.sqlalchemy_url)
    try:
        with Session(engine) as session:
            inbound = session.scalars(select(Message.external_id)).all()
        assert len(inbound) == len(set(inbound)) == 52
    finally:
        engine.dispose()


async def test_worker_process_wakes_delivery_for_a_commit_nobody_waits_for(
    make_settings: Callable[..., Settings],
) -> None:
    """A caller that gave up (webhook timeout, SMTP client gone) does not stop the child's
    commit; what that commit queued must still wake delivery, not wait for the next poll."""
    settings = make_settings(intake_worker=True)
    await asyncio.to_thread(db.upgrade, settings)
    woken = asyncio.Event()
    remote = RemoteIntake(settings, local=Intake.__new__(Intake), on_queued=woken.set)
    await remote.start()
    try:
        waiting = asyncio.ensure_future(remote.accept(email(1)))
        await asyncio.sleep(0)  # the frame is written
        waiting.cancel()
        await asyncio.wait_for(woken.wait(), 15)
    finally:
        await remote.stop()
    assert waiting.cancelled()
    engine = db.make_engine(settings.sqlalchemy_url)
    try:
        with Session(engine) as session:
            assert session.scalars(select(Message.external_id)).all() == ["fast1@example.net"]
    finally:
        engine.dispose()
