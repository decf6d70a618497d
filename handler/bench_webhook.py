"""Webhook benchmark: `wrk` posting Twilio-signed inbound SMS forms to `POST /sms/twilio`.

Compared side by side with (a) a bare endpoint on the same HTTP stack returning the same
empty TwiML and (b) that endpoint doing only form parsing and `RequestValidator`. Every
request carries its own MessageSid (a duplicate would not be stored again): the bodies are
signed in advance and each wrk thread walks its own share of them, so the check "every 200
was stored" holds request by request.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import resource
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlencode

from handler.bench_floor import Floor, measure_floor
from handler.bench_harness import (
    BenchError,
    Figure,
    Report,
    Row,
    child,
    count_rows,
    fresh_database,
    python_module,
    ratios,
    verdict,
)
from handler.bench_smtp import handler_service, relay_sink

AUTH_TOKEN = "bench-auth-token-0123456789abcdef"
PUBLIC_URL = "https://bench.clinic.example"
PATH = "/sms/twilio"
WEBHOOK_TARGET = 0.5
P99_TARGET_MS = 100.0
WRK = "/usr/bin/wrk"

LUA = r"""
-- Rotate over pre-signed bodies; thread k of n takes bodies k, k+n, k+2n, ...
local threads = {}
local counter = 0
function setup(thread)
  thread:set("id", counter)
  table.insert(threads, thread)
  counter = counter + 1
end
function init(args)
  nthreads = tonumber(args[1])
  items = {}
  for line in io.lines(args[2]) do
    local tab = string.find(line, "\t", 1, true)
    table.insert(items, {string.sub(line, 1, tab - 1), string.sub(line, tab + 1)})
  end
  index = id
  sent, bad, wrapped = 0, 0, 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
