"""Personal data: find a person, erase what we hold about them, purge expired enquiries.

Erasure blanks message text, subjects, headers, raw sources and rendered copies, deletes
attachments, and replaces the contact's address, number and name with a pseudonym; enquiry
rows stay with their category, team, priority and dates so that counts still add up. The
retention purge applies the same erasure to closed enquiries older than `retention_days`.
"""

from __future__ import annotations

import asyncio
import logging
import mailbox
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from handler import store
from handler.clock import Clock
from handler.config import Settings
from handler.models import Attachment, Blob, Contact, Enquiry, Event, Message, OutboxItem, Reminder
from handler.parse_email import normalise_address
from handler.parse_sms import normalise_number

log = logging.getLogger("handler.privacy")

ERASED = "[erased]"
ERASED_STATUS = "erased"
"""Enquiry status once its personal data is gone (counts by category and team remain)."""
_EMAIL = re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@[\w-]+(?:\.[\w-]+)+")
_PHONE = re.compile(r"(?<![\w-])(?!\d{4}-\d\d-\d\d)\+?\d[\d ()-]{7,}\d(?![\w-])")
_REFERENCE = re.compile(r"^\s*ENQ-[A-Z0-9]{6}\s*$", re.IGNORECASE)
_BATCH = 200


class NotFound(LookupError):
    pass


@dataclass(slots=True)
class Erasure:
    """What an erasure or purge changed (counts only: safe to print, log and store)."""

    contacts: int = 0
    enquiries: int = 0
    messages: int = 0
    attachments: int = 0
    blobs: int = 0
    outbox: int = 0
    cancelled: int = 0
    events: int = 0
    local_copies: list[str] = field(default_factory=list)
    """Provider ids of copies the embedded transports wrote to disk ("maildir:...")."""

    def add(self, other: Erasure) -> None:
        for f in fields(self):
            if f.name == "local_copies":
                self.local_copies += other.local_copies
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def counts(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "local_copies"}


def find_contacts(session: Session, who: Sequence[str]) -> list[Contact]:
    """Contacts named by email address, phone number or enquiry reference (in any mix)."""
    found: dict[int, Contact] = {}
    for value in who:
        contact = _find_contact(session, value)
        if contact is None:
            raise NotFound(f"no contact or enquiry matches {_describe(value)}")
        found[contact.id] = contact
    return list(found.values())


def _find_contact(session: Session, value: str) -> Contact | None:
    if _REFERENCE.match(value):
        enquiry = session.scalars(select(Enquiry).where(
            Enquiry.reference == value.strip().upper())).first()
        return session.get(Contact, enquiry.contact_id) if enquiry else None
    if "@" in value:
        address = normalise_address(value)
        return session.scalars(select(Contact).where(Contact.email == address)).first()
    number = normalise_number(value)
    if number is None:
        return None
    return session.scalars(select(Contact).where(Contact.phone == number)).first()


def _describe(value: str) -> str:
    return value.strip() if _REFERENCE.match(value) else "the value given"


@dataclass(frozen=True, slots=True)
class Holdings:
    """Every row that holds data about a set of contacts."""

    contacts: list[Contact]
    enquiries: list[Enquiry]
    messages: list[Message]
    outbox: list[OutboxItem]
    reminders: list[Reminder]
    events: list[Event]


def holdings(session: Session, contacts: Sequence[Contact]) -> Holdings:
    contact_ids = [c.id for c in contacts]
    enquiries = list(session.scalars(select(Enquiry).where(
        Enquiry.contact_id.in_(contact_ids)).order_by(Enquiry.id)))
    return _rows(session, contacts, enquiries)


def _rows(session: Session, contacts: Sequence[Contact], enquiries: Sequence[Enquiry]
          ) -> Holdings:
    contact_ids = [c.id for c in contacts]
    enquiry_ids = [e.id for e in enquiries]
    addresses = [a for c in contacts for a in (c.email, c.phone) if a]
    messages = list(session.scalars(select(Message).where(
        Message.contact_id.in_(contact_ids) | Message.enquiry_id.in_(enquiry_ids))
        .order_by(Message.id)))
    outbox = list(session.scalars(select(OutboxItem).where(
        OutboxItem.contact_id.in_(contact_ids) | OutboxItem.enquiry_id.in_(enquiry_ids)
        | OutboxItem.recipient.in_(addresses)).order_by(OutboxItem.id)))
    reminders = list(session.scalars(select(Reminder).where(
        Reminder.enquiry_id.in_(enquiry_ids)).order_by(Reminder.id)))
    events = list(session.scalars(select(Event).where(
        Event.contact_id.in_(contact_ids) | Event.enquiry_id.in_(enquiry_ids))
        .order_by(Event.id)))
    return Holdings(list(contacts), list(enquiries), messages, outbox, reminders, events)


