"""The SMTP listener: aiosmtpd protocol on our event loop, with our accept policy and limits.

RCPT: only the configured mailboxes (550 otherwise: never an open relay). DATA: parse, hand
to `Intake.accept`, and answer 250 with the enquiry reference only once it is committed; any
failure answers 451 so the sender retries. aiosmtpd's default "500 Error: (Exc)" never shows.
Limits (size, line length, recipients, commands, connections, idle time) are documented in
docs/smtp-limits.md together with the answer each one gives.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice
from types import MethodType
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, syntax

from handler.config import Settings
from handler.inbound import InboundMessage
from handler.parse_email import normalise_address, parse_email
from handler.service import Acceptor

log = logging.getLogger("handler.smtp")

# Status lines as named data (aiosmtpd's own testing/statuscodes.py does the same).
S250_QUEUED = "250 2.0.0 Ok: queued as {ref}"
S250_RCPT = "250 2.1.5 Ok"
S421_BUSY = "421 4.7.0 Too many connections, please try again later"
S421_BUSY_CLIENT = "421 4.7.0 Too many connections from your address, please try again later"
S451_TEMP = "451 4.3.0 Temporary failure, please try again later"
S452_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
S500_LINE_TOO_LONG = ("500 5.5.2 Line too long: at most 1000 octets per line "
                      "(RFC 5321 section 4.5.3.1.6)")
S550_NO_MAILBOX = "550 5.1.1 No such mailbox here"
S550_NOT_RELAY = "550 5.7.1 Relaying denied: we accept mail only for our own addresses"
S552_TOO_BIG = ("552 5.3.4 Message too big: the limit is {limit} bytes, please send large "
                "files in several emails")

BARE_LINE_ENDING_DEFECT = "bare CR or LF line endings (normalised to CRLF)"
PARSE_IN_THREAD_BYTES = 256 * 1024
PARSE_IN_THREAD_BOUNDARIES = 64
"""Messages larger than this, or with more MIME boundary lines ("--" at a line start), are
parsed in a worker thread, so one costly message never stalls the other sessions (a 1,000-deep
multipart of 70 KB costs the stdlib parser 0.3 s)."""
MAX_PARALLEL_BIG_PARSES = 2
"""...and at most this many at once: bounded memory, and threads left for the DB writer."""
COMMANDS_PER_SESSION = 100
"""aiosmtpd's command_call_limit: each command verb at most this often per connection."""
READ_LIMIT = 16 * 1024
"""The limit of each connection's StreamReader, which aiosmtpd sizes by `line_length_limit`
(1001, the RFC 5321 line plus a transparency dot): at that size the reader stopped and
restarted reading the socket for every message over 2 KB, and DATA came in ~1 KB steps,
~150 us of CPU per 2 KB message. Lines keep their limits: command lines over 512 octets are
refused by aiosmtpd's `command_size_limit` either way, DATA lines by `_read_data`. Up to twice
this is buffered per connection (asyncio's default limit is 64 KB)."""
MAX_LINE = SMTP.line_length_limit
"""Octets per line in DATA, CRLF included: 1000 (RFC 5321 4.5.3.1.6) plus a stuffed dot."""

_ROUTING_TRICKS = re.compile(r"[%!]|^@|:")
_SOURCE_ROUTE = re.compile(r"\s*TO:\s*<\s*@", re.IGNORECASE)
_ATOM = r"(?!=\?)[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_PLAIN_PATH = re.compile(f"<({_ATOM})@({_ATOM})>")
"""`<local@domain>` with dot-atoms of RFC 5322 atext on both sides (neither starting "=?",
which the stdlib tries as an encoded word): the stdlib parser returns it unchanged."""
_END_OF_DATA = b"\r\n.\r\n"
_DOT_STUFFED = re.compile(rb"\r\n\.")  # searching with re is ~2x `in` on CRLF-dense bytes
_BARE_CR = re.compile(rb"\r(?!\n)")
_BARE_LF = re.compile(rb"\n(?<!\r\n)")
_BOUNDARY_LINE = re.compile(rb"\n--")


def _held_end(buf: bytearray) -> int:
    """How many octets at the end of `buf` could begin an end-of-data marker (0-4)."""
    return next((n for n in (4, 3, 2, 1) if buf.endswith(_END_OF_DATA[:n])), 0)


