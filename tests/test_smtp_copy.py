"""`LimitedSMTP.fresh()` builds each connection's protocol by copying a template instead of
running aiosmtpd's `SMTP.__init__` (whose per-connection `inspect.getmembers` was ~15% of the
service's CPU). These tests compare a copy with what aiosmtpd's own `__init__` builds from the
same arguments, attribute by attribute, so an aiosmtpd upgrade that adds per-instance state
or tables fails here rather than sharing state between connections.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import weakref
from collections.abc import AsyncIterator, Callable
from types import MethodType
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session, auth_mechanism

from handler.service import AcceptOutcome
from handler.smtp_in import COMMANDS_PER_SESSION, ConnectionCounts, IntakeHandler, LimitedSMTP
from tests.smtp_raw import CLINIC, RawSMTP

SHARED_MUTABLES = frozenset({
    "_handle_hooks",  # bound to the handler, never changed after __init__
    "_call_limit_base",  # the caller's dict: aiosmtpd shares it between connections too
    "_replies",  # ours: read-only wording table
})
"""Mutable attributes a copy may share with its template."""


class _Intake:
    async def accept(self, msg: Any) -> AcceptOutcome:
        return AcceptOutcome(reference="E-TEST")


class _HandlerWithAuth(IntakeHandler):
    """A handler with its own AUTH mechanism, to cover the handler half of the table."""

    @auth_mechanism("X-TEST")
    async def auth_XTEST(self, server: SMTP, args: list[str]) -> AuthResult:
        return AuthResult(success=False, handled=False)


def _kwargs(loop: asyncio.AbstractEventLoop, **extra: Any) -> dict[str, Any]:
    return {"counts": ConnectionCounts(max_total=10, max_per_client=5),
            "data_size_limit": 1000, "hostname": "test.example", "ident": "test ESMTP",
            "timeout": 30, "command_call_limit": {"*": COMMANDS_PER_SESSION, "RCPT": 60},
            "loop": loop, **extra}


def _handler(cls: type[IntakeHandler] = IntakeHandler) -> IntakeHandler:
    return cls(intake=_Intake(), mailboxes=(CLINIC,), max_recipients=5)


def _shape(value: Any, owner: object) -> Any:
    """A comparable description of an attribute value: methods bound to `owner` and
    per-instance asyncio objects are described by kind, not identity."""
    if isinstance(value, MethodType):
        return ("method", value.__func__, "self" if value.__self__ is owner else value.__self__)
    if isinstance(value, dict):
        return (type(value), {k: _shape(v, owner) for k, v in value.items()})
    if isinstance(value, tuple):
        return (type(value), tuple(_shape(v, owner) for v in value))
    if isinstance(value, asyncio.StreamReader):
        return ("reader", value._limit, value._loop)  # type: ignore[attr-defined]
    if isinstance(value, asyncio.Future):
        return ("future", value.get_loop(), value.done())
    if isinstance(value, weakref.ref):
        return ("weakref", _shape(value(), owner))
    if isinstance(value, collections.deque):
        return ("deque", list(value))
    return value


def _references(value: Any, target: object, depth: int = 0) -> bool:
    """Whether `value` is `target` or holds it (bound methods, containers)."""
    if value is target:
        return True
    if depth > 4:
        return False
    if isinstance(value, MethodType):
        return _references(value.__self__, target, depth + 1)
    if isinstance(value, dict):
        return any(_references(v, target, depth + 1) for v in value.values())
    if isinstance(value, list | tuple | set | frozenset | collections.deque):
        return any(_references(v, target, depth + 1) for v in value)
    if isinstance(value, weakref.ref):
        return _references(value(), target, depth + 1)
    return False


@pytest.fixture
async def loop() -> AsyncIterator[asyncio.AbstractEventLoop]:
    yield asyncio.get_running_loop()


@pytest.mark.parametrize("make_handler", [_handler, lambda: _handler(_HandlerWithAuth)])
@pytest.mark.parametrize("tls", [False, True])
async def test_a_copy_matches_what_aiosmtpd_init_builds(
    loop: asyncio.AbstractEventLoop, make_handler: Callable[[], IntakeHandler], tls: bool
) -> None:
    handler = make_handler()
    extra: dict[str, Any] = {"auth_exclude_mechanism": ["PLAIN"]}
    if tls:
        extra["tls_context"] = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    kwargs = _kwargs(loop, **extra)
    template = LimitedSMTP(handler, **kwargs)
    reference = LimitedSMTP(handler, **kwargs)  # aiosmtpd's own __init__
    copy = template.fresh()

    assert type(copy) is LimitedSMTP
    assert vars(copy).keys() == vars(reference).keys()
    for name, value in vars(reference).items():
        assert _shape(getattr(copy, name), copy) == _shape(value, reference), name
    # The tables the copy exists for, spelled out.
    assert copy._smtp_methods.keys() == reference._smtp_methods.keys()
    assert copy._smtp_methods["DATA"] == MethodType(LimitedSMTP.smtp_DATA, copy)
    expected_auth = {"LOGIN", "X-TEST"} if isinstance(handler, _HandlerWithAuth) else {"LOGIN"}
    assert copy._auth_methods.keys() == expected_auth
    assert copy._auth_methods["LOGIN"].method.__self__ is copy
    assert copy._ehlo_hook_ver == "new"
    assert copy._handle_hooks.keys() >= {"EHLO", "RCPT", "DATA", "exception"}


async def test_a_copy_shares_nothing_per_connection_with_its_template(
    loop: asyncio.AbstractEventLoop,
) -> None:
    template = LimitedSMTP(_handler(_HandlerWithAuth), **_kwargs(loop))
    first, second = template.fresh(), template.fresh()
    for copy in (first, second):
        for name, value in vars(copy).items():
            assert not _references(value, template), f"{name} still refers to the template"
            if name in SHARED_MUTABLES or not _references(value, copy):
                continue
            assert value is not getattr(template, name)
        for name, value in vars(copy).items():
            mutable = isinstance(value, list | dict | set | bytearray | collections.deque)
            if mutable and name not in SHARED_MUTABLES:
                assert value is not vars(template)[name], f"{name} is shared"
    assert first._stream_reader is not second._stream_reader  # type: ignore[attr-defined]
    assert first._closed is not second._closed  # type: ignore[attr-defined]


async def test_each_connection_resets_the_class_wide_command_size_limits(
    loop: asyncio.AbstractEventLoop,
) -> None:
    template = LimitedSMTP(_handler(), **_kwargs(loop))
    SMTP.command_size_limits["MAIL"] += 26  # what an EHLO with SIZE does
    template.fresh()
    assert dict(SMTP.command_size_limits) == {}


async def _serve(handler: IntakeHandler, loop: asyncio.AbstractEventLoop) -> asyncio.Server:
    template = LimitedSMTP(handler, **_kwargs(loop, enable_SMTPUTF8=False))
    return await loop.create_server(template.fresh, host="127.0.0.1", port=0)


async def test_copies_serve_sessions_independently(loop: asyncio.AbstractEventLoop) -> None:
    server = await _serve(_handler(_HandlerWithAuth), loop)
    port = int(server.sockets[0].getsockname()[1])
    try:
        first = await RawSMTP.connect(port)
        second = await RawSMTP.connect(port)
        assert first.greeting is not None and first.greeting.text.startswith("test.example")
        assert (await first.ehlo()).code == 250
        assert (await first.cmd("MAIL FROM:<patient@example.org>")).code == 250
        # the second session has its own state: no MAIL yet, no EHLO yet
        assert (await second.cmd("RCPT TO:<" + CLINIC + ">")).code == 503
        assert (await second.ehlo()).code == 250
        assert (await second.cmd("MAIL FROM:<other@example.org>")).code == 250
        assert (await first.cmd("RCPT TO:<" + CLINIC + ">")).code == 250
        help_reply = await first.cmd("HELP DATA")  # help comes from the bound command table
        assert help_reply.code == 250 and "DATA" in help_reply.text
        assert (await second.cmd("AUTH PLAIN")).code in (504, 530, 538)
        for client in (first, second):
            await client.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_the_call_limit_is_counted_per_connection(loop: asyncio.AbstractEventLoop) -> None:
    server = await _serve(_handler(), loop)
    port = int(server.sockets[0].getsockname()[1])
    try:
        for _ in range(2):  # the second connection starts with a full budget again
            client = await RawSMTP.connect(port)
            for _ in range(COMMANDS_PER_SESSION):
                assert (await client.cmd("NOOP")).code == 250
            reply = await client.cmd("NOOP")
            assert reply.code == 421, reply
            await client.close()
    finally:
        server.close()
        await server.wait_closed()


def test_hooks_see_the_copy_as_server() -> None:
    """The handler's hooks get the protocol instance as `server` (aiosmtpd passes `self`)."""
    seen: list[object] = []

    class Recording(IntakeHandler):
        async def handle_NOOP(self, server: SMTP, session: Session, envelope: Envelope,
                              arg: str | None) -> str:
            seen.append(server)
            return "250 OK"

    async def run() -> None:
        loop = asyncio.get_running_loop()
        template = LimitedSMTP(_handler(Recording), **_kwargs(loop))
        made: list[LimitedSMTP] = []

        def factory() -> LimitedSMTP:
            made.append(template.fresh())
            return made[-1]

        server = await loop.create_server(factory, host="127.0.0.1", port=0)
        try:
            client = await RawSMTP.connect(int(server.sockets[0].getsockname()[1]))
            assert (await client.cmd("NOOP")).code == 250
            await client.close()
        finally:
            server.close()
            await server.wait_closed()
        assert seen == made and seen[0] is not template

    asyncio.run(run())
