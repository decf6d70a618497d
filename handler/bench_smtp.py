"""SMTP benchmarks: intake throughput against bare aiosmtpd, and acknowledgement latency.

Intake: the same load (N messages of S bytes over 20 sessions, one connection per message)
goes to a bare aiosmtpd server and to `handler serve` on SQLite and on PostgreSQL, round by
round; every 250 must correspond to a stored message. Latency: a steady rate of enquiries
from distinct senders; the time from our 250 to the acknowledgement reaching the relay sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

from handler.bench_harness import (
    SMTP_SINK,
    BenchError,
    Child,
    Figure,
    Load,
    LoadGenerator,
    Report,
    Row,
    child,
    count_rows,
    free_port,
    fresh_database,
    python_module,
    ratios,
    service_env,
    verdict,
)

INTAKE_TARGET = 0.5
LATENCY_TARGET_P99 = 1.0


@dataclass
class SmtpBench:
    work: Path
    generator: LoadGenerator
    loads: Sequence[Load] = (Load(5000, 2048), Load(500, 100 * 1024))
    databases: Sequence[str] = ("sqlite", "postgresql")
    rounds: int = 3
    admin_url: str = ""
    use_smtp_sink: bool = True
    """Relay outbound mail to Postfix's smtp-sink (C); else to a Python aiosmtpd sink."""
    service_extra_env: dict[str, str] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def relay_sink(work: Path, *, use_smtp_sink: bool) -> AsyncIterator[int]:
    """Somewhere for the service's acknowledgements and notifications to go."""
    if use_smtp_sink:
        port = free_port()
        argv = [SMTP_SINK, *(["-u", "nobody"] if os.geteuid() == 0 else []),
                f"127.0.0.1:{port}", "1024"]
        sink = Child(argv, log_path=work / "smtp-sink.log")
        await sink.start(want=())
        try:
            await _wait_connectable(port)
            yield port
        finally:
            await sink.stop()
        return
    async with child(python_module("handler.bench_servers", "sink"),
                     log_path=work / "sink.log") as sink:
        yield sink.ports["SMTP"]


async def _wait_connectable(port: int, wait_s: float = 10.0) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            _r, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"nothing listens on port {port}") from None
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def handler_service(work: Path, database_url: str, relay_port: int, *,
                          extra_env: dict[str, str] | None = None,
                          name: str = "service") -> AsyncIterator[Child]:
    var = work / f"var-{name}"
    env = service_env(database_url=database_url, var_dir=var, relay_port=relay_port,
                      extra=extra_env)
    async with child(python_module("handler", "serve"), env=env, log_path=work / f"{name}.log",
                     want=("SMTP", "HTTP")) as proc:
        yield proc


def stored_inbound(database_url: str) -> int:
    return count_rows(database_url, "SELECT count(*) FROM message WHERE direction = 'in'")


async def measure_bare(bench: SmtpBench, load: Load) -> tuple[float, float]:
    """(messages per second, CPU microseconds per message) of bare aiosmtpd."""
    async with child(python_module("handler.bench_servers", "bare-smtp"),
                     log_path=bench.work / "bare-smtp.log") as proc:
        cpu0 = proc.cpu_seconds()
        sent = await bench.generator("127.0.0.1", proc.ports["SMTP"], load)
        cpu = proc.cpu_seconds() - cpu0
    return sent.accepted / sent.elapsed, cpu * 1e6 / sent.accepted


QUEUED = "SELECT count(*) FROM outbox_item WHERE status IN ('pending', 'sending')"
"""Replies and notifications not sent yet: read as the load ends, it shows whether delivery
kept up with the burst (a burst must not slow the replies)."""


async def measure_service(
    bench: SmtpBench, load: Load, kind: str
) -> tuple[float, float, float, int]:
    """(messages per second, CPU microseconds per message of the service and of its worker
    processes: intake and delivery, outbox rows still unsent when the last message had its
    250) on a fresh database."""
    async with fresh_database(kind, bench.work, bench.admin_url) as database, \
            relay_sink(bench.work, use_smtp_sink=bench.use_smtp_sink) as relay_port:
        async with handler_service(bench.work, database.url, relay_port,
                                   extra_env=bench.service_extra_env,
                                   name=f"service-{kind}") as proc:
            cpu0, worker0 = proc.cpu_seconds(), proc.worker_cpu_seconds()
            sent = await bench.generator("127.0.0.1", proc.ports["SMTP"], load)
            cpu, worker = proc.cpu_seconds() - cpu0, proc.worker_cpu_seconds() - worker0
            queued = await asyncio.to_thread(count_rows, database.url, QUEUED)
        stored = await asyncio.to_thread(stored_inbound, database.url)
    if stored != sent.accepted:
        raise BenchError(f"{kind}: {sent.accepted} messages got a 250 but {stored} are stored")
    per = 1e6 / sent.accepted
    return sent.accepted / sent.elapsed, cpu * per, max(worker, 0.0) * per, queued


def _size(load: Load) -> str:
    return f"{load.size // 1024} KB" if load.size >= 1024 else f"{load.size} B"


