"""No mail loops (RFC 3834): the guards, each rule through the real SMTP listener, the daily
acknowledgement cap, and the service against real auto-responders on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import make_msgid

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import select
from sqlalchemy.orm import Session as DbSession

from handler.app import Service, running
from handler.clock import FakeClock
from handler.config import Settings
from handler.db import make_sessionmaker
from handler.decision import Decision, Facts
from handler.guards import auto_reply_reason, plan_reply
from handler.inbound import Channel, InboundMessage
from handler.models import Enquiry, Event, Message, OutboxItem
from tests.builders import plain_email
from tests.conftest import CLINIC, Sink, eventually

BODY = ("I have been diagnosed with breast cancer and would like a second opinion on the "
        "treatment plan my hospital has offered.")


def inbound(**changes: object) -> InboundMessage:
    values: dict[str, object] = {
        "channel": Channel.EMAIL, "external_id": "a@example.net", "sender": "pat@example.net",
        "subject": "Second opinion", "text": BODY, "envelope_from": "pat@example.net"}
    values.update(changes)
    return InboundMessage(**values)  # type: ignore[arg-type]


def decision(priority: str = "normal", reply: str | None = "ack-breast") -> Decision:
    return Decision(rule="breast", category="breast", priority=priority, teams=("breast",),
                    reply_template=reply, notify_template="notify-team")


# --- the pure guards --------------------------------------------------------------------------

@pytest.mark.parametrize(("changes", "reason"), [
    ({"headers": {"auto-submitted": "auto-replied"}}, "Auto-Submitted: auto-replied"),
    ({"headers": {"auto-submitted": "Auto-Generated"}}, "Auto-Submitted: auto-generated"),
    ({"headers": {"auto-submitted": "auto-notified; owner-email=x@y"}}, "auto-notified"),
    ({"headers": {"precedence": "bulk"}}, "Precedence: bulk"),
    ({"headers": {"precedence": "List"}}, "Precedence: list"),
    ({"headers": {"precedence": "junk"}}, "Precedence: junk"),
    ({"headers": {"precedence": "auto_reply"}}, "Precedence: auto_reply"),
    ({"headers": {"list-id": "<news.example.net>"}}, "list-id"),
    ({"headers": {"list-unsubscribe": "<mailto:u@example.net>"}}, "list-unsubscribe"),
    ({"headers": {"x-auto-response-suppress": "OOF, AutoReply"}}, "X-Auto-Response-Suppress"),
    ({"headers": {"x-loop": "helpdesk@example.net"}}, "x-loop"),
    ({"headers": {"content-type": 'multipart/report; report-type="disposition-notification"'}},
     "multipart/report"),
    ({"envelope_from": ""}, "null return path"),
    ({"sender": "mailer-daemon@mx.example.net"}, "automated sender"),
    ({"sender": "postmaster@example.net"}, "automated sender"),
    ({"sender": "noreply@example.net"}, "automated sender"),
    ({"sender": "no-reply@example.net"}, "automated sender"),
    ({"sender": "do-not-reply@example.net"}, "automated sender"),
    ({"sender": "newsletter-request@example.net"}, "automated sender"),
    ({"sender": "owner-oncology@example.net"}, "automated sender"),
    ({"envelope_from": "bounces+123@example.net"}, "automated return path"),
    ({"sender": ""}, "no usable sender"),
    ({"subject": "Automatic reply: Your enquiry [ENQ-ABCDEF]"}, "subject says"),
    ({"subject": "Out of Office: Re: Your enquiry"}, "subject says"),
])
def test_automatic_mail_gets_no_reply(changes: dict[str, object], reason: str) -> None:
    assert reason in auto_reply_reason(inbound(**changes))


def test_our_own_message_ids_and_addresses_get_no_reply() -> None:
    assert "one we sent" in auto_reply_reason(inbound(), is_own_message=True)
    own = frozenset({"breast-team@clinic.example"})
    assert "our own addresses" in auto_reply_reason(
        inbound(sender="breast-team@clinic.example"), own_addresses=own)


@pytest.mark.parametrize("changes", [
    {}, {"headers": {"auto-submitted": "no"}}, {"headers": {"auto-submitted": " No ; x=y"}},
    {"headers": {"precedence": "first-class"}},
    {"subject": "Out of office hours: can I still ring?"},
    {"subject": "Automatic replies are all I get from my hospital"},
    {"sender": "replyto.jane@example.net"},
])
def test_a_person_writing_gets_a_reply(changes: dict[str, object]) -> None:
    assert auto_reply_reason(inbound(**changes)) == ""


def test_sms_is_not_judged_by_email_headers() -> None:
    sms = InboundMessage(channel=Channel.SMS, external_id="SM1", sender="+447700900123",
                         text="hello")
    assert auto_reply_reason(sms) == ""


def test_plan_reply_caps_acknowledgements_per_window() -> None:
    msg = inbound()
    assert plan_reply(msg, decision(), Facts(acks_last_24h=0), ack_limit=1).send_reply
    capped = plan_reply(msg, decision(), Facts(acks_last_24h=1), ack_limit=1)
    assert not capped.send_reply and "already acknowledged 1" in capped.reason
    assert plan_reply(msg, decision(), Facts(acks_last_24h=1), ack_limit=2).send_reply
    # a safety-net may follow an ordinary acknowledgement once, not more
    assert plan_reply(msg, decision("urgent", "safety-net"), Facts(acks_last_24h=1),
                      ack_limit=1).send_reply
    assert not plan_reply(msg, decision("urgent", "safety-net"), Facts(acks_last_24h=2),
                          ack_limit=1).send_reply


def test_plan_reply_names_the_guard_before_the_rule() -> None:
    plan = plan_reply(inbound(), decision(reply=None), Facts(), ack_limit=1,
                      auto_reason="Precedence: bulk")
    assert plan.reason == "no automatic reply: Precedence: bulk"
    assert plan_reply(inbound(), decision(reply=None), Facts(),
                      ack_limit=1).reason == "rule sends no reply"


# --- each rule through the real listener ------------------------------------------------------

def db(service: Service) -> DbSession:
    return make_sessionmaker(service.engine)()


async def deliver(service: Service, raw: bytes, *, envelope_from: str) -> str:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=service.smtp_port) as client:
        _, response = await client.sendmail(envelope_from, [CLINIC], raw)
    return response.rsplit(" ", 1)[1]


def rows(service: Service, model: type, *where: object) -> list:  # type: ignore[type-arg]
    with db(service) as session:
        return list(session.scalars(select(model).where(*where).order_by(model.id)))


CASES: list[tuple[str, dict[str, object], str | None, str]] = [
    # (case, builder options, envelope sender (None: the From address), expected reason)
    ("auto-replied", {"headers": [("Auto-Submitted", "auto-replied")]}, None,
     "Auto-Submitted: auto-replied"),
    ("auto-generated", {"headers": [("Auto-Submitted", "auto-generated")]}, None,
     "Auto-Submitted: auto-generated"),
    ("precedence-bulk", {"headers": [("Precedence", "bulk")]}, None, "Precedence: bulk"),
    ("precedence-list", {"headers": [("Precedence", "list")]}, None, "Precedence: list"),
    ("precedence-junk", {"headers": [("Precedence", "junk")]}, None, "Precedence: junk"),
    ("list-id", {"headers": [("List-Id", "Patients forum <forum.example.net>")]}, None,
     "list-id header"),
    ("list-unsubscribe", {"headers": [("List-Unsubscribe", "<https://example.net/u>")]},
     None, "list-unsubscribe header"),
    ("x-auto-response-suppress", {"headers": [("X-Auto-Response-Suppress", "All")]}, None,
     "X-Auto-Response-Suppress"),
    ("null-return-path", {}, "", "null return path"),
    ("mailer-daemon", {"sender": "MAILER-DAEMON@mx.example.net"}, None, "automated sender"),
    ("postmaster", {"sender": "postmaster@example.net"}, None, "automated sender"),
    ("noreply", {"sender": "Hospital <noreply@trust.example.net>"}, None, "automated sender"),
    ("no-reply", {"sender": "no-reply@example.net"}, None, "automated sender"),
]


async def test_each_rule_through_the_listener(service: Service, sink: Sink) -> None:
    """Stored and routed like any enquiry (the team hears of it), but never answered."""
    expected: dict[str, tuple[str, str]] = {}
    for n, (case, options, envelope, reason) in enumerate(CASES):
        options = {"sender": f"Sender {n} <person{n}@example.net>", "subject": f"Case {case}",
                   **options}
        raw = plain_email(BODY, **options)  # type: ignore[arg-type]
        sender = str(options["sender"]).rsplit("<", 1)[-1].strip(">").lower()
        reference = await deliver(service, raw, envelope_from=sender if envelope is None
                                  else envelope)
        expected[reference] = (case, reason)
    # the control: a person writing gets their acknowledgement
    control = await deliver(service, plain_email(BODY, sender="person@example.net",
                                                 headers=[("Auto-Submitted", "no")]),
                            envelope_from="person@example.net")

    with db(service) as session:
        for reference, (case, reason) in expected.items():
            enquiry = session.scalars(select(Enquiry).where(
                Enquiry.reference == reference)).one()
            assert enquiry.team, case
            suppressed = session.scalars(select(Event).where(
                Event.enquiry_id == enquiry.id, Event.kind == "reply-suppressed")).one()
            assert reason in suppressed.detail["reason"], (case, suppressed.detail)
            acks = session.scalars(select(OutboxItem).where(
                OutboxItem.enquiry_id == enquiry.id, OutboxItem.kind == "ack")).all()
            assert acks == [], case
        ack = session.scalars(select(OutboxItem).join(Enquiry).where(
            Enquiry.reference == control, OutboxItem.kind == "ack")).one()
        assert ack.recipient == "person@example.net"
        # routed: the breast team is told about the ones the rules did not file as spam
        notified = session.scalars(select(Enquiry.reference).join(
            OutboxItem, OutboxItem.enquiry_id == Enquiry.id).where(
            OutboxItem.kind == "notify")).all()
    assert {expected[r][0] for r in set(notified) & set(expected)} >= {
        "auto-replied", "list-id", "null-return-path", "mailer-daemon", "noreply"}


async def test_mail_carrying_our_own_message_id_gets_no_reply(
    service: Service, sink: Sink
) -> None:
    await deliver(service, plain_email(BODY, sender="first@example.net"),
                  envelope_from="first@example.net")
    ack = await eventually(lambda: next(iter(rows(service, OutboxItem, OutboxItem.kind == "ack")),
                                        None))
    echo = plain_email(BODY, sender="someone.else@example.net", subject="Fwd",
                       message_id=f"<{ack.message_id}>")
    reference = await deliver(service, echo, envelope_from="someone.else@example.net")
    with db(service) as session:
        enquiry = session.scalars(select(Enquiry).where(Enquiry.reference == reference)).one()
        event = session.scalars(select(Event).where(
            Event.enquiry_id == enquiry.id, Event.kind == "reply-suppressed")).one()
    assert "Message-ID is ours" in event.detail["reason"]


async def test_mail_from_our_own_addresses_triggers_nothing(service: Service, sink: Sink) -> None:
    raw = plain_email(BODY, sender="Breast team <breast-team@clinic.example>",
                      subject="Away until Monday")
    reference = await deliver(service, raw, envelope_from="breast-team@clinic.example")
    assert reference == "ok"  # no enquiry
    with db(service) as session:
        message = session.scalars(select(Message)).one()
        assert (message.kind, message.enquiry_id) == ("internal", None)
        assert session.scalars(select(OutboxItem)).all() == []
        assert session.scalars(select(Enquiry)).all() == []


# --- the daily acknowledgement cap ------------------------------------------------------------

@pytest.fixture
async def start(
    make_settings: Callable[..., Settings], sink: Sink, clock: FakeClock
) -> AsyncIterator[Callable[..., object]]:
    stack: list[object] = []

    async def start_service(**overrides: object) -> Service:
        settings = make_settings(relay_host="127.0.0.1", relay_port=sink.port, **overrides)
        context = running(settings, clock=clock)
        stack.append(context)
        return await context.__aenter__()

    yield start_service
    for context in reversed(stack):
        await context.__aexit__(None, None, None)  # type: ignore[attr-defined]


async def new_enquiry(service: Service, n: int, sender: str = "jane@example.com") -> str:
    raw = plain_email(BODY, sender=f"Jane <{sender}>", subject=f"Question {n}")
    return await deliver(service, raw, envelope_from=sender)


def acks_to(service: Service, address: str) -> list[OutboxItem]:
    return rows(service, OutboxItem, OutboxItem.kind == "ack", OutboxItem.recipient == address)


async def test_one_acknowledgement_per_sender_per_day(
    start: Callable[..., object], clock: FakeClock
) -> None:
    service = await start()  # type: ignore[misc]
    refs = [await new_enquiry(service, n) for n in range(3)]
    assert len(set(refs)) == 3  # every message is still an enquiry of its own ...
    assert len(acks_to(service, "jane@example.com")) == 1  # ... but only one is answered
    notified = {o.enquiry_id for o in rows(service, OutboxItem, OutboxItem.kind == "notify")}
    assert len(notified) == 3  # ... and all are routed to the team
    assert len(acks_to(service, "other@example.com")) == 0
    await new_enquiry(service, 9, sender="other@example.com")
    assert len(acks_to(service, "other@example.com")) == 1  # per sender

    clock.advance(timedelta(hours=23))
    await new_enquiry(service, 3)
    assert len(acks_to(service, "jane@example.com")) == 1
    clock.advance(timedelta(hours=2))
    await new_enquiry(service, 4)
    assert len(acks_to(service, "jane@example.com")) == 2


async def test_the_cap_and_window_are_configurable(
    start: Callable[..., object], clock: FakeClock
) -> None:
    service = await start(ack_limit_per_day=2, ack_window_hours=1)  # type: ignore[misc]
    for n in range(3):
        await new_enquiry(service, n)
    assert len(acks_to(service, "jane@example.com")) == 2
    clock.advance(timedelta(minutes=61))
    await new_enquiry(service, 3)
    assert len(acks_to(service, "jane@example.com")) == 3


# --- real auto-responders on loopback ---------------------------------------------------------

class Responder:
    """The service's relay, and an auto-responder at every address behind it: each message it
    receives is answered, by SMTP to the service's own listener, the way `style` says."""

    def __init__(self, style: str) -> None:
        self.style = style
        self.received: list[tuple[Envelope, EmailMessage]] = []
        self.sent: list[EmailMessage] = []
        self.target_port = 0
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        parsed = message_from_bytes(envelope.original_content or b"", policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        self.received.append((envelope, parsed))
        task = asyncio.create_task(self._answer(envelope, parsed))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return "250 2.0.0 Ok: queued"

    async def _answer(self, envelope: Envelope, original: EmailMessage) -> None:
        me = envelope.rcpt_tos[0]
        reply = EmailMessage()
        reply["From"] = me
        reply["To"] = str(original["From"])
        reply["Message-ID"] = make_msgid(domain=me.rpartition("@")[2])
        if self.style == "naive-unthreaded":  # a new thread every time, nothing to go on
            reply["Subject"] = "Away from my desk"
        else:
            reply["In-Reply-To"] = str(original["Message-ID"])
            reply["References"] = str(original["Message-ID"])
            prefix = "Automatic reply: " if self.style == "rfc3834" else "Re: "
            reply["Subject"] = prefix + str(original["Subject"])
        if self.style == "rfc3834":
            reply["Auto-Submitted"] = "auto-replied"
        reply.set_content("Thank you for your email. I am away until Monday and will read it "
                          "when I am back.")
        # RFC 3834 responders send from the null return path; naive ones from themselves
        envelope_from = "" if self.style == "rfc3834" else me
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=self.target_port) as client:
            await client.sendmail(envelope_from, [envelope.mail_from], bytes(reply))
        self.sent.append(reply)

    async def settle(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self.server is not None:
            self.server.close()

    def to(self, address: str) -> list[EmailMessage]:
        return [m for env, m in self.received if address in env.rcpt_tos]


@pytest.mark.parametrize("style", ["naive-threaded", "naive-unthreaded", "rfc3834"])
async def test_the_loop_with_an_auto_responder_stops_at_one(
    make_settings: Callable[..., Settings], clock: FakeClock, style: str
) -> None:
    responder = Responder(style)
    loop = asyncio.get_running_loop()
    responder.server = await loop.create_server(
        lambda: SMTP(responder, hostname="responder.test", loop=loop), "127.0.0.1", 0)
    settings = make_settings(relay_host="127.0.0.1", relay_port=responder.port)
    patient = "jane@example.com"
    try:
        async with running(settings, clock=clock) as service:
            responder.target_port = service.smtp_port
            await new_enquiry(service, 1, sender=patient)
            exchanges = -1
            for _round in range(8):  # each round: we send, the responder answers, we store
                await eventually(lambda: all(
                    o.status in ("sent", "failed", "cancelled")
                    for o in rows(service, OutboxItem)))
                await responder.settle()
                if len(responder.sent) == exchanges:
                    break
                exchanges = len(responder.sent)
            else:
                pytest.fail(f"still exchanging mail after 8 rounds ({exchanges} replies)")
            with db(service) as session:
                kinds = sorted(session.scalars(select(Message.kind)).all())
    finally:
        await responder.close()

    to_patient = responder.to(patient)
    assert len(to_patient) == 1  # the acknowledgement, and nothing after the out-of-office
    assert len(responder.sent) <= 3  # one answer from the patient's side, two from staff's
    for _env, message in responder.received:  # everything we send says it is automatic
        assert message["Auto-Submitted"] in ("auto-replied", "auto-generated")
        assert message["X-Auto-Response-Suppress"] == "All"
    assert to_patient[0]["Auto-Submitted"] == "auto-replied"
    assert kinds.count("enquiry") == (2 if style == "naive-unthreaded" else 1)
