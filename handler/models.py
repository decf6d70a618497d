"""The database schema: SQLAlchemy 2 typed models. UTC-aware timestamps everywhere.

The database is the queue: every outbound intent is an `OutboxItem` row with a status an
administrator can see, and every reminder a `Reminder` row.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC; always returns timezone-aware datetimes (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class Contact(Base):
    __tablename__ = "contact"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str | None] = mapped_column(String(320), unique=True)
    phone: Mapped[str | None] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    sms_opted_out_at: Mapped[datetime | None]
    email_suppressed_at: Mapped[datetime | None]
    """Set by a hard bounce; cleared when the person writes in again."""
    email_suppressed_reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime]
    erased_at: Mapped[datetime | None]


class Enquiry(Base):
    __tablename__ = "enquiry"

    id: Mapped[int] = mapped_column(primary_key=True)
    reference: Mapped[str] = mapped_column(String(32), unique=True)
    contact_id: Mapped[int] = mapped_column(ForeignKey("contact.id"), index=True)
    channel: Mapped[str] = mapped_column(String(8))
    mailbox: Mapped[str] = mapped_column(String(320), default="")
    subject: Mapped[str] = mapped_column(Text, default="")
    category: Mapped[str] = mapped_column(String(64))
    priority: Mapped[str] = mapped_column(String(16))
    team: Mapped[str] = mapped_column(String(64))
    teams: Mapped[list[Any]] = mapped_column(default=list)
    tags: Mapped[list[Any]] = mapped_column(default=list)
    rule: Mapped[str] = mapped_column(String(128))
    reply_template: Mapped[str | None] = mapped_column(String(128))
    notify_template: Mapped[str | None] = mapped_column(String(128))
    decision: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """The whole Decision as JSON, trace included: why this enquiry went where it went."""
    ruleset_version: Mapped[str] = mapped_column(String(64), default="")
    status: Mapped[str] = mapped_column(String(16), default="open", index=True)
    created_at: Mapped[datetime] = mapped_column(index=True)
    updated_at: Mapped[datetime]
    last_inbound_at: Mapped[datetime]
    last_staff_reply_at: Mapped[datetime | None]
    closed_at: Mapped[datetime | None]

    contact: Mapped[Contact] = relationship()
    messages: Mapped[list[Message]] = relationship(
        back_populates="enquiry", order_by="Message.id"
    )


class Message(Base):
    """One message in either direction. Raw source is kept for inbound email."""

    __tablename__ = "message"
    __table_args__ = (UniqueConstraint("channel", "direction", "external_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    enquiry_id: Mapped[int | None] = mapped_column(ForeignKey("enquiry.id"), index=True)
    contact_id: Mapped[int | None] = mapped_column(ForeignKey("contact.id"), index=True)
    direction: Mapped[str] = mapped_column(String(3))  # "in" | "out"
    channel: Mapped[str] = mapped_column(String(8))
    external_id: Mapped[str] = mapped_column(String(255))
    sender: Mapped[str] = mapped_column(String(320))
    recipients: Mapped[list[Any]] = mapped_column(default=list)
    subject: Mapped[str] = mapped_column(Text, default="")
    text: Mapped[str] = mapped_column(Text, default="")
    html: Mapped[str | None] = mapped_column(Text)
    headers: Mapped[dict[str, Any]] = mapped_column(default=dict)
    raw: Mapped[bytes | None] = mapped_column(LargeBinary)
    defects: Mapped[list[Any]] = mapped_column(default=list)
    kind: Mapped[str] = mapped_column(String(16), default="enquiry")
    """"enquiry" | "reply" | "bounce" | "auto-reply" | "internal" (from our own side) |
    "opt-out" | "opt-in" | "help"."""
    created_at: Mapped[datetime]

    enquiry: Mapped[Enquiry | None] = relationship(back_populates="messages")
    attachments: Mapped[list[Attachment]] = relationship(order_by="Attachment.id")


class Blob(Base):
    """Attachment content, addressed by SHA-256 so the same file is stored once."""

    __tablename__ = "blob"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int]
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Attachment(Base):
    __tablename__ = "attachment"

    id: Mapped[int] = mapped_column(primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("message.id"), index=True)
    filename: Mapped[str] = mapped_column(Text, default="")
    content_type: Mapped[str] = mapped_column(String(255))
    size: Mapped[int]
    sha256: Mapped[str | None] = mapped_column(ForeignKey("blob.sha256"))
    url: Mapped[str | None] = mapped_column(Text)


OUTBOX_WORK = "status IN ('pending', 'sending')"
"""The outbox rows the dispatcher may claim, as SQL: the predicate of `ix_outbox_item_work`,
which a query must repeat word for word for SQLite to use that index."""


class OutboxItem(Base):
    """One outbound intent. Rendered at send time; the rendered copy is kept once sent."""

    __tablename__ = "outbox_item"
    __table_args__ = (
        # The dispatcher's claim walks this in its own order and stops at its batch size.
        # Partial: rows that were sent, failed or cancelled (nearly all of them) are not in it,
        # and a plain index scan marks the entries of rows that left it as dead as it passes,
        # where a bitmap scan of a (status, due_at) index visited every entry left behind by
        # the last vacuum's time at every claim.
        Index("ix_outbox_item_work", text("urgent DESC"), "due_at", "id",
              postgresql_where=text(OUTBOX_WORK), sqlite_where=text(OUTBOX_WORK)),
        # intake counts a sender's recent acknowledgements for every inbound message
        Index("ix_outbox_item_recipient", "recipient", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    enquiry_id: Mapped[int | None] = mapped_column(ForeignKey("enquiry.id"), index=True)
    contact_id: Mapped[int | None] = mapped_column(ForeignKey("contact.id"), index=True)
    reminder_id: Mapped[int | None] = mapped_column(ForeignKey("reminder.id"))
    kind: Mapped[str] = mapped_column(String(16))
    """"ack" | "notify" | "reminder" | "help" | "escalation"."""
    channel: Mapped[str] = mapped_column(String(8))
    recipient: Mapped[str] = mapped_column(String(320))
    template: Mapped[str] = mapped_column(String(128))
    context: Mapped[dict[str, Any]] = mapped_column(default=dict)
    urgent: Mapped[bool] = mapped_column(default=False)
    message_id: Mapped[str] = mapped_column(String(255), unique=True)
    """Our RFC 5322 Message-ID (email) or idempotency key (SMS), fixed at creation."""
    status: Mapped[str] = mapped_column(String(16), default="pending")
    """pending | sending | sent | failed | cancelled."""
    due_at: Mapped[datetime]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_until: Mapped[datetime | None]
    last_error: Mapped[str] = mapped_column(Text, default="")
    error_code: Mapped[str] = mapped_column(String(32), default="")
    provider_id: Mapped[str] = mapped_column(String(255), default="")
    delivery_status: Mapped[str] = mapped_column(String(32), default="")
    rendered: Mapped[dict[str, Any] | None]
    cancel_reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime]
    sent_at: Mapped[datetime | None]


class Reminder(Base):
    __tablename__ = "reminder"

    id: Mapped[int] = mapped_column(primary_key=True)
    enquiry_id: Mapped[int] = mapped_column(ForeignKey("enquiry.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    template: Mapped[str] = mapped_column(String(128))
    to: Mapped[str] = mapped_column(String(16), default="team")
    unless: Mapped[str] = mapped_column(String(32), default="answered")
    due_at: Mapped[datetime] = mapped_column(index=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    created_at: Mapped[datetime]
    cancelled_at: Mapped[datetime | None]
    cancel_reason: Mapped[str] = mapped_column(Text, default="")


class Event(Base):
    """Audit trail: who did what, when. Never holds message text."""

    __tablename__ = "event"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    kind: Mapped[str] = mapped_column(String(64))
    enquiry_id: Mapped[int | None] = mapped_column(ForeignKey("enquiry.id"), index=True)
    contact_id: Mapped[int | None] = mapped_column(ForeignKey("contact.id"), index=True)
    actor: Mapped[str] = mapped_column(String(64), default="system")
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
