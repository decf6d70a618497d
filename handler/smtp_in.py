"""The SMTP listener: aiosmtpd protocol on our event loop, with our accept policy.

RCPT: only the configured mailboxes (550 otherwise: never an open relay). DATA: parse, hand
to `Intake.accept`, and answer 250 with the enquiry reference only once it is committed; any
failure answers 451 so the sender retries. aiosmtpd's default "500 Error: (Exc)" never shows.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Sequence
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from handler.config import Settings
from handler.parse_email import normalise_address, parse_email
from handler.service import Intake

log = logging.getLogger("handler.smtp")

# Status lines as named data (aiosmtpd's own testing/statuscodes.py does the same).
S250_QUEUED = "250 2.0.0 Ok: queued as {ref}"
S250_RCPT = "250 2.1.5 Ok"
S421_BUSY = "421 4.7.0 Too many connections, try again later"
S451_TEMP = "451 4.3.0 Temporary failure, please try again later"
S452_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
S550_NO_MAILBOX = "550 5.1.1 No such mailbox here"
S550_NOT_RELAY = "550 5.7.1 Relaying denied: we accept mail only for our own addresses"
S550_BARE_LF = "550 5.6.2 Bare CR or LF in message; please use CRLF line endings"

_ROUTING_TRICKS = re.compile(r"[%!]|^@|:")


class IntakeHandler:
    """aiosmtpd handler: the RCPT policy and the DATA -> intake step."""

    def __init__(self, *, intake: Intake, mailboxes: Sequence[str], max_recipients: int) -> None:
        self._intake = intake
        self._mailboxes = {m.lower() for m in mailboxes}
        self._domains = {m.rpartition("@")[2] for m in self._mailboxes}
        self._max_recipients = max_recipients

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self._max_recipients:
            return S452_TOO_MANY_RCPTS
        verdict = self.rcpt_verdict(address)
        if verdict:
            log.info("RCPT refused (%s)", verdict.split(" ", 2)[1])
            return verdict
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
        raw = envelope.original_content or b""
        if isinstance(envelope.content, bytes) and not envelope.original_content:
            raw = envelope.content
        try:
            msg = parse_email(raw, envelope_from=envelope.mail_from or "",
                              envelope_rcpts=envelope.rcpt_tos, mailboxes=sorted(self._mailboxes))
            outcome = await self._intake.accept(msg)
        except Exception as exc:
            log.error("message not accepted (answered 451): %s", type(exc).__name__)
            return S451_TEMP
        return S250_QUEUED.format(ref=outcome.reference or "ok")

    async def handle_exception(self, error: Exception) -> str:
        log.error("SMTP session error (answered 451): %s", type(error).__name__)
        return S451_TEMP


class LimitedSMTP(SMTP):
    """aiosmtpd's protocol with a cap on concurrent connections."""

    def __init__(self, handler: Any, *, counter: list[int], max_connections: int,
                 **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._counter = counter
        self._max_connections = max_connections
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._counter[0] >= self._max_connections:
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(f"{S421_BUSY}\r\n".encode())
            transport.close()
            return
        self._counter[0] += 1
        self._counted = True
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted:
            self._counter[0] -= 1
            self._counted = False
        if self.transport is None:
            return  # refused in connection_made: aiosmtpd never set up this session
        super().connection_lost(exc)


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
    counter = [0]
    context = tls_context(settings)

    def factory() -> SMTP:
        return LimitedSMTP(
            handler, counter=counter, max_connections=settings.smtp_max_connections,
            data_size_limit=settings.smtp_max_message_size, enable_SMTPUTF8=False,
            decode_data=False, hostname=hostname, ident="enquiry-handler ESMTP",
            tls_context=context, timeout=settings.smtp_timeout,
            command_call_limit={"RCPT": settings.smtp_max_recipients + 10, "*": 100},
            loop=loop)

    return await loop.create_server(factory, host=settings.smtp_host, port=settings.smtp_port)
