"""Patient text is data, end to end: encoded CR/LF in a subject or name cannot add a header
to what we send, and template syntax in a message is never compiled."""

from __future__ import annotations

import aiosmtplib

from handler.app import Service
from tests.builders import encode_word, plain_email
from tests.conftest import CLINIC, Sink

INJECTION = "Help\r\nBcc: victim@elsewhere.example\r\nX-Injected: yes\r\n\r\nfake body"


async def test_encoded_line_breaks_cannot_inject_headers(service: Service, sink: Sink) -> None:
    raw = plain_email(
        "My breast biopsy showed cancer. {{ 7*7 }} {% if true %}compiled{% endif %} "
        "{{ clinic.phone }}",
        sender=f"{encode_word('Eve' + INJECTION)} <eve@example.net>",
        subject=encode_word(INJECTION), encode_headers=False,
        headers=[("Comments", encode_word(INJECTION, encoding="b"))])
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=service.smtp_port) as client:
        await client.sendmail("eve@example.net", [CLINIC], raw)
    received = await sink.wait_for(2)

    for envelope, message in sink.messages:
        assert envelope.rcpt_tos in (["eve@example.net"], ["breast-team@clinic.example"])
        assert "victim@elsewhere.example" not in envelope.rcpt_tos
        assert message["Bcc"] is None and message["X-Injected"] is None
        assert "\n" not in str(message["Subject"]) and "\r" not in str(message["Subject"])
        for name, value in message.items():
            assert "\n" not in str(value) and "\r" not in str(value), name
    note = next(m for m in received if m["To"] == "breast-team@clinic.example")
    assert "Bcc: victim@elsewhere.example" in str(note["Subject"])  # kept as words, one line
    text = note.get_body(("plain",)).get_content()
    html = note.get_body(("html",)).get_content()
    assert "showed cancer. {{ 7*7 }} {% if true %}compiled{% endif %} {{ clinic.phone }}" in text
    assert "showed cancer. {{ 7*7 }}" in html