def _check_lines(buf: bytearray, start: int, end: int, longest: int) -> tuple[int, int]:
    """(where the first line in buf[start:end] not yet known to fit in `longest` octets with
    its CRLF starts; that line's end if it is 1 or 2 octets too long, -1 if longer, else 0).

    The two cases differ because aiosmtpd reads a line of up to `longest` + 2 octets whole and
    counts it against the size limit before its length, but refuses a longer one at once.
    Each step jumps to the last CRLF within reach: ~`longest` octets a step, not one line.
    """
    while start < end:
        reach = start + longest
        crlf = buf.rfind(b"\r\n", start, min(reach, end))
        if crlf >= 0:
            start = crlf + 2
        elif reach > end:
            return start, 0
        elif (crlf := buf.find(b"\r\n", reach - 1, min(reach + 2, end))) >= 0:
            return start, crlf + 2
        else:
            return start, -1 if reach + 2 <= end else 0
    return start, 0


def normalise_line_endings(raw: bytes) -> tuple[bytes, bool]:
    """(raw with every bare CR or LF turned into CRLF, whether there were any).

    aiosmtpd ends DATA only at CRLF.CRLF (so `\\n.\\r\\n` never splits a message in two); a
    bare CR or LF inside the content is a defect we store, normalised, rather than bounce a
    patient's mail over (Postfix's `smtpd_forbid_bare_newline = normalize`).
    """
    if not (_BARE_CR.search(raw) or _BARE_LF.search(raw)):  # 2x faster than counting them
        return raw, False
    return re.sub(rb"\r\n|\r|\n", b"\r\n", raw), True


