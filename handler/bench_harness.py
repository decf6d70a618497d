"""Benchmark machinery shared by `scripts/bench` and its smoke test: figures, child processes,
databases and SMTP load generators. Nothing here asserts timing; every benchmark checks its
own correctness (what got a 250 is stored) and raises `BenchError` when it does not hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib

ROOT = Path(__file__).resolve().parent.parent
CLINIC = "enquiries@clinic.example"
SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


class BenchError(Exception):
    """A benchmark's own check failed (lost message, non-250 reply, server died)."""


@dataclass(frozen=True)
class Figure:
    """Several measurements of one quantity; shown as median (min–max)."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def show(self, digits: int = 0) -> str:
        def fmt(v: float) -> str:
            return f"{v:,.{digits}f}"
        if len(self.values) == 1:
            return fmt(self.median)
        return f"{fmt(self.median)} ({fmt(self.low)}–{fmt(self.high)})"


def ratios(values: Sequence[float], baselines: Sequence[float]) -> Figure:
    """Ratio per round (measured side by side), so drift between rounds cancels out."""
    return Figure(tuple(v / b for v, b in zip(values, baselines, strict=True) if b))


@dataclass
class Row:
    benchmark: str
    subject: str
    unit: str
    figure: Figure
    digits: int = 0
    ratio: Figure | None = None
    target: str = ""
    verdict: str = ""
    note: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(f"  {row.benchmark} | {row.subject}: {row.figure.show(row.digits)} {row.unit}"
              + (f", {row.ratio.show(2)}x" if row.ratio else "")
              + (f" [{row.verdict}]" if row.verdict else ""), flush=True)
        return row

    def table(self) -> str:
        head = ("| benchmark | measured | median (min–max) | unit | × baseline | target | "
                "met | notes |\n|---|---|---:|---|---:|---|---|---|")
        lines = [head]
        for r in self.rows:
            ratio = r.ratio.show(2) if r.ratio else ""
            lines.append(f"| {r.benchmark} | {r.subject} | {r.figure.show(r.digits)} | "
                         f"{r.unit} | {ratio} | {r.target} | {r.verdict} | {r.note} |")
        return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "yes" if ok else "NO"


def free_port() -> int:
    """A port for programs that cannot take port 0 (smtp-sink); closed before they bind it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- child processes ----------------------------------------------------------------------

_LISTENING = re.compile(r"(SMTP|HTTP)\s+listening on (?:http://)?([\d.]+):(\d+)")


class Child:
    """A benchmark participant in its own process (so it gets its own core and GIL).

    Ports are read from stdout lines "SMTP listening on host:port" / "HTTP listening on
    http://host:port"; other output goes to a log file that is shown when something fails.
    """

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
                 log_path: Path, cwd: Path = ROOT) -> None:
        self.argv = list(argv)
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.cwd = cwd
        self.proc: asyncio.subprocess.Process | None = None
        self.ports: dict[str, int] = {}
        self.lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None
        self._line_waiters: list[tuple[re.Pattern[str], asyncio.Future[re.Match[str]]]] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, *, want: Sequence[str] = ("SMTP",), wait_s: float = 60.0) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, cwd=self.cwd, env=self.env, stdout=asyncio.subprocess.PIPE,
                stderr=log)
        finally:
            log.close()
        self._reader = asyncio.create_task(self._read())
        deadline = time.monotonic() + wait_s
        while not all(w in self.ports for w in want):
            if self.proc.returncode is not None or self._reader.done():
                raise BenchError(f"{self.argv[0]} exited before listening:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.argv[0]} did not start in {wait_s:.0f} s\n"
                                 + self.tail())
            await asyncio.sleep(0.02)

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            if m := _LISTENING.search(line):
                self.ports.setdefault(m.group(1), int(m.group(3)))
            for pattern, future in list(self._line_waiters):
                if (found := pattern.search(line)) and not future.done():
                    future.set_result(found)

    async def wait_line(self, pattern: str, wait_s: float) -> re.Match[str]:
        """The next stdout line matching `pattern` (or one already printed)."""
        compiled = re.compile(pattern)
        for line in self.lines:
            if m := compiled.search(line):
                return m
        future: asyncio.Future[re.Match[str]] = asyncio.get_running_loop().create_future()
        self._line_waiters.append((compiled, future))
        try:
            return await asyncio.wait_for(future, wait_s)
        except TimeoutError:
            raise BenchError(f"{self.argv[0]}: no line matching {pattern!r} in {wait_s:.0f} s"
                             f"\n{self.tail()}") from None

    def tail(self, lines: int = 30) -> str:
        text = "\n".join(self.lines[-lines:])
        with contextlib.suppress(OSError):
            text += "\n" + "\n".join(
                self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return text

    def memory_kb(self) -> tuple[int, int]:
        """(current RSS, peak RSS) in KiB, from /proc: the process and its children (the
        service's worker processes), each peak counted whole (an upper bound)."""
        rss = hwm = 0
        for pid in (self.pid, *self._children()):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        hwm += int(line.split()[1])
        return rss, hwm

    def reset_peak(self) -> None:
        """Start a new peak-RSS window (Linux >= 4.0: write 5 to clear_refs)."""
        for pid in (self.pid, *self._children()):
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/clear_refs").write_text("5")

    def _children(self) -> set[int]:
        children: set[int] = set()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{self.pid}/task").iterdir():
                children.update(int(p) for p in (task / "children").read_text().split())
        return children

    def cpu_seconds(self) -> float:
        return _cpu_seconds(self.pid)

    def worker_cpu_seconds(self) -> float:
        """CPU of the process's live children (the intake and delivery workers)."""
        return sum(_cpu_seconds(pid) for pid in self._children())


    async def stop(self, wait_s: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), wait_s)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)
        return self.proc.returncode or 0



