"""Bounces: recognised, matched to our outbox row, never an enquiry or a reply; a hard
bounce stops mail to the address until the person writes in again."""

from __future__ import annotations

from datetime import timedelta

import aiosmtplib
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from handler.app import Service
from handler.bounces import is_bounce, read_report
from handler.clock import FakeClock
from handler.db import make_sessionmaker
from handler.models import Contact, Enquiry, Event, Message, OutboxItem
from handler.parse_email import parse_email
from handler.store import enqueue
from tests.builders import (
    _message,
    _multipart,
    _text_part,
    auto_reply_email,
    bounce_email,
    plain_email,
)
from tests.conftest import CLINIC, Sink, eventually

PATIENT = "jane@example.com"
DOMAIN = "clinic.example"
OURS = "0123456789abcdef0123456789abcdef@clinic.example"


def original(message_id: str = OURS, to: str = PATIENT) -> bytes:
    return plain_email("Thank you for your enquiry.", sender=CLINIC, to=to,
                       subject="Your enquiry [ENQ-ABCDEF]", message_id=f"<{message_id}>")


def dsn(status: str = "5.1.1", action: str = "failed", *, returned: bytes | None = None,
        headers_only: bool = False, recipient: str = PATIENT,
        diagnostic: str = "smtp; 550 5.1.1 <jane@example.com>: Recipient address rejected"
        ) -> bytes:
    """A DSN the way Postfix writes one (RFC 3464), with the returned message or headers."""
    fields = (f"Reporting-MTA: dns; mx.example.com\r\nArrival-Date: Mon, 6 May 2024 09:30:00 "
              f"+0100\r\n\r\nFinal-Recipient: rfc822; {recipient}\r\n"
              f"Original-Recipient: rfc822;{recipient}\r\nAction: {action}\r\n"
              f"Status: {status}\r\nDiagnostic-Code: {diagnostic}\r\n").encode()
    body = returned if returned is not None else original()
    last = (b"Content-Type: text/rfc822-headers\r\n\r\n" + body.split(b"\r\n\r\n")[0] + b"\r\n"
            if headers_only else b"Content-Type: message/rfc822\r\n\r\n" + body)
    report = _multipart("report", [
        _text_part("plain", "This is the mail system at host mx.example.com.", "us-ascii",
                   "7bit"),
        b"Content-Type: message/delivery-status\r\n\r\n" + fields, last,
    ], params='; report-type="delivery-status"')
    return _message(report, sender="MAILER-DAEMON@mx.example.com",
                    subject="Undelivered Mail Returned to Sender")


def parsed(raw: bytes, envelope_from: str | None = "") -> object:
    return parse_email(raw, envelope_from=envelope_from, envelope_rcpts=[CLINIC])


# --- recognising and reading bounces ----------------------------------------------------------

def test_dsns_and_old_style_bounces_are_recognised() -> None:
    assert is_bounce(parsed(dsn()))
    assert is_bounce(parsed(bounce_email(original())))
    # Exchange NDRs may lack Auto-Submitted and come from a named sender: the type decides
    assert is_bounce(parsed(dsn(), envelope_from="postmaster@mx.example.com"))
    exim = plain_email("This message was created automatically by mail delivery software.\n"
                       "A message that you sent could not be delivered to one or more of its "
                       "recipients. This is a permanent error.\n\n  jane@example.com\n"
                       "    SMTP error from remote mail server after RCPT TO:<jane@example.com>:"
                       "\n    550 5.1.1 User unknown\n",
                       sender="Mail Delivery System <Mailer-Daemon@mx.example.com>",
                       subject="Mail delivery failed: returning message to sender",
                       headers=[("X-Failed-Recipients", PATIENT)])
    assert is_bounce(parsed(exim))


def test_people_and_out_of_office_replies_are_not_bounces() -> None:
    assert not is_bounce(parsed(plain_email(), envelope_from="jane.patient@example.com"))
    assert not is_bounce(parsed(auto_reply_email(), envelope_from=""))
    # a patient whose subject happens to sound like one, from their own address
    assert not is_bounce(parsed(plain_email(subject="Undeliverable results from my GP"),
                                envelope_from="jane.patient@example.com"))


def test_read_report_takes_status_diagnostic_and_our_message_id() -> None:
    report = read_report(dsn(), our_domain=DOMAIN)
    assert (report.action, report.status, report.hard) == ("failed", "5.1.1", True)
    assert "Recipient address rejected" in report.diagnostic
    assert report.final_recipient == PATIENT
    assert report.message_ids[0] == OURS
    headers_only = read_report(dsn(headers_only=True), our_domain=DOMAIN)
    assert headers_only.message_ids[0] == OURS


