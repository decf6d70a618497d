"""Pure predicates that decide whether an automatic reply may be sent (RFC 3834 and more).

They never touch the database or the clock: everything they need arrives as arguments
(whether the Message-ID is one of ours, which addresses are our own, the acknowledgement count).
"""

from __future__ import annotations

import re
from collections.abc import Collection

from handler.decision import Decision, Facts, ReplyPlan
from handler.inbound import Channel, InboundMessage

# Local parts used by robots: bounces, list software, RFC 3834 §2 ("owner-*", "*-request",
# "MAILER-DAEMON") and the common no-reply forms.
_ROBOT_LOCALPARTS = re.compile(
    r"^(mailer-daemon|mail-daemon|postmaster|no-?reply|do-?not-?reply|bounces?|listserv|"
    r"majordomo|autoresponder|auto-?reply|owner-.+|.+-request|.+-bounces?)([+\-.=].*)?$"
)
# Subject prefixes of out-of-office replies that carry no header saying so (older Outlook,
# some webmail and ticket systems), in the languages our patients most often write in.
_AUTO_SUBJECT = re.compile(
    r"^\s*(auto(matic|matische)?[ -]?(reply|response|answer|antwort)|autoreply|"
    r"out of (the )?office|abwesenheitsnotiz|r[ée]ponse automatique|respuesta autom[aá]tica|"
    r"risposta automatica|automatisch antwoord|autosvar)(\s+auto-?reply)?\s*(:|$)",
    re.IGNORECASE,
)
_BULK_PRECEDENCE = {"bulk", "list", "junk", "auto_reply"}
"""RFC 3834 names the first three; `auto_reply` is what many auto-responders set (and so do
our own acknowledgements) where they set no Auto-Submitted."""
URGENT_EXTRA_REPLIES = 1
"""A safety-net reply may go out once more in the window after an ordinary acknowledgement."""


def auto_reply_reason(
    msg: InboundMessage, *, is_own_message: bool = False,
    own_addresses: Collection[str] = (),
) -> str:
    """Why this message must not get an automatic reply, or "" when one is allowed.

    `own_addresses` are our mailboxes and the teams' addresses (lower-case): mail from them
    is never answered, whatever its headers say.
    """
    if msg.channel is not Channel.EMAIL:
        return ""
    h = msg.headers
    auto = h.get("auto-submitted", "").strip().lower()
    if auto and auto.split(";")[0].strip() != "no":
        return f"Auto-Submitted: {auto.split(';')[0].strip()}"
    precedence = h.get("precedence", "").strip().lower()
    if precedence in _BULK_PRECEDENCE:
        return f"Precedence: {precedence}"
    for name in ("list-id", "list-unsubscribe", "list-post"):
        if h.get(name):
            return f"{name} header present (mailing list)"
    if h.get("x-auto-response-suppress", "").strip():
        return "X-Auto-Response-Suppress present"
    for name in ("x-autoreply", "x-autorespond", "x-loop"):
        if h.get(name):
            return f"{name} header present"
    if h.get("content-type", "").strip().lower().startswith("multipart/report"):
        return "a delivery or read report (multipart/report)"
    if msg.envelope_from == "":
        return "null return path (bounce or notification)"
    if not msg.sender or "@" not in msg.sender:
        return "no usable sender address"
    if _ROBOT_LOCALPARTS.match(msg.sender.partition("@")[0]):
        return f"automated sender ({msg.sender.partition('@')[0]}@...)"
    if msg.envelope_from and _ROBOT_LOCALPARTS.match(msg.envelope_from.partition("@")[0]):
        return "automated return path"
    if is_own_message:
        return "the message is one we sent (its Message-ID is ours)"
    if msg.sender in own_addresses:  # From only: forwarders may rewrite the envelope
        return "sent from one of our own addresses"
    if _AUTO_SUBJECT.match(msg.subject):
        return "the subject says it is an automatic reply"
    return ""


def plan_reply(
    msg: InboundMessage, decision: Decision, facts: Facts, *, ack_limit: int, auto_reason: str = ""
) -> ReplyPlan:
    """Whether the patient gets the decision's reply template, and if not, why not.

    A hard-bounced address needs no check here: an email from that address has just lifted
    the suppression, and the dispatcher drops anything still queued for a suppressed address.
    """
    if auto_reason:  # first, so that the stored reason names the guard even for spam
        return ReplyPlan(False, f"no automatic reply: {auto_reason}")
    if not decision.reply_template:
        return ReplyPlan(False, "rule sends no reply")
    if msg.channel is Channel.SMS and facts.sms_opted_out:
        return ReplyPlan(False, "number has opted out of SMS")
    # A red-flag safety-net may go out even after an ordinary acknowledgement, but a hard cap
    # still holds so that no loop can form through it.
    limit = ack_limit + URGENT_EXTRA_REPLIES if decision.priority == "urgent" else ack_limit
    if facts.acks_last_24h >= limit:
        return ReplyPlan(False, f"already acknowledged {facts.acks_last_24h} time(s) in the window")
    return ReplyPlan(True)