def _cpu_seconds(pid: int | None) -> float:
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0

@contextlib.asynccontextmanager
async def child(argv: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None,
                want: Sequence[str] = ("SMTP",)) -> AsyncIterator[Child]:
    proc = Child(argv, env=env, log_path=log_path)
    try:
        await proc.start(want=want)
        yield proc
    finally:
        await proc.stop()


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def service_env(*, database_url: str, var_dir: Path, relay_port: int,
                extra: dict[str, str] | None = None) -> dict[str, str]:
    """`handler serve` on loopback ports chosen by the OS, relaying to 127.0.0.1:relay_port."""
    return {
        "HANDLER_DATABASE_URL": database_url,
        "HANDLER_VAR_DIR": str(var_dir),
        "HANDLER_SMTP_PORT": "0",
        "HANDLER_HTTP_PORT": "0",
        "HANDLER_RULES_DIR": str(ROOT / "rules"),
        "HANDLER_TEMPLATES_DIR": str(ROOT / "templates"),
        "HANDLER_RELAY_HOST": "127.0.0.1",
        "HANDLER_RELAY_PORT": str(relay_port),
        "HANDLER_MAILBOXES": CLINIC,
        "HANDLER_CLINIC_ADDRESS": CLINIC,
        "HANDLER_CONFIG": str(var_dir / "no-handler.toml"),
        **(extra or {}),
    }


# --- databases ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Database:
    kind: str  # "sqlite" | "postgresql"
    url: str


@contextlib.asynccontextmanager
async def fresh_database(kind: str, work: Path, admin_url: str) -> AsyncIterator[Database]:
    """An empty SQLite file, or a PostgreSQL database created for this run and dropped after."""
    if kind == "sqlite":
        path = work / f"bench-{uuid.uuid4().hex[:8]}.db"
        try:
            yield Database(kind, f"sqlite:///{path}")
        finally:
            remove_sqlite(path)
        return
    import psycopg

    name = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _db = admin_url.rpartition("/")
    try:
        yield Database(kind, f"{base}/{name}")
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def remove_sqlite(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def postgres_reachable(admin_url: str) -> bool:
    try:
        import psycopg

        with psycopg.connect(admin_url, connect_timeout=3):
            return True
    except Exception:
        return False


def count_rows(url: str, sql: str) -> int:
    """One scalar from the benchmark's database (read after the run, with its own engine)."""
    from sqlalchemy import create_engine, text

    from handler.config import Settings

    engine = create_engine(Settings(database_url=url).sqlalchemy_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(sql)).scalar() or 0)
    finally:
        engine.dispose()


# --- SMTP load generators -----------------------------------------------------------------

@dataclass(frozen=True)
class Load:
    count: int
    size: int
    sessions: int = 20
    sender: str = "bench@sender.example"
    subject: str = "Second opinion enquiry"


@dataclass
class Sent:
    elapsed: float
    accepted: int
    replies: dict[str, float] = field(default_factory=dict)
    """Message-ID -> time.time() of its 250 (Python generator only)."""


LoadGenerator = Callable[[str, int, Load], Awaitable[Sent]]


def have_postfix_tools() -> bool:
    return os.access(SMTP_SOURCE, os.X_OK) and os.access(SMTP_SINK, os.X_OK)


async def smtp_source(host: str, port: int, load: Load) -> Sent:
    """Postfix's `smtp-source`: one connection per message, aborts on any reply but 2xx."""
    argv = [SMTP_SOURCE, "-s", str(load.sessions), "-m", str(load.count), "-l", str(load.size),
            "-f", load.sender, "-t", CLINIC, "-S", load.subject, "-M", "bench.example",
            f"{host}:{port}"]
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise BenchError(f"smtp-source failed ({proc.returncode}): {out.decode()[-2000:]}")
    return Sent(elapsed, load.count)


def source_message(load: Load, number: int, message_id: str, *, sender: str = "") -> bytes:
    """A message shaped like smtp-source's: four headers and `size` bytes of 80-char lines."""
    head = (f"From: <{sender or load.sender}>\r\nTo: <{CLINIC}>\r\n"
            f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
            f"Message-Id: <{message_id}>\r\nSubject: {load.subject}\r\n\r\n")
    lines, left, i = [], load.size, 0
    while left > 0:
        i += 1
        line = (str(i % 10) + "X" * 79)[:max(left - 2, 0)] + "\r\n"
        lines.append(line)
        left -= len(line)
    return head.encode() + "".join(lines).encode()


async def python_source(host: str, port: int, load: Load, *, distinct_senders: bool = False,
                        rate: float = 0.0) -> Sent:
    """aiosmtplib in this process, one connection per message like smtp-source; records the
    time of every 250. `rate` > 0 paces the start of messages (messages per second)."""
    run = uuid.uuid4().hex[:8]
    replies: dict[str, float] = {}
    next_no = iter(range(load.count))
    start = time.perf_counter()

    async def session() -> None:
        for number in next_no:
            if rate:
                delay = start + number / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            message_id = f"{run}.{number}@bench.example"
            sender = f"patient{number}.{run}@sender.example" if distinct_senders else ""
            data = source_message(load, number, message_id, sender=sender)
            async with aiosmtplib.SMTP(hostname=host, port=port, timeout=120) as client:
                errors, _ = await client.sendmail(sender or load.sender, [CLINIC], data)
            if errors:
                raise BenchError(f"message {number} refused: {errors}")
            replies[message_id] = time.time()

    await asyncio.gather(*(session() for _ in range(load.sessions)))
    return Sent(time.perf_counter() - start, len(replies), replies)
