"""The outbound seams: `EmailTransport` and `SmsTransport`, and the embedded local ones.

A transport answers every send with a `SendResult`: ok (with the provider's id),
temporary (retry later) or permanent (give up, show the reason). Dispatch logic never
parses a library's exceptions; the transport does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mailbox
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

log = logging.getLogger("handler.sms")


class Outcome(StrEnum):
    OK = "ok"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class SendResult:
    outcome: Outcome
    provider_id: str = ""
    error: str = ""
    code: str = ""
    """Provider error code (SMTP reply code, Twilio error code) when there is one."""
    status: str = ""
    """The provider's own status for an accepted message (Twilio: "queued", "accepted")."""

    @classmethod
    def ok(cls, provider_id: str, status: str = "") -> SendResult:
        return cls(Outcome.OK, provider_id=provider_id, status=status)

    @classmethod
    def temporary(cls, error: str, code: str = "") -> SendResult:
        return cls(Outcome.TEMPORARY, error=error, code=code)

    @classmethod
    def permanent(cls, error: str, code: str = "") -> SendResult:
        return cls(Outcome.PERMANENT, error=error, code=code)


@dataclass(frozen=True, slots=True)
class SmsRequest:
    to: str
    body: str
    idempotency_key: str
    status_callback: str | None = None


class EmailTransport(Protocol):
    description: str

    async def send(self, message: bytes, *, sender: str, recipient: str) -> SendResult:
        """Send one message composed by `handler.compose` (CRLF line endings)."""

    async def close(self) -> None: ...


class SmsTransport(Protocol):
    description: str

    async def send(self, request: SmsRequest) -> SendResult: ...

    async def close(self) -> None: ...


class MaildirTransport:
    """Embedded default: every outbound email becomes a file in a local Maildir."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"local Maildir {path}"
        path.parent.mkdir(parents=True, exist_ok=True)
        for sub in ("tmp", "new", "cur"):  # Maildir(create=True) skips these if path exists
            (path / sub).mkdir(parents=True, exist_ok=True)
        self._box = mailbox.Maildir(str(path), create=True)

    async def send(self, message: bytes, *, sender: str, recipient: str) -> SendResult:
        data = message.replace(b"\r\n", b"\n")  # Maildir files use the local line ending
        envelope = f"Return-Path: <{sender}>\nDelivered-To: {recipient}\n".encode()
        try:
            key = await asyncio.to_thread(self._box.add, envelope + data)
        except OSError as exc:
            return SendResult.temporary(f"maildir write failed: {exc.strerror}")
        return SendResult.ok(f"maildir:{key}")

    async def close(self) -> None:
        return None


class FileSmsTransport:
    """Embedded default: every outbound SMS becomes a JSON file in a local folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"local folder {path}"
        path.mkdir(parents=True, exist_ok=True)

    async def send(self, request: SmsRequest) -> SendResult:
        name = f"{request.idempotency_key}.json"
        payload = {"to": request.to, "body": request.body, "key": request.idempotency_key}
        try:
            await asyncio.to_thread(
                (self.path / name).write_text, json.dumps(payload, ensure_ascii=False), "utf-8")
        except OSError as exc:
            return SendResult.temporary(f"sms folder write failed: {exc.strerror}")
        log.info("sms written to %s/ (no Twilio credentials: nothing was sent)", self.path)
        return SendResult.ok(f"file:{name}", status="written")

    async def close(self) -> None:
        return None
