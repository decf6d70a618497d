"""Run `handler serve` as a real child process (for restart and kill -9 tests)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

from handler.config import Settings
from tests.conftest import ROOT
from tests.logscan import save_child_output


class ServiceProcess:
    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = {**os.environ, **env}
        self.cwd = cwd
        self.proc: asyncio.subprocess.Process | None = None
        self.smtp_port = 0
        self.http_port = 0
        self.output: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 60.0) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "handler", "serve", cwd=self.cwd, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        assert self.proc.stdout is not None
        async def read_until_ready() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            while not (self.smtp_port and self.http_port):
                line = (await self.proc.stdout.readline()).decode(errors="replace")
                if not line:
                    raise RuntimeError("service exited:\n" + "".join(self.output))
                self.output.append(line)
                if m := re.search(r"SMTP\s+listening on [\d.]+:(\d+)", line):
                    self.smtp_port = int(m.group(1))
                if m := re.search(r"HTTP\s+listening on http://[\d.]+:(\d+)", line):
                    self.http_port = int(m.group(1))
        await asyncio.wait_for(read_until_ready(), timeout)
        self._reader = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.output.append(line.decode(errors="replace"))

    async def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        if self._reader:
            await self._reader
        save_child_output(f"service-{id(self)}", self.output)  # for the log scan
        self.smtp_port = self.http_port = 0

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(self.proc.wait(), 30)
        if self._reader:
            await self._reader
        save_child_output(f"service-{id(self)}", self.output)  # for the log scan
        self.smtp_port = self.http_port = 0
        return self.proc.returncode or 0


async def start_service(
    settings: Settings, *, relay_port: int, tmp_path: Path
) -> ServiceProcess:
    """`handler serve` as a child process on `settings`' database, relaying to relay_port."""
    env = service_env(database_url=settings.database_url, var_dir=tmp_path / "var",
                      relay_port=relay_port)
    proc = ServiceProcess(env, tmp_path)
    await proc.start()
    return proc


def service_env(*, database_url: str, var_dir: Path, relay_port: int) -> dict[str, str]:
    return {
        "HANDLER_DATABASE_URL": database_url,
        "HANDLER_VAR_DIR": str(var_dir),
        "HANDLER_SMTP_PORT": "0",
        "HANDLER_HTTP_PORT": "0",
        "HANDLER_RULES_DIR": str(ROOT / "rules"),
        "HANDLER_TEMPLATES_DIR": str(ROOT / "templates"),
        "HANDLER_RELAY_HOST": "127.0.0.1",
        "HANDLER_RELAY_PORT": str(relay_port),
        "HANDLER_MAILBOXES": "enquiries@clinic.example",
        "HANDLER_CLINIC_ADDRESS": "enquiries@clinic.example",
        "HANDLER_DISPATCH_POLL_SECONDS": "0.5",
        "HANDLER_OUTBOX_LEASE_SECONDS": "2",
        "PYTHONPATH": str(ROOT),
    }