end
function request()
  if index >= #items then wrapped = wrapped + 1 end
  local item = items[index % #items + 1]
  index = index + nthreads
  sent = sent + 1
  wrk.headers["X-Twilio-Signature"] = item[1]
  return wrk.format(nil, nil, nil, item[2])
end
function response(status, headers, body)
  if status ~= 200 then bad = bad + 1 end
end
function done(summary, latency, requests)
  local s, b, w = 0, 0, 0
  for _, t in ipairs(threads) do
    s = s + t:get("sent"); b = b + t:get("bad"); w = w + t:get("wrapped")
  end
  io.write(string.format("lua: sent %d non-200 %d wrapped %d\n", s, b, w))
end
"""


@dataclass
class WebhookBench:
    work: Path
    rounds: int = 3
    seconds: float = 10.0
    connections: int = 32
    threads: int = 2
    bodies: int = 40_000
    admin_url: str = ""
    databases: tuple[str, ...] = ("sqlite",)
    use_smtp_sink: bool = True
    use_wrk: bool = True
    """wrk (Debian package); else a small httpx load generator (the smoke test)."""
    floor_requests: int = 2_100
    """Requests for the floor row (`handler/bench_floor.py`), warm-up included."""


@dataclass(frozen=True)
class WrkResult:
    rate: float
    p99_ms: float
    completed: int
    non_200: int
    sent: int
    wrapped: int
    cpu_us: tuple[float, float] = (0.0, 0.0)
    """CPU µs per request of the server (the service, or a baseline) and of the service's
    worker processes."""
    load_us: float = 0.0
    """CPU µs per request of wrk itself (0 for the Python generator, which runs in this
    process)."""


def signed_bodies(count: int, *, seed: int = 11) -> list[tuple[str, str]]:
    """(X-Twilio-Signature, form body) pairs, each with its own MessageSid and sender."""
    from twilio.request_validator import RequestValidator

    validator = RequestValidator(AUTH_TOKEN)
    rng = random.Random(seed)
    texts = ("Hello, I would like a second opinion on my mother's breast cancer treatment.",
             "Hi, my dad has been told he has prostate cancer. Can you see him privately?",
             "Could someone call me back about a second opinion for lung cancer please",
             "I had a biopsy last week for a mole on my back, can you review the results?")
    out = []
    for n in range(count):
        params = {
            "ToCountry": "GB", "ToState": "", "SmsMessageSid": f"SM{rng.getrandbits(128):032x}",
            "NumMedia": "0", "ToCity": "", "FromZip": "", "FromState": "", "SmsStatus":
            "received", "FromCity": "", "Body": texts[n % len(texts)], "FromCountry": "GB",
            "To": "+442079460000", "ToZip": "", "NumSegments": "1",
            "AccountSid": "AC" + "0" * 32, "From": f"+4474{n:08d}", "ApiVersion": "2010-04-01",
        }
        params["MessageSid"] = params["SmsSid"] = params["SmsMessageSid"]
        out.append((validator.compute_signature(PUBLIC_URL + PATH, params), urlencode(params)))
    return out


async def run_wrk(port: int, bench: WebhookBench, bodies: Path) -> WrkResult:
    script = bench.work / "twilio.lua"
    await asyncio.to_thread(script.write_text, LUA, "utf-8")
    proc = await asyncio.create_subprocess_exec(
        WRK, f"-t{bench.threads}", f"-c{bench.connections}", f"-d{bench.seconds:.0f}s",
        "--latency", "-s", str(script), f"http://127.0.0.1:{port}{PATH}", "--",
        str(bench.threads), str(bodies),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    raw, _ = await proc.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk's own, now that it was reaped
    load_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    out = raw.decode(errors="replace")
    if proc.returncode != 0:
        raise BenchError(f"wrk failed: {out[-2000:]}")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"\s99%\s+([\d.]+)(us|ms|s)\b", out)
    done = re.search(r"(\d+) requests in", out)
    lua = re.search(r"lua: sent (\d+) non-200 (\d+) wrapped (\d+)", out)
    if not (rate and p99 and done and lua):
        raise BenchError(f"could not read wrk's output:\n{out}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99[2]]
    completed = int(done[1])
    return WrkResult(float(rate[1]), float(p99[1]) * scale, completed,
                     int(lua[2]), int(lua[1]), int(lua[3]),
                     load_us=load_cpu * 1e6 / max(completed, 1))


async def run_python(port: int, bench: WebhookBench, bodies: Path) -> WrkResult:
    """The same requests as the wrk script, sent with httpx (no wrk needed), one each."""
    import httpx

    text = await asyncio.to_thread(bodies.read_text, "utf-8")
    items = [line.split("\t", 1) for line in text.splitlines()]
    latencies: list[float] = []
    non_200 = 0
    next_item = iter(items)
    start = time.perf_counter()

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal non_200
        for signature, body in next_item:
            t0 = time.perf_counter()
            response = await client.post(
                PATH, content=body, headers={
                    "X-Twilio-Signature": signature,
                    "Content-Type": "application/x-www-form-urlencoded"})
            latencies.append(time.perf_counter() - t0)
            non_200 += response.status_code != 200

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        await asyncio.gather(*(worker(client) for _ in range(bench.connections)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    return WrkResult(len(latencies) / elapsed, p99, len(latencies), non_200, len(latencies), 0)


async def _load(port: int, bench: WebhookBench, bodies: Path) -> WrkResult:
    if bench.use_wrk:
        return await run_wrk(port, bench, bodies)
    return await run_python(port, bench, bodies)


async def _baseline(bench: WebhookBench, mode: str, bodies: Path) -> WrkResult:
    async with child(python_module("handler.bench_servers", mode, "--auth-token", AUTH_TOKEN,
                                   "--public-url", PUBLIC_URL),
                     log_path=bench.work / f"{mode}.log", want=("HTTP",)) as proc:
        cpu0 = proc.cpu_seconds()
        result = await _load(proc.ports["HTTP"], bench, bodies)
        result = replace(result, cpu_us=(
            (proc.cpu_seconds() - cpu0) * 1e6 / max(result.completed, 1), 0.0))
    if result.non_200:
        raise BenchError(f"{mode}: {result.non_200} requests were not answered 200")
    return result


def _service_env() -> dict[str, str]:
    # Quiet hours off: the acknowledgements are sent (to the local SMS folder, as in the
    # daytime) whatever the hour of the run, so the figure does not depend on the clock.
    return {"HANDLER_TWILIO_AUTH_TOKEN": AUTH_TOKEN, "HANDLER_PUBLIC_URL": PUBLIC_URL,
            "HANDLER_QUIET_HOURS": "off"}


def _baseline_note(results: list[WrkResult]) -> str:
    note = (f"p99 {statistics.median(r.p99_ms for r in results):.1f} ms; CPU per request: "
            f"server {statistics.median(r.cpu_us[0] for r in results):,.0f} µs")
    load = statistics.median(r.load_us for r in results)
    return note + (f", wrk {load:,.0f} µs" if load else "")


def _floor_row(title: str, signed: list[WrkResult], floors: list[Floor]) -> Row:
    """Whether the target is within reach at all on this machine: the CPU a request needs
    with no hand-overs or contention (each stage alone, `bench_floor`, plus (b)'s server),
    against the CPU per request the machine has at the target rate once wrk has taken its
    share."""
    cores = len(os.sched_getaffinity(0))
    rate = WEBHOOK_TARGET * statistics.median(r.rate for r in signed)
    load_us = statistics.median(r.load_us for r in signed)
    budget = (cores * 1e6 - load_us * rate) / rate
    totals = [s.cpu_us[0] + f.total for s, f in zip(signed, floors, strict=True)]
    f = sorted(floors, key=lambda x: x.total)[len(floors) // 2]  # the round shown in full
    return Row(
        title, "our work per request, each stage alone in one process (SQLite)",
        "µs CPU/request",
        Figure(tuple(totals)), target=f"≤ {budget:,.0f} µs to fit",
        verdict=verdict(statistics.median(totals) <= budget),
        note=f"(b)'s server {statistics.median(s.cpu_us[0] for s in signed):,.0f} + parse_sms "
             f"{f.parse:,.0f} + intake {f.intake:,.0f} + delivery {f.delivery:,.0f} µs "
             f"({f.texts:,} texts and {f.emails:,} emails sent for {f.requests:,} requests); "
             f"CPU per request the machine has at 0.50× (b) = {rate:,.0f} req/s: {cores} "
             f"cores less wrk's {load_us:,.0f} µs per request")


async def _service(bench: WebhookBench, kind: str, bodies: Path) -> WrkResult:
    extra = _service_env()
    async with fresh_database(kind, bench.work, bench.admin_url) as database, \
            relay_sink(bench.work, use_smtp_sink=bench.use_smtp_sink) as relay_port:
        async with handler_service(bench.work, database.url, relay_port, extra_env=extra,
                                   name=f"service-webhook-{kind}") as proc:
            cpu0, worker0 = proc.cpu_seconds(), proc.worker_cpu_seconds()
            result = await _load(proc.ports["HTTP"], bench, bodies)
            per = 1e6 / max(result.completed, 1)
            result = replace(result, cpu_us=(
                (proc.cpu_seconds() - cpu0) * per,
                max(proc.worker_cpu_seconds() - worker0, 0.0) * per))
            await asyncio.sleep(0.5)  # requests wrk abandoned at the deadline finish
        stored = await asyncio.to_thread(
            count_rows, database.url,
            "SELECT count(*) FROM message WHERE direction = 'in' AND channel = 'sms'")
    answered = result.completed - result.non_200
    if result.wrapped:
        raise BenchError(f"{result.wrapped} requests reused a MessageSid: sign more bodies")
    if result.non_200 or stored < answered or stored > result.sent:
        raise BenchError(f"webhook {kind}: {answered} answered 200 ({result.non_200} not), "
                         f"{stored} stored, {result.sent} sent")
    return result


async def run_webhook(bench: WebhookBench, report: Report) -> None:
    tool = "wrk" if bench.use_wrk else "httpx"
    title = (f"Webhook POST /sms/twilio, {tool} {bench.connections} connections"
             + (f", {bench.seconds:.0f} s" if bench.use_wrk else f", {bench.bodies} requests"))
    print(f"== {title}", flush=True)
    bodies = bench.work / "twilio-bodies.tsv"
    pairs = await asyncio.to_thread(signed_bodies, bench.bodies)
    await asyncio.to_thread(bodies.write_text, "".join(f"{sig}\t{body}\n" for sig, body in pairs),
                            "utf-8")
    bare: list[WrkResult] = []
    signed: list[WrkResult] = []
    ours: dict[str, list[WrkResult]] = {k: [] for k in bench.databases}
    floors: list[Floor] = []
    for n in range(bench.rounds):
        bare.append(await _baseline(bench, "bare-http", bodies))
        signed.append(await _baseline(bench, "signed-http", bodies))
        line = (f"  round {n + 1}: bare {bare[-1].rate:,.0f} (p99 {bare[-1].p99_ms:.1f} ms), "
                f"signature only {signed[-1].rate:,.0f} (p99 {signed[-1].p99_ms:.1f} ms)")
        for kind in bench.databases:
            ours[kind].append(await _service(bench, kind, bodies))
            line += f", {kind} {ours[kind][-1].rate:,.0f} (p99 {ours[kind][-1].p99_ms:.1f} ms)"
        async with relay_sink(bench.work, use_smtp_sink=bench.use_smtp_sink) as relay_port:
            floors.append(await measure_floor(
                bench.work, [body for _sig, body in pairs[:bench.floor_requests]],
                relay_port=relay_port, extra_env=_service_env()))
        print(line + f" req/s; our stages alone {floors[-1].total:,.0f} µs CPU per request",
              flush=True)
    bare_rates = [r.rate for r in bare]
    signed_rates = [r.rate for r in signed]
    report.add(Row(title, "(a) bare endpoint, empty TwiML", "req/s", Figure(tuple(bare_rates)),
                   ratio=ratios(bare_rates, bare_rates), note=_baseline_note(bare)))
    report.add(Row(title, "(b) form parsing + RequestValidator only", "req/s",
                   Figure(tuple(signed_rates)), ratio=ratios(signed_rates, bare_rates),
                   note=_baseline_note(signed)))
    for kind, results in ours.items():
        rates = [r.rate for r in results]
        p99s = [r.p99_ms for r in results]
        r = ratios(rates, signed_rates)
        name = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}.get(kind, kind)
        report.add(Row(title, f"handler serve, {name}: stored before 200", "req/s",
                       Figure(tuple(rates)), ratio=r, target="≥ 0.50× (b)",
                       verdict=verdict(r.median >= WEBHOOK_TARGET),
                       note=f"ratio to (b); CPU per request: service "
                            f"{statistics.median(x.cpu_us[0] for x in results):,.0f} µs, "
                            f"intake + delivery workers "
                            f"{statistics.median(x.cpu_us[1] for x in results):,.0f} µs"))
        report.add(Row(title, f"handler serve, {name}: p99 latency", "ms", Figure(tuple(p99s)),
                       digits=1, target=f"< {P99_TARGET_MS:.0f} ms",
                       verdict=verdict(statistics.median(p99s) < P99_TARGET_MS)))
    report.add(_floor_row(title, signed, floors))
    bodies.unlink()
