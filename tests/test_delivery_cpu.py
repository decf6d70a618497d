"""The delivery worker's shortcuts give what the long way gave: quoted-printable line by line,
tidy_text's fast paths, format_datetime's cache, the template loop without `generate()`, and
the relay transaction sent with `execute_command` under one moving deadline, and DATA's
content written as aiosmtplib would write it."""

from __future__ import annotations

import asyncio
import contextlib
import quopri
import random
import re
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from handler.compose import compose_email
from handler.render import RenderedEmail, TemplateError, Templates, format_datetime, tidy_text
from handler.smtp_out import RelayTransport, data_payload
from handler.transports import Outcome
from tests.test_smtp_limits import throwaway_certificate

CLINIC = "enquiries@clinic.example"
DATE = datetime(2026, 11, 25, 20, 30, 13, tzinfo=UTC)
_PIECES = ["", " ", "\t", "  ", "=", "a", "word", ".", "é", "…", "€", "\x00", "\x7f", "From ",
           "x" * 70, "y" * 75, "z" * 76, "q" * 77, "<p style=\"margin:0\">", "?=", "=?utf-8?"]


def _random_text(rng: random.Random) -> str:
    lines = ["".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 12)))
             for _ in range(rng.randint(0, 8))]
    return rng.choice(["\n", "\r\n"]).join(lines) + rng.choice(["", "\n", " "])


