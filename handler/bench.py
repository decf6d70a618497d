"""`scripts/bench`: every benchmark side by side with its bare baseline, in one run.

Each figure is the median of several rounds with min–max, and each ratio is taken within
a round (the baseline and the service measured back to back). `plan_full` is what
`scripts/bench` runs; `plan_smoke` runs the same code paths with a handful of messages and
Python load generators (no postfix, no wrk) for the test suite. Nothing asserts timing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from handler import bench_rules
from handler.bench_delivery import DeliveryBench, run_delivery
from handler.bench_harness import (
    POSTGRES_ADMIN_URL,
    ROOT,
    BenchError,
    Figure,
    Load,
    Report,
    Row,
    have_postfix_tools,
    postgres_reachable,
    python_source,
    smtp_source,
)
from handler.bench_memory import MemoryBench, run_memory
from handler.bench_smtp import SmtpBench, run_intake, run_latency
from handler.bench_webhook import WebhookBench, run_webhook
from handler.rules import parse_ruleset

BENCHES = ("intake", "latency", "webhook", "delivery", "rules", "memory")
MARK_BEGIN = "<!-- bench:begin -->"
MARK_END = "<!-- bench:end -->"


@dataclass
class Plan:
    rounds: int = 3
    intake_loads: tuple[Load, ...] = (Load(5000, 2048), Load(500, 100 * 1024))
    databases: tuple[str, ...] = ("sqlite", "postgresql")
    latency_rate: float = 50
    latency_seconds: float = 60
    latency_rounds: int = 3
    latency_postgres_rounds: int = 1  # a minute each: keeps the whole run near 15 minutes
    webhook_seconds: float = 10
    webhook_bodies: int = 40_000
    delivery_emails: int = 10_000
    rules_seconds: float = 1.5
    memory_mb: float = 24.0
    memory_enquiries: int = 100_000
    memory_seed: int = 1000
    memory_after: int = 2000
    postfix: bool = True
    wrk: bool = True
    admin_url: str = field(
        default_factory=lambda: os.environ.get("BENCH_POSTGRES_URL", POSTGRES_ADMIN_URL))
    notes: list[str] = field(default_factory=list)


def plan_full() -> Plan:
    return Plan()


def plan_smoke() -> Plan:
    """A few messages through every benchmark's code path: for `scripts/test`."""
    return Plan(rounds=1, intake_loads=(Load(12, 2048, sessions=3),), databases=("sqlite",),
                latency_rate=10, latency_seconds=1, latency_rounds=1, webhook_seconds=1,
                webhook_bodies=12, delivery_emails=8, rules_seconds=0.05, memory_mb=0.5,
                memory_enquiries=40, memory_seed=20, memory_after=6, postfix=False, wrk=False)


def machine() -> list[str]:
    """What the figures were measured on."""
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo", encoding="utf-8") as f:
        ram_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    libs = ", ".join(f"{name} {_version(name)}" for name in (
        "aiosmtpd", "aiosmtplib", "SQLAlchemy", "psycopg", "starlette", "uvicorn", "httptools",
        "twilio", "Jinja2"))
    debs = ", ".join(f"{name} {_deb_version(name)}" for name in ("postfix", "wrk"))
    return [
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"cpu: {os.cpu_count()} × {cpu} (load generators share these cores)",
        f"ram: {ram_kb / 1024 / 1024:.1f} GiB",
        f"os: {platform.platform()}",
        f"python: {platform.python_version()}, SQLite {sqlite3.sqlite_version}",
        f"libraries: {libs}",
        f"tools: {debs}",
    ]


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def _deb_version(name: str) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "not installed"
    except (OSError, subprocess.SubprocessError):
        return "not installed"


async def bench_rules_rows(plan: Plan, report: Report) -> None:
    title = "Rules: classify one 2 KB email that only the last rule matches"
    print(f"== {title}", flush=True)
    for n in bench_rules.SIZES:
        ruleset = parse_ruleset([(f"generated-{n}.yaml", bench_rules.generate_rules_yaml(n))])
        rates, medians = [], []
        for _ in range(plan.rounds):
            rate, median_us, _count = await asyncio.to_thread(
                bench_rules.measure, ruleset, seconds=plan.rules_seconds)
            rates.append(rate)
            medians.append(median_us)
        report.add(Row(title, f"{n:,} rules", "msg/s", Figure(tuple(rates)),
                       note=f"median {sorted(medians)[len(medians) // 2]:,.0f} µs per decision"))


