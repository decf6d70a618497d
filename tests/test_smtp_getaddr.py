"""`LimitedSMTP._getaddr` answers plain `<local@domain>` paths without the stdlib header parser;
for every input it must return exactly what aiosmtpd's own `SMTP._getaddr` returns."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest
from aiosmtpd.smtp import SMTP

from handler.service import AcceptOutcome
from handler.smtp_in import _PLAIN_PATH, ConnectionCounts, IntakeHandler, LimitedSMTP
from tests.smtp_raw import CLINIC, RawSMTP

EDGE_CASES = [
    "<patient@example.org>", "<Patient.Name+tag@Sub.Example.ORG>", "<a@b>", "<>", "",
    "<patient@example.org> SIZE=1000", "<patient@example.org>  BODY=8BITMIME SIZE=5",
    "<patient@example.org>\tSIZE=1", "<patient@example.org>SIZE=1", "<patient@example.org> ",
    "<patient@example.org> (comment) SIZE=1", "<patient@example.org>(comment)",
    "<patient@example.org> \x0bX", "<patient@example.org>\x0bX", "<patient@example.org>\xa0X",
    "< patient@example.org>", "<patient@example.org >", " <patient@example.org>",
    "<patient @example.org>", "<patient@ example.org>", "<pat..ient@example.org>",
    "<.patient@example.org>", "<patient.@example.org>", "<patient@example..org>",
    "<patient@.example.org>", "<patient@example.org.>", "<=?utf-8?q?x?=@example.org>",
    "<patient@=?utf-8?q?x?=>", "<a=?b@example.org>", "<patient@[127.0.0.1]>",
    '<"quoted name"@example.org>', "<@relay.example:patient@example.org>",
    "<patient%other@example.org>", "<patient!other@example.org>", "<patient@example.org",
    "patient@example.org", "patient@example.org SIZE=1", "<patient@example.org>>",
    "<patient@exämple.org>", "<pätient@example.org>", "<a@b@c>", "<a(b)@c>",
    "<{|}~!#$%&'*+/=?^_`-@example.org>", "<patient@example.org> =?x?q?y?=",
]
ALPHABET = "ab.@<>=?()\" \t,:;[]\\%!-_+\x0bä"
ATEXT = "aZ9.=?!#$%&'*+/^_`{|}~-"


class _Intake:
    async def accept(self, msg: object) -> AcceptOutcome:
        return AcceptOutcome(reference="E-TEST")


def _random_cases(count: int) -> list[str]:
    rng = random.Random(5321)
    cases = []
    for _ in range(count):
        middle = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 8)))
        tail = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 4)))
        cases.append(rng.choice(["<", "", "<a", "<a.b@"]) + middle + rng.choice([">", ""]) + tail)
        cases.append(f"<{middle.replace('<', '').replace('>', '')}@x.example>{tail}")
        local, domain = ("".join(rng.choice(ATEXT) for _ in range(rng.randint(1, 6)))
                         for _ in range(2))
        cases.append(f"<{local}@{domain}>{tail}")
    return cases


def _outcome(getaddr: Callable[[LimitedSMTP, str], object], server: LimitedSMTP,
             arg: str) -> object:
    """The result, or the exception type: the stdlib parser raises on some inputs
    (AttributeError on "<(" for one), and ours must do the same there."""
    try:
        return getaddr(server, arg)
    except Exception as exc:
        return type(exc)


@pytest.mark.parametrize("local_part_limit", [0, 7])
async def test_getaddr_agrees_with_aiosmtpd(local_part_limit: int) -> None:
    handler = IntakeHandler(intake=_Intake(), mailboxes=(CLINIC,), max_recipients=5)
    ours = LimitedSMTP(handler, counts=ConnectionCounts(max_total=1, max_per_client=1),
                       hostname="test.example", loop=asyncio.get_running_loop())
    ours.local_part_limit = local_part_limit
    fast = 0
    for arg in EDGE_CASES + _random_cases(3000):
        expected = _outcome(SMTP._getaddr, ours, arg)
        assert _outcome(LimitedSMTP._getaddr, ours, arg) == expected, repr(arg)
        fast += _PLAIN_PATH.match(arg) is not None
    assert fast > 1000  # the comparison did cover the fast path


async def test_plain_paths_reach_the_handler_unchanged() -> None:
    """A real session: MAIL with parameters and RCPT go through the fast path."""
    handler = IntakeHandler(intake=_Intake(), mailboxes=(CLINIC,), max_recipients=5)
    loop = asyncio.get_running_loop()
    template = LimitedSMTP(handler, counts=ConnectionCounts(max_total=5, max_per_client=5),
                           hostname="test.example", loop=loop)
    server = await loop.create_server(template.fresh, host="127.0.0.1", port=0)
    try:
        client = await RawSMTP.connect(int(server.sockets[0].getsockname()[1]))
        assert (await client.ehlo()).code == 250
        assert (await client.cmd("MAIL FROM:<Patient@Example.ORG> SIZE=100")).code == 250
        assert (await client.cmd("RCPT TO:<" + CLINIC.upper() + ">")).code == 250
        assert (await client.cmd("RCPT TO:<other@clinic.example>")).code == 550
        assert (await client.cmd("RCPT TO:<someone@elsewhere.example>")).code == 550
        assert (await client.cmd("RCPT TO:<" + CLINIC + "> FOO=1")).code == 555
        await client.close()
    finally:
        server.close()
        await server.wait_closed()
