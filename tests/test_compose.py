"""Outbound mail is written straight to bytes (handler/compose.py): the stdlib's own parser must
read back every header and both bodies exactly as meant, whatever the text, and the relay and
Maildir transports must carry those bytes as they are (SMTPUTF8 only for non-ASCII addresses)."""

from __future__ import annotations

import asyncio
import mailbox
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.header import decode_header, make_header
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from handler.compose import ComposedEmail, compose_email
from handler.render import RenderedEmail
from handler.smtp_out import RelayTransport
from handler.transports import MaildirTransport, Outcome

CLINIC = "enquiries@clinic.example"
DATE = datetime(2026, 11, 25, 20, 30, 13, tzinfo=UTC)
INJECTION = "\r\nBcc: victim@elsewhere.example\r\nX-Injected: yes\r\n\r\nfake body"
LONG_LINE = "word " * 300  # 1,500 characters, no line break


@dataclass
class Case:
    subject: str = "Your enquiry"
    name: str = "Northfield Clinic"
    text: str = "Dear Jane,\n\nThank you for your message.\n"
    html: str = "<p>Dear Jane,</p>\n<p>Thank you for your message.</p>\n"
    reference: str = "ENQ-7K3QXM"
    reply_to: str | None = None
    in_reply_to: str | None = "CAxyz.123@mail.example.org"
    references: list[str] = field(default_factory=lambda: [
        "root@mail.example.org", "CAxyz.123@mail.example.org"])
    recipient: str = "jane@example.org"


CASES = {
    "ascii": Case(),
    "accents": Case(subject="Votre demande a été reçue, Zoë", name="Clinique Saint-Étienne",
                    text="Bonjour Zoë,\n\nNous avons bien reçu votre message à 14 h.\n",
                    html="<p>Bonjour Zoë, à bientôt.</p>\n"),
    "cjk": Case(subject="ご予約についてのお問い合わせを受け付けました。"
                        "担当者より折り返しご連絡いたします",
                name="東京クリニック",
                text="山田様\n\nお問い合わせありがとうございます。\n" * 5,
                html="<p>山田様、お問い合わせありがとうございます。</p>\n"),
    "emoji": Case(subject="Thanks 😀 we got it 🎉🎉", name="Clinic 🏥",
                  text="See you soon 👋\n", html="<p>See you soon 👋</p>\n"),
    "long subject": Case(subject="Re: " + "about my appointment next week " * 12
                         + "x" * 120 + " and the end"),
    "long body lines": Case(text=LONG_LINE + "\n" + "é" * 1200 + "\nshort\n",
                            html="<p>" + LONG_LINE + "</p>\n"),
    "injection": Case(subject="Help" + INJECTION, name="Clinic" + INJECTION,
                      reply_to="jane@example.org" + INJECTION),
    "no html": Case(html=""),
    "reference in subject": Case(subject="Re: your enquiry ENQ-7K3QXM about scans"),
    "encoded-word lookalike": Case(subject="Subject =?utf-8?q?not=20decoded?= stays",
                                   name="=?utf-8?q?Not_a_word?="),
    "specials in name": Case(name='Dr. "Who" (Clinic), Ltd.', reply_to="jane@example.org"),
    "no thread": Case(in_reply_to=None, reference=""),
}


def compose(case: Case, *, message_id: str = "abc.123@clinic.example") -> ComposedEmail:
    return compose_email(
        RenderedEmail(case.subject, case.text, case.html), sender=CLINIC,
        sender_name=case.name, recipient=case.recipient, message_id=message_id, date=DATE,
        auto_submitted="auto-replied", reference=case.reference, in_reply_to=case.in_reply_to,
        references=case.references, reply_to=case.reply_to)


