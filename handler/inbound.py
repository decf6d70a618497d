"""The channel-neutral inbound message, built at the edge (SMTP or SMS webhook).

Only `parse_email` and `parse_sms` see `email.message.Message` objects or Twilio form
fields; everything after them works on `InboundMessage`. Addresses are normalised once:
lower-case bare email addresses, E.164 phone numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Channel(StrEnum):
    EMAIL = "email"
    SMS = "sms"


@dataclass(frozen=True, slots=True)
class Attachment:
    """One attachment (email part with a filename or non-text body, or MMS media)."""

    filename: str
    content_type: str
    size: int
    sha256: str
    data: bytes = field(repr=False, default=b"")
    url: str | None = None  # MMS media lives at Twilio; we keep the URL, not the bytes


@dataclass(frozen=True, slots=True)
class InboundMessage:
    channel: Channel
    external_id: str
    """Message-ID (without <>) for email, MessageSid for SMS. Intake is idempotent on it."""
    sender: str
    """Normalised: lower-case bare email address, or E.164 phone number."""
    sender_name: str = ""
    mailbox: str = ""
    """Which of our addresses / numbers it was sent to (normalised)."""
    recipients: tuple[str, ...] = ()
    subject: str = ""
    text: str = ""
    """Readable body text (HTML-only mail converted to text)."""
    html: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    """Selected headers, lower-case names, decoded, CR/LF removed."""
    attachments: tuple[Attachment, ...] = ()
    raw: bytes = field(repr=False, default=b"")
    defects: tuple[str, ...] = ()
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()
    envelope_from: str | None = None
    """SMTP MAIL FROM (Return-Path); "" for the null sender <>; None for SMS."""

    @property
    def thread_ids(self) -> tuple[str, ...]:
        """Message-IDs this message says it answers (In-Reply-To first, then References)."""
        ids = [self.in_reply_to] if self.in_reply_to else []
        ids += [r for r in reversed(self.references) if r != self.in_reply_to]
        return tuple(ids)
