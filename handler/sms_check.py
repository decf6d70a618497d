"""`handler check` for the SMS side: every SMS template's encoding and segment count with
sample data, the templates the service sends on its own (`help`, the HELP keyword reply)
even when no rule names them, and the SMS settings (quiet hours, Twilio sender, public URL).
"""

from __future__ import annotations

from collections.abc import Iterable

from handler.config import ConfigError, Settings
from handler.render import TemplateError, Templates, sample_context, sms_segments
from handler.sms_keywords import HELP_TEMPLATE
from handler.sms_policy import SmsGate


def segment_report(templates: Templates, max_segments: int) -> list[str]:
    """One line per SMS template: "sms/help.txt: GSM-7, 1 segment(s), 142 characters"."""
    lines = []
    for name in sorted(templates.names()["sms"]):
        try:
            text = templates.render_sms(name, sample_context())
        except TemplateError:
            continue  # `check` names the error
        encoding, segments = sms_segments(text)
        over = f"  > limit {max_segments}" if segments > max_segments else ""
        lines.append(f"  sms/{name}.txt: {encoding}, {segments} segment(s), "
                     f"{len(text)} characters{over}")
    return lines


def check_sms(settings: Settings, templates: Templates, checked: Iterable[str]) -> list[str]:
    """Problems not already covered by the rules' own template check (`checked`)."""
    problems: list[str] = []
    try:
        SmsGate.from_settings(settings)
    except ConfigError as exc:
        problems.append(f"configuration: {exc}")
    if settings.twilio_account_sid and settings.twilio_auth_token and not settings.twilio_from:
        problems.append("configuration: twilio_from is required with Twilio credentials")
    if not settings.public_url.startswith(("https://", "http://")):
        problems.append(f"configuration: public_url {settings.public_url!r} is not a URL")
    extra = ({HELP_TEMPLATE} | templates.names()["sms"]) - set(checked)
    problems += templates.check(sorted(extra), max_sms_segments=settings.sms_max_segments)
    return problems
