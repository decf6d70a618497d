"""Outbound email through an SMTP relay with aiosmtplib (optional STARTTLS and login).

Keeps a few connections open and reuses them; maps every failure to a SendResult:
4xx and connection trouble are temporary, 5xx permanent, except when the relay refuses us
rather than the message (greeting, login, our sender: `RelayRefused`), which is temporary.
Messages arrive as bytes and go out asking for the extensions aiosmtplib's `send_message`
would: SIZE, SMTPUTF8 for a non-ASCII address (a relay without it cannot take that mail),
BODY=8BITMIME when offered.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import normalize_message_line_endings
from aiosmtplib.response import SMTPResponse
from aiosmtplib.typing import SMTPStatus

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
        self.description = f"SMTP relay {host}:{port}" + (
            " (STARTTLS required, certificate verified)" if starttls
            else " (STARTTLS when offered)")
        self._idle: asyncio.Queue[aiosmtplib.SMTP | None] = asyncio.Queue()
        for _ in range(connections):
            self._idle.put_nowait(None)  # a slot; connected lazily

    async def _connect(self) -> aiosmtplib.SMTP:
        """A connection ready for mail. What the relay refuses here (its greeting, EHLO, TLS,
        our login) says nothing about any message: `RelayRefused`, a temporary failure, so
        the mail waits for the operator to fix the relay settings instead of failing for
        good. A connection that got no further is closed, not left open."""
        # Patients' data never crosses the network in clear when the relay can do better:
        # STARTTLS whenever it is offered (its certificate unverified, as an MTA does by
        # default: an internal relay's self-signed certificate must not stop the mail);
        # `starttls` makes it required, with the certificate verified.
        client = aiosmtplib.SMTP(hostname=self._host, port=self._port, timeout=self._timeout,
                                 start_tls=True if self._starttls else None,
                                 validate_certs=self._starttls, use_tls=False)
        try:
            await client.connect()
            if client.is_ehlo_or_helo_needed:  # send() reads the extensions
                try:
                    await client.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await client.helo()  # a relay from before ESMTP
            if self._username:
                await client.login(self._username, self._password)
        except aiosmtplib.SMTPResponseException as exc:
            client.close()
            raise RelayRefused(exc.code, exc.message) from exc
        except BaseException:
            client.close()
            raise
        return client

    async def send(self, message: bytes, *, sender: str, recipient: str) -> SendResult:
        """One mail transaction, MAIL, RCPT and DATA called one by one. `sendmail` would parse
        both addresses twice and rewrite the whole message once more just to measure it for
        SIZE (a quarter of the client's CPU per message); our messages already have CRLF line
        endings (`ComposedEmail.data`), so their length is their size.

        MAIL and RCPT go through `execute_command` with the addresses quoted once per address
        (aiosmtplib's `mail`/`rcpt` parse them again on every call, ~15 µs each), and one
        `asyncio.timeout` moved on at each step replaces a `wait_for` per reply: the relay
        still has `timeout` seconds for each reply. DATA's content goes out as `data()` would
        send it (`data_payload`), without rewriting a message that needs no rewriting."""
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
            options = [f"SIZE={len(message)}".encode()] if client.supports_extension("size") else []
            if utf8:
                options.append(b"SMTPUTF8")
            if client.supports_extension("8BITMIME"):
                options.append(b"BODY=8BITMIME")
            mail_from = b"FROM:" + _quoted(sender, encoding)
            rcpt_to = b"TO:" + _quoted(recipient, encoding)
            loop = asyncio.get_running_loop()
            async with asyncio.timeout_at(loop.time() + self._timeout) as deadline:
                response = await client.execute_command(b"MAIL", mail_from, *options,
                                                        timeout=None)
                if response.code != SMTPStatus.completed:
                    if response.code != 552:  # too big for it (SIZE) is this message's fault
                        raise RelayRefused(response.code, response.message)  # our sender
                    raise aiosmtplib.SMTPSenderRefused(response.code, response.message, sender)
                deadline.reschedule(loop.time() + self._timeout)
                response = await client.execute_command(b"RCPT", rcpt_to, timeout=None)
                if response.code not in (SMTPStatus.completed, SMTPStatus.will_forward):
                    raise aiosmtplib.SMTPRecipientRefused(response.code, response.message,
                                                          recipient)
                deadline.reschedule(loop.time() + self._timeout)
                response = await client.execute_command(b"DATA", timeout=None)
                if response.code != SMTPStatus.start_input:
                    raise aiosmtplib.SMTPDataError(response.code, response.message)
                deadline.reschedule(loop.time() + self._timeout)
                response = await _send_content(client, message)
                if response.code != SMTPStatus.completed:
                    raise aiosmtplib.SMTPDataError(response.code, response.message)
            return SendResult.ok(response.message.strip() or "250")
        except RelayRefused as exc:
            client = await _reset(client)
            log.error("relay %s:%s refused %s: check the relay settings", self._host,
                      self._port, exc)
            return SendResult.temporary(f"relay refused: {exc.code} {exc.message}".strip(),
                                        str(exc.code))
        except aiosmtplib.SMTPResponseException as exc:  # refused recipient, DATA, size
            client = await _reset(client)
            return _classify(exc.code, exc.message)
        except ssl.SSLError as exc:  # before ValueError: a failed certificate check is both
            client = await _close(client)
            log.error("relay %s:%s: TLS failed: %s", self._host, self._port, exc)
            return SendResult.temporary(f"relay TLS failed: {exc}")
        except ValueError:  # an address no SMTP command line can carry (aiosmtplib checks)
            client = await _reset(client)
            raise
        except TimeoutError as exc:
            # a reply may still be on its way: the connection cannot be trusted to pair the
            # next reply with its command, so it is dropped (no QUIT)
            if client is not None:
                client.close()
            client = None
            return SendResult.temporary(f"relay unavailable: {type(exc).__name__}: {exc}")
        except (aiosmtplib.SMTPException, OSError) as exc:
            client = await _close(client)
            return SendResult.temporary(f"relay unavailable: {type(exc).__name__}: {exc}")
        finally:
            self._idle.put_nowait(client)

    async def close(self) -> None:
        while not self._idle.empty():
            await _close(self._idle.get_nowait())


class RelayRefused(aiosmtplib.SMTPResponseException):
    """The relay refused us rather than a message: its greeting, EHLO or TLS, our login, or
    our envelope sender. Temporary whatever the code: every message would get the same."""

    def __str__(self) -> str:
        return f"{self.code} {self.message}".strip()


async def _send_content(client: aiosmtplib.SMTP, message: bytes) -> SMTPResponse:
    """After DATA's 354: the content and its end marker, and the relay's reply to them.
    (`SMTP.data` sends DATA and then this, but normalises line endings and doubles leading
    dots with two regular-expression passes over every message: an eighth of the delivery
    worker's CPU. Nothing can arrive between the write and the read: no await between.)"""
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    protocol.write(data_payload(message))
    return await protocol.read_response(timeout=None)


def data_payload(message: bytes) -> bytes:
    """The bytes DATA carries after its 354, exactly those aiosmtplib's `data()` sends: every
    line ending CRLF, a final CRLF, each line's leading dot doubled (RFC 5321 4.5.2), then
    the end marker. Composed messages already have CRLF line endings and rarely a line that
    starts with a dot, so usually only three counts and a copy."""
    crlf = message.count(b"\r\n")
    if message.count(b"\n") != crlf or message.count(b"\r") != crlf:
        message = normalize_message_line_endings(message)
    elif not message.endswith(b"\r\n"):
        message += b"\r\n"
    if message.startswith(b".") or b"\n." in message:
        message = (b"." if message.startswith(b".") else b"") + message.replace(b"\n.", b"\n..")
    return message + b".\r\n"


def _classify(code: int, text: str) -> SendResult:
    detail = f"{code} {text}".strip()
    if 400 <= code < 500:
        return SendResult.temporary(detail, str(code))
    return SendResult.permanent(detail, str(code))


@functools.lru_cache(maxsize=1024)
def _quoted(address: str, encoding: str) -> bytes:
    """`<address>` as MAIL and RCPT carry it, parsed and checked by aiosmtplib (ValueError for
    an address no command line can carry); the same few addresses come back all the time."""
    return quote_address(address).encode(encoding)


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
