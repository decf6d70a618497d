"""Hostile and broken mail through the real listener and store (SQLite and PostgreSQL).

Every message of the corpus (tests/hostile_mail.py) and of a hypothesis generator is stored
once with its defects, answered within a second of the final dot, and the same SMTP session
goes on working. The acknowledgements and team notifications that follow carry no injected
header and show injected template syntax literally. Memory is measured with tracemalloc.
"""

from __future__ import annotations

import asyncio
import re
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, find, given, settings
from sqlalchemy import func, select

from handler.app import Service
from handler.db import make_sessionmaker
from handler.models import Message, OutboxItem
from tests.builders import new_message_id, plain_email
from tests.conftest import Sink, eventually
from tests.hostile_mail import (
    INJECTED,
    TEMPLATE_MARK,
    TOKEN,
    Case,
    corpus,
    generated_message,
)
from tests.smtp_raw import RawSMTP, stuff

SERVER_SECONDS = 1.0
"""The issue's bar per hostile message: from the final dot to our reply (the server's own
work: parse, classify, commit), so a busy machine's client side does not count."""
MEMORY_FACTOR = 50
MEMORY_FLOOR = 256 * 1024
"""Peak memory allocated while one message is handled: at most MEMORY_FACTOR times its size,
counting a message under MEMORY_FLOOR as that big (fixed costs dominate small ones)."""

CASES = {case.name: case for case in corpus()}


def inbound(service: Service) -> int:
    with make_sessionmaker(service.engine)() as session:
        return session.scalar(select(func.count()).select_from(Message).where(
            Message.direction == "in")) or 0


def newest(service: Service) -> dict[str, Any]:
    with make_sessionmaker(service.engine)() as session:
        row = session.scalars(select(Message).where(Message.direction == "in")
                              .order_by(Message.id.desc()).limit(1)).one()
        return {"subject": row.subject, "text": row.text, "sender": row.sender,
                "defects": list(row.defects), "raw": row.raw, "headers": dict(row.headers)}


@pytest.fixture
async def client(service: Service) -> AsyncIterator[RawSMTP]:
    c = await RawSMTP.connect(service.smtp_port)
    assert (await c.ehlo()).code == 250
    yield c
    await c.close()


async def send_case(client: RawSMTP, case: Case) -> tuple[int, str, float]:
    await client.envelope(sender="patient@example.org")
    reply, seconds = await client.data(stuff(case.data))
    return reply.code, reply.text, seconds


def check_stored(case: Case, row: dict[str, Any]) -> None:
    for wanted in case.defects:
        assert any(wanted in d for d in row["defects"]), (wanted, row["defects"])
    if case.sender is not None:
        assert row["sender"] == case.sender, row["sender"]
    for check in case.checks:
        check(row)
    for key in ("subject", "text", "sender"):
        assert "\x00" not in row[key]
    assert "\r" not in row["subject"] and "\n" not in row["subject"]


async def test_hostile_corpus_in_one_session(
    service: Service, client: RawSMTP, sink: Sink
) -> None:
    failures: list[str] = []
    timings: dict[str, float] = {}
    for case in CASES.values():
        before = inbound(service)
        try:
            code, text, seconds = await send_case(client, case)
            timings[case.name] = seconds
            assert code == 250, f"{code} {text}"
            assert (await client.cmd("NOOP")).code == 250
            assert inbound(service) == before + 1, "not stored exactly once"
            check_stored(case, newest(service))
            assert seconds < SERVER_SECONDS, f"{seconds:.2f} s after the final dot"
        except Exception as exc:
            failures.append(f"{case.name}: {exc!r}"[:500])
    message_id = new_message_id()
    await client.envelope()
    reply, _ = await client.data(plain_email(message_id=message_id))
    assert reply.code == 250, "the session did not survive the corpus"
    slowest = sorted(timings.items(), key=lambda kv: -kv[1])[:5]
    print("slowest (s after the final dot):", [(k, round(v, 3)) for k, v in slowest])
    assert not failures, "\n".join(failures)

    await outbox_settled(service)
    check_outbound(sink)


async def outbox_settled(service: Service) -> None:
    def settled() -> bool:
        with make_sessionmaker(service.engine)() as session:
            busy = session.scalar(select(func.count()).select_from(OutboxItem).where(
                OutboxItem.status.in_(("pending", "sending"))))
            return busy == 0
    service.ticker.wake()
    try:
        await eventually(settled, timeout=60)
    except AssertionError:
        with make_sessionmaker(service.engine)() as session:
            for r in session.scalars(select(OutboxItem).where(
                    OutboxItem.status.in_(("pending", "sending")))):
                print("STUCK", r.id, r.kind, r.status, r.attempts, r.recipient, r.due_at,
                      r.last_error[:300])
        raise
    await asyncio.sleep(0.2)


EVALUATED_MARK = re.compile(r"(?<![0-9A-Za-z])1337(?![0-9A-Za-z@])")


