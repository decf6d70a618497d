"""Session-wide privacy check: no patient data in any log record at INFO or above.

Every record any test produces (in this process, and the output of `handler serve` child
processes started through tests/procs.py) is checked for email addresses, phone numbers and
the test patients' words (tests/patient_data.py). Leaks are listed at the end and fail the run.

In this process the product's `RedactingFilter` is NOT applied: it is a second line of
defence, and the test holds our own log calls to the rule without it. The library log levels
are set as in production (`quiet_libraries`), since those are part of the product. Child
processes run exactly as in production (filter included).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from handler.logs import quiet_libraries
from tests.patient_data import OUR_DOMAINS, OUR_NUMBERS, SENTINELS

CHILD_DIR_ENV = "HANDLER_TEST_LOGSCAN_DIR"
_EMAIL = re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@([\w-]+(?:\.[\w-]+)+)")
_IP = re.compile(r"[\d.]+")
_E164 = re.compile(r"(?<![\w+])\+\d{10,15}\b")
_UK = re.compile(r"(?<![\w.:+-])0\d{2,4}[ -]?\d{3,4}[ -]?\d{3,4}(?![\w.:-])")


def find_patient_data(text: str) -> list[str]:
    """What in `text` looks like patient data (empty when it is clean)."""
    found = [s for s in SENTINELS if s.lower() in text.lower()]
    found += [m.group(0) for m in _EMAIL.finditer(text)
              if m.group(1).lower() not in OUR_DOMAINS
              and not m.group(0).startswith("//")  # user@host of a URL (database, relay)
              and not _IP.fullmatch(m.group(1))]
    for pattern in (_E164, _UK):
        for m in pattern.finditer(text):
            digits = "+" + re.sub(r"\D", "", m.group(0))
            if digits not in OUR_NUMBERS and "+44" + digits[2:] not in OUR_NUMBERS:
                found.append(m.group(0))
    return found


def save_child_output(name: str, lines: Iterable[str]) -> None:
    """Called by tests/procs.py when a child service stops: its output is scanned too.
    The same `name` overwrites (a restarted child's output grows)."""
    folder = os.environ.get(CHILD_DIR_ENV)
    if folder and Path(folder).is_dir():
        (Path(folder) / f"{name}.log").write_text("".join(lines), encoding="utf-8")


@dataclass(frozen=True)
class Leak:
    where: str
    found: tuple[str, ...]
    line: str


class _Recorder(logging.Handler):
    def __init__(self, scan: LogScan) -> None:
        super().__init__(logging.INFO)
        self._scan = scan
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            line = f"{record.levelname} {record.name}: {record.msg!r} (could not format)"
        found = find_patient_data(line)
        if found:
            self._scan.leaks.append(Leak(self._scan.current, tuple(found), line[:500]))


class LogScan:
    def __init__(self, records_dir: Path) -> None:
        self.leaks: list[Leak] = []
        self.current = "(collection)"
        self.records_dir = records_dir
        self.recorder = _Recorder(self)

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        root = logging.getLogger()
        root.addHandler(self.recorder)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        quiet_libraries()

    def pytest_runtest_logstart(self, nodeid: str, location: object) -> None:
        self.current = nodeid

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        logging.getLogger().removeHandler(self.recorder)
        for path in sorted(self.records_dir.glob("*.log")):
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                found = find_patient_data(line)
                if found:
                    self.leaks.append(Leak(f"child process ({path.stem})", tuple(found),
                                           line[:500]))
        shutil.rmtree(self.records_dir, ignore_errors=True)
        if self.leaks and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.leaks:
            return
        terminalreporter.section("patient data in the logs", sep="!", red=True, bold=True)
        for leak in self.leaks[:50]:
            terminalreporter.line(f"{leak.where}: {', '.join(leak.found)}")
            terminalreporter.line(f"    {leak.line}")
        if len(self.leaks) > 50:
            terminalreporter.line(f"... and {len(self.leaks) - 50} more")


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("patient-data-log-scan"):
        records_dir = Path(tempfile.mkdtemp(prefix="handler-logscan-"))
        os.environ[CHILD_DIR_ENV] = str(records_dir)  # children started later inherit it
        config.pluginmanager.register(LogScan(records_dir), "patient-data-log-scan")
