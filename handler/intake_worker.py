"""The intake writer in its own process, so committing never waits for the event loop.

In one process, the group-commit writer thread gives up the GIL at every SQL statement and
must win it back from the event loop that serves SMTP and HTTP; under load a group of ten
messages took ~23 ms of which ~6 ms was work (see BENCHMARKS.md). With `intake_worker = true`
(the default, together with `delivery_worker`) `handler serve` keeps the protocols and
parsing, and a child process (`python -m handler.intake_worker`) runs the same `Intake`
(interceptors, rules, group commit) on its own interpreter.

The two talk over a socket pair: the settings as one JSON line, then frames of
``length (4 bytes) + pickle``: ``("accept", id, InboundMessage)`` and ``("reload",)`` down,
``(id, AcceptOutcome | None, error text)`` up. The sender's 250 / 200 still follows the
child's commit. Messages larger than `LOCAL_BYTES` are written by the service's own
writer instead, so a 25 MB message is not copied into a second process. If the child dies,
the messages it held get 451 (the senders retry; a message it had committed is then a
duplicate and stored once) and the service starts another (1 s, growing to 30 s); end of
file stops the child after it answers what it holds, so it never outlives the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import pickle
import signal
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

from handler.config import Settings
from handler.inbound import InboundMessage
from handler.service import AcceptOutcome, Intake
from handler.worker import Restarts, end_process, settings_from_json, settings_to_json

log = logging.getLogger("handler.intake_worker")

LOCAL_BYTES = 1024 * 1024
"""Messages with more raw bytes than this are written by the service process itself."""
READY_SECONDS = 60.0
_HEADER = struct.Struct("!I")


def _frame(obj: object) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    return pickle.loads(await reader.readexactly(size))  # frames come from our own processes


class IntakeUnavailable(RuntimeError):
    """The intake process is not there to take the message (the sender gets 451 / 503)."""


class RemoteIntake:
    """The service's side: `accept` like `Intake.accept`, answered by the child process."""

    def __init__(self, settings: Settings, *, local: Intake,
                 on_queued: Callable[[], None]) -> None:
        self._settings = settings
        self._local = local
        self._on_queued = on_queued
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[AcceptOutcome]] = {}
        self._ids = itertools.count(1)
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = Restarts("intake worker")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        reader = await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(reader), name="intake-worker")

    async def _spawn(self) -> asyncio.StreamReader:
        ours, theirs = socket.socketpair()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "handler.intake_worker", stdin=theirs)
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        writer.write(settings_to_json(self._settings).encode() + b"\n")
        try:  # nothing is handed over before the child has its rules and database
            ready = await asyncio.wait_for(_read_frame(reader), READY_SECONDS)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            ready = None
        if ready != ("ready",):
            log.error("intake worker did not start (see its log above)")
            writer.close()
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()  # the supervisor sees it end and starts another
            return reader
        self._writer = writer
        return reader

    async def _supervise(self, reader: asyncio.StreamReader) -> None:
        while True:
            self.restarts.started()
            await self._read_answers(reader)
            if self._writer is not None:  # from now on accept() answers "unavailable" at once
                self._writer.close()
                self._writer = None
            self._fail_pending("intake process went away")
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping:
                return
            await self.restarts.pause(code)
            reader = await self._spawn()

    async def _read_answers(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                ident, outcome, error = await _read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            future = self._pending.pop(ident, None)
            if outcome is not None and outcome.queued:
                # committed: its replies go out even if nobody waits for the answer any more
                # (a webhook that timed out, an SMTP client that hung up)
                self._on_queued()
            if future is None or future.done():
                continue
            if outcome is None:
                future.set_exception(RuntimeError(error))
            else:
                future.set_result(outcome)

    def _fail_pending(self, why: str) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(IntakeUnavailable(why))

    async def accept(self, msg: InboundMessage) -> AcceptOutcome:
        if len(msg.raw or b"") > LOCAL_BYTES:
            return await self._local.accept(msg)
        writer = self._writer
        if self._stopping or not self.running or writer is None or writer.is_closing():
            raise IntakeUnavailable("intake process is restarting")
        ident = next(self._ids)
        future: asyncio.Future[AcceptOutcome] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        writer.write(_frame(("accept", ident, msg)))
        return await future

    def reload(self) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(_frame(("reload",)))

    def health(self) -> dict[str, Any]:
        return {"worker": "running" if self.running else "restarting", "pid": self.pid,
                "restarts": self.restarts.count}

    async def stop(self, grace: float = 20.0) -> None:
        """End of file: the child answers what it holds, then exits."""
        self._stopping = True
        if self._writer is not None:
            with contextlib.suppress(OSError):
                self._writer.write_eof()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            await end_process(proc, "intake worker", grace)
        if self._supervisor is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._supervisor, 5)
        self._fail_pending("service is shutting down")
        if self._writer is not None:
            self._writer.close()
            self._writer = None


