"""The worker processes: settings reach them whole; the delivery worker is woken by commits,
restarted when it dies, never outlives the service and never meets a template it has not
loaded; the intake worker commits what the service receives, and while it restarts senders
are told to retry (nothing is lost)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import aiosmtplib
import pytest
from sqlalchemy import create_engine, select

from handler.config import Settings
from handler.models import Message
from handler.worker import WakeGate, settings_from_json, settings_to_json
from tests.conftest import CLINIC, ROOT, Sink, eventually
from tests.procs import ServiceProcess, service_env
from tests.test_e2e_email import enquiry_email
from tests.test_hot_reload import healthz


def test_settings_reach_the_worker_whole(tmp_path: Path) -> None:
    settings = Settings(
        database_url="postgresql://u:p@db/x", var_dir=tmp_path, maildir=None,
        sms_dir=tmp_path / "sms", mailboxes=("a@clinic.example", "b@clinic.example"),
        relay_password="s3cret", relay_starttls=True, relay_timeout=12.5, smtp_port=2525,
        smtp_tls_cert=tmp_path / "cert.pem", twilio_auth_token="tok", retention_days=30,
        delivery_worker=True, clinic_name="Clinic “Ünïcode”")
    assert settings_from_json(settings_to_json(settings)) == settings
    assert settings_from_json(settings_to_json(Settings())) == Settings()


def worker_pid(port: int) -> int:
    delivery = healthz(port)["delivery"]
    assert isinstance(delivery, dict)
    return int(delivery["pid"])


async def send(port: int, subject: str = "Second opinion on my treatment plan") -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10) as client:
        await client.send_message(enquiry_email(subject=subject), recipients=[CLINIC])


async def start(tmp_path: Path, settings: Settings, sink: Sink,
                **extra: str) -> ServiceProcess:
    env = {**service_env(database_url=settings.database_url, var_dir=tmp_path / "var",
                         relay_port=sink.port), "HANDLER_DISPATCH_POLL_SECONDS": "60", **extra}
    proc = ServiceProcess(env, tmp_path)
    await proc.start()
    return proc


async def test_worker_sends_is_restarted_and_goes_with_the_service(
    make_settings: Callable[..., Settings], sink: Sink, tmp_path: Path
) -> None:
    proc = await start(tmp_path, make_settings(), sink)
    try:
        await eventually(lambda: any("send   from the delivery worker" in line
                                     for line in proc.output), timeout=5)
        # A commit wakes the worker at once: the poll interval (60 s) is not what sends it.
        await send(proc.smtp_port)
        await sink.wait_for(2, timeout=10)  # the acknowledgement and the team notification
        first = await asyncio.to_thread(worker_pid, proc.http_port)

        os.kill(first, signal.SIGKILL)  # the worker dies: the service starts another
        await eventually(lambda: healthz(proc.http_port)["delivery"]["restarts"] == 1,  # type: ignore[index]
                         timeout=15)
        second = await asyncio.to_thread(worker_pid, proc.http_port)
        assert second != first
        await send(proc.smtp_port, subject="Another question about my treatment")
        await sink.wait_for(3, timeout=15)  # the same patient: a team notification only
    finally:
        await proc.kill9()  # the service dies without a word...
    await eventually(lambda: not _alive(second), timeout=10)  # ...and its worker follows


async def test_new_rule_with_a_new_template_is_rendered_by_the_worker(
    make_settings: Callable[..., Settings], sink: Sink, tmp_path: Path
) -> None:
    rules, templates = tmp_path / "rules", tmp_path / "templates"
    shutil.copytree(ROOT / "rules", rules)
    shutil.copytree(ROOT / "templates", templates)
    proc = await start(tmp_path, make_settings(), sink, HANDLER_RULES_DIR=str(rules),
                       HANDLER_TEMPLATES_DIR=str(templates))
    try:
        version = healthz(proc.http_port)["rules"]["version"]  # type: ignore[index]
        for suffix in ("email/{}.txt", "email/{}.html", "email/{}.subject.txt", "sms/{}.txt"):
            shutil.copy(templates / suffix.format("ack-breast"),
                        templates / suffix.format("ack-zebra"))
        (templates / "email" / "ack-zebra.subject.txt").write_text(
            "Zebra reply {{ enquiry.reference }}\n")
        routing = rules / "routing.yaml"
        routing.write_text(routing.read_text().replace("reply: ack-breast", "reply: ack-zebra"))
        await eventually(lambda: healthz(proc.http_port)["rules"]["version"]  # type: ignore[index]
                         != version, timeout=5)
        await send(proc.smtp_port)  # routed by the new rule at once; the worker must keep up
        received = await sink.wait_for(2, timeout=10)
        assert any(str(m["Subject"]).startswith("Zebra reply") for m in received)
    finally:
        assert await proc.stop() == 0


async def try_send(port: int, subject: str, body: str = "") -> bool:
    msg = enquiry_email(subject=subject, body=body) if body else enquiry_email(subject=subject)
    try:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10) as client:
            await client.send_message(msg, recipients=[CLINIC])
        return True
    except aiosmtplib.SMTPResponseException as exc:
        assert exc.code == 451, exc  # "try again later", never a refusal
        return False


async def test_intake_worker_commits_and_is_restarted_without_losing_mail(
    make_settings: Callable[..., Settings], sink: Sink, tmp_path: Path
) -> None:
    settings = make_settings()
    proc = await start(tmp_path, settings, sink)
    try:
        await eventually(lambda: any("write  in the intake worker" in line
                                     for line in proc.output), timeout=5)
        health = await asyncio.to_thread(healthz, proc.http_port)
        first = int(health["intake"]["pid"])  # type: ignore[index]
        assert await try_send(proc.smtp_port, "Question one about my treatment")
        # A message larger than LOCAL_BYTES is committed by the service itself.
        assert await try_send(proc.smtp_port, "My scans", body="scan data " * 150_000)

        os.kill(first, signal.SIGKILL)
        subjects = [f"Question {i} during the restart" for i in range(12)]
        waiting = list(subjects)
        for _ in range(200):  # a sender retrying as MTAs do
            waiting = [s for s in waiting if not await try_send(proc.smtp_port, s)]
            if not waiting:
                break
            await asyncio.sleep(0.1)
        assert not waiting
        health = await asyncio.to_thread(healthz, proc.http_port)
        assert health["intake"]["restarts"] == 1  # type: ignore[index]
        assert health["intake"]["worker"] == "running"  # type: ignore[index]
    finally:
        assert await proc.stop() == 0
    assert stored_subjects(settings) == sorted(
        ["Question one about my treatment", "My scans", *subjects])


def stored_subjects(settings: Settings) -> list[str]:
    engine = create_engine(settings.sqlalchemy_url)
    with engine.connect() as conn:
        subjects = sorted(conn.execute(
            select(Message.subject).where(Message.direction == "in")).scalars())
    engine.dispose()
    return subjects


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is gone for our purposes
        return stat.read().split(")")[-1].split()[0] != "Z"




def test_wake_gate_wakes_a_lone_commit_at_once_and_gathers_a_stream() -> None:
    gate = WakeGate(interval=0.05)
    assert gate.request(10.0) == 0  # quiet until now: at once
    gate.woke(10.0)
    assert gate.request(10.01) == pytest.approx(0.04)  # a stream: the rest of the interval
    assert gate.request(10.02) is None  # already scheduled: gathered into that one
    assert gate.request(10.03) is None
    gate.woke(10.05)
    assert gate.request(10.2) == 0  # quiet again for longer than the interval
