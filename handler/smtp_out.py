"""Outbound email through an SMTP relay with aiosmtplib (optional STARTTLS and login).

Keeps a few connections open and reuses them; maps every failure to a SendResult:
4xx and connection trouble are temporary, 5xx permanent. Messages arrive as bytes and go out
asking for the extensions aiosmtplib's `send_message` would: SIZE, SMTPUTF8 for a non-ASCII
address (a relay without it cannot take that mail), BODY=8BITMIME when offered.
"""

from __future__ import annotations

import asyncio
import logging

import aiosmtplib

from handler.transports import SendResult

log = logging.getLogger("handler.smtp_out")


class RelayTransport:
    def __init__(
        self, *, host: str, port: int, username: str = "", password: str = "",
        starttls: bool = False, timeout: float = 60.0, connections: int = 4,
    ) -> None:
        self._host, self._port = host, port
        self._username, self._password = username, password
        self._starttls = starttls
        self._timeout = timeout
        self.description = f"SMTP relay {host}:{port}" + (" (STARTTLS)" if starttls else "")
        self._idle: asyncio.Queue[aiosmtplib.SMTP | None] = asyncio.Queue()
        for _ in range(connections):
            self._idle.put_nowait(None)  # a slot; connected lazily

    async def _connect(self) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(hostname=self._host, port=self._port, timeout=self._timeout,
                                 start_tls=self._starttls, use_tls=False)
        await client.connect()
        if client.is_ehlo_or_helo_needed:  # send() reads the extensions
            try:
                await client.ehlo()
            except aiosmtplib.SMTPHeloError:
                await client.helo()  # a relay from before ESMTP
        if self._username:
            await client.login(self._username, self._password)
        return client

    async def send(self, message: bytes, *, sender: str, recipient: str) -> SendResult:
        """One mail transaction, MAIL, RCPT and DATA called one by one. `sendmail` would parse
        both addresses twice and rewrite the whole message once more just to measure it for
        SIZE (a quarter of the client's CPU per message); our messages already have CRLF line
        endings (`ComposedEmail.data`), so their length is their size."""
        utf8 = not (sender.isascii() and recipient.isascii())
        encoding = "utf-8" if utf8 else "ascii"
        client = await self._idle.get()
        try:
            if client is None or not client.is_connected:
                client = await self._connect()
            if utf8 and not client.supports_extension("smtputf8"):
                # a non-ASCII address needs SMTPUTF8, which this relay lacks: retrying won't help
                return SendResult.permanent(
                    "relay cannot send to this address: SMTPUTF8 is not supported by this server")
            options = [f"SIZE={len(message)}"] if client.supports_extension("size") else []
            if utf8:
                options.append("SMTPUTF8")
            if client.supports_extension("8BITMIME"):
                options.append("BODY=8BITMIME")
            await client.mail(sender, options=options, encoding=encoding)
            await client.rcpt(recipient, encoding=encoding)
            response = await client.data(message)
            return SendResult.ok(response.message.strip() or "250")
        except aiosmtplib.SMTPResponseException as exc:  # refused sender or recipient, DATA
            client = await _reset(client)
            return _classify(exc.code, exc.message)
        except ValueError:  # an address no SMTP command line can carry (aiosmtplib checks)
            client = await _reset(client)
            raise
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            client = await _close(client)
            return SendResult.temporary(f"relay unavailable: {type(exc).__name__}: {exc}")
        finally:
            self._idle.put_nowait(client)

    async def close(self) -> None:
        while not self._idle.empty():
            await _close(self._idle.get_nowait())


def _classify(code: int, text: str) -> SendResult:
    detail = f"{code} {text}".strip()
    if 400 <= code < 500:
        return SendResult.temporary(detail, str(code))
    return SendResult.permanent(detail, str(code))


async def _reset(client: aiosmtplib.SMTP | None) -> aiosmtplib.SMTP | None:
    if client is None or not client.is_connected:
        return None
    try:
        await client.rset()
        return client
    except (aiosmtplib.SMTPException, OSError):
        return await _close(client)


async def _close(client: aiosmtplib.SMTP | None) -> None:
    if client is not None:
        try:
            if client.is_connected:
                await client.quit()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            client.close()
    return None
