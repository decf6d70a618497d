"""CPU the intake writer spends per message, on SQLite and PostgreSQL, without SMTP.

Feeds N parsed 2 KB messages shaped like smtp-source's (one sender, as in `scripts/bench
intake`) straight into `Intake._write_batch` in groups of --batch, on a fresh database,
with the interceptors `handler.app.running` installs. Prints µs of process CPU and of wall
time per message. --profile FILE writes a cProfile of the timed part. --repeat N runs each
database N times (fresh each time) and also prints the lowest CPU figure: on a shared
machine the lowest is the least disturbed.

Run: .venv/bin/python scripts/bench_intake_writer.py [--count N] [--batch N] [--repeat N]
     [sqlite] [postgresql]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import create_engine, text

from handler import db
from handler.bench_harness import CLINIC, ROOT, Load, source_message
from handler.bounces import Bounces
from handler.clock import SystemClock
from handler.config import Settings
from handler.live import LiveRules
from handler.loops import OwnMail
from handler.parse_email import parse_email
from handler.service import AcceptOutcome, Intake
from handler.sms_keywords import SmsKeywords

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def build_intake(settings: Settings) -> tuple[Intake, object]:
    """As handler.app.running does."""
    engine = db.make_engine(settings.sqlalchemy_url)
    sessions = db.make_sessionmaker(engine, write=True)
    clock = SystemClock()
    rules = LiveRules(rules_dir=settings.rules_dir, templates_dir=settings.templates_dir,
                      max_sms_segments=settings.sms_max_segments, now=clock.now())
    intake = Intake(sessions=sessions, ruleset=rules.current, clock=clock, settings=settings)
    intake.interceptors.append(SmsKeywords(settings=settings))
    intake.interceptors += [Bounces.from_settings(settings),
                            OwnMail(ruleset=rules.current,
                                    mailboxes=(*settings.mailboxes, settings.clinic_address))]
    return intake, engine


def run(kind: str, count: int, batch: int, profile: str) -> float:
    """One run on a fresh database; returns µs of CPU per message."""
    work = Path(tempfile.mkdtemp(prefix="intake-writer-"))
    dbname = f"iw_{uuid.uuid4().hex[:10]}"
    admin = None
    if kind == "sqlite":
        url = f"sqlite:///{work / 'handler.db'}"
    else:
        admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{dbname}"'))
        url = f"postgresql://postgres@127.0.0.1:5432/{dbname}"
    settings = Settings(database_url=url, rules_dir=ROOT / "rules",
                        templates_dir=ROOT / "templates", var_dir=work / "var",
                        mailboxes=(CLINIC,), clinic_address=CLINIC)
    try:
        db.upgrade(settings)
        intake, engine = build_intake(settings)
        load = Load(count, 2048)
        run_id = uuid.uuid4().hex[:8]
        msgs = [parse_email(source_message(load, i, f"{run_id}.{i}@bench.example"),
                            envelope_from=load.sender, envelope_rcpts=[CLINIC],
                            mailboxes=[CLINIC]) for i in range(count)]
        warm = batch * 5
        for i in range(0, warm, batch):
            intake._write_batch(msgs[i:i + batch])
        profiler = cProfile.Profile() if profile else None
        t0, wall0 = os.times(), time.perf_counter()
        if profiler:
            profiler.enable()
        results: list[AcceptOutcome | Exception] = []
        for i in range(warm, count, batch):
            results += intake._write_batch(msgs[i:i + batch])
        if profiler:
            profiler.disable()
            profiler.dump_stats(f"{profile}.{kind}")
        t1, wall = os.times(), time.perf_counter() - wall0
        user, system = t1.user - t0.user, t1.system - t0.system
        cpu = user + system
        bad = [r for r in results if not isinstance(r, AcceptOutcome) or r.duplicate]
        if bad:
            raise SystemExit(f"{len(bad)} failed: {bad[:3]}")
        timed = count - warm
        print(f"{kind:10} {timed} msgs, batch {batch}: {cpu / timed * 1e6:7.0f} µs CPU/msg, "
              f"(user {user / timed * 1e6:.0f}, system {system / timed * 1e6:.0f}), "
              f"{wall / timed * 1e6:7.0f} µs wall/msg")
        engine.dispose()  # type: ignore[attr-defined]
        return cpu / timed * 1e6
    finally:
        if admin is not None:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
            admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kinds", nargs="*", default=["sqlite", "postgresql"])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--profile", default="")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    for kind in args.kinds:
        figures = [run(kind, args.count, args.batch, args.profile)
                   for _ in range(args.repeat)]
        if args.repeat > 1:
            print(f"{kind:10} lowest of {args.repeat}: {min(figures):7.0f} µs CPU/msg")


if __name__ == "__main__":
    main()
