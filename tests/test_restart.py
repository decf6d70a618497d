"""Restart safety with a real child process: stop, and kill -9, lose nothing and never
acknowledge twice (except the documented ambiguous case, which repeats the Message-ID)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import aiosmtplib
from sqlalchemy import create_engine, func, select

from handler.config import Settings
from handler.models import Message
from tests.conftest import CLINIC, Sink
from tests.procs import start_service


def patient_mail(i: int) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Patient {i} <patient{i}@example.org>"
    msg["To"] = CLINIC
    msg["Subject"] = f"Question about my lymphoma treatment ({i})"
    msg["Message-ID"] = make_msgid(idstring=f"p{i}", domain="example.org")
    msg.set_content(f"I have follicular lymphoma and would like a second opinion. Case {i}.")
    return msg


async def try_send(port: int, msg: EmailMessage) -> bool:
    """True only when the server answered 250 to DATA."""
    try:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10) as client:
            await client.send_message(msg, recipients=[CLINIC])
        return True
    except (aiosmtplib.SMTPException, OSError):
        return False


def stored_ids(settings: Settings) -> Counter[str]:
    engine = create_engine(settings.sqlalchemy_url)
    with engine.connect() as conn:
        ids = conn.execute(select(Message.external_id).where(Message.direction == "in")).scalars()
        result = Counter(ids)
    engine.dispose()
    return result


async def test_kill_9_loses_nothing_and_acknowledges_once(
    make_settings: Callable[..., Settings], sink: Sink, tmp_path: Path
) -> None:
    settings = make_settings()
    proc = await start_service(settings, relay_port=sink.port, tmp_path=tmp_path)
    mails = [patient_mail(i) for i in range(60)]
    accepted: set[str] = set()
    rng = random.Random(7)

    async def client(batch: list[EmailMessage]) -> None:
        for msg in batch:
            if proc.smtp_port and await try_send(proc.smtp_port, msg):
                accepted.add(msg["Message-ID"].strip("<>"))

    for round_ in range(3):
        pending = [m for m in mails if m["Message-ID"].strip("<>") not in accepted]
        batches = [pending[i::5] for i in range(5)]
        senders = asyncio.gather(*(client(b) for b in batches))
        await asyncio.sleep(rng.uniform(0.05, 0.4))
        await proc.kill9()
        await senders
        await proc.start()
        assert round_ < 3

    # The senders retry whatever did not get a 250, as real MTAs do.
    for msg in mails:
        if msg["Message-ID"].strip("<>") not in accepted:
            assert await try_send(proc.smtp_port, msg)
            accepted.add(msg["Message-ID"].strip("<>"))

    ids = stored_ids(settings)
    assert set(ids) == accepted and all(n == 1 for n in ids.values())
    # every patient gets an acknowledgement; a repeat may only be the same Message-ID
    await sink.wait_for(len(mails) * 2, timeout=60)
    await asyncio.sleep(3)  # leases of rows in flight at the kill expire after 2 s
    await proc.stop()
    acks: dict[str, set[str]] = {}
    for _, m in sink.messages:
        if str(m["To"]).startswith("patient"):
            acks.setdefault(str(m["To"]), set()).add(str(m["Message-ID"]))
    assert len(acks) == len(mails)
    assert all(len(message_ids) == 1 for message_ids in acks.values()), acks


async def test_graceful_restart_sends_nothing_twice(
    make_settings: Callable[..., Settings], sink: Sink, tmp_path: Path
) -> None:
    settings = make_settings()
    proc = await start_service(settings, relay_port=sink.port, tmp_path=tmp_path)
    for i in range(5):
        assert await try_send(proc.smtp_port, patient_mail(i))
    await sink.wait_for(10)
    assert await proc.stop() == 0
    await proc.start()
    assert await try_send(proc.smtp_port, patient_mail(99))
    await sink.wait_for(12)
    await asyncio.sleep(1.5)
    await proc.stop()
    assert len(sink.messages) == 12
    assert sum(1 for c in stored_ids(settings).values() if c == 1) == 6
    engine = create_engine(settings.sqlalchemy_url)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Message)).scalar() == 6
    engine.dispose()