def check_outbound(sink: Sink) -> None:
    """Nothing we sent carries an injected header, a CR/LF inside a header, a rendered
    template expression, or goes back to our own mailbox."""
    assert sink.messages, "no acknowledgement or notification was sent at all"
    literal_seen = False
    for envelope, parsed in sink.messages:
        raw = envelope.original_content or b""
        head = raw.split(b"\r\n\r\n", 1)[0]
        for line in head.split(b"\r\n"):
            assert not line.lower().startswith((b"bcc:", INJECTED.lower().encode() + b":")), line
        assert "enquiries@clinic.example" not in envelope.rcpt_tos
        for name, value in parsed.items():
            assert "\r" not in str(value) and "\n" not in str(value), (name, value)
        texts = [str(parsed["Subject"])] + [
            part.get_content() for part in parsed.walk()
            if part.get_content_maintype() == "text"]
        joined = "\n".join(texts)
        # Evaluated, the mark reads "1337" on its own; random hex in Message-IDs and
        # addresses may hold those digits too ("...f1337@example.org").
        assert not EVALUATED_MARK.search(joined), "patient text was rendered as a template"
        literal_seen |= TEMPLATE_MARK in joined
    assert literal_seen, "the template-injection text never reached a notification literally"


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(generated=generated_message())
async def test_generated_messages_are_stored_once(service: Service, generated: bytes) -> None:
    payload = generated.replace(TOKEN, uuid.uuid4().hex.encode())
    before = inbound(service)
    c = await RawSMTP.connect(service.smtp_port)
    try:
        assert (await c.ehlo()).code == 250
        await c.envelope()
        reply, seconds = await c.data(stuff(payload))
        assert reply.code == 250, reply
        assert seconds < SERVER_SECONDS
        assert (await c.cmd("NOOP")).code == 250
        assert inbound(service) == before + 1
        row = newest(service)
        assert "\x00" not in row["subject"] + row["text"] + row["sender"]
        assert "\r" not in row["subject"] and "\n" not in row["subject"]
    finally:
        await c.close()


async def test_acknowledgement_of_a_generated_corpus_is_clean(
    service: Service, sink: Sink
) -> None:
    """The outbound side of the generator: a fixed batch, then every reply checked."""
    seen: list[bytes] = []

    def collect(example: bytes) -> bool:
        seen.append(example)
        return len(seen) >= 25

    find(generated_message(), collect, settings=settings(
        max_examples=200, database=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]))
    c = await RawSMTP.connect(service.smtp_port)
    assert (await c.ehlo()).code == 250
    for payload in seen:
        await c.envelope()
        reply, _seconds = await c.data(stuff(payload.replace(TOKEN, uuid.uuid4().hex.encode())))
        assert reply.code == 250, reply
    case = CASES["template-injection"]
    await c.envelope()
    assert (await c.data(stuff(case.data)))[0].code == 250
    await c.close()
    await outbox_settled(service)
    check_outbound(sink)


@pytest.mark.parametrize("name", ["parts-10000", "header-1mb", "headers-10000",
                                  "rfc822-nested-1000", "html-1mb-nested"])
async def test_memory_is_bounded(service: Service, client: RawSMTP, name: str) -> None:
    case = CASES[name]
    payload = stuff(case.data)
    await client.envelope()
    assert (await client.cmd("DATA")).code == 354
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        started = time.perf_counter()
        await client.send(payload + b".\r\n")
        reply = await client.reply(timeout=60)
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    assert reply.code == 250, reply
    print(f"{name}: {len(payload) / 1e6:.2f} MB, peak +{peak / 1e6:.1f} MB "
          f"({peak / len(payload):.1f}x), {elapsed:.2f} s with tracemalloc on")
    assert peak < MEMORY_FACTOR * max(len(payload), MEMORY_FLOOR)
    assert (await client.cmd("NOOP")).code == 250


@pytest.mark.parametrize("name", ["parts-10000"])  # deep nesting is cut short before parsing
async def test_a_costly_message_does_not_stall_other_sessions(
    service: Service, name: str
) -> None:
    """Large or many-part messages are parsed in a worker thread: a second client's NOOPs
    are answered promptly while one that costs the parser ~0.3 s is being handled."""
    big = await RawSMTP.connect(service.smtp_port)
    other = await RawSMTP.connect(service.smtp_port)
    assert (await big.ehlo()).code == 250 and (await other.ehlo()).code == 250
    await big.envelope()
    assert (await big.cmd("DATA")).code == 354
    await big.send(stuff(CASES[name].data))
    await big.send(b".\r\n")
    pending = asyncio.ensure_future(big.reply(timeout=60))
    worst, noops = 0.0, 0
    while not pending.done() and noops < 80:  # within the per-session command budget
        started = time.perf_counter()
        assert (await other.cmd("NOOP")).code == 250
        worst = max(worst, time.perf_counter() - started)
        noops += 1
        await asyncio.sleep(0.01)
    assert (await pending).code == 250
    print(f"worst NOOP latency while the big message was handled: {worst:.3f} s")
    # Parsed on the loop, the big message would hold every NOOP for its whole ~0.3 s; the
    # margin below that absorbs a loaded machine (CI shares its cores).
    assert worst < 0.25
    assert noops >= 3, "the big message was handled too fast to tell"
    await big.close()
    await other.close()


def test_corpus_messages_fit_smtp_lines() -> None:
    """The corpus must reach the parser: no line may trip the listener's line limit."""
    for case in CASES.values():
        longest = max(len(line) for line in stuff(case.data).split(b"\r\n"))
        assert longest <= 999, (case.name, longest)

