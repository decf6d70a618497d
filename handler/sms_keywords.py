"""SMS keywords: STOP and friends opt a number out, START opts it back in, HELP gets the
clinic's contact details. An intake interceptor, so a keyword is stored (once, like any
message) but never opens an enquiry or reaches the routing rules.

Only a bare keyword counts ("Stop", " STOP ", "stop."); "please stop texting me" is an
ordinary message that staff read.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from handler import store
from handler.config import Settings
from handler.inbound import Channel, InboundMessage
from handler.logs import pseudonym
from handler.models import Contact, Enquiry, OutboxItem
from handler.service import AcceptOutcome
from handler.sms_policy import opt_in, opt_out

log = logging.getLogger("handler.sms")

# Twilio's default opt-out words (STOP, STOPALL, UNSUBSCRIBE, CANCEL, END, QUIT, REVOKE,
# OPTOUT), opt-in words and help words, so our ledger agrees with Twilio's own blocking.
OPT_OUT_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT",
                           "REVOKE", "OPTOUT"})
OPT_IN_WORDS = frozenset({"START", "UNSTOP"})
OPT_IN_IF_OPTED_OUT = frozenset({"YES"})  # Twilio's opt-in word; otherwise just "yes"
HELP_WORDS = frozenset({"HELP", "INFO"})
HELP_REPLIES_PER_WINDOW = 3  # a number that keeps texting HELP (a robot?) is not answered forever
HELP_TEMPLATE = "help"
_BARE_WORD_RE = re.compile(r"^\s*([A-Za-z]+)\s*[.!]*\s*$")
_ADVANCED_OPT_OUT = {"STOP": "opt-out", "START": "opt-in", "HELP": "help"}


@dataclass(frozen=True, slots=True)
class Keyword:
    kind: str
    """"opt-out" | "opt-in" | "help" (also the stored message's kind)."""
    word: str
    conditional: bool = False
    """Only a keyword when the number is opted out (YES)."""


def keyword_of(msg: InboundMessage) -> Keyword | None:
    """The keyword this text is, or None. Twilio's Advanced Opt-Out classification (the
    `OptOutType` field, which knows the keywords configured in the console) wins."""
    advanced = msg.headers.get("opt-out-type", "").strip().upper()
    m = _BARE_WORD_RE.match(msg.text)
    word = m.group(1).upper() if m else ""
    if advanced in _ADVANCED_OPT_OUT:
        return Keyword(_ADVANCED_OPT_OUT[advanced], word or advanced)
    if not word:
        return None
    if word in OPT_OUT_WORDS:
        return Keyword("opt-out", word)
    if word in OPT_IN_WORDS:
        return Keyword("opt-in", word)
    if word in OPT_IN_IF_OPTED_OUT:
        return Keyword("opt-in", word, conditional=True)
    if word in HELP_WORDS:
        return Keyword("help", word)
    return None


class SmsKeywords:
    """The intake interceptor for keyword texts (see `handler.service.Interceptor`)."""

    def __init__(self, *, settings: Settings) -> None:
        self._settings = settings
        self._domain = settings.clinic_address.rpartition("@")[2] or "enquiry-handler.invalid"

    def __call__(
        self, session: Session, msg: InboundMessage, now: datetime
    ) -> AcceptOutcome | None:
        if msg.channel is not Channel.SMS:
            return None
        keyword = keyword_of(msg)
        if keyword is None:
            return None
        store.write_deferred(session)  # an opt-out cancels texts this group may have queued
        contact = store.find_contact(session, msg)
        if keyword.conditional and (contact is None or contact.sms_opted_out_at is None):
            return None  # "yes" from someone who never opted out is an ordinary message
        contact = store.get_or_create_contact(session, msg, now)
        thread = store.find_thread(session, msg, contact, now=now,
                                   sms_thread_days=self._settings.sms_thread_days)
        enquiry = thread.enquiry
        store.add_message(session, msg, enquiry=enquiry, contact=contact, kind=keyword.kind,
                          now=now)
        source = f"keyword {keyword.word}"
        queued = 0
        if keyword.kind == "opt-out":
            opt_out(session, contact, now, source=source, enquiry=enquiry)
        elif keyword.kind == "opt-in":
            opt_in(session, contact, now, source=source, enquiry=enquiry)
        else:
            queued = self._answer_help(session, msg, contact, enquiry, now)
        log.info("sms keyword %s from %s", keyword.word, pseudonym(msg.sender))
        return AcceptOutcome(enquiry.reference if enquiry else "", kind=keyword.kind,
                             queued=queued)

    def _answer_help(self, session: Session, msg: InboundMessage, contact: Contact,
                     enquiry: Enquiry | None, now: datetime) -> int:
        reason = ""
        window = now - timedelta(hours=self._settings.ack_window_hours)
        answered = session.scalar(select(func.count()).select_from(OutboxItem).where(
            OutboxItem.recipient == msg.sender, OutboxItem.kind == "help",
            OutboxItem.created_at >= window)) or 0
        if contact.sms_opted_out_at is not None:
            reason = "number has opted out of SMS"
        elif answered >= HELP_REPLIES_PER_WINDOW:
            reason = f"already answered HELP {answered} time(s) in the window"
        if reason:
            store.record_event(session, "help-not-answered", now, enquiry=enquiry,
                               contact=contact, reason=reason)
            return 0
        # Sent at once even in quiet hours: the person has just asked, and the reply carries
        # the emergency numbers.
        store.enqueue(session, kind="help", channel=Channel.SMS, recipient=msg.sender,
                      template=HELP_TEMPLATE, due_at=now, now=now, domain=self._domain,
                      enquiry=enquiry, contact=contact, urgent=True)
        store.record_event(session, "help-answered", now, enquiry=enquiry, contact=contact)
        return 1
