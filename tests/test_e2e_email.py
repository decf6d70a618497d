"""End to end over real sockets: a patient's email in, stored, acknowledged, team notified."""

from __future__ import annotations

import json
import urllib.request
from datetime import timedelta
from email.message import EmailMessage
from email.utils import make_msgid

import aiosmtplib
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from handler.app import Service
from handler.clock import FakeClock
from handler.db import make_sessionmaker
from handler.models import Enquiry, Message, OutboxItem
from tests.conftest import CLINIC, Sink, eventually

PATIENT = "jane.patient@example.org"


def enquiry_email(
    body: str = "I was diagnosed with HER2+ breast cancer last month and have been offered "
    "a mastectomy. Could you review my treatment plan?",
    subject: str = "Second opinion on my treatment plan",
    sender: str = PATIENT,
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Jane Patient <{sender}>"
    msg["To"] = CLINIC
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="example.org")
    msg.set_content(body)
    return msg


async def send(service: Service, msg: EmailMessage, rcpt: str = CLINIC) -> tuple[int, str]:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=service.smtp_port) as client:
        errors, response = await client.send_message(msg, recipients=[rcpt])
    assert not errors
    return 250, response


def db(service: Service) -> Session:
    """A fresh read session (each `with` sees the latest committed state)."""
    return make_sessionmaker(service.engine)()


def outbox(service: Service) -> list[OutboxItem]:
    with db(service) as session:
        return list(session.scalars(select(OutboxItem).order_by(OutboxItem.id)))


async def test_enquiry_is_stored_acknowledged_and_routed(service: Service, sink: Sink) -> None:
    msg = enquiry_email()
    _, response = await send(service, msg)
    assert "queued as ENQ-" in response
    reference = response.rsplit(" ", 1)[1]

    with db(service) as session:
        enquiry = session.scalars(select(Enquiry).where(Enquiry.reference == reference)).one()
        assert (enquiry.category, enquiry.team) == ("breast", "breast")
        assert enquiry.priority == "normal"
        assert enquiry.reply_template == "ack-breast"
        matched = [hit for hit in enquiry.decision["trace"] if hit["matched"]]
        assert matched and matched[0]["reasons"]
        stored = session.scalars(select(Message).where(Message.enquiry_id == enquiry.id)).one()
        assert stored.raw and b"HER2+" in stored.raw
        assert stored.external_id == msg["Message-ID"].strip("<>")
        assert stored.subject == "Second opinion on my treatment plan"

    received = await sink.wait_for(2)
    ack = next(m for m in received if m["To"] == PATIENT)
    assert reference in ack["Subject"]
    assert ack["In-Reply-To"] == msg["Message-ID"]
    assert msg["Message-ID"] in ack["References"]
    assert ack["Auto-Submitted"] == "auto-replied"
    assert CLINIC in ack["From"]
    assert ack.get_content_type() == "multipart/alternative"
    plain = ack.get_body(("plain",))
    html = ack.get_body(("html",))
    assert plain is not None and html is not None
    assert reference in plain.get_content() and reference in html.get_content()
    assert "999" in plain.get_content()

    note = next(m for m in received if m["To"] == "breast-team@clinic.example")
    body = note.get_body(("plain",)).get_content()
    assert reference in body and "breast" in body.lower()
    assert "HER2" in body  # the summary reaches the team
    assert note["Auto-Submitted"] == "auto-generated"

    rows = await eventually(
        lambda: (r := outbox(service)) and all(x.status == "sent" for x in r) and r)
    assert sorted(r.kind for r in rows) == ["ack", "notify"]
    for row in rows:
        assert "queued as SINK" in row.provider_id
        assert row.rendered and row.rendered["text"]
    ack_row = next(r for r in rows if r.kind == "ack")
    assert ack["Message-ID"] == f"<{ack_row.message_id}>"


async def test_red_flag_goes_to_on_call_with_safety_net(service: Service, sink: Sink) -> None:
    _, response = await send(service, enquiry_email(
        body="Since my chemo started I have chest pain and I can't breathe properly at night.",
        subject="Worried"))
    reference = response.rsplit(" ", 1)[1]
    received = await sink.wait_for(2)
    ack = next(m for m in received if m["To"] == PATIENT)
    text_part = ack.get_body(("plain",)).get_content()
    assert "999" in text_part and "111" in text_part
    with db(service) as session:
        enquiry = session.scalars(select(Enquiry).where(Enquiry.reference == reference)).one()
        assert enquiry.priority == "urgent"
        assert "on-call" in enquiry.teams
        assert enquiry.reply_template == "safety-net"