def test_read_report_delayed_and_soft() -> None:
    delayed = read_report(dsn("4.4.7", "delayed", diagnostic="smtp; 451 try later"),
                          our_domain=DOMAIN)
    assert (delayed.action, delayed.status, delayed.hard, delayed.failed) == (
        "delayed", "4.4.7", False, False)
    full = read_report(dsn("4.2.2", diagnostic="smtp; 452 4.2.2 Mailbox full"),
                       our_domain=DOMAIN)
    assert full.failed and not full.hard


def test_read_report_old_style_bounce_finds_the_id_and_code_in_the_text() -> None:
    text = ("I'm sorry to have to inform you that your message could not be delivered.\n"
            "<jane@example.com>: host mx.example.com said: 550 5.7.1 Rejected\n\n"
            "--- Below this line is a copy of the message.\n\n"
            f"Message-ID: <{OURS}>\nSubject: Your enquiry\n")
    raw = plain_email(text, sender="MAILER-DAEMON@mx.example.com", subject="failure notice")
    report = read_report(raw, our_domain=DOMAIN)
    assert report.message_ids == (OURS,)
    assert (report.status, report.hard) == ("5.7.1", True)


def test_read_report_never_raises() -> None:
    for junk in (b"", b"\xff\xfe" * 100, b"Content-Type: multipart/report\r\n\r\n--x--"):
        assert read_report(junk, our_domain=DOMAIN).message_ids == ()


# --- through the real listener ----------------------------------------------------------------

def db(service: Service, *, write: bool = False) -> Session:
    """A session on the service's database; `write=True` takes SQLite's write lock up front
    (a read transaction that later writes fails at once if the service wrote in between)."""
    return make_sessionmaker(service.engine, write=write)()


async def send_raw(service: Service, raw: bytes, envelope_from: str) -> str:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=service.smtp_port) as client:
        _, response = await client.sendmail(envelope_from, [CLINIC], raw)
    return response


async def enquire(service: Service, sink: Sink) -> tuple[str, bytes, OutboxItem]:
    """A patient writes; returns the reference, our acknowledgement as sent, and its row."""
    response = await send_raw(service, plain_email(sender=f"Jane <{PATIENT}>"), PATIENT)
    reference = response.rsplit(" ", 1)[1]
    await sink.wait_for(2)
    envelope = next(env for env, _ in sink.messages if PATIENT in env.rcpt_tos)
    with db(service) as session:
        ack = session.scalars(select(OutboxItem).where(OutboxItem.kind == "ack")).one()
    return reference, envelope.original_content or b"", ack


def status(service: Service, outbox_id: int) -> str:
    with db(service) as session:  # closed at once: an open read blocks DROP SCHEMA on PG
        return session.get(OutboxItem, outbox_id).status


def count(service: Service, model: type) -> int:
    with db(service) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


async def test_hard_bounce_marks_the_row_failed_and_suppresses_the_address(
    service: Service, sink: Sink
) -> None:
    reference, sent, ack = await enquire(service, sink)
    await eventually(lambda: status(service, ack.id) == "sent")
    enquiries, outbox = count(service, Enquiry), count(service, OutboxItem)

    response = await send_raw(service, dsn(returned=sent), "")
    assert response.endswith(reference)  # accepted, and filed on the enquiry

    with db(service) as session:
        row = session.get(OutboxItem, ack.id)
        assert (row.status, row.delivery_status, row.error_code) == ("failed", "bounced",
                                                                     "5.1.1")
        assert "5.1.1" in row.last_error and "Recipient address rejected" in row.last_error
        bounce = session.scalars(select(Message).where(Message.kind == "bounce")).one()
        assert bounce.enquiry.reference == reference and bounce.contact_id is None
        contact = session.scalars(select(Contact).where(Contact.email == PATIENT)).one()
        assert contact.email_suppressed_at is not None
        assert "5.1.1" in contact.email_suppressed_reason
        kinds = set(session.scalars(select(Event.kind)))
        assert {"delivery-bounced", "email-suppressed"} <= kinds
    assert count(service, Enquiry) == enquiries  # no enquiry ...
    assert count(service, OutboxItem) == outbox  # ... and no reply, no notification


