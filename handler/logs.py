"""Logging set-up, called once from the CLI. Patient data stays out of the logs.

Our own log lines never carry message text, subjects, addresses or phone numbers; as a second
line of defence a filter masks anything that looks like an email address or phone number, and
aiosmtpd's INFO logging (which prints envelope addresses and command lines) is silenced.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
from pathlib import Path

PSEUDONYM_KEY_FILE = "log-pseudonym.key"
_EMAIL = re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@[\w-]+(?:\.[\w-]+)+")
# Phone numbers: E.164 (+447700900123) and national forms (07700 900123, 020 7946 0000).
# Dashes are left alone so that dates and times (2026-11-25T20:30) are not mistaken for one.
_PHONE = re.compile(r"(?<![\w.:-])\+?\d[\d ()]{8,}\d(?![\w.:-])")


class _Key:
    """The secret pseudonyms are keyed with. Unkeyed, a token could be reversed by hashing
    every UK mobile number (about 10^9, minutes on one core); keyed, only with the key."""

    value: bytes | None = None


def use_pseudonym_key(key: bytes) -> None:
    _Key.value = key


def pseudonym_key(var_dir: Path) -> bytes:
    """This installation's key, created on first use (readable by its owner only) in
    `var_dir`, where the service and its worker processes all find the same one."""
    path = var_dir / PSEUDONYM_KEY_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    var_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_bytes()
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return path.read_bytes()


def pseudonym(value: str) -> str:
    """A stable short token for an address or number: safe to log, useless to a reader
    without this installation's key (`pseudonym_key`; a random one per process until set)."""
    if _Key.value is None:
        _Key.value = secrets.token_bytes(32)
    digest = hmac.new(_Key.value, value.strip().lower().encode(), hashlib.sha256)
    return "h:" + digest.hexdigest()[:10]


def redact(text: str) -> str:
    text = _EMAIL.sub(lambda m: pseudonym(m.group(0)), text)
    return _PHONE.sub(lambda m: pseudonym(re.sub(r"\D", "", m.group(0))), text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.INFO:
            message = record.getMessage()
            cleaned = redact(message)
            if cleaned != message:
                record.msg, record.args = cleaned, None
        return True


def configure_logging(level: str = "INFO", *, pseudonym_key: bytes | None = None) -> None:
    if pseudonym_key is not None:
        use_pseudonym_key(pseudonym_key)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet_libraries()


class _BusyTickFilter(logging.Filter):
    """The dispatch tick is a safety net: while a long pass runs, APScheduler skipping the
    next tick is expected, not a warning worth an operator's attention."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in record.getMessage()


def quiet_libraries() -> None:
    """Libraries that would log patient data (or noise) at INFO are held at WARNING.
    The test suite applies this too, and then checks every INFO+ record for patient data."""
    # aiosmtpd logs every command line and envelope address at INFO, DATA lines at DEBUG.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    scheduler = logging.getLogger("apscheduler.scheduler")
    if not any(isinstance(f, _BusyTickFilter) for f in scheduler.filters):
        scheduler.addFilter(_BusyTickFilter())
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    logging.getLogger("twilio.http_client").setLevel(logging.WARNING)
