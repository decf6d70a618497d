"""The dispatcher's claim can walk `ix_outbox_item_work`: its predicate must appear in the
claim word for word (SQLite matches partial indexes textually), and the index order is the
claim's order, so SQLite needs no sort and stops at the batch size."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.orm import Session

from handler import db, store
from handler.config import Settings

NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)


def test_the_claim_walks_the_work_index(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    db.upgrade(settings)
    engine = db.make_engine(settings.sqlalchemy_url)
    seen: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                executemany: bool) -> None:
        if statement.lstrip().upper().startswith("UPDATE OUTBOX_ITEM"):
            seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with Session(engine) as session, session.begin():
            assert store.claim_due_outbox(session, NOW, limit=50,
                                          lease=timedelta(minutes=5)) == []
        assert len(seen) == 1
        statement, parameters = seen[0]
        with engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert raw is not None
            cursor = raw.cursor()
            if engine.dialect.name == "sqlite":
                cursor.execute("EXPLAIN QUERY PLAN " + statement, parameters)
            else:  # an empty table is cheaper to scan: ask whether the index can serve
                cursor.execute("SET LOCAL enable_seqscan = off")
                cursor.execute("EXPLAIN " + statement, parameters)
            plan = "\n".join(str(row[-1]) for row in cursor.fetchall())
            conn.rollback()
        assert "ix_outbox_item_work" in plan, plan
        if engine.dialect.name == "sqlite":
            assert "TEMP B-TREE" not in plan, plan  # no sort: the index gives the order
    finally:
        engine.dispose()


def test_the_work_index_holds_only_claimable_rows(make_settings: Callable[..., Settings]
                                                  ) -> None:
    """Its predicate, as the database keeps it, names exactly pending and sending."""
    settings = make_settings()
    db.upgrade(settings)
    engine = db.make_engine(settings.sqlalchemy_url)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                definition = conn.execute(text(
                    "SELECT sql FROM sqlite_master WHERE name = 'ix_outbox_item_work'")).scalar()
            else:
                definition = conn.execute(text(
                    "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_outbox_item_work'")
                ).scalar()
            old = conn.execute(text(
                "SELECT count(*) FROM pg_indexes WHERE indexname = 'ix_outbox_item_due'"
                if engine.dialect.name != "sqlite" else
                "SELECT count(*) FROM sqlite_master WHERE name = 'ix_outbox_item_due'")).scalar()
    finally:
        engine.dispose()
    assert definition is not None and "pending" in definition and "sending" in definition
    assert "sent" not in definition.replace("sending", "")
    assert old == 0  # replaced, not kept beside it: every index costs each claim and send


def test_an_existing_database_is_upgraded_with_its_rows(make_settings: Callable[..., Settings]
                                                        ) -> None:
    """A database left at revision 0002, with work in its outbox, upgraded to head: every
    row is kept, the old index is gone and the claim finds the pending row through the new
    one."""
    from alembic import command
    from alembic.script import ScriptDirectory

    settings = make_settings()
    engine = db.make_engine(settings.sqlalchemy_url)
    try:
        with engine.begin() as conn:
            cfg = db.alembic_config(settings.sqlalchemy_url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0002")
        with engine.begin() as conn:
            for n, status in enumerate(("pending", "sent", "sending", "failed")):
                conn.execute(text(
                    "INSERT INTO outbox_item (kind, channel, recipient, template, context, "
                    "urgent, message_id, status, due_at, attempts, last_error, error_code, "
                    "provider_id, delivery_status, cancel_reason, created_at, lease_until) "
                    "VALUES ('ack', 'email', 'jane@example.org', 'ack-email', '{}', :urgent, "
                    ":mid, :status, :due, 0, '', '', '', '', '', :due, :lease)"),
                    {"mid": f"m{n}@clinic.example", "status": status, "urgent": n == 0,
                     "due": NOW - timedelta(minutes=5), "lease": NOW - timedelta(minutes=1)})
        db.upgrade(settings)
        with Session(engine) as session, session.begin():
            claimed = store.claim_due_outbox(session, NOW, limit=10, lease=timedelta(minutes=5))
        with engine.connect() as conn:
            statuses = sorted(conn.execute(text("SELECT status FROM outbox_item")).scalars())
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()
    # the pending row and the sending row whose lease ran out are claimed, in claim order
    assert [row.message_id for row in claimed] == ["m0@clinic.example", "m2@clinic.example"]
    assert statuses == ["failed", "sending", "sending", "sent"]
    assert version == ScriptDirectory.from_config(db.alembic_config("")).get_current_head()
