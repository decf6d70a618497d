"""`handler check` counts each SMS template's segments; `handler serve` warns loudly when
Twilio signatures are not checked."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from handler.app import running
from handler.config import Settings
from handler.db import make_sessionmaker
from handler.models import Message
from tests.conftest import ROOT, Sink, eventually
from tests.procs import ServiceProcess, service_env
from tests.test_cli import run_cli
from tests.twilio_fake import PUBLIC_URL


def test_check_reports_segments_and_passes_on_shipped_templates() -> None:
    result = run_cli("check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sms/help.txt: GSM-7, " in result.stdout
    assert "sms/ack-general.txt: GSM-7, 2 segment(s)" in result.stdout


def test_check_fails_when_an_sms_is_longer_than_the_limit(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    help_sms = templates / "sms" / "help.txt"
    # The curly apostrophe is not in GSM-7: the whole text becomes UCS-2, 67 per segment.
    help_sms.write_text(help_sms.read_text() + " We’re here." + " Call us." * 20 + "\n")
    result = run_cli("check", env={"HANDLER_TEMPLATES_DIR": str(templates)})
    assert result.returncode == 1
    assert "sms/help.txt: UCS-2, 6 segment(s), 402 characters  > limit 3" in result.stdout
    assert "help.txt: 6 SMS segments (UCS-2" in result.stdout
    assert "the limit is 3" in result.stdout


def test_check_uses_the_configured_maximum() -> None:
    result = run_cli("check", env={"HANDLER_SMS_MAX_SEGMENTS": "1"})
    assert result.returncode == 1
    assert "ack-general.txt: 2 SMS segments (GSM-7" in result.stdout
    assert "the limit is 1" in result.stdout


def test_check_rejects_bad_quiet_hours() -> None:
    result = run_cli("check", env={"HANDLER_QUIET_HOURS": "9pm-8am"})
    assert result.returncode == 1
    assert "quiet_hours" in result.stdout


async def test_describe_shows_the_webhook_and_whether_signatures_are_checked(
    make_settings: Callable[..., Settings], sink: Sink
) -> None:
    settings = make_settings(relay_host="127.0.0.1", relay_port=sink.port,
                             twilio_validate_signatures=False,
                             public_url="https://tunnel.example.test/")
    async with running(settings) as service:
        line = next(x for x in service.describe() if "webhook" in x)
    assert "https://tunnel.example.test/sms/twilio" in line
    assert "SIGNATURES NOT CHECKED" in line


async def test_serve_warns_loudly_when_signature_checking_is_off(
    tmp_path: Path, database_url: str, sink: Sink
) -> None:
    env = service_env(database_url=database_url, var_dir=tmp_path / "var", relay_port=sink.port)
    env["HANDLER_TWILIO_VALIDATE_SIGNATURES"] = "false"
    proc = ServiceProcess(env, tmp_path)
    await proc.start()
    try:  # the banner follows the "listening" lines
        output = await eventually(
            lambda: "signature checking is OFF" in "".join(proc.output) and "".join(proc.output))
    finally:
        await proc.stop()
    assert "WARNING: Twilio signature checking is OFF" in output
    assert "!" * 40 in output


async def test_send_test_sms_script_posts_a_signed_text(
    make_settings: Callable[..., Settings], sink: Sink, tmp_path: Path
) -> None:
    settings = make_settings(relay_host="127.0.0.1", relay_port=sink.port,
                             twilio_auth_token="local-dev", public_url=PUBLIC_URL)
    async with running(settings) as service:
        url = f"http://127.0.0.1:{service.http_port}/sms/twilio"
        env = {**os.environ, "HANDLER_TWILIO_AUTH_TOKEN": "local-dev",
               "HANDLER_PUBLIC_URL": PUBLIC_URL}
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, str(ROOT / "scripts" / "send-test-sms"),
                             "--url", url, "HELP"],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "200" in result.stdout and "<Response/>" in result.stdout
        with make_sessionmaker(service.engine)() as session:
            assert session.scalars(select(Message.kind)).all() == ["help"]
        wrong = await asyncio.to_thread(
            subprocess.run, [sys.executable, str(ROOT / "scripts" / "send-test-sms"),
                             "--url", url, "HELP"],
            capture_output=True, text=True, env={**env, "HANDLER_TWILIO_AUTH_TOKEN": "other"},
            cwd=tmp_path, timeout=60, check=False)
        assert wrong.returncode == 1 and "403" in wrong.stderr
