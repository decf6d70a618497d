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
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from handler.config import Settings
from handler.inbound import InboundMessage
from handler.parse_email import normalise_address, parse_email
from handler.service import Intake

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

_ROUTING_TRICKS = re.compile(r"[%!]|^@|:")
_SOURCE_ROUTE = re.compile(r"\s*TO:\s*<\s*@", re.IGNORECASE)


def normalise_line_endings(raw: bytes) -> tuple[bytes, bool]:
    """(raw with every bare CR or LF turned into CRLF, whether there were any).

    aiosmtpd ends DATA only at CRLF.CRLF (so `\\n.\\r\\n` never splits a message in two); a
    bare CR or LF inside the content is a defect we store, normalised, rather than bounce a
    patient's mail over (Postfix's `smtpd_forbid_bare_newline = normalize`).
    """
    crlf = raw.count(b"\r\n")
    if raw.count(b"\r") == crlf and raw.count(b"\n") == crlf:
        return raw, False
    return re.sub(rb"\r\n|\r|\n", b"\r\n", raw), True


class IntakeHandler:
    """aiosmtpd handler: the RCPT policy and the DATA -> intake step."""

    def __init__(self, *, intake: Intake, mailboxes: Sequence[str], max_recipients: int) -> None:
        self._intake = intake
        self._mailboxes = {m.lower() for m in mailboxes}
        self._domains = {m.rpartition("@")[2] for m in self._mailboxes}
        self._max_recipients = max_recipients
        self._big_parses = asyncio.Semaphore(MAX_PARALLEL_BIG_PARSES)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        # We have no accounts: offering AUTH after STARTTLS would only invite 535s.
        session.host_name = hostname
        return [r for r in responses if not r.startswith("250-AUTH")]

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
            "mailboxes": sorted(self._mailboxes)}
        if len(raw) > PARSE_IN_THREAD_BYTES or raw.count(b"\n--") > PARSE_IN_THREAD_BOUNDARIES:
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

    def __init__(self, handler: Any, *, counts: ConnectionCounts, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._counts = counts
        self._client: str | None = None  # set while this connection is counted
        too_big = S552_TOO_BIG.format(limit=self.data_size_limit)
        self._replies = {  # aiosmtpd's wording -> ours
            "552 Error: Too much mail data": too_big,
            "552 Error: message size exceeds fixed maximum message size": too_big,
            "500 Line too long (see RFC5321 4.5.3.1.6)": S500_LINE_TOO_LONG,
        }

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

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        # aiosmtpd drops a source route (<@relay:user@domain>) before the handler sees the
        # address; we refuse any routing syntax outright.
        if arg and _SOURCE_ROUTE.match(arg):
            await self.push(S550_NOT_RELAY)
            return
        await super().smtp_RCPT(arg)


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

    def factory() -> SMTP:
        return LimitedSMTP(
            handler, counts=counts, data_size_limit=settings.smtp_max_message_size,
            enable_SMTPUTF8=False, decode_data=False, hostname=hostname,
            ident="enquiry-handler ESMTP", tls_context=context, timeout=settings.smtp_timeout,
            command_call_limit=call_limit, loop=loop)

    return await loop.create_server(factory, host=settings.smtp_host, port=settings.smtp_port,
                                    backlog=1024)