async def test_mail_to_a_suppressed_address_is_cancelled_until_they_write_in(
    service: Service, sink: Sink, clock: FakeClock
) -> None:
    _, sent, _ = await enquire(service, sink)
    with db(service, write=True) as session, session.begin():  # something queued for later
        enquiry = session.scalars(select(Enquiry)).one()
        later = enqueue(session, kind="reminder", channel="email", recipient=PATIENT,
                        template="reminder-patient-documents", due_at=clock.now()
                        + timedelta(days=3), now=clock.now(), domain=DOMAIN, enquiry=enquiry)
        session.flush()
        later_id = later.id
    await send_raw(service, dsn(returned=sent), "")
    with db(service) as session:
        row = session.get(OutboxItem, later_id)
        assert (row.status, row.cancel_reason) == (
            "cancelled", "address suppressed after a hard bounce")

    # queued after the bounce (e.g. by another instance): the dispatcher drops it at claim
    with db(service, write=True) as session, session.begin():
        enquiry = session.scalars(select(Enquiry)).one()
        late_id = enqueue(session, kind="reminder", channel="email", recipient=PATIENT,
                          template="reminder-patient-documents", due_at=clock.now(),
                          now=clock.now(), domain=DOMAIN, enquiry=enquiry)
        session.flush()
        late_id = late_id.id
    service.ticker.wake()
    await eventually(lambda: status(service, late_id) == "cancelled")
    assert len(sink.to(PATIENT)) == 1

    # the patient writes in again: the address works again and they are answered
    clock.advance(timedelta(minutes=5))
    await send_raw(service, plain_email(sender=PATIENT, subject="My new address works"),
                   PATIENT)
    await sink.wait_for(len(sink.messages) + 1)
    await eventually(lambda: len(sink.to(PATIENT)) == 2)
    with db(service) as session:
        contact = session.scalars(select(Contact).where(Contact.email == PATIENT)).one()
        assert contact.email_suppressed_at is None
        assert "email-unsuppressed" in set(session.scalars(select(Event.kind)))


async def test_a_delay_notice_is_recorded_but_changes_nothing(
    service: Service, sink: Sink
) -> None:
    _, sent, ack = await enquire(service, sink)
    await eventually(lambda: status(service, ack.id) == "sent")
    await send_raw(service, dsn("4.4.7", "delayed", returned=sent), "")
    with db(service) as session:
        row = session.get(OutboxItem, ack.id)
        assert (row.status, row.delivery_status) == ("sent", "delayed")
        contact = session.scalars(select(Contact).where(Contact.email == PATIENT)).one()
        assert contact.email_suppressed_at is None


async def test_a_bounced_staff_notification_fails_without_suppressing_anyone(
    service: Service, sink: Sink
) -> None:
    await enquire(service, sink)
    team = "breast-team@clinic.example"
    envelope = next(env for env, _ in sink.messages if team in env.rcpt_tos)
    await send_raw(service, dsn(returned=envelope.original_content, recipient=team), "")
    with db(service) as session:
        notify = session.scalars(select(OutboxItem).where(OutboxItem.kind == "notify")).one()
        assert notify.status == "failed" and notify.error_code == "5.1.1"
        assert all(c.email_suppressed_at is None for c in session.scalars(select(Contact)))


async def test_unmatched_or_forged_bounces_are_stored_and_do_nothing(
    service: Service, sink: Sink
) -> None:
    _, _, ack = await enquire(service, sink)
    await eventually(lambda: status(service, ack.id) == "sent")
    enquiries, outbox = count(service, Enquiry), count(service, OutboxItem)
    # names our patient, but returns a message we never sent: cannot suppress them
    forged = dsn(returned=original("guess@clinic.example"))
    response = await send_raw(service, forged, "")
    assert response.endswith("ok")
    with db(service) as session:
        assert session.get(OutboxItem, ack.id).status == "sent"
        contact = session.scalars(select(Contact).where(Contact.email == PATIENT)).one()
        assert contact.email_suppressed_at is None
        stored = session.scalars(select(Message).where(Message.kind == "bounce")).one()
        assert stored.enquiry_id is None
        assert "bounce-unmatched" in set(session.scalars(select(Event.kind)))
    assert (count(service, Enquiry), count(service, OutboxItem)) == (enquiries, outbox)


async def test_the_returned_message_is_the_one_marked_not_one_it_refers_to(
    service: Service, sink: Sink
) -> None:
    """A bounce quotes the returned message's References too (our earlier acknowledgement,
    say): the row marked is the one whose Message-ID the returned message carries."""
    _, _, ack = await enquire(service, sink)
    await eventually(lambda: status(service, ack.id) == "sent")
    later_id = "fedcba9876543210fedcba9876543210@clinic.example"
    with db(service, write=True) as session, session.begin():
        later = OutboxItem(
            enquiry_id=ack.enquiry_id, contact_id=ack.contact_id, kind="ack", channel="email",
            recipient=PATIENT, template="safety-net", message_id=later_id, status="sent",
            due_at=ack.due_at, created_at=ack.created_at, sent_at=ack.created_at)
        session.add(later)
        session.flush()
        later_row = later.id
    returned = original(later_id).replace(
        b"\r\n\r\n", f"\r\nReferences: <{ack.message_id}>\r\n\r\n".encode(), 1)
    await send_raw(service, dsn(returned=returned), "")
    assert status(service, later_row) == "failed"
    assert status(service, ack.id) == "sent"
