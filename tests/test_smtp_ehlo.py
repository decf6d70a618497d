"""The EHLO reply: our hook hands aiosmtpd all lines as one item, so the multi-line reply goes
out in one write instead of one per line, and reads the same on the wire."""

from __future__ import annotations

import asyncio

from aiosmtpd.smtp import Envelope, Session

from handler.service import AcceptOutcome
from handler.smtp_in import ConnectionCounts, IntakeHandler, LimitedSMTP
from tests.smtp_raw import CLINIC, RawSMTP


class _Intake:
    async def accept(self, msg: object) -> AcceptOutcome:
        return AcceptOutcome(reference="E-TEST")


async def test_the_hook_returns_one_item_without_auth() -> None:
    handler = IntakeHandler(intake=_Intake(), mailboxes=(CLINIC,), max_recipients=5)
    server = LimitedSMTP(handler, counts=ConnectionCounts(max_total=1, max_per_client=1),
                         hostname="test.example", loop=asyncio.get_running_loop())
    session = Session(asyncio.get_running_loop())
    lines = ["250-test.example", "250-SIZE 100", "250-AUTH LOGIN", "250 HELP"]
    result = await handler.handle_EHLO(server, session, Envelope(), "client.example", lines)
    assert result == ["250-test.example\r\n250-SIZE 100\r\n250 HELP"]
    assert session.host_name == "client.example"


async def test_the_reply_on_the_wire_is_unchanged() -> None:
    handler = IntakeHandler(intake=_Intake(), mailboxes=(CLINIC,), max_recipients=5)
    loop = asyncio.get_running_loop()
    template = LimitedSMTP(handler, counts=ConnectionCounts(max_total=5, max_per_client=5),
                           hostname="test.example", data_size_limit=1000, loop=loop)
    server = await loop.create_server(template.fresh, host="127.0.0.1", port=0)
    try:
        client = await RawSMTP.connect(int(server.sockets[0].getsockname()[1]))
        reply = await client.ehlo()
        assert (reply.code, reply.lines) == (250, ("test.example", "SIZE 1000", "8BITMIME",
                                                   "HELP"))
        assert (await client.cmd("NOOP")).code == 250  # nothing left over in the stream
        assert (await client.cmd("EHLO again.example")).lines == reply.lines
        await client.close()
    finally:
        server.close()
        await server.wait_closed()
