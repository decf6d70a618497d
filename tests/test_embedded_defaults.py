"""With no relay configured, outbound mail lands in a local Maildir (the embedded default)."""

from __future__ import annotations

import mailbox
from collections.abc import Callable
from email import message_from_bytes, policy

from handler.app import running
from handler.clock import FakeClock
from handler.config import Settings
from handler.logs import redact
from tests.conftest import eventually
from tests.test_e2e_email import PATIENT, enquiry_email, send


async def test_mail_goes_to_the_local_maildir(
    make_settings: Callable[..., Settings], clock: FakeClock
) -> None:
    settings = make_settings()
    assert settings.relay_host == ""
    async with running(settings, clock=clock) as service:
        assert "Maildir" in service.email.description
        _, response = await send(service, enquiry_email())
        reference = response.rsplit(" ", 1)[1]
        box = mailbox.Maildir(str(settings.maildir_path), create=False)
        await eventually(lambda: len(box.keys()) == 2)
    messages = [message_from_bytes(box.get_bytes(k), policy=policy.default) for k in box.iterkeys()]
    ack = next(m for m in messages if m["To"] == PATIENT)
    assert reference in ack["Subject"]
    assert ack["Delivered-To"] == PATIENT
    assert ack.get_body(("html",)) is not None


def test_log_redaction_masks_addresses_and_numbers_but_not_times() -> None:
    line = "sent to jane@example.org and +447700900123 / 07700 900123 at 2026-11-25T20:30:13"
    cleaned = redact(line)
    assert "jane@example.org" not in cleaned and "900123" not in cleaned
    assert "2026-11-25T20:30:13" in cleaned
    assert redact("outbox 12345 sent (attempt 2)") == "outbox 12345 sent (attempt 2)"
