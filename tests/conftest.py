"""Shared fixtures: settings in tmp_path, real databases, a real SMTP sink as the relay,
and the whole service running on loopback ports chosen by the OS."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import create_engine, text

from handler.app import Service, running
from handler.clock import FakeClock
from handler.config import Settings

# Every INFO+ log record of the session is checked for patient data (tests/logscan.py).
pytest_plugins = ("tests.logscan",)

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_URL = os.environ.get("HANDLER_TEST_POSTGRES_URL", "")
CLINIC = "enquiries@clinic.example"


def _db_params() -> list[Any]:
    params: list[Any] = ["sqlite"]
    if POSTGRES_URL:
        params.append(pytest.param("postgresql", marks=pytest.mark.postgres))
    return params


@pytest.fixture(params=_db_params())
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a private schema on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'handler.db'}"
        return
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in POSTGRES_URL else "?"
    yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture
def make_settings(tmp_path: Path, database_url: str) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": database_url, "rules_dir": ROOT / "rules",
            "templates_dir": ROOT / "templates", "var_dir": tmp_path / "var",
            "smtp_port": 0, "http_port": 0, "mailboxes": (CLINIC,),
            "clinic_address": CLINIC, "dispatch_poll_seconds": 0.5,
            "delivery_worker": False,  # sent on this event loop, with the test's clock
            "intake_worker": False,  # committed by a thread of this process
        }
        values.update(overrides)
        return Settings(**values)

    return make


class Sink:
    """A real SMTP server that stores what it receives; can be told to refuse."""

    def __init__(self) -> None:
        self.messages: list[tuple[Envelope, EmailMessage]] = []
        self.replies: list[str] = []  # next DATA replies to give instead of 250
        self.received = asyncio.Condition()
        self.server: asyncio.base_events.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.replies:
            return self.replies.pop(0)
        parsed = message_from_bytes(envelope.original_content or b"", policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        async with self.received:
            self.messages.append((envelope, parsed))
            self.received.notify_all()
        return "250 2.0.0 Ok: queued as SINK" + str(len(self.messages))

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[EmailMessage]:
        async with self.received:
            await asyncio.wait_for(
                self.received.wait_for(lambda: len(self.messages) >= count), timeout)
        return [m for _, m in self.messages]

    def to(self, address: str) -> list[EmailMessage]:
        return [m for env, m in self.messages if address in env.rcpt_tos]


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    s = Sink()
    loop = asyncio.get_running_loop()
    s.server = await loop.create_server(
        lambda: SMTP(s, hostname="sink.test", loop=loop), "127.0.0.1", 0)
    yield s
    s.server.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def service(
    make_settings: Callable[..., Settings], sink: Sink, clock: FakeClock
) -> AsyncIterator[Service]:
    settings = make_settings(relay_host="127.0.0.1", relay_port=sink.port)
    async with running(settings, clock=clock) as svc:
        yield svc


async def eventually(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll `predicate` until it returns something truthy (for state behind a thread)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


Start = Callable[..., Awaitable[Service]]


@pytest.fixture
async def start(
    make_settings: Callable[..., Settings], sink: Sink, clock: FakeClock
) -> AsyncIterator[Start]:
    """Start the whole service with some settings changed; stopped after the test."""
    async with contextlib.AsyncExitStack() as stack:
        async def start_(**overrides: Any) -> Service:
            settings = make_settings(relay_host="127.0.0.1", relay_port=sink.port, **overrides)
            return await stack.enter_async_context(running(settings, clock=clock))

        yield start_
