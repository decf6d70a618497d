"""The clock of the service: APScheduler ticks the dispatcher; new work wakes it at once.

The database is the queue; APScheduler holds no per-enquiry jobs and pickles nothing. The
interval job is only a safety net (retries, reminders falling due, a missed wake-up).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler

log = logging.getLogger("handler.scheduler")

DISPATCH_JOB = "dispatch"


class Ticker:
    """Runs `work` every `interval` seconds and whenever `wake()` is called."""

    def __init__(self, work: Callable[[], Awaitable[object]], *, interval: float,
                 on_wake: Callable[[], None] = lambda: None) -> None:
        self._work = work
        self._interval = interval
        self._on_wake = on_wake
        self._running = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.scheduler = AsyncIOScheduler(timezone=UTC)

    def start(self) -> None:
        self.scheduler.add_job(self._tick, "interval", seconds=self._interval, id=DISPATCH_JOB,
                               max_instances=1, coalesce=True, misfire_grace_time=None,
                               next_run_time=datetime.now(UTC))
        self.scheduler.start()

    def add_cron(
        self, func: Callable[[], Awaitable[object]], job_id: str, **trigger: object
    ) -> None:
        self.scheduler.add_job(func, "cron", id=job_id, max_instances=1, coalesce=True,
                               misfire_grace_time=3600, **trigger)

    def wake(self) -> None:
        self._on_wake()  # a pass in progress takes another turn
        if not self._running and self.scheduler.running:
            self.scheduler.modify_job(DISPATCH_JOB, next_run_time=datetime.now(UTC))

    async def _tick(self) -> None:
        self._running = True
        self._idle.clear()
        try:
            await self._work()
        except Exception:
            log.exception("dispatch pass failed; the next tick retries")
        finally:
            self._running = False
            self._idle.set()

    def shutdown(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    async def stop(self, grace: float = 10.0) -> None:
        """Start nothing new; give a pass in progress `grace` seconds to finish its sends
        (rows it has not finished keep their lease and are sent again after it runs out)."""
        if self.scheduler.running:
            self.scheduler.pause()  # (shutting down would cancel the pass in progress)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        self.shutdown()
