"""Delivery: claim due outbox rows, render them, hand them to a transport, record the result.

Delivery is at-least-once with a Message-ID fixed when the row was created, so a resend after
a crash (relay said 250, we died before recording it) carries the same Message-ID. Rendering
happens at send time, so reminders see the enquiry as it is now.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session, defer, selectinload, sessionmaker

from handler import bounces, sms_policy, store
from handler.clock import Clock
from handler.compose import ComposedEmail, compose_email
from handler.config import Settings
from handler.models import Contact, Enquiry, Event, Message, OutboxItem
from handler.render import RenderedEmail, TemplateError
from handler.rules import RuleSet
from handler.transports import EmailTransport, Outcome, SendResult, SmsRequest, SmsTransport

log = logging.getLogger("handler.dispatch")

RECORD_EVERY = 0.1
"""Seconds the dispatcher collects send results before committing them together."""
AUTO_SUBMITTED = {"ack": "auto-replied", "help": "auto-replied"}  # everything else: generated


class Renderer(Protocol):
    def render_email(self, name: str, context: Mapping[str, Any]) -> RenderedEmail: ...

    def render_sms(self, name: str, context: Mapping[str, Any]) -> str: ...


def next_attempt(attempts: int, now: datetime) -> datetime:
    """Backoff after a temporary failure: 30 s, 1 min, 2 min, ... capped at 1 hour."""
    delay = min(30 * 2 ** max(attempts - 1, 0), 3600)
    return now + timedelta(seconds=delay)


@dataclass(slots=True)
class Job:
    """Everything needed to send one claimed row, read inside the claiming transaction."""

    id: int
    kind: str
    channel: str
    recipient: str
    template: str
    message_id: str
    attempts: int
    context: dict[str, Any]
    row_context: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Sent:
    job: Job
    result: SendResult
    rendered: dict[str, Any] | None = None


class Dispatcher:
    def __init__(
        self, *, sessions: sessionmaker[Session], templates: Renderer,
        ruleset: Callable[[], RuleSet], email: EmailTransport, sms: SmsTransport, clock: Clock,
        settings: Settings, batch_size: int = 50, concurrency: int = 8,
    ) -> None:
        self._sessions = sessions
        self._templates = templates
        self._ruleset = ruleset
        self._email = email
        self._sms = sms
        self._clock = clock
        self._settings = settings
        self._sms_gate = sms_policy.SmsGate.from_settings(settings)  # opt-outs and quiet hours
        self._batch_size = batch_size
        self._limit = asyncio.Semaphore(concurrency)
        self._woken = False
        self.record_every = RECORD_EVERY

    def wake(self) -> None:
        """Note that new work was committed; a running pass takes another turn."""
        self._woken = True

    async def run_until_idle(self) -> int:
        """Send everything that is due now; returns how many rows were handled."""
        total = 0
        while True:
            self._woken = False
            handled = await self.run_once()
            total += handled
            if handled < self._batch_size and not self._woken:
                return total

    async def run_once(self) -> int:
        now = self._clock.now()
        jobs = await asyncio.to_thread(self._claim, now)
        if not jobs:
            return 0
        # Record results as they arrive, in one commit per RECORD_EVERY seconds at most: a
        # crash then re-sends only the messages whose relay 250 was not yet recorded (with
        # the same Message-ID), and on SQLite every commit (an fsync) is one the intake
        # writer would otherwise have to wait for.
        sends = {asyncio.create_task(self._send(job)) for job in jobs}
        while sends:
            done, sends = await asyncio.wait(sends, return_when=asyncio.FIRST_COMPLETED)
            if sends:
                more, sends = await asyncio.wait(sends, timeout=self.record_every)
                done |= more
            await asyncio.to_thread(self._record, [task.result() for task in done])
        return len(jobs)

    # --- claim (worker thread) ----------------------------------------------------------------

    def _claim(self, now: datetime) -> list[Job]:
        lease = timedelta(seconds=self._settings.outbox_lease_seconds)
        with self._sessions() as session, session.begin():
            items = store.claim_due_outbox(session, now, limit=self._batch_size, lease=lease)
            items = self._sms_gate.admit(session, items, now)
            items = bounces.drop_suppressed(session, items)  # hard-bounced addresses
            ids = [item.id for item in items]
        if not ids:
            return []
        # What rendering needs is read after the claim has committed: on SQLite the write
        # lock (which intake waits for) is held only for the claim itself.
        with self._sessions() as session, session.begin():
            session.connection(execution_options={"write": False})  # a plain BEGIN
            items = list(session.scalars(select(OutboxItem).where(OutboxItem.id.in_(ids))
                                         .order_by(OutboxItem.urgent.desc(),
                                                   OutboxItem.due_at, OutboxItem.id)))
            rows = _BatchRows.load(session, items)
            return [self._job(session, item, rows) for item in items]

    def _job(self, session: Session, item: OutboxItem, rows: _BatchRows | None = None) -> Job:
        job = Job(id=item.id, kind=item.kind, channel=item.channel, recipient=item.recipient,
                  template=item.template, message_id=item.message_id, attempts=item.attempts,
                  context=dict(item.context))
        job.row_context = self._context(session, item, rows)
        return job

    def _context(
        self, session: Session, item: OutboxItem, rows: _BatchRows | None = None
    ) -> dict[str, Any]:
        s = self._settings
        ruleset = self._ruleset()
        ctx: dict[str, Any] = {
            "clinic": {"name": s.clinic_name, "address": s.clinic_address, "phone": s.clinic_phone,
                       "website": s.clinic_website},
            "enquiry": None, "patient": {"name": "", "first_name": "", "email": "", "phone": ""},
            "message": {"subject": "", "text": "", "excerpt": "", "attachments": []},
            "team": {"id": "", "display_name": "", "email": ""},
            "decision": {"rule": item.context.get("rule", ""),
                         "reasons": list(item.context.get("reasons", []))},
            "reminder": None,
        }
        enquiry = session.get(Enquiry, item.enquiry_id) if item.enquiry_id else None
        if enquiry is not None:
            team_id = item.context.get("team") or enquiry.team
            team = ruleset.teams.get(team_id)
            ctx["enquiry"] = {
                "reference": enquiry.reference, "category": enquiry.category,
                "priority": enquiry.priority, "team": enquiry.team,
                "team_name": _team_name(ruleset, enquiry.team), "subject": enquiry.subject,
                "channel": enquiry.channel, "created_at": enquiry.created_at,
                "status": enquiry.status, "tags": list(enquiry.tags),
            }
            if team is not None:
                ctx["team"] = {"id": team.id, "display_name": team.display_name,
                               "email": team.email}
            if not ctx["decision"]["rule"]:
                ctx["decision"]["rule"] = enquiry.rule
            contact = session.get(Contact, enquiry.contact_id)
            if contact is not None:
                name = contact.name or ""
                ctx["patient"] = {"name": name, "first_name": name.split(" ")[0] if name else "",
                                  "email": contact.email or "", "phone": contact.phone or ""}
            if rows is None:
                rows = _BatchRows.load(session, [item])
            latest = rows.latest.get(enquiry.id)
            if latest is not None:
                ctx["message"] = {
                    "subject": latest.subject, "text": latest.text,
                    "excerpt": _excerpt(latest.text),
                    "attachments": [{"filename": a.filename, "content_type": a.content_type,
                                     "size": a.size} for a in latest.attachments],
                }
        if item.reminder_id is not None:
            ctx["reminder"] = {"name": item.context.get("reminder", ""), "due_at": item.due_at}
        return ctx

    # --- send (event loop) --------------------------------------------------------------------

    async def _send(self, job: Job) -> Sent:
        async with self._limit:
            try:
                if job.channel == "sms":
                    body = self._templates.render_sms(job.template, job.row_context)
                    callback = self._settings.public_url.rstrip("/") + "/sms/twilio/status"
                    result = await self._sms.send(SmsRequest(
                        to=job.recipient, body=body, idempotency_key=job.message_id,
                        status_callback=callback))
                    return Sent(job, result, {"body": body})
                rendered = self._templates.render_email(job.template, job.row_context)
                message = self._compose(job, rendered)
                result = await self._email.send(message.data,
                                                sender=self._settings.clinic_address,
                                                recipient=job.recipient)
                return Sent(job, result, {"subject": message.subject,
                                          "text": rendered.text, "html": rendered.html})
            except TemplateError as exc:
                log.error("outbox %d: template %s failed: %s", job.id, job.template, exc)
                return Sent(job, SendResult.permanent(f"template error: {exc}"))
            except Exception as exc:  # a transport bug must not stop the other sends
                log.exception("outbox %d: unexpected error while sending", job.id)
                return Sent(job, SendResult.temporary(f"internal error: {type(exc).__name__}"))

    def _compose(self, job: Job, rendered: RenderedEmail) -> ComposedEmail:
        s = self._settings
        enquiry = job.row_context.get("enquiry") or {}
        reply_to = None
        if job.kind == "notify" and job.row_context["patient"]["email"]:
            reply_to = job.row_context["patient"]["email"]  # staff can answer from their client
        return compose_email(
            rendered, sender=s.clinic_address, sender_name=s.clinic_name,
            recipient=job.recipient, message_id=job.message_id, date=self._clock.now(),
            auto_submitted=AUTO_SUBMITTED.get(job.kind, "auto-generated"),
            reference=enquiry.get("reference", ""), in_reply_to=job.context.get("in_reply_to"),
            references=job.context.get("references"), reply_to=reply_to)

    # --- record (worker thread) ---------------------------------------------------------------

    def _record(self, results: list[Sent]) -> None:
        now = self._clock.now()
        with self._sessions() as session, session.begin():
            # One query for the batch instead of one per row.
            items = {item.id: item for item in session.scalars(select(OutboxItem).where(
                OutboxItem.id.in_([sent.job.id for sent in results])))}
            for sent in results:
                item = items.get(sent.job.id)
                if item is None:
                    continue
                self._apply(session, item, sent, now)

    def _apply(self, session: Session, item: OutboxItem, sent: Sent, now: datetime) -> None:
        result = sent.result
        sms_policy.after_send(session, item, result, now)  # delivery status; 21610 = opted out
        item.lease_until = None
        if result.outcome is Outcome.OK:
            item.status = "sent"
            item.provider_id = result.provider_id[:255]
            item.rendered = sent.rendered
            item.sent_at = now
            item.last_error = ""
            log.info("outbox %d sent (%s %s, attempt %d)", item.id, item.kind, item.channel,
                     item.attempts)
            return
        item.last_error = result.error[:2000]
        item.error_code = result.code[:32]
        if result.outcome is Outcome.TEMPORARY and item.attempts < self._settings.max_attempts:
            item.status = "pending"
            item.due_at = next_attempt(item.attempts, now)
            log.warning("outbox %d: temporary failure (attempt %d), retry at %s: %s", item.id,
                        item.attempts, item.due_at.isoformat(), result.code or "no code")
            return
        item.status = "failed"
        log.error("outbox %d failed for good (%s %s, attempt %d, code %s)", item.id, item.kind,
                  item.channel, item.attempts, result.code or "none")
        session.add(Event(at=now, kind="delivery-failed", enquiry_id=item.enquiry_id,
                          contact_id=item.contact_id,
                          detail={"outbox": item.id, "kind": item.kind, "code": result.code,
                                  "reason": result.error[:500]}))


@dataclass(slots=True)
class _BatchRows:
    """The enquiries, contacts and latest inbound messages behind a claimed batch, read with
    one query per table rather than several per row. Holding them here also keeps them in the
    session's identity map (which holds objects weakly), so `session.get` finds them."""

    enquiries: list[Enquiry]
    contacts: list[Contact]
    latest: dict[int, Message]
    """enquiry id -> its latest inbound message, keywords (STOP, HELP...) left out"""

    @classmethod
    def load(cls, session: Session, items: list[OutboxItem]) -> _BatchRows:
        ids = {item.enquiry_id for item in items if item.enquiry_id is not None}
        if not ids:
            return cls([], [], {})
        enquiries = list(session.scalars(select(Enquiry).where(Enquiry.id.in_(ids))))
        contacts = list(session.scalars(select(Contact).where(
            Contact.id.in_({e.contact_id for e in enquiries}))))
        newest = (select(func.max(Message.id))
                  .where(Message.enquiry_id.in_(ids), Message.direction == "in",
                         Message.kind.not_in(("opt-out", "opt-in", "help")))
                  .group_by(Message.enquiry_id))
        messages = session.scalars(
            select(Message).where(Message.id.in_(newest))
            .options(defer(Message.raw), defer(Message.html), selectinload(Message.attachments)))
        return cls(enquiries, contacts, {m.enquiry_id: m for m in messages
                                         if m.enquiry_id is not None})


def _team_name(ruleset: RuleSet, team_id: str) -> str:
    team = ruleset.teams.get(team_id)
    return team.display_name if team else team_id


def _excerpt(text: str, limit: int = 600) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"
