"""The listener's limits, each at limit-1, limit and limit+1, over real sockets: message size,
line length, recipients, commands per session, connections, idle time; STARTTLS with a
throwaway certificate; internal failures answer 451; smuggling stores exactly one message.

Protocol behaviour does not depend on the database, so these run on SQLite only.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import re
import ssl
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import select

from handler.app import Service
from handler.clock import FakeClock
from handler.db import make_sessionmaker
from handler.models import Message
from handler.service import Intake
from handler.smtp_in import (
    BARE_LINE_ENDING_DEFECT,
    COMMANDS_PER_SESSION,
    IntakeHandler,
    normalise_line_endings,
    start_smtp_server,
)
from tests.builders import new_message_id, plain_email
from tests.conftest import ROOT, Sink, Start, eventually
from tests.smtp_raw import CLINIC, RawSMTP, stuff


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'handler.db'}"


async def connect(service: Service, **kwargs: Any) -> RawSMTP:
    client = await RawSMTP.connect(service.smtp_port, **kwargs)
    assert client.greeting is not None and client.greeting.code == 220, client.greeting
    assert (await client.ehlo()).code == 250
    return client


def stored(service: Service, message_id: str) -> list[Message]:
    with make_sessionmaker(service.engine)() as session:
        return list(session.scalars(
            select(Message).where(Message.external_id == message_id.strip("<>"))))


def inbound_count(service: Service) -> int:
    with make_sessionmaker(service.engine)() as session:
        return len(session.scalars(select(Message.id).where(Message.direction == "in")).all())


def sized_message(size: int, message_id: str) -> bytes:
    """A valid message of exactly `size` octets as counted by SMTP (CRLF lines, no dots)."""
    head = plain_email("Size test.\n", message_id=message_id)
    remaining = size - len(head)
    assert remaining >= 1002, "size too small for this builder"
    lines = []
    while remaining > 1000:
        lines.append(b"x" * 998 + b"\r\n")
        remaining -= 1000
    if remaining == 1:  # no line is one octet long: split the last full line in two
        lines[-1:] = [b"x" * 497 + b"\r\n", b"x" * 500 + b"\r\n"]
    elif remaining:
        lines.append(b"x" * (remaining - 2) + b"\r\n")
    data = head + b"".join(lines)
    assert len(data) == size
    return data


async def good_message_still_accepted(client: RawSMTP, service: Service) -> None:
    """After a refusal the same session must work: RSET, a NOOP and a normal message."""
    assert (await client.cmd("RSET")).code == 250
    assert (await client.cmd("NOOP")).code == 250
    message_id = new_message_id()
    reply = await client.message(plain_email(message_id=message_id))
    assert reply.code == 250, reply
    assert len(stored(service, message_id)) == 1


# --- message size ---------------------------------------------------------------------------

async def test_default_size_limit_is_advertised_and_enforced_at_mail(start: Start) -> None:
    service = await start()
    client = await RawSMTP.connect(service.smtp_port)
    ehlo = await client.ehlo()
    limit = 25 * 1024 * 1024
    assert f"SIZE {limit}" in ehlo.lines
    assert not any(line.startswith("AUTH") for line in ehlo.lines)
    assert (await client.cmd(f"MAIL FROM:<a@example.org> SIZE={limit - 1}")).code == 250
    assert (await client.cmd("RSET")).code == 250
    assert (await client.cmd(f"MAIL FROM:<a@example.org> SIZE={limit}")).code == 250
    assert (await client.cmd("RSET")).code == 250
    too_big = await client.cmd(f"MAIL FROM:<a@example.org> SIZE={limit + 1}")
    assert too_big.code == 552 and "5.3.4" in too_big.text and str(limit) in too_big.text
    await good_message_still_accepted(client, service)
    await client.close()


async def test_default_size_limit_refuses_the_first_byte_too_many(start: Start) -> None:
    service = await start()
    limit = 25 * 1024 * 1024
    client = await connect(service)
    message_id = new_message_id()
    await client.envelope()
    reply, _ = await client.data(sized_message(limit + 1, message_id), timeout=60)
    assert reply.code == 552 and "5.3.4" in reply.text, reply
    assert stored(service, message_id) == []
    await good_message_still_accepted(client, service)
    await client.close()


async def test_size_limit_at_minus_one_limit_and_plus_one(start: Start) -> None:
    limit = 100_000
    service = await start(smtp_max_message_size=limit)
    client = await connect(service)
    for size, accepted in ((limit - 1, True), (limit, True), (limit + 1, False)):
        message_id = new_message_id()
        await client.envelope()
        reply, _ = await client.data(sized_message(size, message_id))
        if accepted:
            assert reply.code == 250, (size, reply)
            (row,) = stored(service, message_id)
            assert row.raw is not None and len(row.raw) == size
        else:
            assert reply.code == 552 and f"limit is {limit} bytes" in reply.text, reply
            assert stored(service, message_id) == []
    await good_message_still_accepted(client, service)
    await client.close()


# --- line length ------------------------------------------------------------------------------

def long_line_message(octets: int, message_id: str, *, first: bytes = b"y") -> bytes:
    """A message whose body has one line of `octets` octets including its CRLF."""
    line = first + b"y" * (octets - 3) + b"\r\n"
    assert len(line) == octets
    return plain_email("Before the long line.\n", message_id=message_id) + line + b"After.\r\n"


@pytest.mark.parametrize(("octets", "accepted"), [
    (999, True), (1000, True),  # RFC 5321 4.5.3.1.6: at most 1000 octets including CRLF
    (1001, True),  # aiosmtpd allows one more (room for a transparency dot): harmless
    (1002, False), (100_000, False),
])
async def test_line_length(start: Start, octets: int, accepted: bool) -> None:
    service = await start()
    client = await connect(service)
    message_id = new_message_id()
    await client.envelope()
    reply, _ = await client.data(long_line_message(octets, message_id))
    if accepted:
        assert reply.code == 250, reply
        (row,) = stored(service, message_id)
        assert "y" * (octets - 2) in row.text
    else:
        assert reply.code == 500 and "5.5.2" in reply.text and "1000" in reply.text, reply
        assert stored(service, message_id) == []
    await good_message_still_accepted(client, service)
    await client.close()


async def test_a_1000_octet_line_that_starts_with_a_dot_is_accepted(start: Start) -> None:
    """Dot-stuffing makes it 1001 octets on the wire; RFC 5321 does not count that dot."""
    service = await start()
    client = await connect(service)
    message_id = new_message_id()
    await client.envelope()
    payload = stuff(long_line_message(1000, message_id, first=b"."))
    assert b"\r\n..yyy" in payload
    reply, _ = await client.data(payload)
    assert reply.code == 250, reply
    (row,) = stored(service, message_id)
    assert "\n." + "y" * 997 + "\n" in row.text
    await client.close()


# --- recipients -------------------------------------------------------------------------------

async def test_recipients_per_message(start: Start) -> None:
    mailboxes = tuple(f"team{i}@clinic.example" for i in range(5))
    service = await start(mailboxes=mailboxes, smtp_max_recipients=3)
    client = await connect(service)
    assert (await client.cmd("MAIL FROM:<patient@example.org>")).code == 250
    for rcpt in mailboxes[:3]:  # limit-1 and limit
        assert (await client.cmd(f"RCPT TO:<{rcpt}>")).code == 250
    again = await client.cmd(f"RCPT TO:<{mailboxes[0].upper()}>")
    assert again.code == 250  # a repeat is the same delivery, not one more recipient
    over = await client.cmd(f"RCPT TO:<{mailboxes[3]}>")  # limit+1
    assert over.code == 452 and "4.5.3" in over.text
    message_id = new_message_id()
    reply, _ = await client.data(plain_email(message_id=message_id, to=mailboxes[0]))
    assert reply.code == 250
    assert len(stored(service, message_id)) == 1
    # the next transaction starts counting afresh
    assert (await client.cmd("MAIL FROM:<patient@example.org>")).code == 250
    for rcpt in mailboxes[2:5]:
        assert (await client.cmd(f"RCPT TO:<{rcpt}>")).code == 250
    await client.close()


async def test_a_flood_of_recipients_is_cut_off(start: Start) -> None:
    """Refused recipients count against the per-session budget: then 421 and goodbye."""
    service = await start()
    client = await connect(service)
    assert (await client.cmd("MAIL FROM:<patient@example.org>")).code == 250
    codes = [(await client.cmd(f"RCPT TO:<victim{i}@elsewhere.example>")).code
             for i in range(COMMANDS_PER_SESSION + 1)]
    assert codes == [550] * COMMANDS_PER_SESSION + [421]
    assert await client.closed_by_server(5)
    await client.close()

    # 10,000 pipelined: the server stops reading at the budget and drops the connection
    flood = await connect(service)
    assert (await flood.cmd("MAIL FROM:<patient@example.org>")).code == 250
    await flood.send(b"".join(b"RCPT TO:<victim%d@elsewhere.example>\r\n" % i
                              for i in range(10_000)))
    assert await flood.closed_by_server(10)
    await flood.close()
    other = await connect(service)  # the listener is fine
    await good_message_still_accepted(other, service)
    await other.close()


# --- commands per session ---------------------------------------------------------------------

async def test_commands_per_session(start: Start) -> None:
    service = await start()
    client = await RawSMTP.connect(service.smtp_port)
    for _ in range(COMMANDS_PER_SESSION - 1):
        assert (await client.cmd("NOOP")).code == 250
    assert (await client.cmd("NOOP")).code == 250  # the limit itself
    over = await client.cmd("NOOP")
    assert over.code == 421 and "4.7.0" in over.text
    assert await client.closed_by_server(5)
    await client.close()


async def test_unknown_commands_are_cut_off_early(start: Start) -> None:
    service = await start()
    client = await RawSMTP.connect(service.smtp_port)
    codes = [(await client.cmd(f"XBOGUS{i}")).code for i in range(5)]
    assert codes == [500, 500, 500, 500, 502]
    assert await client.closed_by_server(5)
    await client.close()


# --- connections ------------------------------------------------------------------------------

async def test_connection_cap(start: Start) -> None:
    service = await start(smtp_max_connections=5, smtp_max_connections_per_client=0)
    clients = [await RawSMTP.connect(service.smtp_port) for _ in range(5)]  # up to the limit
    assert all(c.greeting is not None and c.greeting.code == 220 for c in clients)
    refused = await RawSMTP.connect(service.smtp_port)  # limit+1
    assert refused.greeting is not None and refused.greeting.code == 421
    assert "4.7.0" in refused.greeting.text
    assert await refused.closed_by_server(5)
    await clients.pop().close()

    async def admitted() -> bool:
        client = await RawSMTP.connect(service.smtp_port)
        ok = client.greeting is not None and client.greeting.code == 220
        clients.append(client) if ok else await client.close()
        return ok

    for _ in range(50):
        if await admitted():
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("a freed slot was never given to a new client")
    assert (await clients[-1].ehlo()).code == 250
    await good_message_still_accepted(clients[-1], service)
    for c in clients:
        await c.close()


async def test_connections_per_client_address(start: Start) -> None:
    service = await start(smtp_max_connections_per_client=3)
    mine = [await RawSMTP.connect(service.smtp_port) for _ in range(3)]
    assert all(c.greeting is not None and c.greeting.code == 220 for c in mine)
    fourth = await RawSMTP.connect(service.smtp_port)
    assert fourth.greeting is not None and fourth.greeting.code == 421
    assert "from your address" in fourth.greeting.text
    neighbour = await connect(service, source="127.0.0.2")
    await good_message_still_accepted(neighbour, service)
    for c in [*mine, fourth, neighbour]:
        await c.close()


async def test_a_new_client_is_served_while_500_idle_connections_are_open(
    start: Start,
) -> None:
    service = await start()  # defaults: 1000 connections, 50 per client address
    idle: list[RawSMTP] = []
    for host in range(2, 12):  # 10 addresses x 50 = 500 idle sessions
        idle += await asyncio.gather(*(
            RawSMTP.connect(service.smtp_port, source=f"127.0.0.{host}") for _ in range(50)))
    assert all(c.greeting is not None and c.greeting.code == 220 for c in idle)
    assert len(idle) == 500
    one_more = await RawSMTP.connect(service.smtp_port, source="127.0.0.2")
    assert one_more.greeting is not None and one_more.greeting.code == 421
    started = asyncio.get_running_loop().time()
    patient = await connect(service, source="127.0.0.1")
    await good_message_still_accepted(patient, service)
    assert asyncio.get_running_loop().time() - started < 5
    for c in [*idle, one_more, patient]:
        await c.close()


# --- idle time --------------------------------------------------------------------------------

async def test_idle_session_is_closed_at_the_timeout(start: Start) -> None:
    service = await start(smtp_timeout=1)
    client = await connect(service)
    for _ in range(3):  # activity within the timeout keeps the session open
        await asyncio.sleep(0.6)
        assert (await client.cmd("NOOP")).code == 250
    started = asyncio.get_running_loop().time()
    assert await client.closed_by_server(5)
    waited = asyncio.get_running_loop().time() - started
    assert 0.8 < waited < 3, waited
    await client.close()


async def test_a_slow_data_phase_is_closed_at_the_timeout(start: Start) -> None:
    """The idle timer restarts only on a command, so dribbling DATA does not extend it."""
    service = await start(smtp_timeout=1)
    client = await connect(service)
    await client.envelope()
    assert (await client.cmd("DATA")).code == 354
    closed = False
    for _ in range(40):
        try:
            await client.send(b"x\r\n")
        except ConnectionError:
            closed = True
            break
        if client.reader.at_eof() or await client.closed_by_server(0.1):
            closed = True
            break
    assert closed
    assert inbound_count(service) == 0
    await client.close()


# --- STARTTLS ---------------------------------------------------------------------------------

def throwaway_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=localhost", "-addext",
         "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60)
    return cert, key


def client_context(cert: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert))
    return context


async def test_starttls_with_a_configured_certificate(start: Start, tmp_path: Path) -> None:
    cert, key = throwaway_certificate(tmp_path)
    service = await start(smtp_tls_cert=cert, smtp_tls_key=key)
    message_id = new_message_id()
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=service.smtp_port, start_tls=True,
                               tls_context=client_context(cert)) as client:
        assert client.get_transport_info("sslcontext") is not None
        assert "auth" not in client.esmtp_extensions
        response = await client.sendmail("patient@example.org", [CLINIC],
                                         plain_email(message_id=message_id))
        assert "queued as ENQ-" in response[1]
    assert len(stored(service, message_id)) == 1


async def test_commands_pipelined_before_the_tls_handshake_are_discarded(
    start: Start, tmp_path: Path
) -> None:
    """CVE-2024-34083: a MAIL FROM sent in the same packet as STARTTLS must not be treated as
    if it came through the encrypted channel."""
    cert, key = throwaway_certificate(tmp_path)
    service = await start(smtp_tls_cert=cert, smtp_tls_key=key)
    client = await connect(service)
    assert (await client.cmd(b"STARTTLS\r\nMAIL FROM:<injected@evil.example>")).code == 220
    await client.start_tls(client_context(cert))
    assert (await client.ehlo()).code == 250
    # had the injected MAIL been run, this would be "503 nested MAIL command"
    assert (await client.cmd("MAIL FROM:<patient@example.org>")).code == 250
    await client.close()


async def test_no_starttls_without_a_certificate(start: Start) -> None:
    service = await start()
    client = await RawSMTP.connect(service.smtp_port)
    assert "STARTTLS" not in (await client.ehlo()).lines
    assert (await client.cmd("STARTTLS")).code == 454
    await good_message_still_accepted(client, service)
    await client.close()


# --- internal failures ------------------------------------------------------------------------

class _BrokenMailHook(IntakeHandler):
    """Fault injection at the hook seam: any exception inside a session."""

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        raise RuntimeError("database password is hunter2")


async def test_an_exception_in_a_session_answers_451_without_details(start: Start) -> None:
    service = await start()
    handler = _BrokenMailHook(intake=service.intake, mailboxes=(CLINIC,), max_recipients=5)
    server = await start_smtp_server(service.settings, handler)
    try:
        client = await RawSMTP.connect(int(server.sockets[0].getsockname()[1]))
        await client.ehlo()
        reply = await client.cmd("MAIL FROM:<patient@example.org>")
        assert reply.code == 451 and reply.text.startswith("4.3.0"), reply
        assert "hunter2" not in reply.text and "Error" not in reply.text
        assert (await client.cmd("NOOP")).code == 250
        await client.close()
    finally:
        server.close()


async def test_a_message_that_cannot_be_handed_to_intake_answers_451(
    start: Start, clock: FakeClock
) -> None:
    service = await start()
    never_started = Intake(sessions=make_sessionmaker(service.engine, write=True),
                           ruleset=service.rules.current, clock=clock,
                           settings=service.settings)
    handler = IntakeHandler(intake=never_started, mailboxes=(CLINIC,), max_recipients=5)
    server = await start_smtp_server(service.settings, handler)
    try:
        client = await RawSMTP.connect(int(server.sockets[0].getsockname()[1]))
        await client.ehlo()
        await client.envelope()
        reply, _ = await client.data(plain_email())
        assert reply.code == 451 and "4.3.0" in reply.text, reply
        await client.close()
    finally:
        server.close()


async def test_a_message_arriving_during_shutdown_answers_451(start: Start) -> None:
    service = await start()
    client = await connect(service)
    await client.envelope()
    assert (await client.cmd("DATA")).code == 354
    await client.send(plain_email())
    await service.intake.stop()  # what `running()` does on SIGTERM
    await client.send(b".\r\n")
    reply = await client.reply(timeout=10)
    assert reply.code == 451 and "4.3.0" in reply.text, reply
    await client.close()


# --- smuggling and bare line endings ----------------------------------------------------------

SMUGGLED = (b"MAIL FROM:<admin@clinic.example>\r\nRCPT TO:<enquiries@clinic.example>\r\n"
            b"DATA\r\nFrom: admin@clinic.example\r\nSubject: smuggled\r\n"
            b"Message-ID: <smuggled@evil.example>\r\n\r\nsmuggled body\r\n")


@pytest.mark.parametrize("end_of_data", [
    b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n", b"\n.\r", b"\r\n\x00.\r\n",
], ids=repr)
async def test_smuggling_stores_exactly_one_message(
    start: Start, sink: Sink, end_of_data: bytes
) -> None:
    service = await start()
    client = await connect(service)
    message_id = new_message_id()
    first = plain_email("Hello, I am asking about my biopsy.\n", message_id=message_id)
    await client.envelope()
    payload = first + b"Tail text" + end_of_data + SMUGGLED
    reply, _ = await client.data(payload)
    assert reply.code == 250, reply
    (row,) = stored(service, message_id)
    assert "smuggled body" in row.text  # the would-be second message is the first one's text
    assert stored(service, "smuggled@evil.example") == []
    assert inbound_count(service) == 1
    await eventually(lambda: len(sink.messages) >= 2)
    await asyncio.sleep(0.5)  # nothing else arrives
    acks = [m for m in sink.messages if m[0].rcpt_tos == ["jane.patient@example.com"]]
    assert len(acks) == 1
    assert not any("admin@clinic.example" in env.rcpt_tos for env, _ in sink.messages)
    await client.close()


async def test_bare_line_endings_are_stored_normalised_with_a_defect(
    start: Start, sink: Sink
) -> None:
    service = await start()
    client = await connect(service)
    message_id = new_message_id()
    lf_only = plain_email("Line one\nLine two\n", message_id=message_id).replace(b"\r\n", b"\n")
    await client.envelope()
    reply, _ = await client.data(lf_only + b"\r\n")
    assert reply.code == 250, reply
    (row,) = stored(service, message_id)
    assert BARE_LINE_ENDING_DEFECT in row.defects
    assert row.raw is not None and b"\n" not in row.raw.replace(b"\r\n", b"")
    assert "Line one\nLine two" in row.text
    await good_message_still_accepted(client, service)
    await client.close()


def test_normalise_line_endings() -> None:
    assert normalise_line_endings(b"a\r\nb\r\n") == (b"a\r\nb\r\n", False)
    assert normalise_line_endings(b"a\nb\rc\r\r\n") == (b"a\r\nb\r\nc\r\n\r\n", True)
    assert normalise_line_endings(b"") == (b"", False)


# --- pinned versions --------------------------------------------------------------------------

PINS = {"aiosmtpd": (1, 4, 6), "aiosmtplib": (5, 1, 2), "jinja2": (3, 1, 6)}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text)[:3])


def test_security_minimum_versions_are_pinned_and_installed() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    declared = {}
    for spec in project["project"]["dependencies"]:
        if m := re.match(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?\s*>=\s*([\d.]+)", spec):
            declared[m.group(1).lower()] = _version(m.group(2))
    for package, minimum in PINS.items():
        assert declared.get(package, ()) >= minimum, (package, declared.get(package))
        assert _version(importlib.metadata.version(package)) >= minimum, package