def test_quoted_printable_line_by_line_is_what_quopri_writes_for_the_whole_body() -> None:
    rng = random.Random(20261126)
    checked = 0
    for _ in range(400):
        text, html = _random_text(rng), _random_text(rng)
        composed = compose_email(
            RenderedEmail(subject="s", text=text, html=html), sender=CLINIC, sender_name="C",
            recipient="jane@example.org", message_id="m@clinic.example", date=DATE,
            auto_submitted="auto-generated")
        parsed = message_from_bytes(composed.data, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        for subtype, content in (("plain", text), ("html", html)):
            part = next((p for p in parsed.walk() if p.get_content_type() == f"text/{subtype}"),
                        None)
            if part is None or part["Content-Transfer-Encoding"] != "quoted-printable":
                continue
            lines = content.encode().splitlines()
            whole = quopri.encodestring(b"\r\n".join(lines) + b"\r\n")
            head = f"text/{subtype}; charset=\"utf-8\"\r\nContent-Transfer-Encoding: "
            assert (head + "quoted-printable\r\n\r\n").encode() + whole in composed.data
            assert part.get_content().splitlines() == content.splitlines()
            checked += 1
    assert checked > 100


def _tidy_reference(text: str) -> str:
    text = re.sub(r"[ \t]+$", "", text.replace("\r\n", "\n"), flags=re.MULTILINE)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


@pytest.mark.parametrize("text", [
    "", "a", "a  ", "a \t\nb", "a\n\n\n\nb", "a \n \n\t\n\nb ", "\r\n\r\n\r\nx\r\n", "x\t",
    " lead\n\n\n  \n\ttrail\t \n", "a\r\n \r\n\r\n\r\nb",
])
def test_tidy_text_is_unchanged_by_its_fast_paths(text: str) -> None:
    assert tidy_text(text) == _tidy_reference(text)


def test_tidy_text_on_random_text() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        text = "".join(rng.choice(["a", " ", "\t", "\n", "\r\n", "\n\n\n", "b c"])
                       for _ in range(rng.randint(0, 30)))
        assert tidy_text(text) == _tidy_reference(text)


def test_format_datetime_cached_results_follow_the_instant() -> None:
    summer = datetime(2026, 7, 1, 11, 5, tzinfo=UTC)
    assert format_datetime(summer) == "1 July 2026, 12:05 BST"
    same_instant = summer.astimezone(timezone(timedelta(hours=-5)))
    assert format_datetime(same_instant) == "1 July 2026, 12:05 BST"
    assert format_datetime(summer.replace(tzinfo=None)) == "1 July 2026, 12:05 BST"  # naive: UTC
    assert format_datetime(summer, "%H:%M", "Asia/Tokyo") == "20:05"
    assert format_datetime(summer, "%-d/%m") == "1/07"
    with pytest.raises(TypeError):
        format_datetime("2026-07-01")  # type: ignore[arg-type]


def _templates(tmp_path: Path, source: str, **options: object) -> Templates:
    (tmp_path / "email").mkdir(exist_ok=True)
    for suffix in (".subject.txt", ".txt", ".html"):
        (tmp_path / "email" / f"t{suffix}").write_text(source)
    return Templates(tmp_path, **options)  # type: ignore[arg-type]


def test_a_failing_template_still_names_its_line(tmp_path: Path) -> None:
    templates = _templates(tmp_path, "line one\n" * 40 + "{{ 1 // 0 }}\n")
    with pytest.raises(TemplateError, match=r"email/t\.subject\.txt:41: ZeroDivisionError"):
        templates.render_email("t", {})


def test_many_plain_chunks_still_meet_the_output_cap_and_the_clock(tmp_path: Path) -> None:
    source = "{{ v }}-" * 200  # 400 chunks, no loop, call or operator for the sandbox
    assert _templates(tmp_path, source).render_email("t", {"v": "x"}).html == "x-" * 200 + "\n"
    with pytest.raises(TemplateError, match="output is longer than 300 characters"):
        _templates(tmp_path, source, max_output_chars=300).render_email("t", {"v": "x"})
    ticks = iter(range(10**6))
    slow = _templates(tmp_path, source, max_render_seconds=1.0,
                      timer=lambda: next(ticks) * 0.1)
    with pytest.raises(TemplateError, match="rendering took longer than 1 s"):
        slow.render_email("t", {"v": "x"})


class _Relay:
    """Answers MAIL as told; can hold its DATA reply back until told to go on."""

    def __init__(self, *, refuse_sender: bool = False, stall: str = "",
                 smtputf8: bool = True, data_reply: str = "") -> None:
        self.refuse_sender, self.stall, self.smtputf8 = refuse_sender, stall, smtputf8
        self.data_reply = data_reply
        self.envelopes: list[tuple[object, Envelope]] = []
        self.release = asyncio.Event()

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        if self.stall == "MAIL":
            self.stall = ""
            await self.release.wait()
        if self.refuse_sender:
            return "553 5.7.1 Sender not allowed"
        envelope.mail_from, envelope.mail_options = address, list(options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.stall == "DATA":
            self.stall = ""
            await self.release.wait()
        if self.data_reply:
            return self.data_reply
        self.envelopes.append((session.peer, envelope))
        return "250 2.0.0 queued as R" + str(len(self.envelopes))


async def _serve(relay: _Relay) -> tuple[asyncio.base_events.Server, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(relay, hostname="relay.test", loop=loop, enable_SMTPUTF8=relay.smtputf8),
        "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


@contextlib.asynccontextmanager
async def _relay_transport(relay: _Relay, **options: Any) -> AsyncIterator[RelayTransport]:
    """A RelayTransport with one connection to `relay`, served on loopback; both closed after."""
    server, port = await _serve(relay)
    transport = RelayTransport(host="127.0.0.1", port=port, connections=1, **options)
    try:
        yield transport
    finally:
        await transport.close()
        server.close()
        await server.wait_closed()


MAIL = b"Subject: hello\r\n\r\nA line.\r\n"


@pytest.mark.parametrize("stage", ["MAIL", "DATA"])
async def test_a_relay_that_stops_answering_times_out_and_the_next_mail_reconnects(
    stage: str
) -> None:
    relay = _Relay(stall=stage)
    started = asyncio.get_running_loop().time()
    async with _relay_transport(relay, timeout=0.3) as transport:
        stalled = await transport.send(MAIL, sender=CLINIC, recipient="jane@example.org")
        assert asyncio.get_running_loop().time() - started < 2  # 0.3 s per reply
        relay.release.set()
        after = await transport.send(MAIL, sender=CLINIC, recipient="joe@example.org")
    assert stalled.outcome is Outcome.TEMPORARY and "TimeoutError" in stalled.error
    assert after.outcome is Outcome.OK
    peers = [peer for peer, _ in relay.envelopes]
    if stage == "DATA":  # the stalled mail went through in the end, on its own connection
        assert peers[-1] != peers[0]  # the timed-out connection was dropped, not reused
    assert relay.envelopes[-1][1].rcpt_tos == ["joe@example.org"]


async def test_a_refused_sender_is_temporary_and_addresses_are_checked() -> None:
    """The relay refusing our sender (553) refuses every message alike: a settings problem
    for the operator, so the mail waits instead of failing for good."""
    relay = _Relay(refuse_sender=True)
    async with _relay_transport(relay) as transport:
        refused = await transport.send(MAIL, sender=CLINIC, recipient="jane@example.org")
        relay.refuse_sender = False
        for bad in ("ja\x00ne@example.org", "jane@example.org\x7f", "a b@example.org\x7f"):
            with pytest.raises(ValueError):  # no command line can carry it
                await transport.send(MAIL, sender=CLINIC, recipient=bad)
        sent = await transport.send(MAIL, sender=CLINIC, recipient="Jane <jane@example.org>")
        utf8 = await transport.send(MAIL, sender=CLINIC, recipient="jané@example.org")
    assert (refused.outcome, refused.code) == (Outcome.TEMPORARY, "553")
    assert sent.outcome is utf8.outcome is Outcome.OK
    [(_, plain), (_, international)] = relay.envelopes
    assert plain.rcpt_tos == ["jane@example.org"] and plain.mail_from == CLINIC
    assert international.rcpt_tos == ["jané@example.org"]
    assert "SMTPUTF8" in international.mail_options


@pytest.mark.parametrize("greeting", [b"554 5.3.2 not accepting connections",
                                      b"421 4.3.2 try later"])
async def test_a_relay_that_refuses_us_at_its_greeting_is_temporary_and_not_left_open(
    greeting: bytes
) -> None:
    connections: list[asyncio.StreamReader] = []
    closed = asyncio.Event()

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(reader)
        writer.write(greeting + b"\r\n")
        await writer.drain()
        await reader.read()  # until the client closes its side
        closed.set()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    transport = RelayTransport(host="127.0.0.1", port=port, connections=1)
    try:
        result = await transport.send(MAIL, sender=CLINIC, recipient="jane@example.org")
        await asyncio.wait_for(closed.wait(), 5)  # the refused connection was closed by us
    finally:
        await transport.close()
        server.close()
        await server.wait_closed()
    assert (result.outcome, result.code) == (Outcome.TEMPORARY, greeting[:3].decode())
    assert len(connections) == 1


@pytest.mark.parametrize("required", [False, True])
async def test_the_relay_connection_is_encrypted_whenever_the_relay_offers_starttls(
    tmp_path: Path, required: bool
) -> None:
    """By default STARTTLS is used when offered, and a self-signed certificate (an internal
    relay's) does not stop the mail; `relay_starttls = true` makes TLS required and the
    certificate verified, so the same relay is then refused."""
    cert, key = throwaway_certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    seen: list[bool] = []

    class Encrypted(_Relay):
        async def handle_DATA(self, server: SMTP, session: Session,
                              envelope: Envelope) -> str:
            seen.append(session.ssl is not None)
            return await super().handle_DATA(server, session, envelope)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(Encrypted(), hostname="relay.test", loop=loop, tls_context=context),
        "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    transport = RelayTransport(host="127.0.0.1", port=port, connections=1, starttls=required)
    try:
        result = await transport.send(MAIL, sender=CLINIC, recipient="jane@example.org")
    finally:
        await transport.close()
        server.close()
        await server.wait_closed()
    if required:  # not signed by anyone we trust: nothing is sent, and it is retried
        assert result.outcome is Outcome.TEMPORARY and seen == []
    else:
        assert result.outcome is Outcome.OK and seen == [True]


async def test_a_message_too_big_for_the_relay_is_permanent() -> None:
    relay = _Relay(data_reply="552 5.3.4 Message too big for system")
    async with _relay_transport(relay) as transport:
        result = await transport.send(MAIL, sender=CLINIC, recipient="jane@example.org")
    assert (result.outcome, result.code) == (Outcome.PERMANENT, "552")


async def test_a_non_ascii_address_needs_smtputf8() -> None:
    relay = _Relay(smtputf8=False)
    async with _relay_transport(relay) as transport:
        result = await transport.send(MAIL, sender=CLINIC, recipient="jané@example.org")
    assert result.outcome is Outcome.PERMANENT and "SMTPUTF8" in result.error
    assert relay.envelopes == []


def _aiosmtplib_payload(message: bytes) -> bytes:
    """What aiosmtplib's own `data()` writes after the 354."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"


@pytest.mark.parametrize("message", [
    b"", b".", b"..", b"\r\n", b".\r\n", b"a\r\n.\r\nb", b"a\n.b\n", b"a\r.b", b"a\r",
    b"a\n", b"a", b"\r\n.", b"x\r\n\r\n..y\r\n", b"\n\n\r\r\n.", MAIL])
def test_data_payload_is_what_aiosmtplib_sends(message: bytes) -> None:
    assert data_payload(message) == _aiosmtplib_payload(message)


def test_data_payload_on_random_messages() -> None:
    rng = random.Random(5321)
    pieces = [b"\r\n", b"\n", b"\r", b".", b"..", b"a", b" ", b"\r\n.", b"\xc3\xa9", b"=\r\n"]
    for _ in range(5000):
        message = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 20)))
        assert data_payload(message) == _aiosmtplib_payload(message), message


async def test_lines_with_dots_and_odd_line_endings_arrive_as_written() -> None:
    relay = _Relay()
    messages = [MAIL, b"Subject: dots\r\n\r\n.\r\n..two\r\n.three",
                b"Subject: lf\n\nbare\nlines\r"]
    async with _relay_transport(relay) as transport:
        results = [await transport.send(m, sender=CLINIC, recipient="jane@example.org")
                   for m in messages]
    assert [r.outcome for r in results] == [Outcome.OK] * 3
    assert [r.provider_id for r in results] == [f"2.0.0 queued as R{n}" for n in (1, 2, 3)]
    assert [e.original_content for _, e in relay.envelopes] == [
        normalize_message_line_endings(m) for m in messages]


@pytest.mark.parametrize(("reply", "outcome"), [
    ("554 5.6.0 Message content rejected", Outcome.PERMANENT),
    ("451 4.3.0 Try again later", Outcome.TEMPORARY)])
async def test_a_refused_message_content_is_classified_and_the_connection_reused(
    reply: str, outcome: Outcome
) -> None:
    relay = _Relay(data_reply=reply)
    async with _relay_transport(relay) as transport:
        refused = await transport.send(MAIL, sender=CLINIC, recipient="jane@example.org")
        relay.data_reply = ""
        after = await transport.send(MAIL, sender=CLINIC, recipient="joe@example.org")
    assert (refused.outcome, refused.code) == (outcome, reply[:3])
    assert after.outcome is Outcome.OK
    assert [e.rcpt_tos for _, e in relay.envelopes] == [["joe@example.org"]]
