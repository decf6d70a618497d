"""The DATA phase as the listener reads it (in blocks, not line by line), over real sockets:
the end marker split across TCP reads, dot-unstuffing, the size and line limits at their
edges, commands pipelined behind the end marker, and clients that vanish mid-DATA.

Protocol behaviour does not depend on the database, so these run on SQLite only.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import select

from handler.app import Service
from handler.db import make_sessionmaker
from handler.models import Message
from tests.builders import new_message_id, plain_email
from tests.conftest import Start
from tests.smtp_raw import CLINIC, RawSMTP, stuff
from tests.test_smtp_limits import (
    connect,
    good_message_still_accepted,
    inbound_count,
    long_line_message,
    sized_message,
    stored,
)

END = b"\r\n.\r\n"
ENVELOPE = b"MAIL FROM:<patient@example.org>\r\nRCPT TO:<" + CLINIC.encode() + b">\r\n"


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'handler.db'}"


async def send_in_pieces(client: RawSMTP, data: bytes, cuts: list[int]) -> None:
    """`data` in separate TCP segments, cut at `cuts`: a pause after each lets the server
    read each piece on its own."""
    for piece_start, piece_end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        await client.send(data[piece_start:piece_end])
        await asyncio.sleep(0.02)


def newest_raw(service: Service) -> bytes | None:
    with make_sessionmaker(service.engine)() as session:
        return session.scalars(select(Message.raw).where(Message.direction == "in")
                               .order_by(Message.id.desc()).limit(1)).one()


def raw_of(service: Service, message_id: str) -> bytes:
    (row,) = stored(service, message_id)
    assert row.raw is not None
    return row.raw


# --- the end marker across reads --------------------------------------------------------------

@pytest.mark.parametrize("cut", range(1, len(END)))
async def test_end_marker_split_across_reads(start: Start, cut: int) -> None:
    service = await start()
    client = await connect(service)
    message_id = new_message_id()
    content = plain_email(message_id=message_id)
    await client.envelope()
    assert (await client.cmd("DATA")).code == 354
    wire = content[:-2] + END  # the content's last CRLF is the marker's first
    await send_in_pieces(client, wire, [len(wire) - len(END) + cut])
    assert (await client.reply()).code == 250
    assert raw_of(service, message_id) == content
    await good_message_still_accepted(client, service)
    await client.close()


async def test_a_message_sent_one_octet_at_a_time(start: Start) -> None:
    """Every cut at once: stuffed dots, CRLFs and the marker each arrive split."""
    service = await start()
    client = await connect(service)
    message_id = new_message_id()
    content = plain_email("Hi.\n.\n..\n. not the end\nBye\n", message_id=message_id)
    wire = stuff(content) + b".\r\n"
    await client.envelope()
    assert (await client.cmd("DATA")).code == 354
    for octet in range(len(wire)):
        await client.send(wire[octet:octet + 1])
        await asyncio.sleep(0.001)
    assert (await client.reply()).code == 250
    assert raw_of(service, message_id) == content
    await client.close()


@pytest.mark.parametrize(("near_end", "stored_as"), [
    (b"\n.\r\n", b"\r\n.\r\n"),  # the dot does not start a line: kept; the LF normalised
    (b"\r\n.\n", b"\r\n\r\n"),  # the line ".<LF>more text" starts with a dot: unstuffed
    (b"\r\n..\r\n", b"\r\n.\r\n"),
    (b"\r\n\r\n", b"\r\n\r\n"),
], ids=repr)
async def test_near_markers_in_separate_reads_stay_in_the_message(
    start: Start, near_end: bytes, stored_as: bytes
) -> None:
    service = await start()
    client = await connect(service)
    message_id = new_message_id()
    head = plain_email("Tail\n", message_id=message_id).removesuffix(b"\r\n")
    await client.envelope()
    assert (await client.cmd("DATA")).code == 354
    wire = head + near_end + b"more text\r\n.\r\n"
    await send_in_pieces(client, wire, [len(head) + n for n in range(len(near_end))])
    assert (await client.reply()).code == 250
    assert raw_of(service, message_id) == head + stored_as + b"more text\r\n"
    assert inbound_count(service) == 1
    await client.close()


# --- dot-unstuffing ---------------------------------------------------------------------------

async def test_dots_are_unstuffed_at_the_start_in_the_middle_and_at_the_end(
    start: Start,
) -> None:
    service = await start()
    client = await connect(service)
    message_id = new_message_id()
    body = ".first\n..second\n.\n...\nmid.dle .x\n\n.last\n"
    content = plain_email(body, message_id=message_id)
    await client.envelope()
    reply, _ = await client.data(stuff(content))
    assert reply.code == 250, reply
    assert raw_of(service, message_id) == content
    await client.close()


async def test_a_stuffed_dot_on_the_very_first_line_is_removed(start: Start) -> None:
    """The first line has no CRLF before it on the wire; it is unstuffed all the same."""
    service = await start()
    client = await connect(service)
    message_id = new_message_id()
    content = b".X-Dotted: header\r\n" + plain_email(message_id=message_id)
    await client.envelope()
    reply, _ = await client.data(stuff(content))
    assert reply.code == 250, reply
    assert raw_of(service, message_id) == content
    await client.close()


# --- size limit -------------------------------------------------------------------------------

async def test_size_limit_at_and_over_with_the_marker_in_its_own_read(start: Start) -> None:
    limit = 50_000
    service = await start(smtp_max_message_size=limit)
    client = await connect(service)
    for size, accepted in ((limit, True), (limit + 1, False), (limit, True)):
        message_id = new_message_id()
        content = sized_message(size, message_id)
        await client.envelope()
        assert (await client.cmd("DATA")).code == 354
        wire = content + b".\r\n"
        await send_in_pieces(client, wire, [len(wire) - 4, len(wire) - 2])
        reply = await client.reply()
        if accepted:
            assert reply.code == 250, reply
            assert raw_of(service, message_id) == content
        else:
            assert reply.code == 552 and f"limit is {limit} bytes" in reply.text, reply
            assert stored(service, message_id) == []
    await good_message_still_accepted(client, service)
    await client.close()


async def test_stuffing_dots_count_towards_the_size(start: Start) -> None:
    """As in aiosmtpd: the limit applies to the content as sent, stuffing dots included."""
    limit = 50_000
    service = await start(smtp_max_message_size=limit)
    client = await connect(service)
    message_id = new_message_id()
    content = sized_message(limit, message_id)
    dotted = content[:-5] + b"\r\n.\r\n"  # same size, but the last line is "." (sent as "..")
    assert len(dotted) == limit
    await client.envelope()
    reply, _ = await client.data(stuff(dotted))
    assert reply.code == 552, reply
    assert stored(service, message_id) == []
    await good_message_still_accepted(client, service)
    await client.close()


async def test_an_oversized_message_in_many_reads_is_discarded(start: Start) -> None:
    limit = 50_000
    service = await start(smtp_max_message_size=limit)
    client = await connect(service)
    message_id = new_message_id()
    content = sized_message(4 * limit, message_id)
    await client.envelope()
    assert (await client.cmd("DATA")).code == 354
    await send_in_pieces(client, content + b".\r\n", list(range(7_001, len(content), 7_001)))
    reply = await client.reply()
    assert reply.code == 552, reply
    assert stored(service, message_id) == []
    await good_message_still_accepted(client, service)
    await client.close()


# --- line length ------------------------------------------------------------------------------

@pytest.mark.parametrize(("octets", "accepted"), [(1001, True), (1002, False)])
@pytest.mark.parametrize("where", ["first", "last"])
async def test_line_limit_on_the_first_and_last_line(
    start: Start, octets: int, accepted: bool, where: str
) -> None:
    service = await start()
    client = await connect(service)
    message_id = new_message_id()
    line = (b"X-Long: " if where == "first" else b"") + b"y" * octets
    line = line[:octets - 2] + b"\r\n"  # a header line or a body line of `octets` octets
    message = plain_email(message_id=message_id)
    content = line + message if where == "first" else message + line
    await client.envelope()
    assert (await client.cmd("DATA")).code == 354
    await send_in_pieces(client, content + b".\r\n", [octets // 2, len(content) - 500])
    reply = await client.reply()
    if accepted:
        assert reply.code == 250, reply
        assert raw_of(service, message_id) == content
    else:
        assert reply.code == 500 and "5.5.2" in reply.text, reply
        assert stored(service, message_id) == []
    await good_message_still_accepted(client, service)
    await client.close()


async def test_a_long_line_split_across_reads(start: Start) -> None:
    service = await start()
    client = await connect(service)
    message_id = new_message_id()
    content = long_line_message(5_000, message_id)
    await client.envelope()
    assert (await client.cmd("DATA")).code == 354
    await send_in_pieces(client, content + b".\r\n", list(range(300, len(content), 700)))
    reply = await client.reply()
    assert reply.code == 500 and "5.5.2" in reply.text, reply
    assert stored(service, message_id) == []
    await good_message_still_accepted(client, service)
    await client.close()


@pytest.mark.parametrize(("before", "line", "code"), [
    (45_000, 3_000, 500),  # a long line within the size limit
    (49_500, 3_000, 500),  # ...or across it: refused as too long at once
    (48_000, 1_002, 500),  # one octet too long, within the size limit
    (49_500, 1_002, 552),  # ...across it: counted against the size first
    (49_500, 1_003, 552),
    (100_000, 3_000, 552),  # the size limit was passed on an earlier line
], ids=str)
async def test_the_limit_crossed_first_gives_the_answer(
    start: Start, before: int, line: int, code: int
) -> None:
    """aiosmtpd's order, kept: it reads a line of up to 1003 octets whole and checks the size
    first; a longer line it refuses as too long as soon as it has read 1001 octets."""
    service = await start(smtp_max_message_size=50_000)
    client = await connect(service)
    message_id = new_message_id()
    content = sized_message(before, message_id) + b"z" * (line - 2) + b"\r\n"
    await client.envelope()
    reply, _ = await client.data(content)
    assert reply.code == code, reply
    assert stored(service, message_id) == []
    await good_message_still_accepted(client, service)
    await client.close()


# --- pipelining -------------------------------------------------------------------------------

async def test_commands_pipelined_behind_the_end_marker(start: Start) -> None:
    service = await start()
    client = await connect(service)
    first, second = new_message_id(), new_message_id()
    await client.envelope()
    assert (await client.cmd("DATA")).code == 354
    await client.send(plain_email(message_id=first) + b".\r\n" + ENVELOPE + b"DATA\r\n")
    codes = [(await client.reply()).code for _ in range(4)]
    assert codes == [250, 250, 250, 354]
    await client.send(plain_email(message_id=second) + b".\r\nNOOP\r\nQUIT\r\n")
    codes = [(await client.reply()).code for _ in range(3)]
    assert codes == [250, 250, 221]
    assert len(stored(service, first)) == len(stored(service, second)) == 1
    await client.close()


@pytest.mark.parametrize("content", [b"X: y\r\n", b""], ids=["one-line", "empty"])
async def test_a_short_message_with_the_next_command_in_the_same_packet(
    start: Start, content: bytes
) -> None:
    """The end marker right at the start or behind the first line, with NOOP behind it in
    the same packet: the message ends there and NOOP is answered."""
    service = await start()
    client = await connect(service)
    await client.envelope()
    assert (await client.cmd("DATA")).code == 354
    await client.send(content + b".\r\nNOOP\r\n")
    assert (await client.reply()).code == 250
    assert (await client.reply()).code == 250
    assert (newest_raw(service) or b"") == content  # an empty one is stored as NULL
    await good_message_still_accepted(client, service)
    await client.close()


async def test_commands_pipelined_behind_a_refused_message(start: Start) -> None:
    limit = 50_000
    service = await start(smtp_max_message_size=limit)
    client = await connect(service)
    too_big = sized_message(limit + 1, new_message_id())
    too_long = long_line_message(2_000, new_message_id())
    for content, code in ((too_big, 552), (too_long, 500)):
        await client.envelope()
        assert (await client.cmd("DATA")).code == 354
        await client.send(content + b".\r\nRSET\r\n" + ENVELOPE)
        codes = [(await client.reply()).code for _ in range(4)]
        assert codes == [code, 250, 250, 250]
        assert (await client.cmd("RSET")).code == 250
    assert inbound_count(service) == 0
    await good_message_still_accepted(client, service)
    await client.close()


# --- clients that go away ---------------------------------------------------------------------

async def admitted(service: Service) -> RawSMTP:
    """A session, once a connection slot is free (the server frees one when it notices that
    a client has gone)."""
    for _ in range(100):
        client = await RawSMTP.connect(service.smtp_port)
        assert client.greeting is not None
        if client.greeting.code == 220:
            assert (await client.ehlo()).code == 250
            return client
        await client.close()
        await asyncio.sleep(0.05)
    raise AssertionError("no connection slot came free")


@pytest.mark.parametrize("sent", [
    b"", b"Subject: half\r\n\r\nhalf a mess", b"x\r\n.\r", b"y" * 5_000,
], ids=["nothing", "half-a-message", "part-of-the-marker", "long-line"])
async def test_a_client_that_disconnects_mid_data(start: Start, sent: bytes) -> None:
    service = await start(smtp_max_connections=2, smtp_max_connections_per_client=1)
    for _ in range(3):  # more often than there are slots: each one is given back
        client = await admitted(service)
        await client.envelope()
        assert (await client.cmd("DATA")).code == 354
        await client.send(sent)
        client.writer.close()
        await client.writer.wait_closed()
    client = await admitted(service)
    assert inbound_count(service) == 0
    await good_message_still_accepted(client, service)
    await client.close()