def parse(data: bytes) -> EmailMessage:
    message = message_from_bytes(data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def words(text: str) -> str:
    return " ".join(text.split())


def expected_subject(case: Case) -> str:
    subject = words(case.subject)
    if case.reference and case.reference not in subject:
        subject += f" [{case.reference}]"
    return subject


def body(part: EmailMessage | None) -> str:
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_the_stdlib_reads_back_what_we_meant(case: Case) -> None:
    composed = compose(case)
    message = parse(composed.data)
    assert composed.subject == expected_subject(case)
    assert message["Subject"] == expected_subject(case)
    sender = message["From"].addresses
    assert [(a.display_name, a.addr_spec) for a in sender] == [(words(case.name), CLINIC)]
    assert message["To"] == case.recipient
    assert message["Date"].datetime == DATE
    assert message["Message-ID"] == "<abc.123@clinic.example>"
    expected = {"Subject", "From", "To", "Date", "Message-ID", "Auto-Submitted",
                "X-Auto-Response-Suppress", "Precedence", "MIME-Version", "Content-Type"}
    if case.in_reply_to:
        assert message["In-Reply-To"] == f"<{case.in_reply_to}>"
        assert message["References"] == " ".join(f"<{r}>" for r in case.references)
        expected |= {"In-Reply-To", "References"}
    if case.reply_to:
        assert message["Reply-To"].addresses[0].addr_spec == "jane@example.org"
        expected.add("Reply-To")
    if case.reference:
        assert message["X-Enquiry-Reference"] == case.reference
        expected.add("X-Enquiry-Reference")
    assert (message["Auto-Submitted"], message["X-Auto-Response-Suppress"],
            message["Precedence"], message["MIME-Version"]) == (
        "auto-replied", "All", "auto_reply", "1.0")
    if not case.html:
        expected.add("Content-Transfer-Encoding")
    assert set(message.keys()) == expected  # each once, nothing injected
    assert not message.defects
    assert all(not value.defects for key, value in message.items()
               if case is not CASES["injection"] or key != "Reply-To")  # one line, not valid

    assert body(message.get_body(("plain",))) == case.text
    if case.html:
        assert message.get_content_type() == "multipart/alternative"
        assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain",
                                                                        "text/html"]
        assert body(message.get_body(("html",))) == case.html
    else:
        assert message.get_content_type() == "text/plain"


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_lines_are_short_ascii_and_crlf(case: Case) -> None:
    data = compose(case).data
    assert data.isascii()  # 7-bit: any relay takes it
    lines = data.split(b"\r\n")
    assert b"\n" not in data.replace(b"\r\n", b"") and b"\r" not in data.replace(b"\r\n", b"")
    assert max(map(len, lines)) <= 998  # RFC 5322's hard limit
    assert max(map(len, lines)) <= 78  # and its recommendation, for everything we write


def test_bodies_use_the_lightest_transfer_encoding() -> None:
    def encodings(case: Case) -> list[str]:
        message = parse(compose(case).data)
        return [str(part["Content-Transfer-Encoding"]) for part in message.iter_parts()]

    assert encodings(CASES["ascii"]) == ["7bit", "7bit"]
    assert encodings(CASES["accents"]) == ["quoted-printable", "quoted-printable"]
    assert encodings(CASES["cjk"]) == ["base64", "base64"]
    assert encodings(CASES["long body lines"]) == ["base64", "quoted-printable"]  # é: 6 in QP


def test_a_long_display_name_is_split_into_short_encoded_words() -> None:
    """RFC 2047: at most 75 characters a word, and the space between two words is not part of
    the text. (policy.default's address parser keeps that space in display names; it does the
    same with what its own generator writes.)"""
    name = "東京セカンドオピニオンクリニック受付センター"
    data = compose(Case(name=name)).data
    raw = message_from_bytes(data, policy=policy.compat32)["From"]
    assert str(make_header(decode_header(raw))) == f"{name} <{CLINIC}>"
    encoded = [w for w in raw.split() if w.startswith("=?")]
    assert len(encoded) > 1 and max(map(len, encoded)) <= 75


def test_each_message_has_its_own_boundary() -> None:
    first, second = (parse(compose(CASES["ascii"]).data) for _ in range(2))
    assert first.get_boundary() != second.get_boundary()


def test_a_non_ascii_address_is_written_as_utf8() -> None:
    """SMTPUTF8 mail (RFC 6532): the address as it is; text headers stay encoded words."""
    case = Case(recipient="zoë@exämple.org", subject="Réponse")
    data = compose(case).data
    assert "To: zoë@exämple.org\r\n".encode() in data
    message = parse(data)
    assert message["Subject"] == "Réponse [ENQ-7K3QXM]"
    assert body(message.get_body(("plain",))) == case.text