# --- erasure --------------------------------------------------------------------------------

def erase_contacts(
    session: Session, contacts: Sequence[Contact], now: datetime, *, actor: str = "cli",
) -> Erasure:
    """Erase everything held about `contacts` and record that we did (no personal data in
    the record). The caller commits, then removes `local_copies` from disk."""
    rows = holdings(session, contacts)
    result = _erase_rows(session, rows, _secrets(contacts), now)
    for contact in contacts:
        _pseudonymise(contact, now)
        result.contacts += 1
    for contact in contacts:
        store.record_event(session, "personal-data-erased", now, contact=contact, actor=actor,
                           **result.counts())
    log.info("personal data erased: %s", _format_counts(result))
    return result


def purge_expired(session: Session, now: datetime, *, retention_days: int) -> Erasure:
    """Erase closed enquiries (and stray inbound mail) older than the retention period;
    contacts left with nothing but erased enquiries are pseudonymised too."""
    total = Erasure()
    if retention_days <= 0:
        return total
    cutoff = now - timedelta(days=retention_days)
    while True:
        enquiries = list(session.scalars(
            select(Enquiry).where(Enquiry.status == "closed", Enquiry.closed_at < cutoff)
            .order_by(Enquiry.id).limit(_BATCH)))
        if not enquiries:
            break
        contacts = list(session.scalars(select(Contact).where(
            Contact.id.in_({e.contact_id for e in enquiries}))))
        rows = _rows(session, [], enquiries)
        total.add(_erase_rows(session, rows, _secrets(contacts), now))
        session.flush()
    stray = list(session.scalars(select(Message).where(
        Message.enquiry_id.is_(None), Message.created_at < cutoff,
        (Message.text != "") | (Message.subject != "") | Message.raw.is_not(None))))
    total.add(_erase_rows(session, Holdings([], [], stray, [], [], []), [], now))
    total.add(_retire_contacts(session, cutoff, now))
    if total.enquiries or total.messages or total.contacts:
        store.record_event(session, "retention-purge", now, retention_days=retention_days,
                           **total.counts())
        log.info("retention purge (%d days): %s", retention_days, _format_counts(total))
    return total


def _retire_contacts(session: Session, cutoff: datetime, now: datetime) -> Erasure:
    result = Erasure()
    live = select(Enquiry.contact_id).where(Enquiry.status != ERASED_STATUS)
    recent = select(Message.contact_id).where(Message.created_at >= cutoff,
                                              Message.contact_id.is_not(None))
    candidates = session.scalars(select(Contact).where(
        Contact.erased_at.is_(None), Contact.created_at < cutoff,
        Contact.id.in_(select(Enquiry.contact_id)), Contact.id.not_in(live),
        Contact.id.not_in(recent)))
    for contact in candidates:
        rows = holdings(session, [contact])
        result.add(_erase_rows(session, rows, _secrets([contact]), now))
        _pseudonymise(contact, now)
        result.contacts += 1
    return result


