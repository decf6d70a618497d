"""Engine and schema: SQLite (WAL, synchronous=FULL) or PostgreSQL (synchronous_commit=on).

`make_engine` builds a synchronous engine; the intake writer and the dispatcher run their
transactions in worker threads so the event loop never waits on the disk.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from handler.config import Settings

MIGRATIONS = Path(__file__).with_name("migrations")
_LOCK_FD = "handler_write_lock_fd"
_LOCK_HELD = "handler_write_lock_held"


def make_engine(url: str, *, echo: bool = False) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # hide_parameters: a database error must not put patient data in the logs
        engine = create_engine(url, echo=echo, connect_args={"timeout": 30},
                               hide_parameters=True)
        _configure_sqlite(engine, lock_path=f"{path}.write-lock" if path and path != ":memory:"
                          else "")
        return engine
    engine = create_engine(url, echo=echo, pool_pre_ping=True, pool_size=10, max_overflow=10,
                           hide_parameters=True)

    @event.listens_for(engine, "connect")
    def _pg_connect(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cur:
            cur.execute("SET synchronous_commit = on")
            cur.execute("SET TIME ZONE 'UTC'")
        dbapi_conn.commit()

    return engine


def _configure_sqlite(engine: Engine, *, lock_path: str) -> None:
    """Durable SQLite: WAL + synchronous=FULL, real BEGIN IMMEDIATE transactions, savepoints.

    pysqlite's own transaction handling defers BEGIN and breaks SAVEPOINT, so we switch it off
    and emit BEGIN ourselves (the recipe in SQLAlchemy's SQLite dialect documentation).

    Writers queue for an flock on `lock_path` (one open file per connection) before BEGIN
    IMMEDIATE, and let go after COMMIT or ROLLBACK. SQLite's own busy handler polls with
    sleeps of 1, 2, 5, 10... ms, so writers contending through it (the intake writer, the
    dispatcher, the delivery worker's process) left the database idle between transactions;
    the kernel hands a released flock to the next waiter at once. SQLite's locking still
    guards correctness against programs that do not take the flock.
    """
    dialect = engine.dialect
    plain_commit, plain_rollback = dialect.do_commit, dialect.do_rollback

    def _release(dbapi_conn: Any) -> None:
        try:
            info = dbapi_conn.info
        except (AttributeError, NotImplementedError):  # the dialect's first-connect probe
            return
        fd = info.get(_LOCK_FD)
        if fd is not None and info.pop(_LOCK_HELD, False):
            fcntl.flock(fd, fcntl.LOCK_UN)

    def do_commit(dbapi_conn: Any) -> None:
        try:
            plain_commit(dbapi_conn)
        finally:
            _release(dbapi_conn)

    def do_rollback(dbapi_conn: Any) -> None:
        try:
            plain_rollback(dbapi_conn)
        finally:
            _release(dbapi_conn)

    if lock_path:
        dialect.do_commit = do_commit  # type: ignore[method-assign]
        dialect.do_rollback = do_rollback  # type: ignore[method-assign]

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, record: Any) -> None:
        if lock_path:
            record.info[_LOCK_FD] = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        # Writers take the write lock up front (a deferred transaction that reads and then
        # writes fails at once when another writer got in between); readers don't block.
        immediate = conn.get_execution_options().get("write", False)
        if not immediate:
            conn.exec_driver_sql("BEGIN")
            return
        info = conn.connection.info
        if info.get(_LOCK_FD) is not None and not info.get(_LOCK_HELD):
            fcntl.flock(info[_LOCK_FD], fcntl.LOCK_EX)
            info[_LOCK_HELD] = True
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            _release(conn.connection)
            raise

    @event.listens_for(engine, "close")
    def _close(dbapi_conn: Any, record: Any) -> None:
        fd = record.info.pop(_LOCK_FD, None)
        if fd is not None:
            os.close(fd)  # closing the file also lets go of its lock


def make_sessionmaker(engine: Engine, *, write: bool = False) -> sessionmaker[Session]:
    """Sessions for reading, or (write=True) for read-modify-write transactions."""
    bind = engine.execution_options(write=True) if write else engine
    return sessionmaker(bind, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(settings: Settings) -> None:
    """Bring the schema up to date (idempotent)."""
    engine = make_engine(settings.sqlalchemy_url)
    try:
        with engine.execution_options(write=True).begin() as conn:
            cfg = alembic_config(settings.sqlalchemy_url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    finally:
        engine.dispose()


def ping(engine: Engine) -> bool:
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
