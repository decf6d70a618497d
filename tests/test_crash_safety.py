"""Crash safety, measured: 1,000 messages from 20 concurrent clients while the server is
killed with SIGKILL at random points; afterwards every message that got a 250 is stored
exactly once and every patient has exactly one acknowledgement Message-ID. A resent copy is
allowed only in the ambiguous case (relay said 250, we died before recording it), and then
it repeats the same Message-ID. Also: the durability settings on a live connection.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
from sqlalchemy import func, select, text

from handler.app import Service
from handler.config import Settings
from handler.models import Enquiry
from tests.conftest import CLINIC, Sink
from tests.procs import start_service
from tests.test_restart import patient_mail, stored_ids

MESSAGES = 1000
CLIENTS = 20
KILLS = 4
DISPATCH_BATCH = 50
"""The most one kill may leave ambiguous: what was sent but not yet recorded (at most
RECORD_EVERY = 0.1 s of sends, plus the 8 in flight); generous at this test's rate."""


def test_durability_settings_on_a_live_connection(service: Service) -> None:
    with service.engine.connect() as conn:
        if service.engine.dialect.name == "sqlite":
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
        else:
            assert conn.execute(text("SHOW synchronous_commit")).scalar() == "on"
            assert conn.execute(text("SHOW fsync")).scalar() == "on"


async def test_1000_messages_20_clients_and_kill_9(
    make_settings: Callable[..., Settings], sink: Sink, tmp_path: Path
) -> None:
    settings = make_settings()
    proc = await start_service(settings, relay_port=sink.port, tmp_path=tmp_path)
    rng = random.Random(20240506)
    mails = [patient_mail(i) for i in range(MESSAGES)]
    accepted: dict[str, str] = {}  # Message-ID -> the reference in our 250
    attempts = Counter[str]()
    progress = asyncio.Condition()  # notified on every 250
    up = asyncio.Event()  # the server is accepting connections
    up.set()
    started = time.perf_counter()

    async def client(batch: list[EmailMessage]) -> None:
        """Sends its share in one session, as an MTA would; reconnects and re-sends whatever
        did not get a 250 (the server was killed, or answered 4xx)."""
        smtp: aiosmtplib.SMTP | None = None
        for msg in batch:
            message_id = msg["Message-ID"].strip("<>")
            while message_id not in accepted:
                attempts[message_id] += 1
                try:
                    if smtp is None:
                        await up.wait()
                        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=proc.smtp_port,
                                               timeout=15)
                        await smtp.connect()
                    _errors, response = await smtp.send_message(msg, recipients=[CLINIC])
                    accepted[message_id] = response.rsplit(" ", 1)[-1]
                    async with progress:
                        progress.notify_all()
                except (aiosmtplib.SMTPException, OSError):
                    if smtp is not None:
                        smtp.close()
                    smtp = None
                    await asyncio.sleep(0.02)
        if smtp is not None:
            await smtp.quit()

    async def killer() -> list[int]:
        points = sorted(rng.sample(range(50, MESSAGES - 50), KILLS))
        for point in points:
            async with progress:
                await progress.wait_for(lambda p=point: len(accepted) >= p)
            await asyncio.sleep(rng.uniform(0, 0.05))
            up.clear()
            await proc.kill9()
            await proc.start()
            up.set()
        return points

    clients = asyncio.gather(*(client(mails[i::CLIENTS]) for i in range(CLIENTS)))
    points, _ = await asyncio.gather(killer(), clients)
    intake_seconds = time.perf_counter() - started

    # every 250 is stored exactly once, under the reference that 250 carried
    ids = await asyncio.to_thread(stored_ids, settings)
    assert set(ids) == set(accepted) and len(accepted) == MESSAGES
    assert all(n == 1 for n in ids.values())
    references = set(accepted.values())
    assert len(references) == MESSAGES, "a re-sent message must get its first reference"
    assert await asyncio.to_thread(_enquiry_references, settings) == references

    # one acknowledgement and one notification per enquiry, resends only with the same id
    await sink.wait_for(2 * MESSAGES, timeout=120)
    await asyncio.sleep(3)  # rows leased at a kill are re-sent once the 2 s lease expires
    await proc.stop()
    ids_by_intent: dict[tuple[str, str], set[str]] = defaultdict(set)
    deliveries = Counter[str]()
    for _, m in sink.messages:
        ids_by_intent[(str(m["To"]), str(m["X-Enquiry-Reference"]))].add(str(m["Message-ID"]))
        deliveries[str(m["Message-ID"])] += 1
    acks = {to for to, _ in ids_by_intent if to.startswith("patient")}
    assert len(acks) == MESSAGES
    assert len(ids_by_intent) == 2 * MESSAGES
    assert all(len(message_ids) == 1 for message_ids in ids_by_intent.values())
    resent = sum(n - 1 for n in deliveries.values())
    assert resent <= KILLS * DISPATCH_BATCH
    print(f"\n{MESSAGES} messages, {CLIENTS} clients, kill -9 after {points} acceptances: "
          f"intake {intake_seconds:.1f} s, {sum(attempts.values()) - MESSAGES} re-sends by "
          f"clients, {resent} outbound mails delivered twice (same Message-ID)")


def _enquiry_references(settings: Settings) -> set[str]:
    from sqlalchemy import create_engine

    engine = create_engine(settings.sqlalchemy_url)
    with engine.connect() as conn:
        refs = set(conn.execute(select(Enquiry.reference)).scalars())
        assert conn.execute(select(func.count()).select_from(Enquiry)).scalar() == len(refs)
    engine.dispose()
    return refs