async def _serve_parent(settings: Settings, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
    from handler import app
    from handler.clock import SystemClock

    clock = SystemClock()
    async with app.intake_alone(settings, clock=clock) as (intake, rules):
        writer.write(_frame(("ready",)))
        replies = _Replies(writer)
        buffer = bytearray()
        while True:
            # Every frame that has arrived, in one read: no task or future per message.
            try:
                chunk = await reader.read(_READ_BYTES)
            except ConnectionError:
                break
            if not chunk:
                break
            buffer += chunk
            offset = 0
            while len(buffer) - offset >= _HEADER.size:
                (size,) = _HEADER.unpack_from(buffer, offset)
                end = offset + _HEADER.size + size
                if end > len(buffer):
                    break
                # frames come from our own processes
                request = pickle.loads(memoryview(buffer)[offset + _HEADER.size:end])
                offset = end
                if request[0] == "accept":
                    replies.submit(intake, request[1], request[2])
                elif request[0] == "reload":
                    await asyncio.to_thread(rules.reload, clock.now())
            del buffer[:offset]
        with contextlib.suppress(TimeoutError):  # answer what we hold (the senders wait)
            await asyncio.wait_for(replies.wait_all(), 15)
        replies.flush()
        with contextlib.suppress(ConnectionError):
            await writer.drain()


_READ_BYTES = 256 * 1024


class _Replies:
    """Answers to the service, written once per group commit (one write, not one per
    message), and a count of the messages still waiting for theirs."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._frames: list[bytes] = []
        self._outstanding = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def submit(self, intake: Intake, ident: int, msg: InboundMessage) -> None:
        self._outstanding += 1
        self._idle.clear()
        done = functools.partial(self._done, ident)
        try:
            intake.submit(msg, done)
        except Exception as exc:
            done(exc)

    def _done(self, ident: int, result: AcceptOutcome | BaseException) -> None:
        reply: tuple[int, AcceptOutcome | None, str]
        if isinstance(result, BaseException):
            reply = (ident, None, f"{type(result).__name__}: {result}"[:500])
        else:
            reply = (ident, result, "")
        if not self._frames:  # the first answer of this round: write them all soon after
            asyncio.get_running_loop().call_soon(self.flush)
        self._frames.append(_frame(reply))
        self._outstanding -= 1
        if not self._outstanding:
            self._idle.set()

    def flush(self) -> None:
        frames, self._frames = self._frames, []
        if frames and not self._writer.is_closing():
            self._writer.write(b"".join(frames))

    async def wait_all(self) -> None:
        await self._idle.wait()


async def _main() -> None:
    from handler.logs import configure_logging, pseudonym_key

    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=os.dup(0))
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    line = await reader.readline()
    if not line:
        return
    settings = settings_from_json(line)
    configure_logging(settings.log_level, pseudonym_key=pseudonym_key(settings.var_dir))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the service
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    serving = asyncio.create_task(_serve_parent(settings, reader, writer))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving


def main() -> int:
    import handler.app  # before logging is set up: alembic logs its import at INFO

    sys.setswitchinterval(handler.app.SWITCH_INTERVAL)
    asyncio.run(_main())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
