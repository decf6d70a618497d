"""The CPU our webhook path needs per request without hand-overs or contention: each stage
alone, one after another, in one process.

`handler serve` answers an inbound text in three processes that share the machine's cores
with each other and with the load generator; what each costs there is inflated by
hand-overs, wake-ups and contention. This measures the same work with none of that, one
stage after another in this process, on a fresh SQLite database (cheaper than PostgreSQL):

1. **parse**: `parse_sms` on each signed form (what the service adds to (b)'s parsing);
2. **intake**: `Intake._write_batch` on those messages in groups of `GROUP` (lookups,
   interceptors, rules, the enquiry and what it queues, one commit per group), as the intake
   worker runs it;
3. **delivery**: the real `Dispatcher` sending what intake queued (each text's
   acknowledgement to the local SMS folder, each team notification through the relay), as
   the delivery worker runs it, but with nothing else running.

Each figure is process CPU (every thread) per request, after a warm-up of `WARM` requests
whose outbox rows are delivered first, so template compilation and connections are not
counted. Added to (b)'s own CPU per request it is what one stored, routed and answered
request costs when nothing else runs; compared with the CPU the machine has per request at
the target rate (its cores, less what wrk needs), it says whether the target is within reach
at all. (Measured here it comes out close to what the three processes spend together under
wrk: the hand-overs between them cost little; the work itself is what does not fit.)
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

from sqlalchemy import Engine, func, select

from handler import app, db
from handler.bench_harness import remove_sqlite, service_env
from handler.clock import SystemClock
from handler.config import load_settings
from handler.dispatch import Dispatcher
from handler.inbound import InboundMessage
from handler.live import LiveRules
from handler.models import OutboxItem
from handler.parse_sms import parse_sms
from handler.service import AcceptOutcome, Intake

GROUP = 20
"""Messages per intake transaction: about what the intake worker gathers at 32 connections."""
WARM = 100


@dataclass(frozen=True)
class Floor:
    """µs of CPU per request of each stage alone."""

    parse: float
    intake: float
    delivery: float
    texts: int
    emails: int
    """What delivery sent for the timed requests (a text and an email for each, normally)."""
    requests: int

    @property
    def total(self) -> float:
        return self.parse + self.intake + self.delivery


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


async def measure_floor(work: Path, bodies: Sequence[str], *, relay_port: int,
                        extra_env: dict[str, str]) -> Floor:
    """Floor figures for `bodies` (url-encoded Twilio forms, each its own MessageSid)."""
    warm = min(WARM, len(bodies) // 5)
    if len(bodies) - warm < 1:
        raise ValueError("floor: no bodies to time")
    path = work / "floor.db"
    env = service_env(database_url=f"sqlite:///{path}", var_dir=work / "var-floor",
                      relay_port=relay_port, extra=extra_env)
    settings = load_settings(env)
    clock = SystemClock()
    await asyncio.to_thread(db.upgrade, settings)
    engine = db.make_engine(settings.sqlalchemy_url)
    try:
        rules = LiveRules(rules_dir=settings.rules_dir, templates_dir=settings.templates_dir,
                          max_sms_segments=settings.sms_max_segments, now=clock.now())
        intake = app.build_intake(settings, sessions=db.make_sessionmaker(engine, write=True),
                                  rules=rules, clock=clock)
        delivery = app.build_delivery(
            settings, sessions=db.make_sessionmaker(engine, write=True), rules=rules,
            clock=clock, email=app.build_email_transport(settings),
            sms=app.build_sms_transport(settings))
        forms = [dict(parse_qsl(body, keep_blank_values=True)) for body in bodies]
        try:
            _store(intake, [parse_sms(form) for form in forms[:warm]])
            await _deliver(delivery.dispatcher)
            before = _sent(engine)
            c0 = _cpu()
            msgs = [parse_sms(form) for form in forms[warm:]]
            c1 = _cpu()
            _store(intake, msgs)
            c2 = _cpu()
            await _deliver(delivery.dispatcher)
            c3 = _cpu()
        finally:
            await app.stop_delivery(delivery)
        after = _sent(engine)
        n = len(msgs)
        return Floor(parse=(c1 - c0) * 1e6 / n, intake=(c2 - c1) * 1e6 / n,
                     delivery=(c3 - c2) * 1e6 / n,
                     texts=after.get("sms", 0) - before.get("sms", 0),
                     emails=after.get("email", 0) - before.get("email", 0), requests=n)
    finally:
        engine.dispose()
        remove_sqlite(path)
        shutil.rmtree(settings.var_dir, ignore_errors=True)


def _sent(engine: Engine) -> dict[str, int]:
    """Outbox rows sent, by channel; raises if any row is left unsent (the relay failed)."""
    with engine.connect() as conn:
        rows = conn.execute(select(OutboxItem.channel, OutboxItem.status, func.count())
                            .group_by(OutboxItem.channel, OutboxItem.status)).all()
    left = {f"{channel} {status}": n for channel, status, n in rows if status != "sent"}
    if left:
        raise RuntimeError(f"floor: outbox rows not sent: {left}")
    return {channel: n for channel, _status, n in rows}


def _store(intake: Intake, msgs: list[InboundMessage]) -> None:
    for i in range(0, len(msgs), GROUP):
        for outcome in intake._write_batch(msgs[i:i + GROUP]):
            if not isinstance(outcome, AcceptOutcome) or outcome.duplicate:
                raise RuntimeError(f"floor: a text was not stored: {outcome!r}")


async def _deliver(dispatcher: Dispatcher) -> int:
    """Send everything due; how many rows were claimed."""
    claimed = 0
    while n := await dispatcher.run_until_idle():
        claimed += n
    return claimed
