"""LimitedSMTP's StreamReader limit (READ_LIMIT) is larger than aiosmtpd's 1001 so that DATA is
read in few, large steps. aiosmtpd takes the reader's limit from `line_length_limit`; these
tests pin that it uses the attribute for nothing else, and that lines keep their limits:
command lines of any length over 512 octets get aiosmtpd's answer, DATA lines over 1001 ours.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator

import aiosmtpd.smtp
import pytest
from aiosmtpd.smtp import SMTP

from handler.service import AcceptOutcome
from handler.smtp_in import (
    MAX_LINE,
    READ_LIMIT,
    S500_LINE_TOO_LONG,
    ConnectionCounts,
    IntakeHandler,
    LimitedSMTP,
)
from tests.smtp_raw import CLINIC, RawSMTP, stuff


class _Intake:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    async def accept(self, msg: object) -> AcceptOutcome:
        self.sizes.append(len(getattr(msg, "raw", b"")))
        return AcceptOutcome(reference="E-TEST")


def _uses(source: str) -> list[str]:
    return [line.strip() for line in source.splitlines() if "line_length_limit" in line]


def test_aiosmtpd_uses_line_length_limit_only_to_size_the_reader() -> None:
    """...and in its smtp_DATA, which LimitedSMTP replaces."""
    assert LimitedSMTP.smtp_DATA is not SMTP.smtp_DATA
    in_data = _uses(inspect.getsource(SMTP.smtp_DATA))
    uses = _uses(inspect.getsource(aiosmtpd.smtp))
    for line in in_data:
        uses.remove(line)
    assert uses == ["line_length_limit = 1001",
                    "asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),"]
    assert MAX_LINE == 1001 and READ_LIMIT > 2 * MAX_LINE


@pytest.fixture
async def served() -> AsyncIterator[tuple[int, _Intake, LimitedSMTP]]:
    intake = _Intake()
    handler = IntakeHandler(intake=intake, mailboxes=(CLINIC,), max_recipients=5)
    loop = asyncio.get_running_loop()
    template = LimitedSMTP(handler, counts=ConnectionCounts(max_total=5, max_per_client=5),
                           hostname="test.example", data_size_limit=100_000, loop=loop,
                           command_call_limit=100)
    server = await loop.create_server(template.fresh, host="127.0.0.1", port=0)
    yield int(server.sockets[0].getsockname()[1]), intake, template
    server.close()
    await server.wait_closed()


async def test_each_connection_reads_with_the_larger_limit(
    served: tuple[int, _Intake, LimitedSMTP],
) -> None:
    _port, _intake, template = served
    for protocol in (template, template.fresh()):
        reader = protocol._stream_reader  # type: ignore[attr-defined]
        assert reader._limit == READ_LIMIT  # type: ignore[union-attr]


@pytest.mark.parametrize("octets", [515, 1001, 1002, 1003, 5000, READ_LIMIT - 1, READ_LIMIT,
                                    READ_LIMIT + 1, READ_LIMIT + 3, 3 * READ_LIMIT, 100_000])
async def test_long_command_lines_are_refused_and_the_session_goes_on(
    served: tuple[int, _Intake, LimitedSMTP], octets: int,
) -> None:
    port, _intake, _template = served
    client = await RawSMTP.connect(port)
    assert (await client.ehlo()).code == 250
    line = b"NOOP " + b"x" * (octets - 7)
    reply = await client.cmd(line)
    assert (reply.code, reply.text) == (500, "Command line too long"), octets
    assert (await client.cmd("NOOP")).code == 250
    await client.close()


@pytest.mark.parametrize("size", [100, 2_000, READ_LIMIT - 3, READ_LIMIT, READ_LIMIT + 5,
                                  5 * READ_LIMIT + 7])
async def test_messages_around_the_reader_limit_arrive_whole(
    served: tuple[int, _Intake, LimitedSMTP], size: int,
) -> None:
    port, intake, _template = served
    client = await RawSMTP.connect(port)
    assert (await client.ehlo()).code == 250
    await client.envelope()
    head = b"From: <patient@example.org>\r\nSubject: x\r\n\r\n"
    lines, left = [], size - len(head)
    while left > 0:
        line = (b"." + b"y" * 97)[:max(left - 2, 0)] + b"\r\n"  # dot-stuffed on the wire
        lines.append(line)
        left -= len(line)
    body = b"".join(lines)
    reply, _ = await client.data(stuff(head + body))
    assert reply.code == 250, reply
    assert intake.sizes[-1] == len(head + body)
    # a line over the limit is still refused, wherever the reader's steps fall
    await client.envelope()
    reply, _ = await client.data(head + body + b"z" * MAX_LINE + b"\r\n")
    assert f"{reply.code} {reply.text}" == S500_LINE_TOO_LONG, reply
    assert (await client.cmd("NOOP")).code == 250
    await client.close()
