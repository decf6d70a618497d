"""Delivery in its own process, so sending never competes with intake for the interpreter.

`handler serve` (with `delivery_worker = true`, the default) runs the SMTP listener, the
webhook and the intake writer itself and starts this worker as a child process
(`python -m handler.worker`). The database is the queue, as it is in a single process; the
pipe between the two only carries

- the settings, as one JSON line, first (so secrets never sit in the child's environment);
- then one byte per wake-up: ``w`` "rows were committed, look now", ``r`` "rules and
  templates were reloaded, reload yours".

End of file on that pipe means the service is gone (stopped, or killed with -9): the worker
finishes the sends in flight and exits, so it never outlives its service. The service restarts
a worker that dies, with a growing pause (1 s up to 30 s). The worker keeps the dispatcher's
safety-net interval tick, so a lost wake-up only delays a message by `dispatch_poll_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, get_type_hints

from handler.config import ConfigError, Settings, convert_setting
from handler.live import LiveRules
from handler.render import RenderedEmail, TemplateError

log = logging.getLogger("handler.worker")

WAKE = b"w"
RELOAD = b"r"
WAKE_DELAY = 0.05
"""At most one wake-up of the dispatcher per this many seconds (see `WakeGate`)."""
RESTART_PAUSES = (1.0, 2.0, 5.0, 10.0, 30.0)
"""Pause before restarting a worker that died; a worker that ran for a minute starts over."""


@dataclass(slots=True)
class WakeGate:
    """When to wake the dispatcher after a commit: the first commit after a quiet spell
    wakes it at once (a lone enquiry's reply is not held back); under a stream of commits
    (each wakes) the wake-ups of `interval` seconds are gathered into one, so a claim takes
    the rows of several commits rather than a claim, a record and their two fsyncs for
    every few rows. Times are the caller's clock (the event loop's)."""

    interval: float = WAKE_DELAY
    last: float = float("-inf")
    scheduled: bool = False

    def request(self, now: float) -> float | None:
        """Seconds until the wake-up (0: now), or None when one is already scheduled."""
        if self.scheduled:
            return None
        self.scheduled = True
        return max(0.0, self.last + self.interval - now)

    def woke(self, now: float) -> None:
        self.scheduled = False
        self.last = now


class Restarts:
    """Counts a worker's restarts and spaces them out (RESTART_PAUSES)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0
        self._step = 0
        self._started = time.monotonic()

    def started(self) -> None:
        self._started = time.monotonic()

    async def pause(self, code: int | None) -> None:
        if time.monotonic() - self._started > 60:
            self._step = 0
        wait = RESTART_PAUSES[min(self._step, len(RESTART_PAUSES) - 1)]
        log.error("%s exited with code %s; restarting in %.0f s", self.what, code, wait)
        await asyncio.sleep(wait)
        self._step += 1
        self.count += 1


def settings_to_json(settings: Settings) -> str:
    values: dict[str, Any] = {}
    for f in fields(Settings):
        value = getattr(settings, f.name)
        if isinstance(value, tuple):
            value = list(value)
        elif value is not None and not isinstance(value, bool | int | float | str):
            value = str(value)
        values[f.name] = value
    return json.dumps(values)


def settings_from_json(line: str | bytes) -> Settings:
    hints = get_type_hints(Settings)
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ConfigError("worker: expected the settings as a JSON object")
    values = {name: (None if raw is None else convert_setting(name, raw, hints[name]))
              for name, raw in data.items() if name in hints}
    return Settings(**values)


