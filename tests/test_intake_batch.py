"""Group commit: messages accepted together share one transaction, and still one failing
message loses no other, a message stored meanwhile by another instance is a duplicate, and
later messages of a group see what earlier ones wrote."""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from handler import store
from handler.app import Service
from handler.inbound import Attachment, Channel, InboundMessage
from handler.models import Enquiry, Event, Message, OutboxItem
from handler.service import AcceptOutcome

BODY = "I would like a second opinion on my knee surgery, the MRI report is attached."


def email(number: int, *, sender: str = "") -> InboundMessage:
    sender = sender or f"patient{number}@example.net"
    return InboundMessage(channel=Channel.EMAIL, external_id=f"m{number}@example.net",
                          sender=sender, subject="Second opinion", text=BODY,
                          envelope_from=sender, mailbox="enquiries@clinic.example")


async def accept_together(service: Service, msgs: list[InboundMessage]) -> list[object]:
    """All queued before the writer runs, so they form one group."""
    return await asyncio.gather(*(service.intake.accept(m) for m in msgs),
                                return_exceptions=True)


def count(service: Service, model: type, *where: object) -> int:
    with Session(service.engine) as session:
        return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


async def test_one_failing_message_loses_no_other(service: Service) -> None:
    def fail_one(session: Session, msg: InboundMessage, now: datetime) -> AcceptOutcome | None:
        if msg.external_id == "m2@example.net":
            store.add_message(session, msg, enquiry=None, contact=None, kind="enquiry", now=now)
            store.record_event(session, "about-to-fail", now)
            raise ValueError("this message breaks something")
        return None

    service.intake.interceptors.append(fail_one)
    results = await accept_together(service, [email(n) for n in range(5)])
    assert isinstance(results[2], ValueError)
    assert all(isinstance(r, AcceptOutcome) and r.kind == "enquiry" and not r.duplicate
               for i, r in enumerate(results) if i != 2)
    assert count(service, Message, Message.direction == "in") == 4
    assert count(service, Enquiry) == 4
    assert count(service, Event, Event.kind == "about-to-fail") == 0
    assert count(service, Event, Event.kind == "enquiry-opened") == 4


async def test_later_messages_of_a_group_see_what_earlier_ones_wrote(service: Service) -> None:
    same = "jane@example.net"
    results = await accept_together(service, [
        email(1, sender=same), email(2, sender=same), email(1, sender=same)])
    first, second, again = results
    assert isinstance(first, AcceptOutcome) and isinstance(second, AcceptOutcome)
    assert first.kind == second.kind == "enquiry" and first.reference != second.reference
    assert isinstance(again, AcceptOutcome) and again.duplicate
    assert again.reference == first.reference
    # one acknowledgement a day: the second enquiry's is suppressed, whatever the grouping
    assert count(service, OutboxItem, OutboxItem.kind == "ack") == 1
    assert count(service, Event, Event.kind == "reply-suppressed") == 1
    with Session(service.engine) as session:
        enquiry = session.scalars(select(Enquiry).where(
            Enquiry.reference == second.reference)).one()
        assert "contact has 1 earlier enquiry" in str(enquiry.decision)


async def test_stored_meanwhile_by_another_instance_is_a_duplicate(service: Service) -> None:
    if service.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time: no other instance can get in between")

    def other_instance(session: Session, msg: InboundMessage,
                       now: datetime) -> AcceptOutcome | None:
        if msg.external_id == "m1@example.net" and not count(service, Message):
            with Session(service.engine) as other, other.begin():
                store.add_message(other, msg, enquiry=None, contact=None, kind="enquiry",
                                  now=now)
        return None

    service.intake.interceptors.append(other_instance)
    results = await accept_together(service, [email(n) for n in range(3)])
    assert isinstance(results[1], AcceptOutcome) and results[1].duplicate
    assert all(isinstance(r, AcceptOutcome) and not r.duplicate for r in results[::2])
    assert count(service, Message, Message.direction == "in") == 3
    assert count(service, Enquiry) == 2


async def test_a_reply_in_the_same_group_joins_the_enquiry_it_answers(service: Service) -> None:
    """The message it answers waits with the group's other rows until the end of the
    transaction: the reply's thread lookup must still find it."""
    same = "jane@example.net"
    reply = InboundMessage(channel=Channel.EMAIL, external_id="m9@example.net", sender=same,
                           subject="Re: Second opinion", text="Forgot to say: scans attached.",
                           envelope_from=same, mailbox="enquiries@clinic.example",
                           in_reply_to="m1@example.net", references=("m1@example.net",))
    first, joined = await accept_together(service, [email(1, sender=same), reply])
    assert isinstance(first, AcceptOutcome) and isinstance(joined, AcceptOutcome)
    assert (first.kind, joined.kind) == ("enquiry", "reply")
    assert joined.reference == first.reference
    assert count(service, Enquiry) == 1
    assert count(service, Message, Message.direction == "in") == 2


def text(number: int, body: str, *, sender: str = "+447700900123") -> InboundMessage:
    return InboundMessage(channel=Channel.SMS, external_id=f"SM{number:032d}", sender=sender,
                          subject="", text=body, mailbox="+447700900000")


async def test_stop_in_the_same_group_cancels_the_texts_queued_before_it(
    service: Service
) -> None:
    """An opt-out must see the acknowledgement its sender's enquiry queued a moment before,
    in the same transaction, and cancel it."""
    results = await accept_together(service, [
        text(1, "Hello, I was diagnosed with prostate cancer, can you review my plan?"),
        text(2, "STOP")])
    assert all(isinstance(r, AcceptOutcome) for r in results), results
    with Session(service.engine) as session:
        texts = session.execute(select(OutboxItem.kind, OutboxItem.status, OutboxItem.recipient)
                                .where(OutboxItem.channel == "sms")).all()
    to_patient = [(kind, status) for kind, status, recipient in texts
                  if recipient == "+447700900123"]
    assert to_patient and all(status == "cancelled" for _, status in to_patient), to_patient


async def test_messages_of_a_group_keep_their_order_when_one_has_attachments(
    service: Service
) -> None:
    """A message with attachments is written at once (they need its id); the messages that
    arrived before it in its group must be written first, or the enquiry's latest message
    (what notifications show) and its history come out in the wrong order."""
    await accept_together(service, [text(1, "STOP")])  # no acknowledgement for this number
    mms = InboundMessage(
        channel=Channel.SMS, external_id=f"MM{3:032d}", sender="+447700900123",
        subject="", text="And here is the scan report.", mailbox="+447700900000",
        attachments=(Attachment(filename="report.pdf", content_type="application/pdf",
                                size=1200, sha256="", url="https://api.twilio.com/media/1"),))
    results = await accept_together(service, [
        text(2, "I was diagnosed with HER2+ breast cancer, can you review my plan?"), mms])
    assert all(isinstance(r, AcceptOutcome) for r in results), results
    with Session(service.engine) as session:
        order = session.scalars(select(Message.external_id).where(
            Message.direction == "in", Message.external_id != text(1, "").external_id)
            .order_by(Message.id)).all()
    assert order == [text(2, "").external_id, mms.external_id]
