"""Delivery benchmark: N due outbox emails sent by `handler serve` to an aiosmtpd sink, against
a plain aiosmtplib loop sending the very same messages over the same number of connections.

The outbox is filled once through the real intake path (an acknowledgement and a team
notification per enquiry) and copied for each round; the first round keeps what the sink
received, and the baseline replays those bytes. Both rates are taken at the sink, from the
first message to the last.
"""

from __future__ import annotations

import asyncio
import resource
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

from handler.bench_data import populate
from handler.bench_harness import (
    BenchError,
    Figure,
    Report,
    Row,
    child,
    count_rows,
    python_module,
    ratios,
    verdict,
)
from handler.bench_smtp import handler_service
from handler.config import Settings

DELIVERY_TARGET = 0.6
RELAY_CONNECTIONS = 4  # RelayTransport's default pool
_RECEIVED = r"received (\d+) distinct (\d+) in ([\d.]+) s"


@dataclass
class DeliveryBench:
    work: Path
    emails: int = 10_000
    rounds: int = 3
    timeout: float = 300.0


def _settings(work: Path, url: str) -> Settings:
    root = Path(__file__).resolve().parent.parent
    return Settings(database_url=url, rules_dir=root / "rules", templates_dir=root / "templates",
                    var_dir=work / "var-populate")


async def _prepare(bench: DeliveryBench) -> Path:
    """A SQLite file holding `emails` due outbox emails (two per enquiry)."""
    seed = bench.work / "delivery-seed.db"
    if seed.exists():
        seed.unlink()
    due = await asyncio.to_thread(populate, _settings(bench.work, f"sqlite:///{seed}"),
                                  bench.emails // 2, tag="delivery")
    if due != bench.emails:
        raise BenchError(f"expected {bench.emails} due emails after populating, found {due}")
    return seed


async def _service_round(bench: DeliveryBench, seed: Path, n: int, keep: Path | None) -> float:
    database = bench.work / f"delivery-{n}.db"
    shutil.copyfile(seed, database)
    url = f"sqlite:///{database}"
    sink_args = ["sink", "--expect", str(bench.emails)] + (["--keep", str(keep)] if keep else [])
    sink_argv = python_module("handler.bench_servers", *sink_args)
    async with child(sink_argv, log_path=bench.work / "delivery-sink.log") as sink, \
            handler_service(bench.work, url, sink.ports["SMTP"], name="service-delivery"):
        found = await sink.wait_line(_RECEIVED, bench.timeout)
    sent = await asyncio.to_thread(
        count_rows, url, "SELECT count(*) FROM outbox_item WHERE status = 'sent'")
    received, distinct, seconds = int(found[1]), int(found[2]), float(found[3])
    if not (sent == received == distinct == bench.emails):
        raise BenchError(f"delivery: {sent} marked sent, {received} received "
                         f"({distinct} distinct), expected {bench.emails}")
    database.unlink()
    return received / seconds


async def _baseline_round(bench: DeliveryBench, messages: Path) -> tuple[float, float]:
    """(messages per second at the sink, the replaying process's CPU µs per message)."""
    async with child(python_module("handler.bench_servers", "sink", "--expect",
                                   str(bench.emails)),
                     log_path=bench.work / "delivery-sink.log") as sink:
        proc = await asyncio.create_subprocess_exec(
            *python_module("handler.bench_servers", "replay", "--messages", str(messages),
                           "--port", str(sink.ports["SMTP"]),
                           "--connections", str(RELAY_CONNECTIONS)),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out, _ = await proc.communicate()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the replay's, once reaped
        if proc.returncode != 0:
            raise BenchError(f"replay failed: {out.decode()[-2000:]}")
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        found = await sink.wait_line(_RECEIVED, bench.timeout)
    if int(found[2]) != bench.emails:
        raise BenchError(f"baseline: {found[2]} distinct messages received")
    return int(found[1]) / float(found[3]), cpu * 1e6 / bench.emails


async def run_delivery(bench: DeliveryBench, report: Report) -> None:
    title = f"Delivery, {bench.emails:,} due emails, {RELAY_CONNECTIONS} connections"
    print(f"== {title}", flush=True)
    seed = await _prepare(bench)
    kept = bench.work / "delivery-messages.pickle"
    ours: list[float] = []
    bare: list[float] = []
    bare_cpu: list[float] = []
    for n in range(bench.rounds):
        ours.append(await _service_round(bench, seed, n, kept if n == 0 else None))
        rate, cpu = await _baseline_round(bench, kept)
        bare.append(rate)
        bare_cpu.append(cpu)
        print(f"  round {n + 1}: aiosmtplib loop {bare[-1]:,.0f}, handler serve "
              f"{ours[-1]:,.0f} msg/s", flush=True)
    report.add(Row(title, "plain aiosmtplib loop, same messages", "msg/s", Figure(tuple(bare)),
                   ratio=ratios(bare, bare),
                   note=f"CPU per message of the sending process (the library's own cost of "
                        f"an email): {statistics.median(bare_cpu):,.0f} µs"))
    r = ratios(ours, bare)
    report.add(Row(title, "handler serve, SQLite (claim, render, compose, send, record)",
                   "msg/s", Figure(tuple(ours)), ratio=r, target="≥ 0.60×",
                   verdict=verdict(statistics.median(r.values) >= DELIVERY_TARGET)))
    seed.unlink()
    kept.unlink()
