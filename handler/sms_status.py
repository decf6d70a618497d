"""Twilio delivery status callbacks -> the outbox row they are about.

Callbacks may arrive twice, late or out of order, so the stored status only moves forward
(queued < sending < sent < delivered/undelivered/failed < read). The row is found by the key
our transport put in the callback URL (the row's idempotency key), or else by the Message SID.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from handler import store
from handler.models import Enquiry, OutboxItem
from handler.sms_policy import OPTED_OUT_CODE, contact_for_number, opt_out

log = logging.getLogger("handler.sms")

_RANK = {
    "": -1, "accepted": 0, "scheduled": 0, "written": 1, "queued": 1, "sending": 2, "sent": 3,
    "delivered": 4, "undelivered": 4, "failed": 4, "canceled": 4, "partially_delivered": 4,
    "read": 5,
}
UNDELIVERED = frozenset({"undelivered", "failed"})


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    sid: str
    status: str
    error_code: str = ""
    key: str = ""


def parse_status(form: Mapping[str, str], key: str = "") -> StatusUpdate:
    sid = (form.get("MessageSid") or form.get("SmsSid") or "").strip()
    status = (form.get("MessageStatus") or form.get("SmsStatus") or "").strip().lower()
    if not sid or not status:
        raise ValueError("not a status callback: MessageSid and MessageStatus are required")
    code = (form.get("ErrorCode") or "").strip()
    return StatusUpdate(sid=sid[:64], status=status[:32], error_code=code[:32], key=key[:255])


def advance_status(current: str, new: str) -> str:
    """The status to keep: `new` only if it is further along than `current`."""
    return new if _RANK.get(new, 1) > _RANK.get(current, 1) else current


def record_status(session: Session, update: StatusUpdate, now: datetime) -> bool:
    """Apply one callback; False when no outbox row matches it."""
    item = None
    if update.key:
        item = session.scalars(select(OutboxItem).where(
            OutboxItem.message_id == update.key, OutboxItem.channel == "sms")).first()
    if item is None:
        item = session.scalars(select(OutboxItem).where(
            OutboxItem.provider_id == update.sid, OutboxItem.channel == "sms")).first()
    if item is None:
        log.warning("status callback for an unknown message (%s)", update.status)
        return False
    if not item.provider_id:
        item.provider_id = update.sid  # the callback beat the dispatcher's own record
    before = item.delivery_status
    after = advance_status(before, update.status)
    if after == before:
        return True  # a repeat, or a late callback about an earlier stage
    item.delivery_status = after
    if update.error_code:
        item.error_code = update.error_code
        item.last_error = f"twilio status {after}, error {update.error_code}"
    if after in UNDELIVERED:
        enquiry = session.get(Enquiry, item.enquiry_id) if item.enquiry_id else None
        store.record_event(session, "sms-undelivered", now, enquiry=enquiry, outbox=item.id,
                           status=after, code=update.error_code)
        log.warning("outbox %d: SMS %s (error %s)", item.id, after, update.error_code or "none")
        if update.error_code == OPTED_OUT_CODE:
            contact = contact_for_number(session, item.recipient, now)
            opt_out(session, contact, now, source=f"twilio error {OPTED_OUT_CODE}",
                    enquiry=enquiry)
    return True
