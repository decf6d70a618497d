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
from handler.inbound import Channel, InboundMessage
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