def test_a_non_ascii_reply_to_stays_7bit_without_smtputf8() -> None:
    """No 7-bit form exists: it is written as the stdlib writes it, and the mail still goes."""
    data = compose(Case(reply_to="zoë@example.org")).data
    assert data.isascii()
    assert b"\r\nReply-To: =?utf-8?q?zo=C3=AB?=@example.org\r\n" in data


# --- transports -------------------------------------------------------------------------------


@dataclass
class Relay:
    """A real SMTP server that keeps every envelope."""

    port: int = 0
    envelopes: list[Envelope] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return "250 2.0.0 Ok: queued as RELAY" + str(len(self.envelopes))


async def start_relay(*, smtputf8: bool) -> tuple[Relay, asyncio.Server]:
    relay = Relay()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(relay, hostname="relay.test", enable_SMTPUTF8=smtputf8, loop=loop),
        "127.0.0.1", 0)
    relay.port = int(server.sockets[0].getsockname()[1])
    return relay, server


def options(envelope: Envelope) -> list[str]:
    """MAIL FROM options but SIZE (sendmail adds it whenever the server offers it)."""
    return sorted(o for o in envelope.mail_options if not o.startswith("SIZE="))


@pytest.fixture(params=[True, False], ids=["smtputf8", "ascii-only"])
async def relay(request: pytest.FixtureRequest) -> AsyncIterator[Relay]:
    relay, server = await start_relay(smtputf8=request.param)
    yield relay
    server.close()
    await server.wait_closed()


async def test_the_relay_gets_our_bytes_unchanged(relay: Relay) -> None:
    transport = RelayTransport(host="127.0.0.1", port=relay.port)
    composed = compose(CASES["long body lines"])
    try:
        result = await transport.send(composed.data, sender=CLINIC, recipient="jane@example.org")
    finally:
        await transport.close()
    assert result.outcome is Outcome.OK and result.provider_id.endswith("RELAY1")
    [envelope] = relay.envelopes
    assert envelope.mail_from == CLINIC and envelope.rcpt_tos == ["jane@example.org"]
    assert options(envelope) == ["BODY=8BITMIME"]  # as aiosmtplib's send_message asked
    assert envelope.original_content == composed.data


async def test_a_non_ascii_address_needs_smtputf8() -> None:
    """With SMTPUTF8 the mail goes out; a relay without it can never take it: permanent."""
    address = "zoë@exämple.org"
    composed = compose(Case(recipient=address))
    for smtputf8 in (True, False):
        relay, server = await start_relay(smtputf8=smtputf8)
        transport = RelayTransport(host="127.0.0.1", port=relay.port)
        try:
            result = await transport.send(composed.data, sender=CLINIC, recipient=address)
            again = await transport.send(compose(CASES["ascii"]).data, sender=CLINIC,
                                         recipient="jane@example.org")
        finally:
            await transport.close()
            server.close()
            await server.wait_closed()
        assert again.outcome is Outcome.OK  # the connection is still good for other mail
        if smtputf8:
            assert result.outcome is Outcome.OK
            first = relay.envelopes[0]
            assert first.rcpt_tos == [address]
            assert options(first) == ["BODY=8BITMIME", "SMTPUTF8"]
            assert parse(first.original_content or b"")["To"] == address
        else:
            assert result.outcome is Outcome.PERMANENT
            assert "cannot send to this address" in result.error
            assert len(relay.envelopes) == 1


async def test_maildir_keeps_the_message_with_local_line_endings(tmp_path: Path) -> None:
    transport = MaildirTransport(tmp_path / "mail")
    composed = compose(CASES["accents"])
    result = await transport.send(composed.data, sender=CLINIC, recipient="jane@example.org")
    assert result.outcome is Outcome.OK
    box = mailbox.Maildir(str(tmp_path / "mail"), create=False)
    [key] = box.keys()
    stored = box.get_bytes(key)
    assert b"\r" not in stored
    message = parse(stored)
    assert message["Delivered-To"] == "jane@example.org"
    assert message["Subject"] == composed.subject
    assert body(message.get_body(("plain",))) == CASES["accents"].text
