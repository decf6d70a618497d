"""Outbound SMS through the real `twilio` client, pointed at a loopback server that answers
as Twilio's Messages API does; status callbacks signed as Twilio signs them."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import select

from handler.app import Service, running
from handler.clock import FakeClock
from handler.config import Settings
from handler.models import Contact, Event, OutboxItem
from handler.sms_out import TwilioTransport
from handler.transports import Outcome, SmsRequest
from tests.conftest import Sink, eventually
from tests.test_sms_webhook import BREAST, INBOUND, PATIENT, db, sms_rows
from tests.twilio_fake import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    OUR_NUMBER,
    PUBLIC_URL,
    Answer,
    FakeTwilio,
    error,
    inbound_form,
    post_signed,
    serving,
    status_form,
)

CALLBACK = PUBLIC_URL + "/sms/twilio/status"


@pytest.fixture
async def fake() -> AsyncIterator[FakeTwilio]:
    twilio = FakeTwilio()
    async with serving(twilio.app()) as port:
        twilio.port = port
        yield twilio


def transport(fake: FakeTwilio, sender: str = OUR_NUMBER, timeout: float = 5.0
              ) -> TwilioTransport:
    return TwilioTransport(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, sender=sender,
                           api_url=fake.url, timeout=timeout)


def request(body: str = "Your reference is ENQ-ABC234") -> SmsRequest:
    return SmsRequest(to=PATIENT, body=body, idempotency_key="k1@clinic.example",
                      status_callback=CALLBACK)


async def test_created_message_is_ok_with_its_sid(fake: FakeTwilio) -> None:
    sms = transport(fake)
    try:
        result = await sms.send(request())
    finally:
        await sms.close()
    assert result.outcome is Outcome.OK
    assert result.provider_id == fake.created[0]["sid"] and result.status == "queued"
    sent = fake.requests[0]
    assert (sent["To"], sent["From"], sent["Body"]) == (
        PATIENT, OUR_NUMBER, "Your reference is ENQ-ABC234")
    callback = urlsplit(sent["StatusCallback"])
    assert f"{callback.scheme}://{callback.netloc}{callback.path}" == CALLBACK
    assert parse_qs(callback.query) == {"key": ["k1@clinic.example"]}


async def test_messaging_service_sid_is_sent_as_such(fake: FakeTwilio) -> None:
    service_sid = "MG" + "a" * 32
    sms = transport(fake, sender=service_sid)
    try:
        result = await sms.send(request())
    finally:
        await sms.close()
    assert result.outcome is Outcome.OK and result.status == "accepted"
    assert fake.requests[0]["MessagingServiceSid"] == service_sid
    assert "From" not in fake.requests[0]


@pytest.mark.parametrize(("answer", "outcome", "code"), [
    (error(21211), Outcome.PERMANENT, "21211"),
    (error(21610), Outcome.PERMANENT, "21610"),
    (error(20500), Outcome.TEMPORARY, "20500"),
    (error(20429), Outcome.TEMPORARY, "20429"),
    (Answer(201, delay=1.0), Outcome.TEMPORARY, "timeout"),
])
async def test_failures_are_temporary_or_permanent_with_twilio_code(
    fake: FakeTwilio, answer: Answer, outcome: Outcome, code: str
) -> None:
    fake.answers.append(answer)
    sms = transport(fake, timeout=0.3)
    try:
        result = await sms.send(request())
    finally:
        await sms.close()
    assert (result.outcome, result.code) == (outcome, code)
    if answer.message:
        assert answer.message in result.error


async def test_unreachable_api_is_temporary() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sms = TwilioTransport(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, sender=OUR_NUMBER,
                          api_url=f"http://127.0.0.1:{port}", timeout=2)
    try:
        result = await sms.send(request())
    finally:
        await sms.close()
    assert (result.outcome, result.code) == (Outcome.TEMPORARY, "network")


@pytest.fixture
async def service(
    make_settings: Callable[..., Settings], sink: Sink, clock: FakeClock, fake: FakeTwilio
) -> AsyncIterator[Service]:
    settings = make_settings(relay_host="127.0.0.1", relay_port=sink.port,
                             public_url=PUBLIC_URL, twilio_account_sid=ACCOUNT_SID,
                             twilio_auth_token=AUTH_TOKEN, twilio_from=OUR_NUMBER,
                             twilio_api_url=fake.url)
    async with running(settings, clock=clock) as svc:
        yield svc


async def deliver_callback(service: Service, fake: FakeTwilio, index: int, status: str,
                           error_code: str = "") -> int:
    """What Twilio does next: POST the signed status to the StatusCallback it was given."""
    url = fake.requests[index]["StatusCallback"]
    form = status_form(str(fake.created[index]["sid"]), status, error_code=error_code)
    response = await post_signed(service.http_port, url, form)
    return response.status_code


async def test_acknowledgement_goes_through_twilio_and_callbacks_track_it(
    service: Service, fake: FakeTwilio
) -> None:
    assert "Twilio" in service.sms.description
    await post_signed(service.http_port, INBOUND, inbound_form(BREAST))
    rows = await eventually(lambda: [r for r in sms_rows(service) if r.status == "sent"])
    assert rows[0].provider_id == fake.created[0]["sid"]
    assert rows[0].delivery_status == "queued"
    assert fake.requests[0]["To"] == PATIENT
    for status in ("sent", "delivered"):
        assert await deliver_callback(service, fake, 0, status) == 204
    with db(service) as session:
        row = session.get(OutboxItem, rows[0].id)
        assert row is not None and row.delivery_status == "delivered"


async def test_undelivered_callback_records_the_error_code(
    service: Service, fake: FakeTwilio
) -> None:
    await post_signed(service.http_port, INBOUND, inbound_form(BREAST))
    rows = await eventually(lambda: [r for r in sms_rows(service) if r.status == "sent"])
    assert await deliver_callback(service, fake, 0, "undelivered", "30003") == 204
    with db(service) as session:
        row = session.get(OutboxItem, rows[0].id)
        assert row is not None
        assert (row.delivery_status, row.error_code) == ("undelivered", "30003")
        event = session.scalars(select(Event).where(Event.kind == "sms-undelivered")).one()
        assert event.detail["code"] == "30003"


async def test_21610_fails_at_once_and_opts_the_number_out(
    service: Service, fake: FakeTwilio
) -> None:
    fake.answers.append(error(21610))
    await post_signed(service.http_port, INBOUND, inbound_form(BREAST))
    rows = await eventually(lambda: [r for r in sms_rows(service) if r.status == "failed"])
    assert rows[0].attempts == 1 and rows[0].error_code == "21610"
    assert "unsubscribed" in rows[0].last_error
    with db(service) as session:
        contact = session.scalars(select(Contact).where(Contact.phone == PATIENT)).one()
        assert contact.sms_opted_out_at is not None
        kinds = set(session.scalars(select(Event.kind)))
        assert {"sms-opted-out", "delivery-failed"} <= kinds


async def test_server_errors_are_retried_with_backoff(
    service: Service, fake: FakeTwilio, clock: FakeClock
) -> None:
    fake.answers += [error(20500), error(20429)]
    await post_signed(service.http_port, INBOUND, inbound_form(BREAST))
    row = (await eventually(lambda: [r for r in sms_rows(service) if r.attempts == 1
                                     and r.status == "pending"]))[0]
    assert row.error_code == "20500" and row.due_at > clock.now()
    clock.advance(timedelta(minutes=1))
    service.ticker.wake()
    await eventually(lambda: [r for r in sms_rows(service) if r.attempts == 2
                              and r.status == "pending"])
    clock.advance(timedelta(minutes=5))
    service.ticker.wake()
    sent = await eventually(lambda: [r for r in sms_rows(service) if r.status == "sent"])
    assert sent[0].attempts == 3 and len(fake.requests) == 3
