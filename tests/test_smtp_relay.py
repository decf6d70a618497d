"""No open relay: we accept mail for our own mailboxes only, whatever the address tricks.

Each RCPT below goes over a real socket to the real listener; anything that is not exactly
one of our mailboxes (case aside) is refused, and nothing is ever queued for another domain.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from handler.app import Service
from handler.config import Settings
from handler.db import make_sessionmaker
from handler.models import Message, OutboxItem
from tests.builders import new_message_id, plain_email
from tests.conftest import Sink, eventually
from tests.smtp_raw import CLINIC, RawSMTP

NOT_RELAY = (550, "5.7.1")
NO_MAILBOX = (550, "5.1.1")

REFUSED = [
    # other domains, including ones that look like ours
    ("victim@elsewhere.example", NOT_RELAY),
    ("victim@ELSEWHERE.EXAMPLE", NOT_RELAY),
    ("enquiries@clinic.example.evil.example", NOT_RELAY),
    ("enquiries@evilclinic.example", NOT_RELAY),
    ("enquiries@sub.clinic.example", NOT_RELAY),
    ("enquiries@[127.0.0.1]", NOT_RELAY),
    ("enquiries", NOT_RELAY),
    # the %-hack and bang paths, even when they would end up at us
    ("victim%elsewhere.example@clinic.example", NOT_RELAY),
    ("enquiries%clinic.example@clinic.example", NOT_RELAY),
    ("elsewhere.example!victim@clinic.example", NOT_RELAY),
    ("victim@elsewhere.example%clinic.example", NOT_RELAY),
    # several @, quoted local parts carrying an address
    ("enquiries@clinic.example@elsewhere.example", (553, "5.1.3")),  # aiosmtpd: malformed
    ('"victim@elsewhere.example"@clinic.example', NOT_RELAY),
    ('"enquiries@clinic.example"@elsewhere.example', NOT_RELAY),
    # source routes (RFC 5321 appendix C); aiosmtpd would silently drop the route
    ("@clinic.example:victim@elsewhere.example", NOT_RELAY),
    ("@relay.example:enquiries@clinic.example", NOT_RELAY),
    ("@a.example,@b.example:victim@elsewhere.example", NOT_RELAY),
    # our domain, not our mailbox
    ("nobody@clinic.example", NO_MAILBOX),
    ("ENQUIRIES2@CLINIC.EXAMPLE", NO_MAILBOX),
    ("postmaster@clinic.example", NO_MAILBOX),
]

ACCEPTED = ["enquiries@clinic.example", "ENQUIRIES@CLINIC.EXAMPLE", "EnQuIrIeS@ClInIc.ExAmPlE",
            '"enquiries"@clinic.example']  # the quoted form is the same mailbox


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'handler.db'}"


@pytest.fixture
async def client(service: Service) -> AsyncIterator[RawSMTP]:
    c = await RawSMTP.connect(service.smtp_port)
    assert (await c.ehlo()).code == 250
    assert (await c.cmd("MAIL FROM:<enquiries@clinic.example>")).code == 250  # spoofed: ours
    yield c
    await c.close()


@pytest.mark.parametrize(("address", "expected"), REFUSED, ids=[a for a, _ in REFUSED])
async def test_refused(client: RawSMTP, address: str, expected: tuple[int, str]) -> None:
    reply = await client.cmd(f"RCPT TO:<{address}>")
    assert (reply.code, reply.text[:5]) == expected, reply
    reply = await client.cmd("DATA")
    assert reply.code == 503  # no recipient was accepted


@pytest.mark.parametrize("raw", [
    b"RCPT TO:<enquiries@clinic.example\x00@elsewhere.example>",
    b"RCPT TO:<enquiries@clinic.example\x00>",
    b"RCPT TO:<enquiries@clinic.exampl\xe2\x84\xaa>",  # KELVIN SIGN lower-cases to "k"
    b"RCPT TO:<enquiries@cl\xc4\xb1nic.example>",     # dotless i
    b"RCPT TO:<enquiries@clinic.example.>",
    b"RCPT TO:<>",
    b"RCPT TO:<enquiries@clinic.example> NOTIFY=NEVER ORCPT=rfc822;victim@elsewhere.example",
], ids=repr)
async def test_refused_raw(client: RawSMTP, raw: bytes) -> None:
    reply = await client.cmd(raw)
    assert 500 <= reply.code < 600, reply
    assert (await client.cmd("DATA")).code == 503


@pytest.mark.parametrize("address", ACCEPTED)
async def test_our_mailbox_in_any_case_is_accepted(client: RawSMTP, address: str) -> None:
    assert (await client.cmd(f"RCPT TO:<{address}>")).code == 250


async def test_a_mixed_envelope_delivers_only_to_us(
    service: Service, client: RawSMTP, sink: Sink
) -> None:
    """Refused recipients in the same transaction get nothing; the message is stored once and
    the only mail we send is our own acknowledgement and team notification."""
    for address, _ in REFUSED[:6]:
        assert (await client.cmd(f"RCPT TO:<{address}>")).code >= 500
    assert (await client.cmd(f"RCPT TO:<{CLINIC}>")).code == 250
    message_id = new_message_id()
    reply, _ = await client.data(plain_email(message_id=message_id,
                                             to="victim@elsewhere.example, " + CLINIC))
    assert reply.code == 250, reply

    def outbox() -> list[OutboxItem]:
        with make_sessionmaker(service.engine)() as session:
            return list(session.scalars(select(OutboxItem)))

    rows = await eventually(lambda: (r := outbox()) and all(x.status == "sent" for x in r) and r)
    recipients = {row.recipient for row in rows}
    assert "victim@elsewhere.example" not in recipients
    assert all(r.endswith("@clinic.example") or r == "jane.patient@example.com"
               for r in recipients), recipients
    await asyncio.sleep(0.3)
    for envelope, _ in sink.messages:
        assert all(r.endswith("@clinic.example") or r == "jane.patient@example.com"
                   for r in envelope.rcpt_tos), envelope.rcpt_tos
    with make_sessionmaker(service.engine)() as session:
        assert len(session.scalars(select(Message).where(Message.direction == "in")).all()) == 1


def test_relay_policy_does_not_depend_on_configured_case(
    make_settings: Callable[..., Settings],
) -> None:
    from handler.smtp_in import IntakeHandler

    settings = make_settings(mailboxes=("Enquiries@Clinic.Example",))
    handler = IntakeHandler(intake=None, mailboxes=settings.mailboxes,  # type: ignore[arg-type]
                            max_recipients=5)
    assert handler.rcpt_verdict("enquiries@clinic.example") == ""
    assert handler.rcpt_verdict("victim@elsewhere.example").startswith("550 5.7.1")


async def test_relay_refusals_do_not_log_addresses(
    service: Service, client: RawSMTP, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="handler.smtp")
    await client.cmd("RCPT TO:<victim@elsewhere.example>")
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "handler.smtp")
    assert "RCPT refused" in text and "victim" not in text and "elsewhere" not in text

