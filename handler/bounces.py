"""Bounces: delivery status notifications matched to the outbox row they report on.

A DSN (RFC 3464 `multipart/report; report-type=delivery-status`, or an older bounce from a
null sender) never opens an enquiry and never gets a reply. We find our Message-ID in the
returned message, mark that outbox row failed with the DSN's status and diagnostic, and a
hard (5.x.x) failure suppresses further mail to the address until the person writes in.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.message import Message as MimeMessage
from email.parser import BytesParser, HeaderParser
from email.policy import compat32
from typing import Any

from sqlalchemy import Row, select, update
from sqlalchemy.orm import Session

from handler import store
from handler.config import Settings
from handler.inbound import Channel, InboundMessage
from handler.logs import pseudonym
from handler.models import Contact, Enquiry, OutboxItem
from handler.service import AcceptOutcome

log = logging.getLogger("handler.bounces")

MAX_SCAN_BYTES = 2_000_000
"""How much of a bounce we read when looking for our Message-IDs (the returned copy)."""
SUPPRESSED_REASON = "address suppressed after a hard bounce"

_REPORT_TYPE = re.compile(r"report-type\s*=\s*\"?([\w.-]+)", re.IGNORECASE)
_BOUNCE_SUBJECT = re.compile(
    r"^\s*(undeliver(ed|able)|delivery (status notification|failure|has failed)|"
    r"mail delivery (failed|failure|system)|returned mail|failure notice|"
    r"mail system error|non-?delivery|delivery notification)",
    re.IGNORECASE,
)
_BOUNCE_SENDER = re.compile(r"^(mailer-daemon|mail-daemon|postmaster)([+\-.=].*)?$")
_ENHANCED_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_SMTP_CODE = re.compile(r"\b([245])\d\d\b")
_QUOTED_REPLY = re.compile(r"\b[45]\d\d[ -]([45])\.(\d{1,3})\.(\d{1,3})\b")


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """What a bounce says about one of our messages (one recipient: we send one each)."""

    action: str = "failed"
    """failed | delayed | delivered | relayed | expanded (RFC 3464 §2.3.3)."""
    status: str = ""
    """Enhanced status code (RFC 3463), e.g. "5.1.1"; "" when the bounce gives none."""
    diagnostic: str = ""
    final_recipient: str = ""
    message_ids: tuple[str, ...] = ()
    """Message-IDs found in the returned message (ours first, if any)."""

    @property
    def hard(self) -> bool:
        """A permanent failure: the address does not work."""
        return self.action == "failed" and self.status.startswith("5")

    @property
    def failed(self) -> bool:
        return self.action == "failed"

    def summary(self) -> str:
        parts = [f"bounced ({self.action})", self.status, self.diagnostic]
        return " ".join(p for p in parts if p)


def is_bounce(msg: InboundMessage) -> bool:
    """A delivery status notification or an older-style bounce, not a person writing."""
    if msg.channel is not Channel.EMAIL:
        return False
    ctype = msg.headers.get("content-type", "").strip().lower()
    if ctype.startswith("multipart/report"):
        m = _REPORT_TYPE.search(ctype)
        if m and m.group(1).lower() == "delivery-status":
            return True
    if any(a.content_type == "message/delivery-status" for a in msg.attachments):
        return True
    robot = msg.envelope_from == "" or bool(
        _BOUNCE_SENDER.match(msg.sender.partition("@")[0]))
    if not robot:
        return False
    returned = any(a.content_type in ("message/rfc822", "text/rfc822-headers")
                   for a in msg.attachments)
    return bool(msg.headers.get("x-failed-recipients") or _BOUNCE_SUBJECT.match(msg.subject)
                or returned)


def read_report(raw: bytes, *, our_domain: str) -> DeliveryReport:
    """Read the status fields and the returned Message-IDs from a bounce. Never raises."""
    data = raw[:MAX_SCAN_BYTES]
    fields: dict[str, str] = {}
    ids: list[str] = []
    try:
        root = BytesParser(policy=compat32).parsebytes(data)
        fields = _status_fields(root)
        ids = _returned_ids(root)
    except Exception:  # a broken bounce still gets the text scan below
        pass
    text = data.decode("utf-8", "replace")
    pattern = re.compile(r"<([^<>\s@]+@" + re.escape(our_domain) + r")>", re.IGNORECASE)
    ids += [m for m in pattern.findall(text) if m not in ids]
    action = fields.get("action", "failed").strip().lower() or "failed"
    diagnostic = " ".join(fields.get("diagnostic-code", "").split())[:500]
    status = _status(fields.get("status", ""), diagnostic, text if not fields else "")
    recipient = fields.get("final-recipient", "").partition(";")[2].strip().lower()
    ours = [i for i in ids if i.lower().endswith("@" + our_domain.lower())]
    return DeliveryReport(action=action, status=status, diagnostic=diagnostic,
                          final_recipient=recipient,
                          message_ids=tuple(ours + [i for i in ids if i not in ours])[:20])


def _status(field: str, diagnostic: str, body: str) -> str:
    """From the Status field, else the diagnostic, else (old-style bounces without a
    delivery-status part) an SMTP reply quoted in the text such as "550 5.1.1"."""
    for source in (field, diagnostic):
        m = _ENHANCED_STATUS.search(source)
        if m:
            return ".".join(m.groups())
    m = _SMTP_CODE.search(diagnostic)
    if m:  # only a basic SMTP code: 550 -> 5.0.0
        return f"{m.group(1)}.0.0"
    m = _QUOTED_REPLY.search(body)
    return ".".join(m.groups()) if m else ""


def _status_fields(root: MimeMessage) -> dict[str, str]:
    """The first failed recipient's fields (or the first recipient's), per-message fields
    underneath."""
    for part in root.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        payload = part.get_payload()
        if isinstance(payload, str):
            blocks = [HeaderParser(policy=compat32).parsestr(chunk)
                      for chunk in re.split(r"\r?\n\s*\r?\n", payload) if chunk.strip()]
        else:
            blocks = list(payload)
        recipients = [b for b in blocks[1:] if b.get("Final-Recipient") or b.get("Action")]
        chosen = next((b for b in recipients if str(b.get("Action", "")).strip().lower()
                       == "failed"), recipients[0] if recipients else None)
        merged: dict[str, str] = {}
        for block in ([blocks[0]] if blocks else []) + ([chosen] if chosen else []):
            for name, value in block.items():
                merged[name.lower()] = " ".join(str(value).split())
        return merged
    return {}


def _returned_ids(root: MimeMessage) -> list[str]:
    ids: list[str] = []
    for part in root.walk():
        ctype = part.get_content_type()
        headers: MimeMessage | None = None
        if ctype in ("message/rfc822", "message/global"):
            inner = part.get_payload()
            if isinstance(inner, list) and inner:
                headers = inner[0]
        elif ctype == "text/rfc822-headers":
            body = part.get_payload(decode=True)
            if isinstance(body, bytes):
                headers = HeaderParser(policy=compat32).parsestr(
                    body.decode("utf-8", "replace"))
        if headers is not None:
            for value in headers.get_all("Message-ID", []):
                ids += re.findall(r"<([^<>\s]+)>", str(value))
    return ids


def find_outbox(session: Session, ids: Sequence[str]) -> OutboxItem | None:
    """The outbox row of the first of `ids` that is one (`read_report` puts the returned
    message's own Message-ID before those it merely refers to)."""
    if not ids:
        return None
    rows = {item.message_id: item for item in session.scalars(
        select(OutboxItem).where(OutboxItem.message_id.in_(ids)))}
    return next((rows[i] for i in ids if i in rows), None)


def suppress_address(session: Session, address: str, reason: str, now: datetime) -> int:
    """Stop mail to `address` until the person writes in; cancels what is queued for it."""
    contact = session.scalars(select(Contact).where(Contact.email == address)).first()
    if contact is not None and contact.email_suppressed_at is None:
        contact.email_suppressed_at = now
        contact.email_suppressed_reason = reason[:500]
        store.record_event(session, "email-suppressed", now, contact=contact, reason=reason)
    return store.cancel_pending(session, [OutboxItem.channel == "email",
                                          OutboxItem.recipient == address],
                                SUPPRESSED_REASON, now)


def drop_suppressed(session: Session, rows: Iterable[Row[Any]]) -> list[Row[Any]]:
    """For the dispatcher, at claim time: cancel email to hard-bounced addresses and return
    the claimed rows (`store.claim_due_outbox`) that may still be sent."""
    rows = list(rows)
    addresses = {row.recipient for row in rows if row.channel == "email"}
    if not addresses:
        return rows
    suppressed = set(session.scalars(select(Contact.email).where(
        Contact.email.in_(addresses), Contact.email_suppressed_at.is_not(None))))
    if not suppressed:
        return rows
    keep, cancel = [], []
    for row in rows:
        if row.channel == "email" and row.recipient in suppressed:
            cancel.append(row.id)
            log.info("outbox %d cancelled: %s", row.id, SUPPRESSED_REASON)
        else:
            keep.append(row)
    session.execute(update(OutboxItem).where(OutboxItem.id.in_(cancel)).values(
        status="cancelled", cancel_reason=SUPPRESSED_REASON, lease_until=None))
    return keep


class Bounces:
    """Intake interceptor: bounces are matched and recorded, never treated as enquiries."""

    def __init__(self, *, domain: str) -> None:
        self._domain = domain

    @classmethod
    def from_settings(cls, settings: Settings) -> Bounces:
        """Our Message-IDs end in the clinic address's domain (see `Intake`)."""
        return cls(domain=settings.clinic_address.rpartition("@")[2] or "enquiry-handler.invalid")

    def __call__(
        self, session: Session, msg: InboundMessage, now: datetime
    ) -> AcceptOutcome | None:
        if not is_bounce(msg):
            return None
        store.write_deferred(session)  # suppression cancels mail this group may have queued
        report = read_report(msg.raw, our_domain=self._domain)
        item = find_outbox(session, report.message_ids)
        enquiry = session.get(Enquiry, item.enquiry_id) if item and item.enquiry_id else None
        store.add_message(session, msg, enquiry=enquiry, contact=None, kind="bounce", now=now)
        if item is None:
            store.record_event(session, "bounce-unmatched", now, action=report.action,
                               status=report.status)
            log.warning("bounce received that matches none of our messages (%s %s)",
                        report.action, report.status or "no status")
            return AcceptOutcome("", kind="bounce", notes=("unmatched",))
        self._apply(session, item, enquiry, report, now)
        return AcceptOutcome(enquiry.reference if enquiry else "", kind="bounce",
                             notes=(f"outbox {item.id}", report.action, report.status))

    def _apply(
        self, session: Session, item: OutboxItem, enquiry: Enquiry | None,
        report: DeliveryReport, now: datetime,
    ) -> None:
        item.delivery_status = "bounced" if report.failed else report.action[:32]
        if not report.failed:  # delayed / relayed / delivered: for the record only
            store.record_event(session, "delivery-report", now, enquiry=enquiry,
                               outbox=item.id, action=report.action, status=report.status)
            log.info("outbox %d: delivery report %s %s", item.id, report.action,
                     report.status or "")
            return
        item.status = "failed"
        item.lease_until = None
        item.error_code = (report.status or "bounce")[:32]
        item.last_error = report.summary()[:2000]
        store.record_event(session, "delivery-bounced", now, enquiry=enquiry, outbox=item.id,
                           outbox_kind=item.kind, status=report.status, hard=report.hard)
        log.warning("outbox %d bounced (%s %s, status %s, to %s)", item.id, item.kind,
                    item.channel, report.status or "none", pseudonym(item.recipient))
        if report.hard and item.channel == "email":
            cancelled = suppress_address(
                session, item.recipient, f"hard bounce {report.status} of outbox {item.id}",
                now)
            log.warning("address %s suppressed after a hard bounce; %d queued message(s) "
                        "cancelled", pseudonym(item.recipient), cancelled)
