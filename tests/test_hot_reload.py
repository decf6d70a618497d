"""Hot reload: edited rules and templates take effect without a restart; a broken edit is
refused, the previous rules stay in force, and /healthz says what happened."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from handler.app import running
from handler.clock import FakeClock
from handler.config import Settings
from tests.conftest import ROOT, Sink, eventually
from tests.procs import ServiceProcess, service_env
from tests.test_e2e_email import enquiry_email, send


def healthz(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        return json.load(response)  # type: ignore[no-any-return]


def copy_config(tmp_path: Path) -> tuple[Path, Path]:
    rules, templates = tmp_path / "rules", tmp_path / "templates"
    shutil.copytree(ROOT / "rules", rules)
    shutil.copytree(ROOT / "templates", templates)
    return rules, templates


async def test_rule_and_template_edits_take_effect_and_bad_edits_are_refused(
    make_settings: Callable[..., Settings], sink: Sink, clock: FakeClock, tmp_path: Path
) -> None:
    rules, templates = copy_config(tmp_path)
    settings = make_settings(rules_dir=rules, templates_dir=templates, relay_host="127.0.0.1",
                             relay_port=sink.port)
    async with running(settings, clock=clock) as service:
        before = service.rules.status.version
        # 1. a template edit is live within 2 seconds
        subject = templates / "email" / "ack-breast.subject.txt"
        subject.write_text("Hot-reloaded subject {{ enquiry.reference }}\n")
        await eventually(lambda: service.rules.status.version == before
                         and "Hot-reloaded" in (templates / "email" /
                                                "ack-breast.subject.txt").read_text()
                         and _renders(service, "Hot-reloaded"), timeout=2.5)
        await send(service, enquiry_email())
        received = await sink.wait_for(2)
        assert any("Hot-reloaded subject" in str(m["Subject"]) for m in received)

        # 2. a rule edit changes the version
        routing = rules / "routing.yaml"
        original = routing.read_text()
        routing.write_text(original.replace("HER2", "HER2-positive-edited", 1))
        await eventually(lambda: service.rules.status.version != before, timeout=2.5)
        good_version = service.rules.status.version

        # 3. a broken edit is refused, the previous rules stay, healthz reports the error
        routing.write_text(original.replace("priority:", "priorty:", 1))
        await eventually(lambda: service.rules.status.last_error, timeout=2.5)
        assert service.rules.status.version == good_version
        assert "priorty" in service.rules.status.last_error
        body = await asyncio.to_thread(healthz, service.http_port)
        rules_health = body["rules"]
        assert isinstance(rules_health, dict)
        assert rules_health["version"] == good_version
        assert "routing.yaml" in str(rules_health["last_reload_error"])

        # 4. fixing the file clears the error; a broken template is then refused too, and
        #    patients keep getting the old wording
        routing.write_text(original.replace("HER2", "HER2-positive-edited", 1))
        await eventually(lambda: not service.rules.status.last_error, timeout=2.5)
        subject.write_text("{{ enquiry.reference \n")
        await eventually(lambda: "ack-breast" in service.rules.status.last_error
                         if service.rules.status.last_error else False, timeout=2.5)
        assert _renders(service, "Hot-reloaded")


def _renders(service: object, needle: str) -> bool:
    from handler.render import sample_context

    rules = service.rules  # type: ignore[attr-defined]
    return needle in rules.render_email("ack-breast", sample_context()).subject


async def test_sighup_reloads(
    make_settings: Callable[..., Settings], sink: Sink, tmp_path: Path
) -> None:
    rules, templates = copy_config(tmp_path)
    settings = make_settings()
    env = {**service_env(database_url=settings.database_url, var_dir=tmp_path / "var",
                         relay_port=sink.port),
           "HANDLER_RULES_DIR": str(rules), "HANDLER_TEMPLATES_DIR": str(templates)}
    proc = ServiceProcess(env, tmp_path)
    await proc.start()
    try:
        first = await asyncio.to_thread(healthz, proc.http_port)
        version = first["rules"]["version"]  # type: ignore[index]
        routing = rules / "routing.yaml"
        routing.write_text(routing.read_text() + "\n# edited\n")
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGHUP)
        await eventually(lambda: healthz(proc.http_port)["rules"]["version"]  # type: ignore[index]
                         != version, timeout=5)
    finally:
        await proc.stop()


def test_templates_the_code_sends_itself_are_checked_at_every_load(tmp_path: Path) -> None:
    """The HELP answer and the on-call text are sent whatever the rules name: a reload that
    breaks one is refused (the old templates stay), and so is a start without them."""
    from datetime import UTC, datetime

    from handler.live import LiveRules, load_checked
    from handler.render import Templates
    from handler.rules import RulesError

    rules, templates = copy_config(tmp_path)
    now = datetime.now(UTC)
    live = LiveRules(rules_dir=rules, templates_dir=templates, max_sms_segments=3, now=now)
    for broken in ("sms/help.txt", "sms/notify-urgent.txt"):
        path = templates / broken
        kept = path.read_text()
        path.write_text("{{ enquiry.reference ")  # unclosed
        assert not live.reload(now)
        assert broken in live.status.last_error
        assert live.render_sms(broken[4:-4], _sample()).strip()  # the old one still renders
        path.unlink()
        with pytest.raises(RulesError, match=broken[4:-4]):
            load_checked(rules, Templates(templates, frozen=True), max_sms_segments=3)
        path.write_text(kept)
    assert live.reload(now)


def _sample() -> dict[str, object]:
    from handler.render import sample_context

    return sample_context()


def test_an_edit_that_breaks_the_rule_files_own_tests_is_refused(tmp_path: Path) -> None:
    """A phrase removed from the red-flag rule is valid YAML and a valid rule, but the file's
    own examples say that wording is an emergency: the edit is refused, the old rules stay."""
    from datetime import UTC, datetime

    from handler.live import LiveRules

    rules, templates = copy_config(tmp_path)
    now = datetime.now(UTC)
    live = LiveRules(rules_dir=rules, templates_dir=templates, max_sms_segments=3, now=now)
    before = live.status.version
    routing = rules / "routing.yaml"
    original = routing.read_text()
    routing.write_text(original.replace("              - can't breathe\n", "", 1))
    assert not live.reload(now)
    assert live.status.version == before
    assert "routing.yaml:" in live.status.last_error
    assert "fails with these rules: rule: expected red-flag" in live.status.last_error
    routing.write_text(original)
    assert live.reload(now) and not live.status.last_error
