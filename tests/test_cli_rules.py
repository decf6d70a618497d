"""`handler rules test`, `handler route` and `handler rules replay` as real processes."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from handler.app import running
from handler.clock import FakeClock
from handler.config import Settings
from tests.conftest import ROOT, Sink
from tests.test_cli import run_cli, settings_env
from tests.test_e2e_email import enquiry_email, send


def test_rules_test_passes_and_fails(tmp_path: Path) -> None:
    result = run_cli("rules", "test")
    assert result.returncode == 0, result.stdout
    assert " 0 failed" in result.stdout and "PASS" in result.stdout

    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules)
    routing = rules / "routing.yaml"
    # Expect the wrong team in one shipped case: the runner must notice.
    text = routing.read_text()
    assert "team: breast" in text
    routing.write_text(text.replace("team: breast", "team: lung", 1))
    broken = run_cli("rules", "test", "--rules-dir", str(rules))
    assert broken.returncode == 1
    assert "FAIL" in broken.stdout


def test_route_dry_run_email_and_sms(tmp_path: Path) -> None:
    eml = tmp_path / "message.eml"
    eml.write_bytes(bytes(enquiry_email()))
    result = run_cli("route", str(eml))
    assert result.returncode == 0, result.stderr
    assert "breast" in result.stdout and "MATCH" in result.stdout

    sms = run_cli("route", "--sms", "+447700900123", "I can't breathe and I have chest pain")
    assert sms.returncode == 0, sms.stderr
    assert "red-flag" in sms.stdout and "urgent" in sms.stdout and "can't breathe" in sms.stdout


async def test_replay_reports_what_a_candidate_would_change(
    make_settings: Callable[..., Settings], sink: Sink, tmp_path: Path
) -> None:
    settings = make_settings(relay_host="127.0.0.1", relay_port=sink.port)
    async with running(settings, clock=FakeClock(datetime.now(UTC))) as service:
        _, response = await send(service, enquiry_email())
        reference = response.rsplit(" ", 1)[1]
        await send(service, enquiry_email(body="My PSA is 14 and my Gleason score is 7.",
                                          subject="Prostate", sender="bob@example.org"))
    candidate = tmp_path / "candidate"
    shutil.copytree(ROOT / "rules", candidate)
    routing = candidate / "routing.yaml"
    # The candidate sends breast enquiries to the coordinator instead.
    routing.write_text(routing.read_text().replace(
        "    category: breast\n    team: breast\n",
        "    category: breast\n    team: coordinator\n", 1))

    env = settings_env(settings)
    same = run_cli("rules", "replay", "--since", "1d", env=env)
    assert same.returncode == 0, same.stderr
    assert reference not in same.stdout  # the rules in force change nothing

    changed = run_cli("rules", "replay", "--since", "1d", "--rules-dir", str(candidate),
                      env=env)
    assert changed.returncode == 0, changed.stderr
    assert reference in changed.stdout
    assert "breast" in changed.stdout