async def test_unknown_recipients_are_refused(service: Service) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=service.smtp_port) as client:
        await client.mail("someone@example.org")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as same_domain:
            await client.rcpt("nobody@clinic.example")
        assert same_domain.value.code == 550 and "5.1.1" in same_domain.value.message
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as other:
            await client.rcpt("victim@elsewhere.example")
        assert other.value.code == 550 and "5.7.1" in other.value.message
        response = await client.rcpt(CLINIC.upper())
        assert response.code == 250


async def test_redelivered_message_is_stored_once(service: Service, sink: Sink) -> None:
    msg = enquiry_email()
    _, first = await send(service, msg)
    _, second = await send(service, msg)
    assert first == second  # same reference in both 250 replies
    await sink.wait_for(2)
    with db(service) as session:
        assert session.scalar(select(func.count()).select_from(Message)) == 1
        assert session.scalar(select(func.count()).select_from(Enquiry)) == 1
        assert session.scalar(select(func.count()).select_from(OutboxItem).where(
            OutboxItem.kind == "ack")) == 1


async def test_database_failure_answers_451_and_retry_succeeds(
    service: Service, sink: Sink
) -> None:
    with service.engine.begin() as conn:
        conn.execute(text("ALTER TABLE message RENAME TO message_away"))
    msg = enquiry_email()
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=service.smtp_port) as client:
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await client.send_message(msg, recipients=[CLINIC])
        assert refused.value.code == 451 and "4.3.0" in refused.value.message
    with service.engine.begin() as conn:
        conn.execute(text("ALTER TABLE message_away RENAME TO message"))
    _, response = await send(service, msg)  # the sender's retry
    assert "ENQ-" in response
    with db(service) as session:
        assert session.scalar(select(func.count()).select_from(Enquiry)) == 1


async def test_reply_in_thread_joins_the_enquiry(service: Service, sink: Sink) -> None:
    first = enquiry_email()
    _, response = await send(service, first)
    reference = response.rsplit(" ", 1)[1]
    received = await sink.wait_for(2)
    ack = next(m for m in received if m["To"] == PATIENT)
    follow_up = enquiry_email(body="Here are my histology results, attached soon.",
                              subject=f"Re: {ack['Subject']}")
    follow_up["In-Reply-To"] = ack["Message-ID"]
    follow_up["References"] = ack["Message-ID"]
    _, response2 = await send(service, follow_up)
    assert response2.rsplit(" ", 1)[1] == reference
    received = await sink.wait_for(3)  # the team hears about the reply; no second ack
    assert len([m for m in received if m["To"] == PATIENT]) == 1
    first_notice, second_notice = [m for m in received if m["To"] != PATIENT]
    assert "new breast enquiry" in str(first_notice["Subject"])
    assert "the sender wrote again" in str(second_notice["Subject"])  # not "new enquiry"
    body = second_notice.get_body(("plain",)).get_content()
    assert "has written again" in body and "within 2 working days" not in body
    with db(service) as session:
        assert session.scalar(select(func.count()).select_from(Enquiry)) == 1
        kinds = session.scalars(select(Message.kind).order_by(Message.id)).all()
        assert kinds == ["enquiry", "reply"]


async def test_temporary_relay_failure_is_retried(
    service: Service, sink: Sink, clock: FakeClock
) -> None:
    sink.replies = ["451 4.7.1 Greylisted, try again later"] * 2
    await send(service, enquiry_email())
    await eventually(lambda: sum(r.attempts == 1 and r.status == "pending"
                                 and "451" in r.last_error for r in outbox(service)) == 2)
    clock.advance(timedelta(minutes=5))
    service.ticker.wake()
    received = await sink.wait_for(2)
    assert {m["To"] for m in received} >= {PATIENT}


async def test_healthz_reports_database_and_rules(service: Service) -> None:
    url = f"http://127.0.0.1:{service.http_port}/healthz"
    import asyncio

    body = await asyncio.to_thread(lambda: json.load(urllib.request.urlopen(url, timeout=5)))
    assert body["status"] == "ok"
    assert body["database"]["reachable"] is True
    assert body["rules"]["loaded"] is True and len(body["rules"]["version"]) >= 12
    assert body["version"]
