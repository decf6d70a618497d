"""Memory benchmark: the service's RSS while it takes a 25 MB message with attachments, and
with 100,000 enquiries already stored (the service must not grow with the database).

Peak RSS comes from /proc (VmHWM, reset before the message with clear_refs), so the figure
is what the kernel saw, not an estimate. "RSS per message byte" is the peak's growth over
the resting RSS divided by the size of the message on the wire.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib

from handler import db
from handler.bench_data import multiply, populate
from handler.bench_harness import (
    CLINIC,
    ROOT,
    BenchError,
    Child,
    Figure,
    Load,
    LoadGenerator,
    Report,
    Row,
    child,
    count_rows,
    python_module,
    remove_sqlite,
    verdict,
)
from handler.bench_smtp import handler_service, relay_sink
from handler.config import Settings

COPIES_OVER_BARE = 2.0
""""A few copies": peak growth at most this many message sizes over what bare aiosmtpd
itself needs to receive the same message (it reads DATA line by line, then joins)."""


@dataclass
class MemoryBench:
    work: Path
    generator: LoadGenerator
    message_mb: float = 24.0
    enquiries: int = 100_000
    seed: int = 1000
    after_messages: int = 2000
    use_smtp_sink: bool = True


def big_message(total_bytes: int) -> bytes:
    """A patient's mail with three scanned reports attached, `total_bytes` on the wire."""
    msg = EmailMessage()
    msg["From"] = "Jane Patient <jane.patient@example.org>"
    msg["To"] = CLINIC
    msg["Subject"] = "Second opinion: my scans and reports"
    msg["Message-ID"] = f"<big.{os.getpid()}.{os.urandom(4).hex()}@example.org>"
    msg.set_content("Dear team,\n\nplease find my MRI, CT and biopsy reports attached.\n\n"
                    "Kind regards,\nJane\n")
    raw_size = int(total_bytes * 0.74 / 3)  # base64 grows each file by 4/3 (plus line ends)
    for name in ("mri-report.pdf", "ct-report.pdf", "biopsy-histology.pdf"):
        msg.add_attachment(os.urandom(raw_size), maintype="application", subtype="pdf",
                           filename=name)
    return bytes(msg).replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")


async def _settle(proc: Child, seconds: float = 1.0) -> tuple[int, int]:
    await asyncio.sleep(seconds)
    return proc.memory_kb()


async def _send_big(port: int, data: bytes) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=300) as client:
        errors, _reply = await client.sendmail("jane.patient@example.org", [CLINIC], data)
    if errors:
        raise BenchError(f"25 MB message refused: {errors}")


async def bare_growth(bench: MemoryBench, data: bytes) -> float:
    """Peak RSS growth of bare aiosmtpd (handle_DATA answers 250) taking the same message."""
    async with child(python_module("handler.bench_servers", "bare-smtp"),
                     log_path=bench.work / "bare-smtp.log") as proc:
        await bench.generator("127.0.0.1", proc.ports["SMTP"], Load(5, 2048, sessions=1))
        rest, _ = await _settle(proc)
        proc.reset_peak()
        await _send_big(proc.ports["SMTP"], data)
        _, peak = await _settle(proc)
    return (peak - rest) * 1024 / len(data)


