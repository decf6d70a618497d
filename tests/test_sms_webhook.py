"""The SMS webhook end to end: real HTTP requests to the running service, signed with the
twilio package's RequestValidator; outbound SMS land in the local folder (no credentials)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from handler import store
from handler.app import Service, running
from handler.clock import FakeClock
from handler.config import Settings
from handler.db import make_sessionmaker
from handler.inbound import Channel
from handler.models import Attachment, Contact, Enquiry, Event, Message, OutboxItem
from tests.conftest import Sink, eventually
from tests.twilio_fake import (
    AUTH_TOKEN,
    PUBLIC_URL,
    inbound_form,
    new_sid,
    post_signed,
    sign,
    status_form,
)

PATIENT = "+447700900123"
INBOUND = PUBLIC_URL + "/sms/twilio"
STATUS = PUBLIC_URL + "/sms/twilio/status"
BREAST = "Hi, I was diagnosed with breast cancer last month. Can your team review my plan?"


@pytest.fixture
async def service(
    make_settings: Callable[..., Settings], sink: Sink, clock: FakeClock
) -> AsyncIterator[Service]:
    settings = make_settings(relay_host="127.0.0.1", relay_port=sink.port,
                             twilio_auth_token=AUTH_TOKEN, public_url=PUBLIC_URL)
    async with running(settings, clock=clock) as svc:
        yield svc


def db(service: Service) -> Session:
    return make_sessionmaker(service.engine)()


def count(service: Service, model: Any, *where: Any) -> int:
    with db(service) as session:
        return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def sms_files(service: Service) -> list[dict[str, str]]:
    folder: Path = service.settings.sms_dir_path
    return [json.loads(p.read_text("utf-8")) for p in sorted(folder.glob("*.json"))]


def sms_rows(service: Service) -> list[OutboxItem]:
    with db(service) as session:
        return list(session.scalars(select(OutboxItem).where(OutboxItem.channel == "sms")
                                    .order_by(OutboxItem.id)))


async def text(service: Service, body: str, **kwargs: Any) -> dict[str, str]:
    form = inbound_form(body, **kwargs)
    response = await post_signed(service.http_port, INBOUND, form)
    assert response.status_code == 200, response.text
    return form


async def test_signed_text_opens_an_enquiry_acknowledged_by_sms(
    service: Service, sink: Sink
) -> None:
    form = inbound_form(BREAST, sender="07700 900123")
    response = await post_signed(service.http_port, INBOUND, form)
    assert response.status_code == 200
    assert response.elapsed.total_seconds() < 2  # Twilio waits 15 s at most
    assert response.headers["content-type"].startswith("text/xml")
    assert response.text.endswith("<Response/>")

    with db(service) as session:  # committed before the 200
        enquiry = session.scalars(select(Enquiry)).one()
        assert (enquiry.channel, enquiry.team, enquiry.reply_template) == (
            "sms", "breast", "ack-breast")
        assert enquiry.contact.phone == PATIENT
        message = session.scalars(select(Message)).one()
        assert (message.external_id, message.text) == (form["MessageSid"], BREAST)
        reference = enquiry.reference

    files = await eventually(lambda: sms_files(service))
    assert files[0]["to"] == PATIENT
    assert reference in files[0]["body"] and "breast cancer" not in files[0]["body"]
    rows = await eventually(lambda: [r for r in sms_rows(service) if r.status == "sent"])
    assert rows[0].delivery_status == "written" and rows[0].rendered
    notes = await sink.wait_for(1)
    assert notes[0]["To"] == "breast-team@clinic.example"


async def test_bad_missing_and_misdirected_signatures_get_403(service: Service) -> None:
    form = inbound_form(BREAST)
    port = service.http_port
    local_url = f"http://127.0.0.1:{port}/sms/twilio"
    attempts = {
        "missing": await post_signed(port, INBOUND, form, signature=""),
        "wrong token": await post_signed(port, INBOUND, form,
                                         signature=sign(INBOUND, form, token="not-the-token")),
        "signed for the URL it reached, not the public one":
            await post_signed(port, INBOUND, form, signature=sign(local_url, form)),
        "body changed after signing": await post_signed(
            port, INBOUND, {**form, "Body": "STOP"}, signature=sign(INBOUND, form)),
        "forwarded headers do not help": await post_signed(
            port, INBOUND, form, signature=sign(local_url, form),
            headers={"X-Forwarded-Host": "127.0.0.1", "X-Forwarded-Proto": "http"}),
    }
    assert {name: r.status_code for name, r in attempts.items()} == {
        name: 403 for name in attempts}
    assert count(service, Message) == 0 and count(service, Contact) == 0
    status = await post_signed(port, STATUS, status_form(new_sid(), "delivered"), signature="")
    assert status.status_code == 403


async def test_twilio_retry_of_the_same_message_sid_is_stored_once(service: Service) -> None:
    form = await text(service, BREAST)
    again = await post_signed(service.http_port, INBOUND, form)
    assert again.status_code == 200 and again.text.endswith("<Response/>")
    await eventually(lambda: sms_files(service))
    assert count(service, Message) == 1 and count(service, Enquiry) == 1
    assert count(service, OutboxItem, OutboxItem.kind == "ack") == 1


async def test_a_text_joins_the_open_enquiry_within_the_window(
    service: Service, clock: FakeClock
) -> None:
    await text(service, BREAST)
    clock.advance(timedelta(days=3))
    await text(service, "I can send my scan report tomorrow")
    with db(service) as session:
        assert session.scalars(select(Message.kind).order_by(Message.id)).all() == [
            "enquiry", "reply"]
        assert session.scalar(select(func.count()).select_from(Enquiry)) == 1
    clock.advance(timedelta(days=15))
    await text(service, BREAST)
    assert count(service, Enquiry) == 2


async def test_mms_media_are_stored_with_their_urls(service: Service) -> None:
    base = "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/Media/"
    await text(service, "My biopsy report", media=[(base + "ME1", "image/jpeg"),
                                                   (base + "ME2", "application/pdf")])
    with db(service) as session:
        rows = session.scalars(select(Attachment).order_by(Attachment.id)).all()
        assert [(a.url, a.content_type, a.filename, a.sha256) for a in rows] == [
            (base + "ME1", "image/jpeg", "ME1.jpg", None),
            (base + "ME2", "application/pdf", "ME2.pdf", None)]


async def test_stop_opts_out_cancels_pending_sms_and_leaves_email_alone(
    service: Service, clock: FakeClock
) -> None:
    clock.set(datetime(2026, 11, 25, 22, 30, tzinfo=UTC))  # quiet hours: the ack waits
    await text(service, BREAST)
    held = await eventually(lambda: [r for r in sms_rows(service)
                                     if r.kind == "ack" and r.attempts == 0
                                     and r.due_at > clock.now()])
    assert held[0].status == "pending"
    with service.engine.execution_options(write=True).begin() as conn, \
            Session(bind=conn) as session:  # the writers' lock first: SQLite would refuse
        contact = session.scalars(select(Contact).where(Contact.phone == PATIENT)).one()
        contact.email = "jane@example.org"
        store.enqueue(session, kind="reminder", channel=Channel.EMAIL,
                      recipient="jane@example.org", template="reminder-patient-documents",
                      due_at=clock.now() + timedelta(days=1), now=clock.now(),
                      domain="clinic.example", contact=contact)
        session.flush()

    response = await post_signed(service.http_port, INBOUND, inbound_form(" Stop "))
    assert response.status_code == 200 and response.text.endswith("<Response/>")
    with db(service) as session:
        contact = session.scalars(select(Contact).where(Contact.phone == PATIENT)).one()
        assert contact.sms_opted_out_at == clock.now()
        sms = session.scalars(select(OutboxItem).where(OutboxItem.channel == "sms")).one()
        assert sms.status == "cancelled" and "opted out" in sms.cancel_reason
        assert "STOP" in sms.cancel_reason
        mail = session.scalars(select(OutboxItem).where(OutboxItem.kind == "reminder")).one()
        assert mail.status == "pending"
        event = session.scalars(select(Event).where(Event.kind == "sms-opted-out")).one()
        assert event.detail["cancelled"] == 1 and event.detail["source"] == "keyword STOP"
        assert event.enquiry_id is not None
        assert session.scalars(select(Message.kind).order_by(Message.id)).all() == [
            "enquiry", "opt-out"]
        assert session.scalar(select(func.count()).select_from(Enquiry)) == 1

    clock.set(datetime(2026, 11, 26, 9, 0, tzinfo=UTC))  # morning: still nothing by SMS
    with service.engine.execution_options(write=True).begin() as conn, \
            Session(bind=conn) as session:  # the writers' lock first: SQLite would refuse
        late = store.enqueue(session, kind="reminder", channel=Channel.SMS, recipient=PATIENT,
                             template="reminder-patient-documents", due_at=clock.now(),
                             now=clock.now(), domain="clinic.example")
        session.flush()
        late_id = late.id
    await service.dispatcher.run_until_idle()
    assert sms_files(service) == []
    with db(service) as session:
        row = session.get(OutboxItem, late_id)
        assert row is not None and row.status == "cancelled"
        assert row.cancel_reason == "recipient opted out of SMS"


async def test_start_opts_back_in_and_help_gets_the_contact_template(
    service: Service, clock: FakeClock
) -> None:
    await text(service, "STOP")
    with db(service) as session:
        contact = session.scalars(select(Contact)).one()
        assert contact.sms_opted_out_at is not None
        assert session.scalar(select(func.count()).select_from(Enquiry)) == 0
    await text(service, "help")  # opted out: not answered
    await text(service, "start")
    with db(service) as session:
        assert session.scalars(select(Contact)).one().sms_opted_out_at is None
        kinds = session.scalars(select(Event.kind).order_by(Event.id)).all()
        assert kinds == ["sms-opted-out", "help-not-answered", "sms-opted-in"]
    clock.set(datetime(2026, 11, 25, 23, 0, tzinfo=UTC))  # HELP is answered even at night
    await text(service, "HELP")
    files = await eventually(lambda: sms_files(service))
    assert len(files) == 1 and files[0]["to"] == PATIENT
    assert service.settings.clinic_phone in files[0]["body"]
    assert "STOP" in files[0]["body"]
    with db(service) as session:
        assert session.scalars(select(Message.kind).order_by(Message.id)).all() == [
            "opt-out", "help", "opt-in", "help"]
        assert session.scalar(select(func.count()).select_from(Enquiry)) == 0


async def test_non_urgent_sms_wait_for_the_end_of_quiet_hours(
    service: Service, clock: FakeClock
) -> None:
    clock.set(datetime(2026, 11, 25, 22, 30, tzinfo=UTC))
    await text(service, BREAST)
    await text(service, "Chest pain since last night, I am on tamoxifen. Should I come in?",
               sender="+447700900555")
    files = await eventually(lambda: len(sms_files(service)) == 2 and sms_files(service))
    on_call = service.rules.ruleset.teams["on-call"].sms
    # urgent texts go at once: the safety-net to the patient, the alert to the on-call phone
    assert sorted(f["to"] for f in files) == sorted(["+447700900555", on_call])
    rows = sms_rows(service)
    held = next(r for r in rows if r.recipient == PATIENT)
    assert held.status == "pending" and held.attempts == 0
    assert held.due_at == datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
    clock.set(datetime(2026, 11, 26, 8, 0, 1, tzinfo=UTC))
    service.ticker.wake()
    files = await eventually(lambda: len(sms_files(service)) == 3 and sms_files(service))
    assert PATIENT in {f["to"] for f in files}


async def test_status_callbacks_update_the_stored_message(service: Service) -> None:
    await text(service, BREAST)
    row = (await eventually(lambda: [r for r in sms_rows(service) if r.status == "sent"]))[0]
    sid = new_sid()
    callback = f"{STATUS}?key={row.message_id.replace('@', '%40')}"
    for status in ("sent", "delivered", "sent"):  # the last one arrives late
        response = await post_signed(service.http_port, callback, status_form(sid, status))
        assert response.status_code == 204
    with db(service) as session:
        stored = session.get(OutboxItem, row.id)
        assert stored is not None and stored.delivery_status == "delivered"
    failed = await post_signed(service.http_port, callback,
                               status_form(sid, "undelivered", error_code="30003"))
    assert failed.status_code == 204
    with db(service) as session:
        stored = session.get(OutboxItem, row.id)
        assert stored is not None
        assert (stored.delivery_status, stored.error_code) == ("delivered", "")
    tampered = await post_signed(service.http_port, callback, status_form(sid, "failed"),
                                 signature=sign(STATUS, status_form(sid, "failed")))
    assert tampered.status_code == 403  # signed without the query string


async def test_what_is_not_a_twilio_form_is_refused(service: Service) -> None:
    url = f"http://127.0.0.1:{service.http_port}/sms/twilio"
    async with httpx.AsyncClient(timeout=10) as client:
        as_json = await client.post(url, json=inbound_form(BREAST))
        huge = await client.post(url, data={"Body": "x" * 70_000})
        get = await client.get(url)
    assert (as_json.status_code, huge.status_code, get.status_code) == (415, 413, 405)
    no_sid = await post_signed(service.http_port, INBOUND, {"Body": "hello"})
    assert no_sid.status_code == 400  # signed, but no MessageSid / From
    assert count(service, Message) == 0


async def test_a_chunked_body_is_held_to_the_same_size_limit(service: Service) -> None:
    """Chunked transfer encoding carries no Content-Length: the body is still read only up
    to 64 KB (and nothing parsed) before the signature check; a signed chunked form works."""
    url = f"http://127.0.0.1:{service.http_port}/sms/twilio"

    async def endless() -> AsyncIterator[bytes]:
        yield b"Body="
        for _ in range(300):  # 300 KB: the whole form parsed, had nobody stopped it
            yield b"x" * 1024

    form = inbound_form(BREAST)
    body = urlencode(form).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 50):
            yield body[i:i + 50]

    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    async with httpx.AsyncClient(timeout=10) as client:
        huge = (await client.post(url, content=endless(), headers=headers)).status_code
        signed = await client.post(url, content=chunks(), headers={
            **headers, "X-Twilio-Signature": sign(INBOUND, form)})
    assert huge == 413
    assert signed.status_code == 200 and count(service, Message) == 1


async def test_a_text_arriving_as_the_service_stops_is_still_stored(
    make_settings: Callable[..., Settings], sink: Sink, clock: FakeClock
) -> None:
    """Twilio does not retry an inbound webhook that got a 500: a request the HTTP server
    took before shutting down must be answered by an intake that is still there."""
    import asyncio

    settings = make_settings(relay_host="127.0.0.1", relay_port=sink.port,
                             twilio_auth_token=AUTH_TOKEN, public_url=PUBLIC_URL,
                             intake_worker=True)
    form = inbound_form(BREAST)
    body = urlencode(form).encode()
    head = (f"POST /sms/twilio HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            f"application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n"
            f"X-Twilio-Signature: {sign(INBOUND, form)}\r\nConnection: close\r\n\r\n")
    up, stop = asyncio.Event(), asyncio.Event()
    ports: list[int] = []
    stored: list[int] = []

    async def serve() -> None:
        async with running(settings, clock=clock) as service:
            ports.append(service.http_port)
            up.set()
            await stop.wait()
        with Session(service.engine) as session:  # after the service stopped
            stored.append(int(session.scalar(select(func.count()).select_from(Message)) or 0))

    task = asyncio.create_task(serve())
    await up.wait()
    reader, writer = await asyncio.open_connection("127.0.0.1", ports[0])
    writer.write(head.encode())  # the request has begun; its body comes during shutdown
    await writer.drain()
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.sleep(0.5)  # shutdown under way
    writer.write(body)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 15)
    writer.close()
    await task
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert stored == [1]


async def test_texts_claimed_at_night_are_held_together_and_all_sent_in_the_morning(
    service: Service, clock: FakeClock
) -> None:
    clock.set(datetime(2026, 11, 25, 23, 15, tzinfo=UTC))  # quiet hours (21:00-08:00 London)
    senders = [f"+4477009002{n:02d}" for n in range(5)]
    for sender in senders:
        await text(service, BREAST, sender=sender)
    morning = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)

    def all_held() -> list[OutboxItem] | None:  # claimed, then put back until the morning
        rows = [r for r in sms_rows(service) if r.kind == "ack" and r.due_at == morning]
        return rows if len(rows) == len(senders) else None

    held = await eventually(all_held)
    assert all(r.status == "pending" and r.attempts == 0 and r.lease_until is None
               for r in held)
    assert sms_files(service) == []  # nothing went out during the night

    clock.set(morning + timedelta(minutes=1))
    # recorded as sent only after the files are written (complete)
    await eventually(lambda: {r.status for r in sms_rows(service)} == {"sent"})
    assert sorted(f["to"] for f in sms_files(service)) == senders
    assert {r.attempts for r in sms_rows(service)} == {1}
