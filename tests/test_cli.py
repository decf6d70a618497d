"""The `handler` command run as a real process: check, db upgrade, enquiries list/show."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from handler.app import Service
from handler.config import Settings
from tests.conftest import ROOT, Sink
from tests.test_e2e_email import enquiry_email, send


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "handler", *args], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=120, check=False)


def settings_env(settings: Settings) -> dict[str, str]:
    return {"HANDLER_DATABASE_URL": settings.database_url,
            "HANDLER_RULES_DIR": str(settings.rules_dir),
            "HANDLER_TEMPLATES_DIR": str(settings.templates_dir)}


def test_check_passes_on_shipped_config() -> None:
    result = run_cli("check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout


def test_check_fails_with_file_and_line(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules)
    routing = next(p for p in sorted(rules.glob("*.yaml")) if "priority:" in p.read_text())
    lines = routing.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if "priority:" in line)
    lines[index] = lines[index].replace("priority:", "priorty:")
    routing.write_text("\n".join(lines) + "\n")
    result = run_cli("check", env={"HANDLER_RULES_DIR": str(rules)})
    assert result.returncode == 1
    assert f"{routing.name}:{index + 1}:" in result.stdout
    assert "priorty" in result.stdout


def test_check_fails_when_a_template_is_missing(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    (templates / "email" / "ack-breast.html").unlink()
    result = run_cli("check", env={"HANDLER_TEMPLATES_DIR": str(templates)})
    assert result.returncode == 1
    assert "ack-breast" in result.stdout


def test_db_upgrade_is_idempotent(make_settings: Callable[..., Settings]) -> None:
    env = settings_env(make_settings())
    for _ in range(2):
        result = run_cli("db", "upgrade", env=env)
        assert result.returncode == 0, result.stderr
        assert "up to date" in result.stdout


async def test_enquiries_list_and_show(service: Service, sink: Sink) -> None:
    _, response = await send(service, enquiry_email())
    reference = response.rsplit(" ", 1)[1]
    await sink.wait_for(2)
    env = settings_env(service.settings)

    listing = run_cli("enquiries", "list", env=env)
    assert listing.returncode == 0, listing.stderr
    assert reference in listing.stdout and "breast" in listing.stdout
    as_json = json.loads(run_cli("enquiries", "list", "--json", env=env).stdout)
    assert as_json[0]["reference"] == reference and as_json[0]["team"] == "breast"

    shown = run_cli("enquiries", "show", reference, env=env)
    assert shown.returncode == 0
    assert "MATCH" in shown.stdout and "ack-breast" in shown.stdout
    detail = json.loads(run_cli("enquiries", "show", reference, "--json", env=env).stdout)
    assert detail["reference"] == reference
    assert {o["kind"] for o in detail["outbox"]} == {"ack", "notify"}
    assert any(hit["matched"] for hit in detail["trace"])

    missing = run_cli("enquiries", "show", "ENQ-ZZZZZZ", env=env)
    assert missing.returncode == 1


def test_configuration_errors_are_clear(tmp_path: Path) -> None:
    result = run_cli("check", env={"HANDLER_SMTP_PORT": "not-a-number"})
    assert result.returncode == 1 and "HANDLER_SMTP_PORT" in result.stderr
    (tmp_path / "handler.toml").write_text("smtp_prot = 25\n")
    result = run_cli("check", cwd=tmp_path)
    assert result.returncode == 1 and "smtp_prot" in result.stderr
