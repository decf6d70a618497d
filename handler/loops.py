"""Loop protection that needs the database: mail from our own side triggers nothing.

Mail sent from one of our own addresses (our mailboxes, the teams' addresses), or answering
a notification we sent to staff, is stored (on the enquiry it answers, if any) and nothing
is sent because of it: no acknowledgement, no team notification. Without this, a team's
out-of-office reply to a notification would notify the team again, for ever.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from handler import store
from handler.inbound import Channel, InboundMessage
from handler.models import Enquiry, OutboxItem
from handler.rules import RuleSet
from handler.service import AcceptOutcome

log = logging.getLogger("handler.loops")

STAFF_KINDS = frozenset({"notify", "escalation"})
"""Outbox kinds that only ever go to staff."""


def own_addresses(ruleset: RuleSet, mailboxes: Iterable[str]) -> frozenset[str]:
    """Our mailboxes and every team's address, lower-case."""
    found = {m.strip().lower() for m in mailboxes if m.strip()}
    found |= {t.email.strip().lower() for t in ruleset.teams.values() if t.email}
    return frozenset(found)


def internal_reason(
    msg: InboundMessage, own: frozenset[str], parent: OutboxItem | None
) -> str:
    """Why `msg` comes from our own side ("" when it does not). `parent` is the outbox row
    its In-Reply-To names, if any."""
    # From only, not the envelope: a forwarder in front of us may rewrite the envelope
    # sender of every patient's mail to our own address.
    if msg.sender in own:
        return "sent from one of our own addresses"
    if parent is not None and (parent.kind in STAFF_KINDS or parent.recipient in own):
        return "answers a notification we sent to staff"
    return ""


class OwnMail:
    """Intake interceptor for mail from our own side (see the module docstring)."""

    def __init__(self, *, ruleset: Callable[[], RuleSet], mailboxes: Iterable[str]) -> None:
        self._ruleset = ruleset
        self._mailboxes = tuple(mailboxes)

    def __call__(
        self, session: Session, msg: InboundMessage, now: datetime
    ) -> AcceptOutcome | None:
        if msg.channel is not Channel.EMAIL:
            return None
        parent = None
        if msg.thread_ids:
            parent = session.scalars(select(OutboxItem).where(
                OutboxItem.message_id == msg.thread_ids[0])).first()
        reason = internal_reason(msg, own_addresses(self._ruleset(), self._mailboxes), parent)
        if not reason:
            return None
        store.write_deferred(session)
        enquiry = None
        if parent is not None and parent.enquiry_id is not None:
            enquiry = session.get(Enquiry, parent.enquiry_id)
        store.add_message(session, msg, enquiry=enquiry, contact=None, kind="internal", now=now)
        store.record_event(session, "internal-mail-stored", now, enquiry=enquiry,
                           reason=reason)
        log.info("mail from our own side stored%s; nothing sent (%s)",
                 f" on enquiry {enquiry.reference}" if enquiry else "", reason)
        return AcceptOutcome(enquiry.reference if enquiry else "", kind="internal",
                             notes=(reason,))