def _erase_rows(session: Session, rows: Holdings, secrets: list[str], now: datetime) -> Erasure:
    result = Erasure()
    ids = [m.id for m in rows.messages]
    attachments = session.execute(select(Attachment.id, Attachment.sha256).where(
        Attachment.message_id.in_(ids))).all()
    shas = {sha for _id, sha in attachments if sha}
    if attachments:
        session.execute(delete(Attachment).where(Attachment.id.in_([a for a, _ in attachments])))
        result.attachments = len(attachments)
    for message in rows.messages:
        session.expire(message, ["attachments"])
        if message.sender == ERASED and message.raw is None:
            continue  # erased before
        message.subject = message.text = ""
        message.html = None
        message.raw = None
        message.headers = {}
        message.recipients = []
        message.defects = []
        message.sender = ERASED
        # a space: no Message-ID we parse can ever match it, so nothing threads here again
        message.external_id = f"erased {message.id}"
        result.messages += 1
    session.flush()
    for sha in shas:
        still_used = session.scalar(select(Attachment.id).where(Attachment.sha256 == sha)
                                    .limit(1))
        blob = session.get(Blob, sha)
        if still_used is None and blob is not None:
            session.delete(blob)
            result.blobs += 1
    for item in rows.outbox:
        if item.recipient == ERASED:
            continue
        if item.status == "pending":
            item.status = "cancelled"
            item.cancel_reason = "personal data erased"
            result.cancelled += 1
        if item.provider_id.startswith(("maildir:", "file:")):
            result.local_copies.append(item.provider_id)
        item.rendered = None
        item.context = {}
        item.recipient = ERASED
        item.last_error = scrub(item.last_error, secrets)
        item.message_id = f"erased {item.id}"
        result.outbox += 1
    for reminder in rows.reminders:
        if reminder.status == "pending":
            reminder.status = "cancelled"
            reminder.cancelled_at = now
            reminder.cancel_reason = "personal data erased"
    for event in rows.events:
        cleaned = _scrub_value(event.detail, secrets)
        if cleaned != event.detail:
            event.detail = cleaned
            result.events += 1
    for enquiry in rows.enquiries:
        if enquiry.status == ERASED_STATUS:
            continue
        enquiry.subject = ""
        enquiry.decision = {k: enquiry.decision.get(k) for k in
                            ("rule", "category", "priority", "teams", "tags", "ruleset_version")
                            if k in enquiry.decision}
        if enquiry.status == "open":
            enquiry.closed_at = now
        enquiry.status = ERASED_STATUS
        enquiry.updated_at = now
        result.enquiries += 1
    return result


def _pseudonymise(contact: Contact, now: datetime) -> None:
    contact.email = f"erased-{contact.id}@erased.invalid" if contact.email else None
    contact.phone = f"erased-{contact.id}" if contact.phone else None
    contact.name = ""
    contact.email_suppressed_reason = ""
    contact.erased_at = now


def _secrets(contacts: Iterable[Contact]) -> list[str]:
    found = []
    for c in contacts:
        found += [v for v in (c.email, c.phone, c.name) if v and len(v) >= 3]
        if c.phone:
            found.append(c.phone.lstrip("+"))
    return found


def scrub(text: str, secrets: Sequence[str] = ()) -> str:
    """`text` without email addresses, phone numbers or the given values."""
    for secret in secrets:
        text = re.sub(re.escape(secret), ERASED, text, flags=re.IGNORECASE)
    return _PHONE.sub(ERASED, _EMAIL.sub(ERASED, text))


def _scrub_value(value: Any, secrets: Sequence[str]) -> Any:
    if isinstance(value, str):
        return scrub(value, secrets)
    if isinstance(value, dict):
        return {k: _scrub_value(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_value(v, secrets) for v in value]
    return value


def _format_counts(result: Erasure) -> str:
    return ", ".join(f"{n} {name}" for name, n in result.counts().items() if n) or "nothing"


def remove_local_copies(settings: Settings, provider_ids: Iterable[str]) -> int:
    """Delete the copies the embedded Maildir / SMS-folder transports wrote for these rows."""
    removed = 0
    box = None
    for provider_id in provider_ids:
        kind, _, key = provider_id.partition(":")
        try:
            if kind == "maildir" and settings.maildir_path.is_dir():
                box = box or mailbox.Maildir(str(settings.maildir_path), create=False)
                if key in box:
                    box.discard(key)
                    removed += 1
            elif kind == "file":
                path = settings.sms_dir_path / Path(key).name
                if path.exists():
                    path.unlink()
                    removed += 1
        except OSError as exc:
            log.warning("could not remove a local delivery copy: %s", type(exc).__name__)
    return removed


class RetentionJob:
    """The nightly purge (registered with the scheduler when retention_days > 0)."""

    def __init__(self, *, sessions: sessionmaker[Session], clock: Clock,
                 settings: Settings) -> None:
        self._sessions = sessions
        self._clock = clock
        self._settings = settings

    async def __call__(self) -> Erasure:
        try:
            return await asyncio.to_thread(self.run)
        except Exception:
            log.exception("retention purge failed; it runs again tomorrow")
            return Erasure()

    def run(self) -> Erasure:
        with self._sessions() as session, session.begin():
            result = purge_expired(session, self._clock.now(),
                                   retention_days=self._settings.retention_days)
        remove_local_copies(self._settings, result.local_copies)
        return result
