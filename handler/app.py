"""The composition root: builds everything from Settings and runs it on one event loop.

SMTP listener (aiosmtpd protocol via loop.create_server), HTTP server (uvicorn + Starlette),
the intake writer and the dispatch ticker start together and stop together. Nothing here
runs at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
import watchfiles
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from handler import db
from handler.bounces import Bounces
from handler.clock import Clock, SystemClock
from handler.config import Settings
from handler.dispatch import Dispatcher, Renderer
from handler.http import make_http_app
from handler.intake_worker import RemoteIntake
from handler.live import LiveRules
from handler.loops import OwnMail
from handler.privacy import RetentionJob
from handler.scheduler import Ticker
from handler.service import Acceptor, Intake
from handler.sms_keywords import SmsKeywords
from handler.sms_webhook import SmsWebhook
from handler.sms_webhook import describe as describe_sms_webhook
from handler.sms_webhook import startup_warnings as sms_warnings
from handler.smtp_in import IntakeHandler, start_smtp_server
from handler.smtp_out import RelayTransport
from handler.transports import EmailTransport, FileSmsTransport, MaildirTransport, SmsTransport
from handler.worker import WorkerProcess

log = logging.getLogger("handler.app")


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the service owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Delivery:
    """What sends: the dispatcher, its ticker (and the nightly retention job), transports."""

    rules: LiveRules
    dispatcher: Dispatcher
    ticker: Ticker
    email: EmailTransport
    sms: SmsTransport
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)


@dataclass
class Service:
    settings: Settings
    engine: Engine
    rules: LiveRules
    intake: Intake
    remote_intake: RemoteIntake | None
    """The intake writer's own process (`intake_worker = true`); `intake` then takes only
    messages over LOCAL_BYTES."""
    delivery: Delivery | None
    """In this process (`delivery_worker = false`); otherwise None and `worker` is set."""
    worker: WorkerProcess | None
    smtp_server: asyncio.Server
    http_server: uvicorn.Server
    http_socket: socket.socket
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def reload_children(self) -> None:
        """Rules and templates were reloaded here: the worker processes reload theirs."""
        if self.worker is not None:
            self.worker.reload()
        if self.remote_intake is not None:
            self.remote_intake.reload()

    @property
    def dispatcher(self) -> Dispatcher:
        assert self.delivery is not None, "delivery runs in the worker process"
        return self.delivery.dispatcher

    @property
    def ticker(self) -> Ticker:
        assert self.delivery is not None, "delivery runs in the worker process"
        return self.delivery.ticker

    @property
    def email(self) -> EmailTransport:
        assert self.delivery is not None, "delivery runs in the worker process"
        return self.delivery.email

    @property
    def sms(self) -> SmsTransport:
        assert self.delivery is not None, "delivery runs in the worker process"
        return self.delivery.sms

    @property
    def smtp_port(self) -> int:
        return int(self.smtp_server.sockets[0].getsockname()[1])

    @property
    def http_port(self) -> int:
        return int(self.http_socket.getsockname()[1])

    def describe(self) -> list[str]:
        s = self.settings
        return [
            f"SMTP   listening on {s.smtp_host}:{self.smtp_port} for "
            f"{', '.join(s.mailboxes)}",
            f"HTTP   listening on http://{s.http_host}:{self.http_port} (GET /healthz)",
            f"store  {_redact_url(s.database_url)}",
            f"email  goes to {describe_email(s)}",
            f"sms    goes to {describe_sms(s)}",
            "send   " + (f"from the delivery worker (pid {self.worker.pid})" if self.worker
                         else "from this process (delivery_worker = false)"),
            "write  " + (f"in the intake worker (pid {self.remote_intake.pid})"
                         if self.remote_intake else "in this process (intake_worker = false)"),
            describe_sms_webhook(s),
            f"rules  {len(self.rules.ruleset.rules)} rules from {s.rules_dir} "
            f"(version {self.rules.status.version[:12]})",
        ]


def _redact_url(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}" if ":" in creds else url
    return url


def build_email_transport(settings: Settings) -> EmailTransport:
    if settings.relay_host:
        return RelayTransport(host=settings.relay_host, port=settings.relay_port,
                              username=settings.relay_username, password=settings.relay_password,
                              starttls=settings.relay_starttls, timeout=settings.relay_timeout)
    return MaildirTransport(settings.maildir_path)


def describe_email(settings: Settings) -> str:
    if settings.relay_host:
        return f"SMTP relay {settings.relay_host}:{settings.relay_port}" + (
            " (STARTTLS required)" if settings.relay_starttls else " (STARTTLS when offered)")
    return f"local Maildir {settings.maildir_path}"


def describe_sms(settings: Settings) -> str:
    if settings.twilio_account_sid and settings.twilio_auth_token:
        return "Twilio" + (f" at {settings.twilio_api_url}" if settings.twilio_api_url else "")
    return f"local folder {settings.sms_dir_path}"


def build_sms_transport(settings: Settings) -> SmsTransport:
    if settings.twilio_account_sid and settings.twilio_auth_token:
        from handler.sms_out import TwilioTransport

        return TwilioTransport(account_sid=settings.twilio_account_sid,
                               auth_token=settings.twilio_auth_token,
                               sender=settings.twilio_from, api_url=settings.twilio_api_url)
    return FileSmsTransport(settings.sms_dir_path)


def build_delivery(
    settings: Settings, *, sessions: sessionmaker[Session], rules: LiveRules, clock: Clock,
    email: EmailTransport, sms: SmsTransport, renderer: Renderer | None = None,
) -> Delivery:
    dispatcher = Dispatcher(sessions=sessions, templates=renderer or rules,
                            ruleset=rules.current, email=email, sms=sms, clock=clock,
                            settings=settings)
    ticker = Ticker(dispatcher.run_until_idle, interval=settings.dispatch_poll_seconds,
                    on_wake=dispatcher.wake)
    if settings.retention_days > 0:
        ticker.add_cron(RetentionJob(sessions=sessions, clock=clock, settings=settings),
                        "retention-purge", hour=3, minute=30, timezone=settings.timezone)
    return Delivery(rules=rules, dispatcher=dispatcher, ticker=ticker, email=email, sms=sms)


async def stop_delivery(delivery: Delivery) -> None:
    await delivery.ticker.stop()  # rows in flight that do not finish keep their lease
    await delivery.email.close()
    await delivery.sms.close()


@contextlib.asynccontextmanager
async def delivering(
    settings: Settings, *, clock: Clock,
    renderer: Callable[[LiveRules], Renderer] | None = None,
) -> AsyncIterator[Delivery]:
    """Delivery on its own (the worker process): its own engine, rules and transports."""
    engine = db.make_engine(settings.sqlalchemy_url)
    rules = LiveRules(rules_dir=settings.rules_dir, templates_dir=settings.templates_dir,
                      max_sms_segments=settings.sms_max_segments, now=clock.now())
    delivery = build_delivery(
        settings, sessions=db.make_sessionmaker(engine, write=True), rules=rules, clock=clock,
        email=build_email_transport(settings), sms=build_sms_transport(settings),
        renderer=renderer(rules) if renderer else None)
    delivery.ticker.start()
    watcher = asyncio.create_task(
        watch_and_reload(rules, [settings.rules_dir, settings.templates_dir], clock))
    try:
        yield delivery
    finally:
        watcher.cancel()
        await stop_delivery(delivery)
        engine.dispose()


def build_intake(
    settings: Settings, *, sessions: sessionmaker[Session], rules: LiveRules, clock: Clock,
    on_queued: Callable[[], None] = lambda: None,
) -> Intake:
    intake = Intake(sessions=sessions, ruleset=rules.current, clock=clock, settings=settings,
                    on_queued=on_queued)
    intake.interceptors.append(SmsKeywords(settings=settings))  # STOP / START / HELP
    intake.interceptors += [Bounces.from_settings(settings),  # DSNs never open enquiries
                            OwnMail(ruleset=rules.current,  # nor does mail from our side
                                    mailboxes=(*settings.mailboxes, settings.clinic_address))]
    return intake


@contextlib.asynccontextmanager
async def intake_alone(
    settings: Settings, *, clock: Clock
) -> AsyncIterator[tuple[Intake, LiveRules]]:
    """The intake writer on its own (the intake worker process)."""
    engine = db.make_engine(settings.sqlalchemy_url)
    rules = LiveRules(rules_dir=settings.rules_dir, templates_dir=settings.templates_dir,
                      max_sms_segments=settings.sms_max_segments, now=clock.now())
    intake = build_intake(settings, sessions=db.make_sessionmaker(engine, write=True),
                          rules=rules, clock=clock)
    await intake.start()
    watcher = asyncio.create_task(
        watch_and_reload(rules, [settings.rules_dir, settings.templates_dir], clock))
    try:
        yield intake, rules
    finally:
        watcher.cancel()
        await intake.stop()
        engine.dispose()


@contextlib.asynccontextmanager
async def running(
    settings: Settings, *, clock: Clock | None = None, email: EmailTransport | None = None,
    sms: SmsTransport | None = None, upgrade: bool = True,
) -> AsyncIterator[Service]:
    """Start the whole service; stop it gracefully when the block exits.

    With `delivery_worker` (the default) sending happens in a child process (handler.worker)
    woken through a pipe; otherwise here, on this event loop (what most tests use, with a
    fake clock and their own transports)."""
    clock = clock or SystemClock()
    if upgrade:
        await asyncio.to_thread(db.upgrade, settings)
    engine = db.make_engine(settings.sqlalchemy_url)
    sessions = db.make_sessionmaker(engine, write=True)
    rules = LiveRules(rules_dir=settings.rules_dir, templates_dir=settings.templates_dir,
                      max_sms_segments=settings.sms_max_segments, now=clock.now())
    delivery: Delivery | None = None
    worker: WorkerProcess | None = None
    if settings.delivery_worker:
        if email is not None or sms is not None:
            raise ValueError("transports are given to the delivery worker by settings only")
        worker = WorkerProcess(settings)
        await worker.start()
        on_queued: Callable[[], None] = worker.wake
    else:
        delivery = build_delivery(settings, sessions=sessions, rules=rules, clock=clock,
                                  email=email or build_email_transport(settings),
                                  sms=sms or build_sms_transport(settings))
        on_queued = delivery.ticker.wake
    intake = build_intake(settings, sessions=sessions, rules=rules, clock=clock,
                          on_queued=on_queued)
    await intake.start()
    acceptor: Acceptor = intake
    remote: RemoteIntake | None = None
    if settings.intake_worker:
        remote = RemoteIntake(settings, local=intake, on_queued=on_queued)
        await remote.start()
        acceptor = remote
    sms_webhook = SmsWebhook(settings=settings, intake=acceptor, sessions=sessions,
                             clock=clock)

    def health() -> dict[str, Any]:
        return {**(worker.health() if worker else {}),
                **({"intake": remote.health()} if remote else {})}

    http_app = make_http_app(rules=rules, db_ping=lambda: db.ping(engine),
                             extra_routes=sms_webhook.routes(), extra_health=health)
    config = uvicorn.Config(http_app, log_config=None, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=5)
    http_server = _QuietServer(config)
    # IPPROTO_TCP named, so asyncio sets TCP_NODELAY on accepted connections: without it
    # every HTTP response waits ~40 ms for the client's delayed ACK (Nagle).
    http_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    http_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    http_socket.bind((settings.http_host, settings.http_port))
    http_socket.listen(2048)  # connections wait in the backlog until uvicorn is up
    handler = IntakeHandler(intake=acceptor, mailboxes=settings.mailboxes,
                            max_recipients=settings.smtp_max_recipients)
    smtp_server = await start_smtp_server(settings, handler)
    service = Service(settings=settings, engine=engine, rules=rules, intake=intake,
                      remote_intake=remote, delivery=delivery, worker=worker,
                      smtp_server=smtp_server,
                      http_server=http_server, http_socket=http_socket)
    service.tasks.append(asyncio.create_task(http_server.serve(sockets=[http_socket])))
    if delivery is not None:
        delivery.ticker.start()
    watcher = asyncio.create_task(watch_and_reload(
        rules, [settings.rules_dir, settings.templates_dir], clock,
        on_reload=service.reload_children))
    await asyncio.sleep(0)  # let the watcher register before anyone edits a file
    try:
        yield service
    finally:
        smtp_server.close()          # 1. accept nothing new
        http_server.should_exit = True
        watcher.cancel()
        for task in service.tasks:   # 2. answer the HTTP requests already taken (Twilio
            with contextlib.suppress(Exception):  # does not retry a text that got a 500)
                await asyncio.wait_for(task, 10)
        if remote is not None:       # 3. commit what was already received
            await remote.stop()
        await intake.stop()
        if delivery is not None:     # 4. stop sending
            await stop_delivery(delivery)
        if worker is not None:
            await worker.stop()
        http_socket.close()
        engine.dispose()


async def watch_and_reload(
    rules: LiveRules, paths: list[Path], clock: Clock,
    on_reload: Callable[[], None] | None = None,
) -> None:
    """Reload rules and templates when a file under `paths` changes (well within 2 s);
    `on_reload` is told after each successful reload (the worker reloads too)."""
    try:
        async for _changes in watchfiles.awatch(*paths, debounce=200, step=50,
                                                 recursive=True):
            if await asyncio.to_thread(rules.reload, clock.now()) and on_reload:
                on_reload()
    except asyncio.CancelledError:
        raise
    except Exception:  # e.g. the folder vanished: SIGHUP still works
        log.exception("file watching stopped; send SIGHUP to reload rules and templates")


SWITCH_INTERVAL = 0.001
"""Seconds a thread may hold the GIL while another waits (Python's default: 0.005). The
intake writer releases the GIL at every SQL statement and must win it back from the event
loop each time; with the default it waited up to 5 ms per statement under load (a group of
8 messages took ~20 ms instead of ~6; 2 KB intake 370 -> 530 msg/s with 0.001)."""


async def serve(settings: Settings) -> None:
    """Run until SIGTERM / SIGINT; SIGHUP reloads rules and templates."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[bool]] = set()  # keeps SIGHUP reload tasks referenced
    async with running(settings) as service:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        def reload() -> None:
            reloads.add(asyncio.create_task(
                asyncio.to_thread(service.rules.reload, SystemClock().now())))
            service.reload_children()

        loop.add_signal_handler(signal.SIGHUP, reload)
        for line in service.describe():
            print(line, flush=True)
        if warnings := sms_warnings(settings):
            print("\n".join(["!" * 78, *warnings, "!" * 78]), file=sys.stderr, flush=True)
        await stop.wait()
        print("shutting down: finishing accepted messages", flush=True)
