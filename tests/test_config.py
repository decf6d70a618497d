from pathlib import Path

import pytest

from handler.config import ConfigError, load_settings


def test_defaults_are_embedded(tmp_path: Path) -> None:
    s = load_settings({}, None) if not Path("handler.toml").exists() else None
    if s is None:
        pytest.fail("a handler.toml in the working directory would change the defaults")
    assert s.database_url == "sqlite:///var/handler.db"
    assert (s.smtp_host, s.smtp_port, s.http_port) == ("127.0.0.1", 8025, 8080)
    assert s.maildir_path == Path("var/mail") and s.relay_host == ""


def test_file_then_environment(tmp_path: Path) -> None:
    f = tmp_path / "handler.toml"
    f.write_text('smtp_port = 2525\nmailboxes = ["Enquiries@Clinic.Example", "x@clinic.example"]\n'
                 'relay_starttls = true\n')
    s = load_settings({"HANDLER_SMTP_PORT": "2626"}, f)
    assert s.smtp_port == 2626
    assert s.mailboxes == ("enquiries@clinic.example", "x@clinic.example")
    assert s.relay_starttls is True


def test_plain_postgresql_url_gets_our_driver() -> None:
    s = load_settings({"HANDLER_DATABASE_URL": "postgresql://user@db:5432/clinic"}, None)
    assert s.sqlalchemy_url == "postgresql+psycopg://user@db:5432/clinic"


@pytest.mark.parametrize(("env", "needle"), [
    ({"HANDLER_SMTP_PORT": "x"}, "HANDLER_SMTP_PORT"),
    ({"HANDLER_RELAY_STARTTLS": "maybe"}, "HANDLER_RELAY_STARTTLS"),
    ({"HANDLER_NO_SUCH": "1"}, "HANDLER_NO_SUCH"),
])
def test_bad_values_are_reported(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_settings(env, None)


def test_example_config_file_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "handler.example.toml"
    s = load_settings({}, example)
    assert s.smtp_port == 8025