async def run_intake(bench: SmtpBench, report: Report) -> None:
    for load in bench.loads:
        title = f"SMTP intake, {load.count:,} × {_size(load)}, {load.sessions} sessions"
        print(f"== {title}", flush=True)
        bare: list[float] = []
        bare_cpu: list[float] = []
        ours: dict[str, list[float]] = {k: [] for k in bench.databases}
        cpu: dict[str, list[float]] = {k: [] for k in bench.databases}
        worker_cpu: dict[str, list[float]] = {k: [] for k in bench.databases}
        queued: dict[str, list[int]] = {k: [] for k in bench.databases}
        for n in range(bench.rounds):
            rate, us = await measure_bare(bench, load)
            bare.append(rate)
            bare_cpu.append(us)
            line = f"  round {n + 1}: bare {bare[-1]:,.0f}"
            for kind in bench.databases:
                rate, us, worker_us, unsent = await measure_service(bench, load, kind)
                ours[kind].append(rate)
                cpu[kind].append(us)
                worker_cpu[kind].append(worker_us)
                queued[kind].append(unsent)
                line += (f", {kind} {rate:,.0f} ({us:,.0f} + workers {worker_us:,.0f} µs "
                         f"CPU/msg, {unsent:,} unsent at the end)")
            print(line + " msg/s", flush=True)
        report.add(Row(title, "bare aiosmtpd (handle_DATA answers 250)", "msg/s",
                       Figure(tuple(bare)), ratio=ratios(bare, bare),
                       note=f"CPU per message: {statistics.median(bare_cpu):,.0f} µs"))
        for kind in bench.databases:
            r = ratios(ours[kind], bare)
            report.add(Row(title, f"handler serve, {_db_name(kind)}", "msg/s",
                           Figure(tuple(ours[kind])), ratio=r, target="≥ 0.50×",
                           verdict=verdict(r.median >= INTAKE_TARGET),
                           note=f"CPU per message: service "
                                f"{statistics.median(cpu[kind]):,.0f} µs, intake + delivery "
                                f"workers {statistics.median(worker_cpu[kind]):,.0f} µs; "
                                f"replies and notifications not yet sent when the last "
                                f"message was accepted: {max(queued[kind]):,} at most"))


def _db_name(kind: str) -> str:
    return {"sqlite": "SQLite", "postgresql": "PostgreSQL"}.get(kind, kind)


# --- acknowledgement latency ------------------------------------------------------------------

class _AckSink:
    """The relay, in this process: when did the acknowledgement for each enquiry arrive."""

    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        self.other = 0
        self._arrived = asyncio.Event()

    async def all_in(self, count: int) -> None:
        while len(self.arrivals) < count:
            self._arrived.clear()
            await self._arrived.wait()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        now = time.time()
        data = envelope.original_content or b""
        head = data.split(b"\r\n\r\n", 1)[0].decode("ascii", "replace")
        fields = {}
        for line in head.split("\r\n"):
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if fields.get("auto-submitted") == "auto-replied" and "in-reply-to" in fields:
            self.arrivals[fields["in-reply-to"].strip("<>")] = now
            self._arrived.set()
        else:
            self.other += 1
        return "250 2.0.0 Ok"


@dataclass
class LatencyResult:
    sent: int
    p50: float
    p99: float
    worst: float


async def measure_latency(work: Path, database_url: str, *, rate: float, seconds: float,
                          sessions: int = 4, size: int = 2048,
                          extra_env: dict[str, str] | None = None) -> LatencyResult:
    from handler.bench_harness import python_source

    loop = asyncio.get_running_loop()
    sink = _AckSink()
    server = await loop.create_server(lambda: SMTP(sink, hostname="relay", loop=loop),
                                      "127.0.0.1", 0)
    relay_port = int(server.sockets[0].getsockname()[1])
    count = max(int(rate * seconds), 1)
    try:
        async with handler_service(work, database_url, relay_port, extra_env=extra_env,
                                   name="service-latency") as proc:
            sent = await python_source("127.0.0.1", proc.ports["SMTP"],
                                       Load(count, size, sessions=sessions),
                                       distinct_senders=True, rate=rate)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sink.all_in(sent.accepted), 30)
    finally:
        server.close()
    missing = [m for m in sent.replies if m not in sink.arrivals]
    if missing:
        raise BenchError(f"{len(missing)} of {sent.accepted} acknowledgements never arrived")
    delays = sorted(sink.arrivals[m] - t for m, t in sent.replies.items())
    q = statistics.quantiles(delays, n=100, method="inclusive") if len(delays) > 1 \
        else [delays[0]] * 99
    return LatencyResult(len(delays), q[49], q[98], delays[-1])


async def run_latency(work: Path, report: Report, *, admin_url: str, kinds: Sequence[str],
                      rate: float = 50, seconds: float = 60, rounds: int = 3,
                      postgres_rounds: int = 1) -> None:
    title = f"Ack latency, {rate:.0f} msg/s for {seconds:.0f} s"
    print(f"== {title}", flush=True)
    for kind in kinds:
        p50s: list[float] = []
        p99s: list[float] = []
        for n in range(rounds if kind == "sqlite" else postgres_rounds):
            async with fresh_database(kind, work, admin_url) as database:
                result = await measure_latency(work, database.url, rate=rate, seconds=seconds)
                stored = await asyncio.to_thread(stored_inbound, database.url)
            if stored != result.sent:
                raise BenchError(f"{result.sent} messages got a 250 but {stored} are stored")
            p50s.append(result.p50 * 1000)
            p99s.append(result.p99 * 1000)
            print(f"  round {n + 1} {kind}: {result.sent} acks, p50 {p50s[-1]:.1f} ms, "
                  f"p99 {p99s[-1]:.1f} ms, worst {result.worst * 1000:.1f} ms", flush=True)
        report.add(Row(title, f"250 → ack at relay, p50, {_db_name(kind)}", "ms",
                       Figure(tuple(p50s)), digits=1))
        report.add(Row(title, f"250 → ack at relay, p99, {_db_name(kind)}", "ms",
                       Figure(tuple(p99s)), digits=1, target="< 1,000 ms",
                       verdict=verdict(statistics.median(p99s) < LATENCY_TARGET_P99 * 1000)))
