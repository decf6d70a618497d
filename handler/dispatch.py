"""Delivery: claim due outbox rows, render them, hand them to a transport, record the result.

Delivery is at-least-once with a Message-ID fixed when the row was created, so a resend after
a crash (relay said 250, we died before recording it) carries the same Message-ID. Rendering
happens at send time, so reminders see the enquiry as it is now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from sqlalchemy import Connection, Row, bindparam, case, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from handler import bounces, sms_policy, store
from handler.clock import Clock
from handler.compose import ComposedEmail, compose_email
from handler.config import Settings
from handler.models import Attachment, Contact, Enquiry, Event, Message, OutboxItem
from handler.render import RenderedEmail, TemplateError
from handler.rules import RuleSet
from handler.sms_status import UNDELIVERED
from handler.transports import EmailTransport, Outcome, SendResult, SmsRequest, SmsTransport

log = logging.getLogger("handler.dispatch")
_T = TypeVar("_T")

RECORD_EVERY = 0.1
"""Seconds the dispatcher collects send results before committing them together."""
AUTO_SUBMITTED = {"ack": "auto-replied", "help": "auto-replied"}  # everything else: generated

# Statements built once, on the tables: Core rows instead of ORM objects for the hot path.
_outbox, _enquiry, _contact = OutboxItem.__table__, Enquiry.__table__, Contact.__table__
_message, _attachment = Message.__table__, Attachment.__table__
_inbound = _message.alias("inbound")
_LATEST_INBOUND = (
    select(func.max(_inbound.c.id))
    .where(_inbound.c.enquiry_id == _enquiry.c.id, _inbound.c.direction == "in",
           # keywords (STOP, HELP...) are not what the enquiry is about
           *(_inbound.c.kind != kind for kind in ("opt-out", "opt-in", "help")))
    .correlate(_enquiry).scalar_subquery())
_BATCH = (
    select(_enquiry.c.id, _enquiry.c.reference, _enquiry.c.category, _enquiry.c.priority,
           _enquiry.c.team, _enquiry.c.subject, _enquiry.c.channel, _enquiry.c.created_at,
           _enquiry.c.status, _enquiry.c.tags, _enquiry.c.rule,
           _contact.c.name.label("contact_name"), _contact.c.email.label("contact_email"),
           _contact.c.phone.label("contact_phone"), _LATEST_INBOUND.label("message_id"))
    .select_from(_enquiry.outerjoin(_contact, _contact.c.id == _enquiry.c.contact_id))
    .where(_enquiry.c.id.in_(bindparam("ids", expanding=True))))
"""Each enquiry of a claimed batch with its contact and the id of its latest inbound message.
(Joining the message on that id in the same query made PostgreSQL hash the whole message
table at every claim: the join condition is a subquery, so no index could serve it.)"""
_MESSAGES = (
    select(_message.c.id, _message.c.subject, _message.c.text)
    .where(_message.c.id.in_(bindparam("ids", expanding=True))))
_ATTACHMENTS = (
    select(_attachment.c.message_id, _attachment.c.filename, _attachment.c.content_type,
           _attachment.c.size)
    .where(_attachment.c.message_id.in_(bindparam("ids", expanding=True)))
    .order_by(_attachment.c.id))
_STILL_SENDING = _outbox.c.status == "sending"
_MARK_SENT = (
    update(_outbox).where(_outbox.c.id == bindparam("id_"))
    # A row that left "sending" meanwhile keeps its verdict: a bounce that came back before
    # this record (failed, with its error). It still gets what was sent and when.
    .values(status=case((_STILL_SENDING, "sent"), else_=_outbox.c.status),
            provider_id=bindparam("provider_id_"),
            rendered=bindparam("rendered_", type_=_outbox.c.rendered.type),
            sent_at=bindparam("sent_at_", type_=_outbox.c.sent_at.type),
            lease_until=None, last_error=case((_STILL_SENDING, ""), else_=_outbox.c.last_error)))
_MARK_TEXT_SENT = _MARK_SENT.values(
    # a status callback that came first keeps its status (and its error: undelivered,
    # 30003); else the provider's status, or "sent"
    delivery_status=func.coalesce(
        func.nullif(_outbox.c.delivery_status, ""),
        bindparam("delivery_status_", type_=_outbox.c.delivery_status.type)),
    last_error=case(
        (or_(~_STILL_SENDING,
             *(_outbox.c.delivery_status == s for s in sorted(UNDELIVERED))),
         _outbox.c.last_error), else_=""))


class Renderer(Protocol):
    def render_email(self, name: str, context: Mapping[str, Any]) -> RenderedEmail: ...

    def render_sms(self, name: str, context: Mapping[str, Any]) -> str: ...


def next_attempt(attempts: int, now: datetime) -> datetime:
    """Backoff after a temporary failure: 30 s, 1 min, 2 min, ... capped at 1 hour."""
    delay = min(30 * 2 ** max(attempts - 1, 0), 3600)
    return now + timedelta(seconds=delay)


@dataclass(slots=True)
class Job:
    """Everything needed to send one claimed row, read when it was claimed."""

    id: int
    kind: str
    channel: str
    recipient: str
    template: str
    message_id: str
    attempts: int
    context: dict[str, Any]
    row_context: dict[str, Any] = field(default_factory=dict)
    claimed_at: float = 0.0
    """loop.time() of the claim: a job still waiting after half its lease is not sent."""


@dataclass(slots=True)
class Sent:
    job: Job
    result: SendResult
    rendered: dict[str, Any] | None = None


class Dispatcher:
    def __init__(
        self, *, sessions: sessionmaker[Session], templates: Renderer,
        ruleset: Callable[[], RuleSet], email: EmailTransport, sms: SmsTransport, clock: Clock,
        settings: Settings, batch_size: int = 200, concurrency: int = 8,
    ) -> None:
        self._sessions = sessions
        self._templates = templates
        self._ruleset = ruleset
        self._email = email
        self._sms = sms
        self._clock = clock
        self._settings = settings
        self._sms_gate = sms_policy.SmsGate.from_settings(settings)  # opt-outs and quiet hours
        self._status_callback = settings.public_url.rstrip("/") + "/sms/twilio/status"
        self._batch_size = batch_size
        self._concurrency = concurrency
        self._limit = asyncio.Semaphore(concurrency)
        self._low_water = 4 * concurrency
        """The next batch is claimed once no more than this many claimed jobs wait to start."""
        self._woken = False
        self.record_every = RECORD_EVERY

    def wake(self) -> None:
        """Note that new work was committed; a running pass claims again."""
        self._woken = True

    async def run_until_idle(self) -> int:
        """Send everything that is due now; returns how many rows were claimed.

        The next batch is claimed while the last jobs of the current one are still going out,
        so the relay connections never wait for the database. Results are recorded as they
        arrive, in one commit per `record_every` seconds at most: a crash then re-sends only
        the messages whose relay 250 was not yet recorded (with the same Message-ID), and on
        SQLite every commit (an fsync) is one the intake writer would otherwise have to wait
        for. A database error stops further claims; what was claimed is still sent and
        recorded, then the error is raised (rows whose record failed keep their lease and are
        sent again once it runs out).
        """
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()  # a send, claim or record finished
        waiting: deque[Job] = deque()  # claimed, not started yet
        sends: set[asyncio.Task[Sent]] = set()
        results: list[Sent] = []  # not recorded yet
        oldest = 0.0  # when the first of `results` arrived

        stale_after = self._settings.outbox_lease_seconds / 2

        def start_next() -> None:
            # A slow relay can keep claimed jobs waiting; one that waited past half its lease
            # could be claimed again by then (and sent twice), so it is left for the lease
            # to run out and is sent by a later claim instead.
            while waiting:
                job = waiting.popleft()
                if loop.time() - job.claimed_at < stale_after:
                    task = asyncio.create_task(self._send(job))
                    sends.add(task)
                    task.add_done_callback(finished)
                    return
                log.warning("outbox %d: waited %.0f s behind a slow relay; sent after its "
                            "lease runs out", job.id, loop.time() - job.claimed_at)

        def finished(task: asyncio.Task[Sent]) -> None:
            nonlocal oldest
            sends.discard(task)
            if task.cancelled():
                return
            if not results:
                oldest = loop.time()
            results.append(task.result())
            start_next()
            changed.set()

        def in_thread(func: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
            future = loop.run_in_executor(None, func, *args)
            future.add_done_callback(lambda _: changed.set())
            return future

        total = 0
        more = True  # the last claim was full: more may be due
        claiming: asyncio.Future[tuple[int, list[Job]]] | None = None
        recording: asyncio.Future[None] | None = None
        error: Exception | None = None
        while True:
            if claiming is not None and claiming.done():
                try:
                    claimed, jobs = claiming.result()
                except Exception as exc:
                    error = error or exc
                else:
                    total += claimed
                    more = claimed >= self._batch_size
                    for job in jobs:
                        job.claimed_at = loop.time()
                    waiting.extend(jobs)
                    while waiting and len(sends) < self._concurrency:
                        start_next()
                claiming = None
            if recording is not None and recording.done():
                try:
                    recording.result()
                except Exception as exc:
                    error = error or exc
                recording = None
            if (claiming is None and error is None and (more or self._woken)
                    and len(waiting) <= self._low_water):
                self._woken = False
                claiming = in_thread(self._claim, self._clock.now())
            if recording is None and results and (
                    not sends or loop.time() - oldest >= self.record_every):
                recording = in_thread(self._record, results)
                results = []
            if claiming is None and recording is None and not sends:
                break
            timeout = None
            if results and recording is None:
                timeout = oldest + self.record_every - loop.time()
            changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await changed.wait()
        if error is not None:
            raise error
        return total

    # --- claim (worker thread) ----------------------------------------------------------------

    def _claim(self, now: datetime) -> tuple[int, list[Job]]:
        """Claims a batch: how many rows were claimed, and the jobs for those that may be sent
        (the SMS gate and bounce suppression cancel or hold the others)."""
        lease = timedelta(seconds=self._settings.outbox_lease_seconds)
        with self._sessions() as session, session.begin():
            claimed = store.claim_due_outbox(session, now, limit=self._batch_size, lease=lease)
            rows = self._sms_gate.admit(session, claimed, now)
            rows = bounces.drop_suppressed(session, rows)  # hard-bounced addresses
        if not rows:
            return len(claimed), []
        # What rendering needs is read after the claim has committed: on SQLite the write
        # lock (which intake waits for) is held only for the claim itself.
        ruleset = self._ruleset()
        with self._sessions() as session, session.begin():
            enquiries = _read_enquiries(
                session.connection(execution_options={"write": False}), rows, ruleset)
        return len(claimed), [self._job(row, enquiries, ruleset) for row in rows]

    def _job(self, row: Row[Any], enquiries: dict[int, _About], ruleset: RuleSet) -> Job:
        return Job(id=row.id, kind=row.kind, channel=row.channel, recipient=row.recipient,
                   template=row.template, message_id=row.message_id, attempts=row.attempts,
                   context=dict(row.context), row_context=self._context(row, enquiries, ruleset))

    def _context(
        self, row: Row[Any], enquiries: dict[int, _About], ruleset: RuleSet
    ) -> dict[str, Any]:
        s = self._settings
        context = row.context
        ctx: dict[str, Any] = {
            "clinic": {"name": s.clinic_name, "address": s.clinic_address, "phone": s.clinic_phone,
                       "website": s.clinic_website},
            "enquiry": None, "patient": {"name": "", "first_name": "", "email": "", "phone": ""},
            "message": {"subject": "", "text": "", "excerpt": "", "attachments": []},
            "team": {"id": "", "display_name": "", "email": ""},
            "decision": {"rule": context.get("rule", ""),
                         "reasons": list(context.get("reasons", []))},
            "reminder": None,
            # a notification about a patient writing again, not about a new enquiry
            "update": bool(context.get("update", False)),
        }
        about = enquiries.get(row.enquiry_id) if row.enquiry_id else None
        if about is not None:
            ctx.update(about.parts)
            team = ruleset.teams.get(context.get("team") or about.team)
            if team is not None:
                ctx["team"] = {"id": team.id, "display_name": team.display_name,
                               "email": team.email}
            if not ctx["decision"]["rule"]:
                ctx["decision"]["rule"] = about.rule
        if row.reminder_id is not None:
            ctx["reminder"] = {"name": context.get("reminder", ""), "due_at": row.due_at}
        return ctx

    # --- send (event loop) --------------------------------------------------------------------

    async def _send(self, job: Job) -> Sent:
        async with self._limit:
            try:
                if job.channel == "sms":
                    body = self._templates.render_sms(job.template, job.row_context)
                    result = await self._sms.send(SmsRequest(
                        to=job.recipient, body=body, idempotency_key=job.message_id,
                        status_callback=self._status_callback))
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
        """Sends the transport took are marked sent with one executemany per channel (a text
        also gets its delivery status, unless a status callback set one first); failures
        (SMS policy, events, backoff) go through `_apply` on the rows loaded as objects."""
        now = self._clock.now()
        emails: list[dict[str, Any]] = []
        texts: list[dict[str, Any]] = []
        failed: dict[int, Sent] = {}
        for r in results:
            result = r.result
            if result.outcome is not Outcome.OK:
                failed[r.job.id] = r
                continue
            values = {"id_": r.job.id, "provider_id_": result.provider_id[:255],
                      "rendered_": r.rendered, "sent_at_": now}
            if r.job.channel == "sms":
                values["delivery_status_"] = result.status or "sent"
                texts.append(values)
            else:
                emails.append(values)
        with self._sessions() as session, session.begin():
            connection = session.connection()
            if emails:
                connection.execute(_MARK_SENT, emails)
            if texts:
                connection.execute(_MARK_TEXT_SENT, texts)
            if failed:
                for item in session.scalars(select(OutboxItem).where(OutboxItem.id.in_(failed))):
                    self._apply(session, item, failed[item.id], now)
        for r in results:
            if r.result.outcome is Outcome.OK:
                log.info("outbox %d sent (%s %s, attempt %d)", r.job.id, r.job.kind,
                         r.job.channel, r.job.attempts)

    def _apply(self, session: Session, item: OutboxItem, sent: Sent, now: datetime) -> None:
        """A failed send: backoff, or failed for good with an event."""
        result = sent.result
        assert result.outcome is not Outcome.OK  # those are marked sent by `_record`
        sms_policy.after_send(session, item, result, now)  # 21610 = opted out
        item.lease_until = None
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
class _About:
    """One enquiry's share of the template context, built once for all its rows. (Templates
    cannot change what they are given: the sandbox is immutable.)"""

    team: str
    rule: str
    parts: dict[str, Any]
    """The "enquiry" and "patient" entries, and "message" when there is an inbound one."""


def _read_enquiries(connection: Connection, rows: list[Row[Any]], ruleset: RuleSet
                    ) -> dict[int, _About]:
    """What rendering a claimed batch reads about its enquiries, with two queries rather than
    several per row."""
    ids = {row.enquiry_id for row in rows if row.enquiry_id is not None}
    if not ids:
        return {}
    enquiries = list(connection.execute(_BATCH, {"ids": list(ids)}))
    attachments: dict[int, list[dict[str, Any]]] = {}
    messages: dict[int, Row[Any]] = {}
    latest = [e.message_id for e in enquiries if e.message_id is not None]
    if latest:
        messages = {m.id: m for m in connection.execute(_MESSAGES, {"ids": latest})}
        for a in connection.execute(_ATTACHMENTS, {"ids": latest}):
            attachments.setdefault(a.message_id, []).append(
                {"filename": a.filename, "content_type": a.content_type, "size": a.size})
    return {e.id: _about(e, messages.get(e.message_id), attachments, ruleset)
            for e in enquiries}


def _about(e: Row[Any], message: Row[Any] | None,
           attachments: dict[int, list[dict[str, Any]]], ruleset: RuleSet) -> _About:
    """From a `_BATCH` row: the enquiry, its contact (none: an empty patient) and its latest
    inbound message (a `_MESSAGES` row) with its attachments."""
    name = e.contact_name or ""
    parts: dict[str, Any] = {
        "enquiry": {"reference": e.reference, "category": e.category, "priority": e.priority,
                    "team": e.team, "team_name": _team_name(ruleset, e.team),
                    "subject": e.subject, "channel": e.channel, "created_at": e.created_at,
                    "status": e.status, "tags": list(e.tags)},
        "patient": {"name": name, "first_name": first_name(name),
                    "email": e.contact_email or "", "phone": e.contact_phone or ""},
    }
    if message is not None:
        parts["message"] = {"subject": message.subject, "text": message.text,
                            "excerpt": _excerpt(message.text),
                            "attachments": attachments.get(message.id, [])}
    return _About(team=e.team, rule=e.rule, parts=parts)


_TITLES = frozenset({"dr", "mr", "mrs", "ms", "miss", "mx", "prof", "professor", "sir",
                     "dame", "rev", "revd", "lady", "lord"})
_BRACKETS = re.compile(r"\([^)]*\)|\[[^\]]*\]")


def first_name(name: str) -> str:
    """What a greeting can use from a sender's display name, or "" (templates then say
    "Hello"): not a title ("Dr Jane Smith"), not a surname written first ("SMITH, Jane
    (NHS TRUST)"), not an address, and not in capitals."""
    name = _BRACKETS.sub(" ", name).strip()
    if not name or "@" in name:
        return ""
    if "," in name:
        surname, _, rest = name.partition(",")
        name = rest.strip() or surname
    words = [w for w in name.replace(".", " ").split() if w.lower() not in _TITLES]
    if not words or not words[0][0].isalpha():
        return ""
    first = words[0]
    return first.capitalize() if first.isupper() and len(first) > 1 else first


def _team_name(ruleset: RuleSet, team_id: str) -> str:
    team = ruleset.teams.get(team_id)
    return team.display_name if team else team_id


def _excerpt(text: str, limit: int = 600) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"
