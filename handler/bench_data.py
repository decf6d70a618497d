"""Benchmark data: a database filled through the real intake path, and copies of its rows.

`populate` stores N enquiries exactly as the service would (parse, classify, group commit),
leaving their acknowledgements and notifications due in the outbox. `multiply` then copies
every row K times with fresh keys (a few INSERT ... SELECT statements), which is how the
memory benchmark reaches 100,000 enquiries in seconds rather than minutes.
"""

from __future__ import annotations

from sqlalchemy import Engine, Integer, String, Table, UniqueConstraint, text

from handler import db
from handler.bench_harness import CLINIC, Load, source_message
from handler.clock import SystemClock
from handler.config import Settings
from handler.live import load_checked
from handler.models import Base
from handler.parse_email import parse_email
from handler.render import Templates
from handler.service import Intake


def populate(settings: Settings, count: int, *, size: int = 2048, batch: int = 50,
             tag: str = "seed") -> int:
    """Store `count` enquiries from distinct senders; returns the outbox rows now due."""
    db.upgrade(settings)
    engine = db.make_engine(settings.sqlalchemy_url)
    try:
        ruleset = load_checked(settings.rules_dir, Templates(settings.templates_dir),
                               max_sms_segments=settings.sms_max_segments)
        intake = Intake(sessions=db.make_sessionmaker(engine, write=True),
                        ruleset=lambda: ruleset, clock=SystemClock(), settings=settings)
        load = Load(count, size)
        for start in range(0, count, batch):
            msgs = [parse_email(source_message(load, n, f"{tag}.{n}@bench.example",
                                               sender=f"patient{n}.{tag}@sender.example"),
                                envelope_from=f"patient{n}.{tag}@sender.example",
                                envelope_rcpts=[CLINIC], mailboxes=[CLINIC])
                    for n in range(start, min(start + batch, count))]
            for result in intake._write_batch(msgs):
                if isinstance(result, Exception):
                    raise result
        with engine.connect() as conn:
            return int(conn.execute(text(
                "SELECT count(*) FROM outbox_item WHERE status = 'pending'")).scalar() or 0)
    finally:
        engine.dispose()


def _suffixed(table: Table) -> set[str]:
    """Columns to suffix so copied rows keep every unique constraint: the last string column
    of each one (email, reference, external_id, message_id...)."""
    found = {c.name for c in table.columns if c.unique and isinstance(c.type, String)}
    for constraint in table.constraints:
        if isinstance(constraint, UniqueConstraint):
            strings = [c.name for c in constraint.columns if isinstance(c.type, String)]
            if strings:
                found.add(strings[-1])
    return found


def _copy_sql(table: Table, *, offset: int, top: int) -> str:
    """INSERT ... SELECT copying rows with id <= `top`, ids and foreign keys shifted by
    `offset` and unique keys suffixed: a second, independent set of enquiries."""
    names, values = [], []
    suffixed = _suffixed(table)
    for column in table.columns:
        name = column.name
        names.append(f'"{name}"')
        if name == "id" or (column.foreign_keys and isinstance(column.type, Integer)):
            values.append(f'"{name}" + {offset}')
        elif name in suffixed:
            values.append(f"\"{name}\" || '.{offset}'")
        elif table.name == "outbox_item" and name == "status":
            values.append("'sent'")  # copies are history, not work for the dispatcher
        else:
            values.append(f'"{name}"')
    return (f'INSERT INTO "{table.name}" ({", ".join(names)}) '
            f'SELECT {", ".join(values)} FROM "{table.name}" WHERE id <= {top}')


def multiply(engine: Engine, copies: int) -> int:
    """Copy every row `copies` more times (SQLite); returns the enquiry count after."""
    tables = [t for t in Base.metadata.sorted_tables
              if "id" in t.columns and t.columns["id"].primary_key]
    with engine.begin() as conn:
        conn.execute(text("UPDATE outbox_item SET status = 'sent' WHERE status = 'pending'"))
        top = max(int(conn.execute(text(f'SELECT coalesce(max(id), 0) FROM "{t.name}"'))
                      .scalar() or 0) for t in tables)
    for k in range(1, copies + 1):
        with engine.begin() as conn:
            for table in tables:
                conn.execute(text(_copy_sql(table, offset=k * top, top=top)))
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM enquiry")).scalar() or 0)