class IntakeHandler:
    """aiosmtpd handler: the RCPT policy and the DATA -> intake step."""

    def __init__(self, *, intake: Acceptor, mailboxes: Sequence[str], max_recipients: int) -> None:
        self._intake = intake
        self._mailboxes = {m.lower() for m in mailboxes}
        self._mailbox_list = tuple(sorted(self._mailboxes))
        self._domains = {m.rpartition("@")[2] for m in self._mailboxes}
        self._max_recipients = max_recipients
        self._big_parses = asyncio.Semaphore(MAX_PARALLEL_BIG_PARSES)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        # We have no accounts: offering AUTH after STARTTLS would only invite 535s.
        session.host_name = hostname
        lines = [r for r in responses if not r.startswith("250-AUTH")]
        # aiosmtpd pushes each item with its own write (a send() each); one item holding
        # all the lines is the same reply on the wire in one.
        return ["\r\n".join(lines)] if lines else []

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        verdict = self.rcpt_verdict(address)
        if verdict:
            log.info("RCPT refused (%s)", verdict.split(" ", 2)[1])
            return verdict
        if address.lower() in envelope.rcpt_tos:
            return S250_RCPT  # the same mailbox twice is still one delivery
        if len(envelope.rcpt_tos) >= self._max_recipients:
            return S452_TOO_MANY_RCPTS
        envelope.rcpt_tos.append(address.lower())
        return S250_RCPT

    def rcpt_verdict(self, address: str) -> str:
        """"" when we accept mail for `address`, otherwise the refusal line."""
        if _ROUTING_TRICKS.search(address) or address.count("@") != 1:
            return S550_NOT_RELAY  # source routes, %-hack, bang paths, quoted tricks
        bare = normalise_address(address)
        if bare != address.strip().lower():
            return S550_NOT_RELAY
        if bare in self._mailboxes:
            return ""
        if bare.rpartition("@")[2] in self._domains:
            return S550_NO_MAILBOX
        return S550_NOT_RELAY

    async def handle_DATA(
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        try:
            msg = await self._parse(envelope)
            outcome = await self._intake.accept(msg)
        except Exception as exc:
            log.error("message not accepted (answered 451): %s", type(exc).__name__)
            return S451_TEMP
        return S250_QUEUED.format(ref=outcome.reference or "ok")

    async def handle_exception(self, error: Exception) -> str:
        log.warning("SMTP session error (answered 451): %s", type(error).__name__)
        return S451_TEMP

    async def _parse(self, envelope: Envelope) -> InboundMessage:
        raw = envelope.original_content or b""
        raw, bare_line_endings = normalise_line_endings(raw)
        options: dict[str, Any] = {
            "envelope_from": envelope.mail_from or "", "envelope_rcpts": envelope.rcpt_tos,
            "mailboxes": self._mailbox_list}
        if len(raw) > PARSE_IN_THREAD_BYTES or next(islice(  # stops at the first one too many
                _BOUNDARY_LINE.finditer(raw), PARSE_IN_THREAD_BOUNDARIES, None), None):
            async with self._big_parses:
                msg = await asyncio.to_thread(parse_email, raw, **options)
        else:
            msg = parse_email(raw, **options)
        if bare_line_endings:
            msg = dataclasses.replace(msg, defects=(*msg.defects, BARE_LINE_ENDING_DEFECT))
        return msg


@dataclass
class ConnectionCounts:
    """Open connections, in total and per client address, shared by one listener."""

    max_total: int
    max_per_client: int  # 0 = no per-client limit
    total: int = 0
    per_client: dict[str, int] = field(default_factory=dict)

    def admit(self, client: str) -> str:
        """"" and count the connection, or the 421 line refusing it."""
        if self.total >= self.max_total:
            return S421_BUSY
        if self.max_per_client and self.per_client.get(client, 0) >= self.max_per_client:
            return S421_BUSY_CLIENT
        self.total += 1
        self.per_client[client] = self.per_client.get(client, 0) + 1
        return ""

    def release(self, client: str) -> None:
        self.total -= 1
        left = self.per_client.get(client, 1) - 1
        if left > 0:
            self.per_client[client] = left
        else:
            self.per_client.pop(client, None)


class LimitedSMTP(SMTP):
    """aiosmtpd's protocol with connection caps, no source routes, and answers that carry
    enhanced status codes and say what the limit is."""

    line_length_limit = READ_LIMIT  # aiosmtpd uses it only as the StreamReader's limit

    def __init__(self, handler: Any, *, counts: ConnectionCounts, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._counts = counts
        self._client: str | None = None  # set while this connection is counted
        self._too_big = S552_TOO_BIG.format(limit=self.data_size_limit)
        self._replies = {  # aiosmtpd's wording -> ours
            "552 Error: message size exceeds fixed maximum message size": self._too_big,
        }

    def fresh(self) -> LimitedSMTP:
        """A new, unconnected protocol configured as this one: what `LimitedSMTP(...)` with
        the same arguments builds, for ~5% of the CPU. Use this instance only as the template.

        aiosmtpd's `__init__` rebuilds its AUTH, hook and command tables per connection with
        `inspect.getmembers`, `dir` and `inspect.signature` (~15% of the service's CPU per
        message); they depend only on the class and the handler. So we copy the template's
        state and redo only what is per instance: the stream reader and its protocol state
        (`StreamReaderProtocol.__init__`, as `SMTP.__init__` calls it), the methods bound to
        the instance, and the class-wide `command_size_limits` reset. tests/test_smtp_copy.py
        compares the result with a real `__init__` so an aiosmtpd change cannot slip by.
        """
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        asyncio.StreamReaderProtocol.__init__(
            new, asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=new._cb_client_connected, loop=self.loop)
        new._smtp_methods = {name: MethodType(method.__func__, new)
                             for name, method in self._smtp_methods.items()}
        new._auth_methods = {  # built-in mechanisms are bound to the instance, the handler's not
            name: mech._replace(method=MethodType(mech.method.__func__, new))
            if mech.is_builtin else mech
            for name, mech in self._auth_methods.items()}
        new.command_size_limits.clear()  # class-wide; EHLO grows it, each connection resets it
        return new

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if self.transport is None:  # a new connection, not the switch to TLS
            refusal = self._counts.admit(client)
            if refusal:
                log.info("connection refused: %s", refusal[10:].split(",")[0])
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(f"{refusal}\r\n".encode())
                transport.close()
                return
            self._client = client
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._client is not None:
            self._counts.release(self._client)
            self._client = None
        if self.transport is None:
            return  # refused in connection_made: aiosmtpd never set up this session
        super().connection_lost(exc)

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str):
            status = self._replies.get(status, status)
        await super().push(status)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's (address, rest of the argument), with a fast path for the plain
        `<local@domain>` nearly every client sends: its route through the stdlib header
        parser costs ~50 us, twice per message. tests/test_smtp_getaddr.py checks the two agree."""
        match = _PLAIN_PATH.match(arg)
        if match is None:
            return super()._getaddr(arg)
        rest = arg[match.end():]
        if rest[:1] in (" ", "\t"):  # the stdlib drops whitespace (and comments) after ">"
            rest = rest.lstrip()
        if rest[:1] == "(":
            return super()._getaddr(arg)
        if self.local_part_limit and len(match.group(1)) > self.local_part_limit:
            return None, None
        return f"{match.group(1)}@{match.group(2)}", rest

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        # aiosmtpd drops a source route (<@relay:user@domain>) before the handler sees the
        # address; we refuse any routing syntax outright.
        if arg and _SOURCE_ROUTE.match(arg):
            await self.push(S550_NOT_RELAY)
            return
        await super().smtp_RCPT(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        """aiosmtpd's DATA with the content read in blocks: its line-by-line loop costs ~2 ms
        of CPU for 100 KB (this ~0.2 ms), more than the rest of the session. Same answers,
        limits and hooks."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            original_content, refusal = await self._read_data()
        except asyncio.CancelledError:
            log.info("connection lost during DATA")
            self._writer.close()
            raise
        if refusal:
            await self.push(refusal)
            self._set_post_data_state()
            return
        content: str | bytes = original_content
        if self._decode_data:
            if self.enable_SMTPUTF8:
                content = original_content.decode("utf-8", errors="surrogateescape")
            else:
                try:
                    content = original_content.decode("ascii", errors="strict")
                except UnicodeDecodeError:
                    await self.push("500 Error: strict ASCII mode")
                    return
        self.envelope.content = content
        self.envelope.original_content = original_content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self) -> tuple[bytes, str]:
        """(the content up to CRLF.CRLF, dot-unstuffed, ""), or (b"", the refusal) when a line or
        the whole is over its limit: then the rest is read and dropped as it comes.

        As aiosmtpd: the size counts the content as sent (stuffing dots too); the refusal is the
        limit crossed first in the stream; the idle timer keeps running (restarted by commands).
        """
        limit = self.data_size_limit or 0
        over = limit + 2  # index in `buf` of the first octet past the size limit
        buf = bytearray(b"\r\n")  # as if after a CRLF: ".\r\n" as the first line ends DATA
        checked, refusal = 2, ""  # the lines before `checked` fit the line length limit
        while True:
            # Never read past the marker: commands pipelined behind it stay in the reader.
            held = _held_end(buf)
            if held:  # the marker may continue what we hold: read just its remainder
                block = await self._reader.readexactly(len(_END_OF_DATA) - held)
            else:  # any marker lies wholly ahead; the reader searches its buffer for it
                try:
                    block = await self._reader.readuntil(_END_OF_DATA)
                except asyncio.LimitOverrunError as exc:
                    # Past its limit (READ_LIMIT) the reader hands over what it holds:
                    # all but the last 4 octets (they may start a marker) or all before one.
                    block = await self._reader.read(exc.consumed)
            buf += block
            ended = buf.endswith(_END_OF_DATA)
            if not refusal:
                content_end = len(buf) - 3 if ended else len(buf)  # without the ".\r\n"
                checked, long_end = _check_lines(buf, checked, content_end, MAX_LINE)
                if limit and max(checked, long_end) > over:  # a whole line ends past the limit
                    refusal = self._too_big
                elif long_end:
                    refusal = S500_LINE_TOO_LONG
            if ended:
                break
            if refusal:
                buf = buf[-4:]  # only what may start the marker
        if refusal:
            return b"", refusal
        del buf[-3:]  # the ".\r\n" of the marker
        if _DOT_STUFFED.search(buf):
            buf = buf.replace(b"\r\n.", b"\r\n")
        del buf[:2]
        return bytes(buf), ""


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.smtp_tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(settings.smtp_tls_cert),
                            str(settings.smtp_tls_key) if settings.smtp_tls_key else None)
    return context


async def start_smtp_server(
    settings: Settings, handler: IntakeHandler, *, hostname: str = "enquiry-handler"
) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    counts = ConnectionCounts(
        max_total=settings.smtp_max_connections,
        max_per_client=settings.smtp_max_connections_per_client)
    context = tls_context(settings)
    call_limit = {"*": COMMANDS_PER_SESSION,
                  "RCPT": max(COMMANDS_PER_SESSION, settings.smtp_max_recipients + 10)}

    template = LimitedSMTP(
        handler, counts=counts, data_size_limit=settings.smtp_max_message_size,
        enable_SMTPUTF8=False, decode_data=False, hostname=hostname,
        ident="enquiry-handler ESMTP", tls_context=context, timeout=settings.smtp_timeout,
        command_call_limit=call_limit, loop=loop)
    return await loop.create_server(template.fresh, host=settings.smtp_host,
                                    port=settings.smtp_port, backlog=1024)
