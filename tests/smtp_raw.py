"""A byte-exact SMTP client for tests: what aiosmtplib would tidy up (bare LF, exact line
lengths, unstuffed dots, pipelined commands, smuggling vectors) goes on the wire as written."""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass

CLINIC = "enquiries@clinic.example"


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class ConnectionClosed(Exception):
    pass


class RawSMTP:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting: Reply | None = None

    @classmethod
    async def connect(cls, port: int, *, host: str = "127.0.0.1", source: str | None = None,
                      timeout: float = 10.0) -> RawSMTP:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, local_addr=(source, 0) if source else None, limit=2**20), timeout)
        client = cls(reader, writer)
        client.greeting = await client.reply(timeout)
        return client

    async def reply(self, timeout: float = 10.0) -> Reply:
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), timeout)
            if not raw:
                raise ConnectionClosed("server closed the connection: " + " | ".join(lines))
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line[4:])
            if len(line) < 4 or line[3] != "-":
                return Reply(int(line[:3]), tuple(lines))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str | bytes, timeout: float = 10.0) -> Reply:
        data = line.encode() if isinstance(line, str) else line
        await self.send(data + b"\r\n")
        return await self.reply(timeout)

    async def ehlo(self, name: str = "client.example") -> Reply:
        return await self.cmd(f"EHLO {name}")

    async def envelope(self, sender: str = "patient@example.org",
                       rcpts: Sequence[str] = (CLINIC,)) -> None:
        """MAIL and RCPT; every one must be accepted."""
        reply = await self.cmd(f"MAIL FROM:<{sender}>")
        assert reply.code == 250, reply
        for rcpt in rcpts:
            reply = await self.cmd(f"RCPT TO:<{rcpt}>")
            assert reply.code == 250, reply

    async def data(self, payload: bytes, timeout: float = 30.0) -> tuple[Reply, float]:
        """DATA with `payload` sent verbatim (no dot-stuffing, no line-ending repair), then
        the end-of-data line. Returns the reply and the seconds between sending the final
        dot and the reply: the server's own work on the message."""
        reply = await self.cmd("DATA")
        assert reply.code == 354, reply
        await self.send(payload)
        end = b".\r\n" if payload.endswith(b"\r\n") else b"\r\n.\r\n"
        started = time.perf_counter()
        await self.send(end)
        reply = await self.reply(timeout)
        return reply, time.perf_counter() - started

    async def message(self, payload: bytes, *, sender: str = "patient@example.org",
                      rcpts: Sequence[str] = (CLINIC,), timeout: float = 30.0) -> Reply:
        """A whole transaction; `payload` is dot-stuffed (but line endings are kept)."""
        await self.envelope(sender, rcpts)
        reply, _ = await self.data(stuff(payload), timeout)
        return reply

    async def start_tls(self, context: ssl.SSLContext) -> None:
        await self.writer.start_tls(context, server_hostname="localhost")

    async def closed_by_server(self, timeout: float) -> bool:
        """True when the server closes (or resets) the connection within `timeout` seconds."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), timeout):
                pass
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return True

    async def close(self) -> None:
        if not self.writer.is_closing():
            try:
                self.writer.write(b"QUIT\r\n")
                await asyncio.wait_for(self.writer.drain(), 2)
            except (ConnectionError, TimeoutError):
                pass
            self.writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


def stuff(payload: bytes) -> bytes:
    """RFC 5321 transparency: a line starting with "." gets another one."""
    return re.sub(rb"(^|\r\n)\.", rb"\1..", payload)
