"""Pure predicates that decide whether an automatic reply may be sent (RFC 3834 and more).

They never touch the database or the clock: everything they need arrives as arguments.
"""

from __future__ import annotations

import re

from handler.decision import Decision, Facts, ReplyPlan
from handler.inbound import Channel, InboundMessage

_ROBOT_LOCALPARTS = re.compile(
    r"^(mailer-daemon|postmaster|no-?reply|do-?not-?reply|bounces?|listserv|majordomo|"
    r"mail-daemon|autoresponder|auto-reply)([+\-.].*)?$"
)
_BULK_PRECEDENCE = {"bulk", "list", "junk"}


def auto_reply_reason(msg: InboundMessage, *, is_own_message: bool = False) -> str:
    """Why this message must not get an automatic reply, or "" when one is allowed."""
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
    for name in ("x-autoreply", "x-autorespond"):
        if h.get(name):
            return f"{name} header present"
    if msg.envelope_from == "":
        return "null return path (bounce or notification)"
    local = msg.sender.partition("@")[0]
    if not msg.sender or "@" not in msg.sender:
        return "no usable sender address"
    if _ROBOT_LOCALPARTS.match(local):
        return f"automated sender ({local}@...)"
    if msg.envelope_from and _ROBOT_LOCALPARTS.match(msg.envelope_from.partition("@")[0]):
        return "automated return path"
    if is_own_message:
        return "the message is one we sent (its Message-ID is ours)"
    return ""


def plan_reply(
    msg: InboundMessage, decision: Decision, facts: Facts, *, ack_limit: int, auto_reason: str = ""
) -> ReplyPlan:
    """Whether the patient gets the decision's reply template, and if not, why not."""
    if not decision.reply_template:
        return ReplyPlan(False, "rule sends no reply")
    if auto_reason:
        return ReplyPlan(False, f"no automatic reply: {auto_reason}")
    if msg.channel is Channel.SMS and facts.sms_opted_out:
        return ReplyPlan(False, "number has opted out of SMS")
    if msg.channel is Channel.EMAIL and facts.email_suppressed:
        return ReplyPlan(False, "address suppressed after a hard bounce")
    # A red-flag safety-net may go out even after an ordinary acknowledgement, but a hard cap
    # still holds so that no loop can form through it.
    limit = ack_limit + 2 if decision.priority == "urgent" else ack_limit
    if facts.acks_last_24h >= limit:
        return ReplyPlan(False, f"already acknowledged {facts.acks_last_24h} time(s) in the window")
    return ReplyPlan(True)