async def measure_big_message(bench: MemoryBench, report: Report) -> None:
    data = big_message(int(bench.message_mb * 1024 * 1024))
    bare = await bare_growth(bench, data)
    url = f"sqlite:///{bench.work / 'memory-big.db'}"
    async with relay_sink(bench.work, use_smtp_sink=bench.use_smtp_sink) as relay_port, \
            handler_service(bench.work, url, relay_port, name="service-memory") as proc:
        # one small message first, so lazily built parts (templates, pools) are in the rest
        await bench.generator("127.0.0.1", proc.ports["SMTP"], Load(5, 2048, sessions=1))
        rest, _ = await _settle(proc)
        proc.reset_peak()
        await _send_big(proc.ports["SMTP"], data)
        _, peak = await _settle(proc, 3.0)  # the acknowledgement and notification go out too
    stored = await asyncio.to_thread(
        count_rows, url, "SELECT count(*) FROM blob")
    if stored != 3:
        raise BenchError(f"expected the 3 attachments stored, found {stored}")
    growth = (peak - rest) * 1024
    per_byte = growth / len(data)
    title = f"Memory, one {len(data) / 1e6:.1f} MB message with 3 attachments"
    print(f"== {title}: resting {rest / 1024:.0f} MB, peak {peak / 1024:.0f} MB", flush=True)
    report.add(Row(title, "service + workers: peak RSS", "MB", Figure((peak / 1024,)),
                   note=f"resting {rest / 1024:.0f} MB"))
    report.add(Row(title, "bare aiosmtpd: peak RSS growth per byte of message", "bytes/byte",
                   Figure((bare,)), digits=1, note="reads DATA line by line, then joins"))
    report.add(Row(title, "handler serve: peak RSS growth per byte of message", "bytes/byte",
                   Figure((per_byte,)), digits=1, ratio=Figure((per_byte / bare,)),
                   target=f"≤ bare + {COPIES_OVER_BARE:.0f} copies",
                   verdict=verdict(per_byte <= bare + COPIES_OVER_BARE),
                   note="receive, parse, store, notify"))
    remove_sqlite(bench.work / "memory-big.db")


async def _rss_after(bench: MemoryBench, url: str, name: str) -> tuple[float, float, float]:
    """(RSS after start, RSS after `after_messages` more, peak) in MB."""
    async with relay_sink(bench.work, use_smtp_sink=bench.use_smtp_sink) as relay_port, \
            handler_service(bench.work, url, relay_port, name=name) as proc:
        start, _ = await _settle(proc)
        await bench.generator("127.0.0.1", proc.ports["SMTP"], Load(bench.after_messages, 2048))
        after, peak = await _settle(proc, 2.0)
    return start / 1024, after / 1024, peak / 1024


async def measure_stored(bench: MemoryBench, report: Report) -> None:
    root = ROOT
    path = bench.work / "memory-many.db"
    url = f"sqlite:///{path}"
    settings = Settings(database_url=url, rules_dir=root / "rules",
                        templates_dir=root / "templates", var_dir=bench.work / "var-populate")
    await asyncio.to_thread(populate, settings, bench.seed, tag="memory")
    engine = db.make_engine(settings.sqlalchemy_url)
    try:
        total = await asyncio.to_thread(multiply, engine, bench.enquiries // bench.seed - 1)
    finally:
        engine.dispose()
    if total != bench.enquiries:
        raise BenchError(f"expected {bench.enquiries} stored enquiries, found {total}")
    empty = bench.work / "memory-empty.db"
    e_start, e_after, e_peak = await _rss_after(bench, f"sqlite:///{empty}", "service-empty")
    m_start, m_after, m_peak = await _rss_after(bench, url, "service-many")
    title = (f"Memory, RSS after start and after {bench.after_messages:,} more messages")
    print(f"== {title}: empty {e_start:.0f} → {e_after:.0f} MB (peak {e_peak:.0f}); "
          f"{total:,} enquiries {m_start:.0f} → {m_after:.0f} MB (peak {m_peak:.0f})",
          flush=True)
    report.add(Row(title, "empty database: RSS (service + workers) after start / after / peak",
                   "MB",
                   Figure((e_after,)), note=f"{e_start:.0f} / {e_after:.0f} / {e_peak:.0f}"))
    report.add(Row(title, f"{total:,} stored enquiries: RSS (service + workers) after start / "
                   "after / peak", "MB",
                   Figure((m_after,)), ratio=Figure((m_after / e_after,)),
                   note=f"{m_start:.0f} / {m_after:.0f} / {m_peak:.0f}",
                   target="≈ 1× the empty database",
                   verdict=verdict(m_after <= e_after * 1.25)))
    remove_sqlite(path)
    remove_sqlite(empty)


async def run_memory(bench: MemoryBench, report: Report) -> None:
    await measure_big_message(bench, report)
    if bench.enquiries:
        await measure_stored(bench, report)
