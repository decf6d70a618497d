"""The dispatcher's batches and the relay transaction: rows claimed with one UPDATE ...
RETURNING, the next batch claimed while the last one goes out, results recorded together;
every row is sent once and keeps its Message-ID, failures keep their meaning."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parseaddr

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session as DbSession

from handler import db
from handler.app import Service
from handler.bench_data import populate
from handler.clock import FakeClock
from handler.config import Settings
from handler.dispatch import Dispatcher, first_name, next_attempt
from handler.live import LiveRules
from handler.models import Enquiry, Event, OutboxItem
from handler.smtp_out import RelayTransport
from handler.transports import FileSmsTransport, Outcome
from tests.conftest import CLINIC, Sink
from tests.test_e2e_email import PATIENT, enquiry_email, send
from tests.test_e2e_email import db as db_session


@asynccontextmanager
async def dispatcher(
    settings: Settings, clock: FakeClock, **options: int
) -> AsyncIterator[tuple[Dispatcher, Engine]]:
    engine = db.make_engine(settings.sqlalchemy_url)
    rules = LiveRules(rules_dir=settings.rules_dir, templates_dir=settings.templates_dir,
                      max_sms_segments=settings.sms_max_segments, now=clock.now())
    email = RelayTransport(host="127.0.0.1", port=settings.relay_port)
    try:
        yield Dispatcher(sessions=db.make_sessionmaker(engine, write=True), templates=rules,
                         ruleset=rules.current, email=email,
                         sms=FileSmsTransport(settings.sms_dir_path), clock=clock,
                         settings=settings, **options), engine
    finally:
        await email.close()
        engine.dispose()


async def due_outbox(settings: Settings, enquiries: int) -> tuple[FakeClock, int]:
    """Enquiries stored through the real intake path, their acknowledgements and team
    notifications due; a clock a minute later."""
    due = await asyncio.to_thread(populate, settings, enquiries, tag="dispatch")
    return FakeClock(datetime.now(UTC) + timedelta(minutes=1)), due


def rows(engine: Engine) -> list[OutboxItem]:
    with DbSession(engine) as session:
        return list(session.scalars(select(OutboxItem).order_by(
            OutboxItem.urgent.desc(), OutboxItem.due_at, OutboxItem.id)))


async def test_several_batches_are_each_sent_once_and_recorded(
    make_settings: Callable[..., Settings], sink: Sink
) -> None:
    settings = make_settings(relay_host="127.0.0.1", relay_port=sink.port)
    clock, due = await due_outbox(settings, 7)
    async with dispatcher(settings, clock, batch_size=3, concurrency=2) as (dispatch, engine):
        assert await dispatch.run_until_idle() == due == 14
        assert await dispatch.run_until_idle() == 0
        sent = rows(engine)
    received = await sink.wait_for(due)
    assert sorted(m["Message-ID"] for m in received) == sorted(f"<{r.message_id}>" for r in sent)
    for row in sent:
        assert (row.status, row.attempts, row.lease_until, row.last_error) == ("sent", 1, None, "")
        assert row.sent_at == clock.now() and "SINK" in row.provider_id
        assert row.rendered is not None and set(row.rendered) == {"subject", "text", "html"}
        [message] = [m for m in received if m["Message-ID"] == f"<{row.message_id}>"]
        assert parseaddr(message["To"])[1] == row.recipient
        assert row.rendered["subject"] in " ".join(str(message["Subject"]).split())


async def test_failures_back_off_or_fail_for_good_with_an_event(
    make_settings: Callable[..., Settings], sink: Sink
) -> None:
    settings = make_settings(relay_host="127.0.0.1", relay_port=sink.port)
    clock, _ = await due_outbox(settings, 2)
    async with dispatcher(settings, clock, concurrency=1) as (dispatch, engine):
        refused, last_try, greylisted, fine = (r.id for r in rows(engine))
        with engine.begin() as conn:
            conn.execute(update(OutboxItem).where(OutboxItem.id == last_try)
                         .values(attempts=settings.max_attempts - 1))
        sink.replies = ["550 5.1.1 Mailbox unknown", "451 4.7.1 Try again later",
                        "451 4.7.1 Try again later"]
        await dispatch.run_until_idle()
        after = {r.id: r for r in rows(engine)}
        with DbSession(engine) as session:
            events = list(session.scalars(select(Event).where(Event.kind == "delivery-failed")
                                          .order_by(Event.id)))
    assert (after[refused].status, after[refused].error_code) == ("failed", "550")
    assert (after[last_try].status, after[last_try].error_code) == ("failed", "451")
    assert after[last_try].attempts == settings.max_attempts
    retry = after[greylisted]
    assert (retry.status, retry.attempts, retry.error_code) == ("pending", 1, "451")
    assert retry.due_at == next_attempt(1, clock.now()) and retry.lease_until is None
    assert "Try again later" in retry.last_error and retry.rendered is None
    assert after[fine].status == "sent"
    assert sorted(e.detail["outbox"] for e in events) == sorted([refused, last_try])
    assert {e.detail["code"] for e in events} == {"550", "451"}


async def test_an_expired_lease_is_claimed_again_with_the_same_message_id(
    make_settings: Callable[..., Settings], sink: Sink
) -> None:
    settings = make_settings(relay_host="127.0.0.1", relay_port=sink.port)
    clock, _ = await due_outbox(settings, 2)
    async with dispatcher(settings, clock) as (dispatch, engine):
        expired, leased, *_ = rows(engine)
        with engine.begin() as conn:  # a worker that died mid-send, and one still sending
            conn.execute(update(OutboxItem).where(OutboxItem.id == expired.id).values(
                status="sending", attempts=1, lease_until=clock.now() - timedelta(seconds=1)))
            conn.execute(update(OutboxItem).where(OutboxItem.id == leased.id).values(
                status="sending", attempts=1, lease_until=clock.now() + timedelta(minutes=1)))
        assert await dispatch.run_until_idle() == 3
        after = {r.id: r for r in rows(engine)}
    assert (after[expired.id].status, after[expired.id].attempts) == ("sent", 2)
    assert (after[leased.id].status, after[leased.id].attempts) == ("sending", 1)
    ids = [m["Message-ID"] for m in await sink.wait_for(3)]
    assert f"<{expired.message_id}>" in ids and f"<{leased.message_id}>" not in ids


async def test_the_team_sees_the_patient_the_message_and_why_it_came_to_them(
    service: Service, sink: Sink
) -> None:
    """The template context read for a batch: enquiry, contact, latest message and its
    attachments, the team and the decision, as the notification shows them."""
    msg = enquiry_email()
    msg.add_attachment(b"%PDF-1.4 scan", maintype="application", subtype="pdf",
                       filename="biopsy-report.pdf")
    await send(service, msg)
    received = await sink.wait_for(2)
    with db_session(service) as session:
        enquiry = session.scalars(select(Enquiry)).one()
    team = service.rules.ruleset.teams[enquiry.team]
    ack = next(m for m in received if m["To"] == PATIENT).get_body(("plain",)).get_content()
    assert ack.startswith("Dear Jane,") and enquiry.reference in ack
    note = next(m for m in received if m["To"] == team.email)
    assert note["Reply-To"] == PATIENT
    assert f"for {team.display_name}: Second opinion on my treatment plan" in " ".join(
        str(note["Subject"]).split())
    body = note.get_body(("plain",)).get_content()
    reasons = next(hit for hit in enquiry.decision["trace"] if hit["matched"])["reasons"]
    for expected in (f"Team:       {team.display_name}", "Name:   Jane Patient",
                     f"Email:  {PATIENT}", "Subject: Second opinion on my treatment plan",
                     "> I was diagnosed with HER2+ breast cancer",
                     "- biopsy-report.pdf (application/pdf, 13 Bytes)",
                     f"Rule: {enquiry.rule}", f"- {reasons[0]}"):
        assert expected in body


# --- the relay transaction ------------------------------------------------------------------


@dataclass
class PickyRelay:
    """Refuses one recipient at RCPT; remembers every envelope and the connection it came on."""

    refuse: str
    port: int = 0
    envelopes: list[tuple[object, Envelope]] = field(default_factory=list)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if address == self.refuse:
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.envelopes.append((session.peer, envelope))
        return "250 2.0.0 Ok: queued as PICKY" + str(len(self.envelopes))


async def test_a_refused_recipient_is_permanent_and_the_connection_goes_on() -> None:
    relay = PickyRelay(refuse="gone@example.org")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(relay, hostname="relay.test", loop=loop), "127.0.0.1", 0)
    transport = RelayTransport(host="127.0.0.1", port=server.sockets[0].getsockname()[1],
                               connections=1)
    mail = b"Subject: hello\r\n\r\nA line.\r\n.starts with a dot\r\n"
    try:
        refused = await transport.send(mail, sender=CLINIC, recipient="gone@example.org")
        first = await transport.send(mail, sender=CLINIC, recipient="jane@example.org")
        second = await transport.send(mail, sender=CLINIC, recipient="joe@example.org")
    finally:
        await transport.close()
        server.close()
        await server.wait_closed()
    assert (refused.outcome, refused.code) == (Outcome.PERMANENT, "550")
    assert "No such user" in refused.error
    assert first.outcome is second.outcome is Outcome.OK
    assert (first.provider_id, second.provider_id) == ("2.0.0 Ok: queued as PICKY1",
                                                       "2.0.0 Ok: queued as PICKY2")
    [(peer1, env1), (peer2, env2)] = relay.envelopes
    assert peer1 == peer2  # one connection, reset after the refusal
    assert env1.rcpt_tos == ["jane@example.org"] and env2.rcpt_tos == ["joe@example.org"]
    assert env1.original_content == mail
    assert f"SIZE={len(mail)}" in env1.mail_options


@pytest.mark.parametrize(("name", "first"), [
    ("Jane Smith", "Jane"), ("SMITH, Jane (NHS TRUST)", "Jane"), ("Dr Jane Smith", "Jane"),
    ("Dr. J. Smith", "J"), ("Prof Smith", "Smith"), ("JANE SMITH", "Jane"),
    ("jane.smith@example.org", ""), ("", ""), ("Dr", ""), ("(Jane)", ""),
    ("Seán Ó Briain", "Seán"), ("O'Neill, Mary", "Mary"), ("Smith,", "Smith"),
])
def test_a_greeting_takes_the_first_name_a_display_name_really_has(name: str, first: str) -> None:
    assert first_name(name) == first
