"""The SMS consent ledger and the rules every outbound text obeys, on a caller's Session.

`opt_out` / `opt_in` keep `Contact.sms_opted_out_at` (set by STOP, by Twilio's error 21610,
cleared by START) and cancel pending texts with a reason. `SmsGate.admit` runs when the
dispatcher claims rows: texts to opted-out numbers are cancelled, non-urgent ones claimed
during quiet hours go back to the queue, due when the quiet period ends.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Row, case, select, update
from sqlalchemy.orm import Session

from handler import store
from handler.config import ConfigError, Settings
from handler.logs import pseudonym
from handler.models import Contact, Enquiry, OutboxItem
from handler.quiet import QuietHours, parse_quiet_hours, release_time
from handler.transports import Outcome, SendResult

log = logging.getLogger("handler.sms")

OPTED_OUT_CODE = "21610"  # Twilio: "Attempt to send to unsubscribed recipient"
_E164_RE = re.compile(r"^\+[1-9]\d{6,14}$")


def contact_for_number(session: Session, number: str, now: datetime) -> Contact:
    """The contact holding this number's consent state (created if we never met it)."""
    contact = session.scalars(select(Contact).where(Contact.phone == number)).first()
    if contact is None:
        contact = Contact(phone=number, created_at=now)
        session.add(contact)
        session.flush()
    return contact


def opt_out(
    session: Session, contact: Contact, now: datetime, *, source: str,
    enquiry: Enquiry | None = None,
) -> int:
    """Stop all SMS to the contact's number; returns how many pending texts were cancelled.
    Email to the same person is not touched."""
    assert contact.phone
    already = contact.sms_opted_out_at is not None
    if not already:
        contact.sms_opted_out_at = now
    cancelled = store.cancel_pending(
        session, [OutboxItem.channel == "sms", OutboxItem.recipient == contact.phone],
        f"recipient opted out of SMS ({source})", now)
    store.record_event(session, "sms-opted-out", now, enquiry=enquiry, contact=contact,
                       source=source, cancelled=cancelled, already=already)
    log.info("sms opt-out for %s (%s); %d pending text(s) cancelled",
             pseudonym(contact.phone), source, cancelled)
    return cancelled


def opt_in(
    session: Session, contact: Contact, now: datetime, *, source: str,
    enquiry: Enquiry | None = None,
) -> None:
    was = contact.sms_opted_out_at is not None
    contact.sms_opted_out_at = None
    store.record_event(session, "sms-opted-in", now, enquiry=enquiry, contact=contact,
                       source=source, was_opted_out=was)
    log.info("sms opt-in for %s (%s)", pseudonym(contact.phone or ""), source)


def after_send(session: Session, item: OutboxItem, result: SendResult, now: datetime) -> None:
    """Consequences of one failed SMS send beyond the row itself (called by the dispatcher;
    texts that went out are marked sent, with their delivery status, in one UPDATE there)."""
    if item.channel != "sms" or result.outcome is Outcome.OK:
        return
    if result.code == OPTED_OUT_CODE:
        contact = contact_for_number(session, item.recipient, now)
        enquiry = session.get(Enquiry, item.enquiry_id) if item.enquiry_id else None
        opt_out(session, contact, now, source=f"twilio error {OPTED_OUT_CODE}", enquiry=enquiry)


class SmsGate:
    """Claim-time rules for SMS rows: consent first, then quiet hours."""

    def __init__(self, quiet: QuietHours | None) -> None:
        self.quiet = quiet

    @classmethod
    def from_settings(cls, settings: Settings) -> SmsGate:
        try:
            return cls(parse_quiet_hours(settings.quiet_hours, settings.timezone))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def admit(self, session: Session, rows: Sequence[Row[Any]], now: datetime
              ) -> list[Row[Any]]:
        """The claimed rows (`store.claim_due_outbox`) that may be sent now; the others are
        cancelled or put back."""
        numbers = {row.recipient for row in rows if row.channel == "sms"}
        if not numbers:
            return list(rows)
        opted_out = set(session.scalars(select(Contact.phone).where(
            Contact.phone.in_(numbers), Contact.sms_opted_out_at.is_not(None))))
        release = release_time(now, self.quiet)
        admitted: list[Row[Any]] = []
        held: list[int] = []
        for row in rows:
            if row.channel != "sms":
                admitted.append(row)
            elif not _E164_RE.match(row.recipient):
                self._cancel(session, row.id, "recipient is not a phone number", now)
            elif row.recipient in opted_out:
                self._cancel(session, row.id, "recipient opted out of SMS", now)
            elif release is not None and not row.urgent:
                held.append(row.id)
            else:
                admitted.append(row)
        if held:  # one UPDATE for the batch: a burst at night puts back hundreds at a time
            assert release is not None
            session.execute(
                update(OutboxItem).where(OutboxItem.id.in_(held)).values(
                    status="pending", due_at=release, lease_until=None,
                    # this claim was not an attempt
                    attempts=case((OutboxItem.attempts > 0, OutboxItem.attempts - 1), else_=0)),
                execution_options={"synchronize_session": "fetch"})
            log.info("%d text(s) claimed in quiet hours, held until %s (outbox %s)", len(held),
                     release.isoformat(), _ids(held))
        return admitted

    def _cancel(self, session: Session, item_id: int, reason: str, now: datetime) -> None:
        item = _claimed(session, item_id)
        item.status = "cancelled"
        item.cancel_reason = reason
        item.lease_until = None
        item.attempts = max(item.attempts - 1, 0)
        enquiry = session.get(Enquiry, item.enquiry_id) if item.enquiry_id else None
        store.record_event(session, "sms-cancelled", now, enquiry=enquiry, outbox=item.id,
                           outbox_kind=item.kind, reason=reason)
        log.info("outbox %d cancelled: %s", item.id, reason)


def _claimed(session: Session, item_id: int) -> OutboxItem:
    item = session.get(OutboxItem, item_id)
    assert item is not None  # claimed in this very transaction
    return item


def _ids(ids: Sequence[int], shown: int = 10) -> str:
    """A log-sized list of row ids."""
    head = ", ".join(str(i) for i in ids[:shown])
    return head + (f" and {len(ids) - shown} more" if len(ids) > shown else "")