class WorkerProcess:
    """The service's side: starts the worker, wakes it, restarts it, stops it."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = Restarts("delivery worker")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name="delivery-worker")

    async def _spawn(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "handler.worker", stdin=asyncio.subprocess.PIPE)
        assert self._proc.stdin is not None
        self._proc.stdin.write(settings_to_json(self._settings).encode() + b"\n" + WAKE)

    async def _supervise(self) -> None:
        while True:
            assert self._proc is not None
            self.restarts.started()
            code = await self._proc.wait()
            if self._stopping:
                return
            await self.restarts.pause(code)
            await self._spawn()

    def _send(self, byte: bytes) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            return  # the restarted worker looks at the whole outbox anyway
        transport = proc.stdin.transport
        if transport.is_closing() or transport.get_write_buffer_size() > 64:
            return  # already has wake-ups it has not read; one more adds nothing
        proc.stdin.write(byte)

    def wake(self) -> None:
        self._send(WAKE)

    def reload(self) -> None:
        self._send(RELOAD)

    def health(self) -> dict[str, Any]:
        return {"delivery": {"worker": "running" if self.running else "restarting",
                             "pid": self.pid, "restarts": self.restarts.count}}

    async def stop(self, grace: float = 20.0) -> None:
        """Close the pipe (the worker finishes what it is sending and exits); after `grace`
        seconds, SIGTERM, then SIGKILL."""
        self._stopping = True
        proc = self._proc
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if proc is None or proc.returncode is not None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        await end_process(proc, "delivery worker", grace)


async def end_process(proc: asyncio.subprocess.Process, what: str, grace: float) -> None:
    """Wait `grace` seconds for a worker told to stop (its pipe closed), then SIGTERM, then
    SIGKILL."""
    for action in (None, proc.terminate, proc.kill):
        if action is not None:
            with contextlib.suppress(ProcessLookupError):
                action()
        try:
            await asyncio.wait_for(proc.wait(), grace)
            return
        except TimeoutError:
            log.warning("%s did not stop in %.0f s", what, grace)
            grace = 5.0


class _ReloadingRenderer:
    """Renders with the worker's rules; when a template fails, reloads once from disk and
    tries again, so a rule the service already uses never meets a template the worker has
    not loaded yet (both processes watch the files, but not in lockstep)."""

    def __init__(self, rules: LiveRules) -> None:
        self._rules = rules

    def _retry(self, exc: TemplateError) -> bool:
        from handler.clock import SystemClock

        log.info("template failed (%s); reloading templates before giving up", exc)
        return self._rules.reload(SystemClock().now())

    def render_email(self, name: str, context: Mapping[str, Any]) -> RenderedEmail:
        try:
            return self._rules.render_email(name, context)
        except TemplateError as exc:
            if not self._retry(exc):
                raise
            return self._rules.render_email(name, context)

    def render_sms(self, name: str, context: Mapping[str, Any]) -> str:
        try:
            return self._rules.render_sms(name, context)
        except TemplateError as exc:
            if not self._retry(exc):
                raise
            return self._rules.render_sms(name, context)


async def deliver(settings: Settings, *, control_fd: int | None) -> None:
    """Run the dispatcher (and the nightly retention job) until told to stop: SIGTERM,
    SIGINT when standalone, or end of file on `control_fd`."""
    from handler import app
    from handler.clock import SystemClock

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    clock = SystemClock()
    async with app.delivering(settings, clock=clock, renderer=_ReloadingRenderer) as delivery:
        def reload() -> None:
            delivery.tasks.add(asyncio.create_task(
                asyncio.to_thread(delivery.rules.reload, clock.now())))

        gate = WakeGate()
        waking: asyncio.TimerHandle | None = None

        def wake() -> None:
            nonlocal waking
            waking = None
            gate.woke(loop.time())
            delivery.ticker.wake()

        def on_control() -> None:
            nonlocal waking
            assert control_fd is not None
            try:
                data = os.read(control_fd, 4096)
            except BlockingIOError:
                return
            if not data:
                loop.remove_reader(control_fd)
                stop.set()
                return
            if RELOAD in data:
                reload()
            delay = gate.request(loop.time())
            if delay == 0:
                wake()
            elif delay is not None:
                waking = loop.call_later(delay, wake)

        if control_fd is not None:
            os.set_blocking(control_fd, False)
            loop.add_reader(control_fd, on_control)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the service
        else:
            loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload)
        log.info("delivery worker started (pid %d): email to %s, sms to %s", os.getpid(),
                 delivery.email.description, delivery.sms.description)
        await stop.wait()
        if waking is not None:
            waking.cancel()
        log.info("delivery worker stopping")


def main() -> int:
    import handler.app  # before logging is set up: alembic logs its import at INFO
    from handler.logs import configure_logging, pseudonym_key

    line = sys.stdin.buffer.readline()
    if not line:
        return 0  # the service went away before saying anything
    settings = settings_from_json(line)
    configure_logging(settings.log_level, pseudonym_key=pseudonym_key(settings.var_dir))
    sys.setswitchinterval(handler.app.SWITCH_INTERVAL)  # claims and records run in threads
    asyncio.run(deliver(settings, control_fd=sys.stdin.fileno()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