async def run(plan: Plan, which: list[str], work: Path) -> Report:
    report = Report()
    generator = smtp_source if plan.postfix else python_source
    databases = plan.databases
    if "postgresql" in databases and not postgres_reachable(plan.admin_url):
        databases = tuple(d for d in databases if d != "postgresql")
        report.notes.append(f"PostgreSQL not reachable at {plan.admin_url}: its rows skipped")
    jobs: dict[str, Callable[[], Awaitable[None]]] = {
        "intake": lambda: run_intake(SmtpBench(
            work=work, generator=generator, loads=plan.intake_loads, databases=databases,
            rounds=plan.rounds, admin_url=plan.admin_url, use_smtp_sink=plan.postfix), report),
        "latency": lambda: run_latency(
            work, report, admin_url=plan.admin_url, kinds=databases, rate=plan.latency_rate,
            seconds=plan.latency_seconds, rounds=plan.latency_rounds,
            postgres_rounds=plan.latency_postgres_rounds),
        "webhook": lambda: run_webhook(WebhookBench(
            work=work, rounds=plan.rounds, seconds=plan.webhook_seconds,
            bodies=plan.webhook_bodies, admin_url=plan.admin_url, databases=databases,
            use_smtp_sink=plan.postfix, use_wrk=plan.wrk), report),
        "delivery": lambda: run_delivery(DeliveryBench(
            work=work, emails=plan.delivery_emails, rounds=plan.rounds), report),
        "rules": lambda: bench_rules_rows(plan, report),
        "memory": lambda: run_memory(MemoryBench(
            work=work, generator=generator, message_mb=plan.memory_mb,
            enquiries=plan.memory_enquiries, seed=plan.memory_seed,
            after_messages=plan.memory_after, use_smtp_sink=plan.postfix), report),
    }
    for name in which:
        started = time.monotonic()
        try:
            await jobs[name]()
        except (BenchError, OSError) as exc:
            report.notes.append(f"{name}: FAILED: {exc}")
            print(f"!! {name} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        print(f"   ({name}: {time.monotonic() - started:.0f} s)", flush=True)
    return report


def render(report: Report, lines: list[str], seconds: float) -> str:
    out = ["Machine:", *[f"- {line}" for line in lines], "", report.table()]
    if report.notes:
        out += ["", *[f"- {note}" for note in report.notes]]
    out += ["", f"Whole run: {seconds / 60:.1f} minutes."]
    return "\n".join(out)


def write_benchmarks(text: str, path: Path) -> None:
    """Replace the figures between the markers in BENCHMARKS.md."""
    doc = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(MARK_BEGIN) + ".*?" + re.escape(MARK_END), re.DOTALL)
    if not pattern.search(doc):
        raise SystemExit(f"{path}: markers {MARK_BEGIN} / {MARK_END} not found")
    path.write_text(pattern.sub(lambda _m: f"{MARK_BEGIN}\n{text}\n{MARK_END}", doc),
                    encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument("which", nargs="*", metavar="BENCH",
                        help=f"any of {', '.join(BENCHES)} (default: all)")
    parser.add_argument("--rounds", type=int, help="rounds per figure (default 3)")
    parser.add_argument("--smoke", action="store_true", help="a few messages, Python loads")
    parser.add_argument("--write", action="store_true",
                        help="put the figures into BENCHMARKS.md (between its markers)")
    args = parser.parse_args(argv)
    plan = plan_smoke() if args.smoke else plan_full()
    if args.rounds:
        plan = replace(plan, rounds=args.rounds, latency_rounds=args.rounds)
    if plan.postfix and not have_postfix_tools():
        print("smtp-source / smtp-sink not found: install postfix (scripts/bench does)",
              file=sys.stderr)
        return 2
    unknown = set(args.which) - {*BENCHES, "all"}
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    which = list(BENCHES) if not args.which or "all" in args.which else args.which
    lines = machine()
    print("\n".join(lines), flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="handler-bench-") as tmp:
        report = asyncio.run(run(plan, which, Path(tmp)))
    text = render(report, lines, time.monotonic() - started)
    print("\n" + text)
    if args.write:
        write_benchmarks(text, ROOT / "BENCHMARKS.md")
    return 1 if any("FAILED" in n for n in report.notes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
