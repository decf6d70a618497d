"""The outbound seams: `EmailTransport` and `SmsTransport`, and the embedded local ones.

A transport answers every send with a `SendResult`: ok (with the provider's id),
temporary (retry later) or permanent (give up, show the reason). Dispatch logic never
parses a library's exceptions; the transport does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mailbox
import os
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
    """Embedded default: every outbound SMS becomes a JSON file in a local folder, named by
    its idempotency key (a resend overwrites the same file).

    Files are written off the event loop, but the texts that arrive while one group is being
    written go together in the next one: one thread hand-off and one log line per group
    rather than per text. A send returns only once its own file is written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"local folder {path}"
        path.mkdir(parents=True, exist_ok=True)
        self._queue: list[tuple[str, bytes, asyncio.Future[SendResult]]] = []
        self._writing = False  # a group is on its way to (or in) a worker thread
        self._loop: asyncio.AbstractEventLoop | None = None

    async def send(self, request: SmsRequest) -> SendResult:
        name = f"{request.idempotency_key}.json"
        payload = {"to": request.to, "body": request.body, "key": request.idempotency_key}
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a group still pending on a closed loop never finishes
            self._queue, self._writing, self._loop = [], False, loop
        done: asyncio.Future[SendResult] = loop.create_future()
        self._queue.append((name, json.dumps(payload, ensure_ascii=False).encode(), done))
        if not self._writing:
            self._writing = True
            loop.call_soon(self._write_queued, loop)  # sends started this turn join the group
        return await done

    def _write_queued(self, loop: asyncio.AbstractEventLoop) -> None:
        group, self._queue = self._queue, []
        try:
            writing = loop.run_in_executor(
                None, self._write_files, [(name, data) for name, data, _ in group])
        except Exception as exc:  # no executor (shutting down): these sends fail, not hang
            self._writing = False
            for _, _, done in group:
                if not done.done():
                    done.set_exception(exc)
            return
        writing.add_done_callback(lambda future: self._written(loop, group, future))

    def _written(self, loop: asyncio.AbstractEventLoop,
                 group: list[tuple[str, bytes, asyncio.Future[SendResult]]],
                 writing: asyncio.Future[list[SendResult | Exception]]) -> None:
        results = None if writing.cancelled() or writing.exception() else writing.result()
        written = 0
        for i, (_, _, done) in enumerate(group):
            if done.done():
                continue  # its sender was cancelled; the file may still have been written
            if results is not None:
                result = results[i]
                if isinstance(result, Exception):
                    done.set_exception(result)
                else:
                    done.set_result(result)
                    written += result.outcome is Outcome.OK
            elif writing.cancelled():
                done.cancel()
            else:
                done.set_exception(writing.exception() or RuntimeError("sms folder write"))
        if written:
            log.info("%d sms written to %s/ (no Twilio credentials: nothing was sent)",
                     written, self.path)
        if self._queue:
            self._write_queued(loop)
        else:
            self._writing = False

    def _write_files(self, files: list[tuple[str, bytes]]) -> list[SendResult | Exception]:
        """Worker thread: each file in turn; one that cannot be written fails on its own (an
        error other than OSError is raised to its sender alone)."""
        results: list[SendResult | Exception] = []
        for name, data in files:
            try:
                _write_file(self.path / name, data)
            except OSError as exc:
                results.append(SendResult.temporary(f"sms folder write failed: {exc.strerror}"))
            except Exception as exc:
                results.append(exc)
            else:
                results.append(SendResult.ok(f"file:{name}", status="written"))
        return results

    async def close(self) -> None:
        return None


def _write_file(path: Path, data: bytes) -> None:
    """`data` as `path`, whole or not at all: written to a hidden sibling, then renamed over
    `path`, so a reader of the folder never sees a half-written text (a resend replaces the
    file in one step too). Without the buffered file object around the system calls."""
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0),
                 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    os.close(fd)
    os.replace(partial, path)
