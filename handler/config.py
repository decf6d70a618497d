"""Settings: defaults, overridden by an optional `handler.toml`, overridden by `HANDLER_*`.

Every setting is a flat field so the environment variable is simply `HANDLER_` + the field
name upper-cased (`smtp_port` -> `HANDLER_SMTP_PORT`). `handler.toml` uses the same names.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Settings:
    # where things live
    database_url: str = "sqlite:///var/handler.db"
    rules_dir: Path = Path("rules")
    templates_dir: Path = Path("templates")
    var_dir: Path = Path("var")
    # inbound SMTP
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 8025
    mailboxes: tuple[str, ...] = ("enquiries@clinic.example",)
    smtp_max_message_size: int = 25 * 1024 * 1024
    smtp_max_recipients: int = 50
    smtp_max_connections: int = 1000
    smtp_max_connections_per_client: int = 50  # per client IP address; 0 = no limit
    smtp_timeout: int = 300
    smtp_tls_cert: Path | None = None
    smtp_tls_key: Path | None = None
    # HTTP (health, SMS webhook, metrics)
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    public_url: str = "http://127.0.0.1:8080"
    # the clinic, as patients see it
    clinic_name: str = "London Second Opinion Clinic"
    clinic_address: str = "enquiries@clinic.example"
    clinic_phone: str = "+44 20 7946 0000"
    clinic_website: str = "https://clinic.example"
    # outbound email: a relay, or a local Maildir when relay_host is empty
    relay_host: str = ""
    relay_port: int = 25
    relay_username: str = ""
    relay_password: str = field(default="", repr=False)
    relay_starttls: bool = False
    relay_timeout: float = 60.0
    maildir: Path | None = None  # default: var_dir / "mail"
    # Twilio
    twilio_account_sid: str = ""
    twilio_auth_token: str = field(default="", repr=False)
    twilio_from: str = ""
    twilio_api_url: str = ""
    twilio_validate_signatures: bool = True
    sms_dir: Path | None = None  # default: var_dir / "sms"
    sms_thread_days: int = 14
    sms_max_segments: int = 3
    quiet_hours: str = "21:00-08:00"
    timezone: str = "Europe/London"
    # behaviour
    ack_limit_per_day: int = 1
    ack_window_hours: int = 24
    dispatch_poll_seconds: float = 5.0
    delivery_worker: bool = True  # send from a child process (a second core); false = inline
    intake_worker: bool = True  # commit intake in a child process; false = a thread here
    outbox_lease_seconds: int = 300
    max_attempts: int = 8
    retention_days: int = 0  # 0 = keep closed enquiries forever
    log_level: str = "INFO"

    @property
    def maildir_path(self) -> Path:
        return self.maildir or self.var_dir / "mail"

    @property
    def sms_dir_path(self) -> Path:
        return self.sms_dir or self.var_dir / "sms"

    @property
    def sqlalchemy_url(self) -> str:
        """The URL with our chosen driver, so operators can write plain postgresql://."""
        url = self.database_url
        for plain in ("postgresql://", "postgres://"):
            if url.startswith(plain):
                return "postgresql+psycopg://" + url[len(plain):]
        return url

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def convert_setting(name: str, raw: Any, type_: Any) -> Any:
    """A setting's value from TOML, the environment or JSON, as its field's type."""
    text = str(raw).strip() if not isinstance(raw, list | tuple) else raw
    try:
        if type_ is bool:
            if isinstance(raw, bool):
                return raw
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(f"expected true/false, got {raw!r}")
        if type_ is int:
            return int(raw)
        if type_ is float:
            return float(raw)
        if type_ in (Path, Path | None):
            return Path(text) if text else None
        if type_ == tuple[str, ...]:
            items = raw if isinstance(raw, list | tuple) else str(raw).split(",")
            return tuple(str(i).strip().lower() for i in items if str(i).strip())
        return str(raw)
    except ValueError as exc:
        raise ConfigError(f"setting {name}: {exc}") from None


def load_settings(
    environ: Mapping[str, str] | None = None, config_file: Path | None = None
) -> Settings:
    """Defaults < handler.toml (or HANDLER_CONFIG) < HANDLER_* environment variables."""
    environ = os.environ if environ is None else environ
    hints = get_type_hints(Settings)
    known = {f.name for f in fields(Settings)}
    values: dict[str, Any] = {}

    path = config_file or Path(environ.get("HANDLER_CONFIG", "handler.toml"))
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        for key, raw in data.items():
            if key not in known:
                raise ConfigError(f"{path}: unknown setting {key!r}")
            values[key] = convert_setting(key, raw, hints[key])
    elif config_file is not None:
        raise ConfigError(f"{path}: no such file")

    for key, raw in environ.items():
        if not key.startswith("HANDLER_") or key == "HANDLER_CONFIG":
            continue
        name = key[len("HANDLER_"):].lower()
        if name.startswith("test_"):
            continue  # HANDLER_TEST_* belong to the test suite
        if name not in known:
            raise ConfigError(f"unknown environment variable {key}")
        values[name] = convert_setting(key, raw, hints[name])
    return Settings(**values)
