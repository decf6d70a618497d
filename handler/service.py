"""Intake: turn an InboundMessage into a durable enquiry, in one transaction per group.

`Intake.accept(msg)` resolves only after the message, the enquiry, the routing decision and
the outbox rows are committed, so the SMTP 250 / HTTP 200 that follows means "stored". One
writer commits the messages that arrived together in a single transaction (group commit);
each caller awaits its own outcome. Re-delivery of a known (channel, external id) succeeds
without storing anything again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from handler import guards, store
from handler.classify import classify
from handler.clock import Clock
from handler.config import Settings
from handler.decision import Decision
from handler.inbound import Channel, InboundMessage
from handler.models import Contact, Enquiry, Message
from handler.rules import RuleSet

log = logging.getLogger("handler.intake")


@dataclass(frozen=True, slots=True)
class AcceptOutcome:
    reference: str
    duplicate: bool = False
    kind: str = "enquiry"
    """"enquiry" (new), "reply" (joined an enquiry), or what an interceptor handled."""
    queued: int = 0
    """Outbox rows created (the dispatcher is woken when > 0)."""
    notes: tuple[str, ...] = field(default=())


class Acceptor(Protocol):
    """What the protocol adapters hand messages to: `Intake`, or `RemoteIntake` (the same
    intake in its own process)."""

    async def accept(self, msg: InboundMessage) -> AcceptOutcome: ...


class Interceptor(Protocol):
    """Handles messages that are not enquiries (SMS keywords, bounces) before routing.
    Returns None to let the message through to routing."""

    def __call__(
        self, session: Session, msg: InboundMessage, now: datetime
    ) -> AcceptOutcome | None: ...


Done = Callable[[AcceptOutcome | BaseException], None]
"""Called on the event loop with a submitted message's outcome, once."""


@dataclass(slots=True)
class _Pending:
    msg: InboundMessage
    done: Done


class Intake:
    def __init__(
        self, *, sessions: sessionmaker[Session], ruleset: Callable[[], RuleSet], clock: Clock,
        settings: Settings, on_queued: Callable[[], None] = lambda: None,
        interceptors: Sequence[Interceptor] = (), max_batch: int = 64,
    ) -> None:
        self._sessions = sessions
        self._ruleset = ruleset
        self._clock = clock
        self._settings = settings
        self._on_queued = on_queued
        self.interceptors = list(interceptors)
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Pending | None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._domain = settings.clinic_address.rpartition("@")[2] or "enquiry-handler.invalid"
        self._ack_window = timedelta(hours=settings.ack_window_hours)

    # --- the group-commit writer ------------------------------------------------------------

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._writer = asyncio.create_task(self._write_loop(), name="intake-writer")

    async def stop(self, *, drain_seconds: float = 10.0) -> None:
        """Finish what was queued (the senders are waiting for their answer), then stop."""
        if self._writer is None or self._queue is None:
            return
        await self._queue.put(None)  # the writer exits when it reaches this marker
        try:
            await asyncio.wait_for(asyncio.shield(self._writer), drain_seconds)
        except TimeoutError:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        self._writer = None
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if pending is not None:
                pending.done(RuntimeError("service is shutting down"))
        self._queue = None  # later callers get an error (SMTP 451), not a wait for no one

    async def accept(self, msg: InboundMessage) -> AcceptOutcome:
        """Durably record `msg`; raises when it could not be stored (caller answers 4xx/5xx)."""
        future: asyncio.Future[AcceptOutcome] = asyncio.get_running_loop().create_future()

        def done(result: AcceptOutcome | BaseException) -> None:
            if future.done():  # the caller went away (cancelled)
                return
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

        self.submit(msg, done)
        return await future

    def submit(self, msg: InboundMessage, done: Done) -> None:
        """`accept` without a future or task per message (the intake worker process hands
        over messages as they come off its socket): `done` gets the outcome, called on the
        event loop after the commit."""
        if self._queue is None:
            raise RuntimeError("Intake.start() was not called")
        self._queue.put_nowait(_Pending(msg, done))  # unbounded: never waits

    async def _write_loop(self) -> None:
        assert self._queue is not None
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self._max_batch and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            try:
                results = await asyncio.to_thread(self._write_batch, [p.msg for p in batch])
            except Exception as exc:  # the whole transaction failed: every sender retries
                log.error("intake commit failed for %d message(s): %s", len(batch),
                          type(exc).__name__)
                results = [exc] * len(batch)
            queued = 0
            for pending, result in zip(batch, results, strict=True):
                if not isinstance(result, BaseException):
                    queued += result.queued
                try:
                    pending.done(result)
                except Exception:  # one caller's callback must not lose the others' answers
                    log.exception("intake: answering a sender failed")
            if queued:
                self._on_queued()

    def _write_batch(self, msgs: list[InboundMessage]) -> list[AcceptOutcome | Exception]:
        """Optimistically the whole group in one transaction; when any message fails, again
        with a savepoint per message, so that one bad message cannot fail the others."""
        now = self._clock.now()
        try:
            with self._sessions() as session, session.begin():
                deferred = store.defer_writes(session)
                results: list[AcceptOutcome | Exception] = [
                    self.record(session, msg, now) for msg in msgs]
                deferred.write(session)
            return results
        except Exception as exc:
            log.info("intake: redoing %d message(s) one by one after %s", len(msgs),
                     type(exc).__name__)
        return self._write_each(msgs, now)

    def _write_each(
        self, msgs: list[InboundMessage], now: datetime
    ) -> list[AcceptOutcome | Exception]:
        results: list[AcceptOutcome | Exception] = []
        with self._sessions() as session, session.begin():
            for msg in msgs:
                try:
                    with session.begin_nested():
                        results.append(self.record(session, msg, now))
                except IntegrityError:
                    # Another instance stored the same message between our read and write.
                    session.expunge_all()  # rows inserted in the rolled-back savepoint are gone
                    existing = store.find_inbound(session, msg)
                    if existing is None:
                        results.append(RuntimeError("integrity error without a duplicate"))
                    else:
                        results.append(_duplicate(existing))
                except Exception as exc:
                    log.exception("intake failed for one message (%s)", msg.channel.value)
                    session.expunge_all()  # rows inserted in the rolled-back savepoint are gone
                    results.append(exc)
        return results

    # --- recording one message (inside the caller's transaction) ----------------------------

    def record(self, session: Session, msg: InboundMessage, now: datetime) -> AcceptOutcome:
        settings = self._settings
        ruleset = self._ruleset()
        store.write_deferred(session, msg)  # rows of this group it may need to see
        known = store.look_up(session, msg, since=now - self._ack_window,
                              earlier_cap=ruleset.earlier_enquiries_cap)
        if known.stored_id is not None:
            return _duplicate(session.get_one(Message, known.stored_id))
        for intercept in self.interceptors:  # those that let a message through write nothing
            outcome = intercept(session, msg, now)
            if outcome is not None:
                return outcome

        contact: Contact | store.Created | None = None
        if known.contact_id is not None:
            contact = store.Created(known.contact_id)
        thread = store.find_thread(session, msg, contact, now=now,
                                   sms_thread_days=settings.sms_thread_days)
        facts = store.gather_facts(known, thread, earlier_cap=ruleset.earlier_enquiries_cap)
        decision = classify(msg, ruleset, facts, now)
        auto_reason = guards.auto_reply_reason(msg, is_own_message=known.own_message_id)
        if contact is None:
            contact = store.create_contact(session, msg, now)
        elif (msg.sender_name and not known.contact_named) or (
                msg.channel is Channel.EMAIL and known.email_suppressed):
            # Only a contact that changes is loaded as an object.
            contact = store.get_or_create_contact(
                session, msg, now, known=session.get_one(Contact, known.contact_id))
            if msg.channel is Channel.EMAIL and contact.email_suppressed_at is not None:
                contact.email_suppressed_at = None  # they wrote in: the address works again
                store.record_event(session, "email-unsuppressed", now, contact=contact)

        if thread.enquiry is None:
            return self._open_enquiry(session, msg, contact, decision, facts, auto_reason,
                                      ruleset, now)
        return self._continue_enquiry(session, msg, contact, thread.enquiry, decision, facts,
                                      auto_reason, ruleset, now, thread.how)

    def _open_enquiry(
        self, session: Session, msg: InboundMessage, contact: Contact | store.Created,
        decision: Decision, facts: Any, auto_reason: str, ruleset: RuleSet, now: datetime,
    ) -> AcceptOutcome:
        enquiry = store.create_enquiry(session, msg, contact, decision, now)
        store.add_message(session, msg, enquiry=enquiry, contact=contact, kind="enquiry",
                          now=now)
        queued = self._queue_reply(session, msg, contact, enquiry, decision, facts, auto_reason,
                                   now)
        queued += self._queue_notifications(session, enquiry, decision.teams,
                                            decision.notify_template, decision, ruleset, now)
        store.add_reminders(session, enquiry, decision.reminders, now)
        store.record_event(session, "enquiry-opened", now, enquiry=enquiry, contact=contact,
                           rule=decision.rule, category=decision.category,
                           priority=decision.priority, teams=list(decision.teams))
        log.info("enquiry %s opened: %s/%s -> %s (rule %s)", enquiry.reference,
                 decision.category, decision.priority, ",".join(decision.teams), decision.rule)
        return AcceptOutcome(enquiry.reference, kind="enquiry", queued=queued)

    def _continue_enquiry(
        self, session: Session, msg: InboundMessage, contact: Contact | store.Created,
        enquiry: Enquiry, decision: Decision, facts: Any, auto_reason: str, ruleset: RuleSet,
        now: datetime, how: str,
    ) -> AcceptOutcome:
        enquiry.last_inbound_at = now
        enquiry.updated_at = now
        if enquiry.status != "open":
            enquiry.status = "open"
            enquiry.closed_at = None
            store.record_event(session, "enquiry-reopened", now, enquiry=enquiry)
        store.add_message(session, msg, enquiry=enquiry, contact=contact,
                          kind="auto-reply" if auto_reason else "reply", now=now)
        store.cancel_patient_reminders(session, enquiry, now)
        queued = 0
        if auto_reason:
            store.record_event(session, "auto-reply-stored", now, enquiry=enquiry,
                               reason=auto_reason)
        elif decision.priority == "urgent" and enquiry.priority != "urgent":
            # A red flag in a follow-up escalates the whole enquiry.
            enquiry.priority = "urgent"
            new_teams = [t for t in decision.teams if t not in enquiry.teams]
            enquiry.teams = list(enquiry.teams) + new_teams
            queued += self._queue_reply(session, msg, contact, enquiry, decision, facts, "",
                                        now)
            queued += self._queue_notifications(session, enquiry, decision.teams,
                                                decision.notify_template, decision, ruleset,
                                                now)
            store.record_event(session, "enquiry-escalated", now, enquiry=enquiry,
                               rule=decision.rule)
        else:
            queued += self._queue_notifications(session, enquiry, enquiry.teams,
                                                enquiry.notify_template, decision, ruleset,
                                                now, update=True)
        store.record_event(session, "message-added", now, enquiry=enquiry, contact=contact,
                           how=how, rule=decision.rule)
        log.info("message joined enquiry %s (%s)", enquiry.reference, how)
        return AcceptOutcome(enquiry.reference, kind="reply", queued=queued)

    def _queue_reply(
        self, session: Session, msg: InboundMessage, contact: Contact | store.Created,
        enquiry: Enquiry | store.Created, decision: Decision, facts: Any, auto_reason: str,
        now: datetime,
    ) -> int:
        plan = guards.plan_reply(msg, decision, facts, ack_limit=self._settings.ack_limit_per_day,
                                 auto_reason=auto_reason)
        if not plan.send_reply:
            store.record_event(session, "reply-suppressed", now, enquiry=enquiry,
                               contact=contact, reason=plan.reason)
            return 0
        assert decision.reply_template is not None
        context: dict[str, Any] = {}
        if msg.channel is Channel.EMAIL:
            context = {"in_reply_to": msg.external_id,
                       "references": [*msg.references, msg.external_id][-20:]}
        store.enqueue(session, kind="ack", channel=msg.channel, recipient=msg.sender,
                      template=decision.reply_template, due_at=now, now=now,
                      domain=self._domain, enquiry=enquiry, contact=contact, context=context,
                      urgent=decision.priority == "urgent")
        return 1

    def _queue_notifications(
        self, session: Session, enquiry: Enquiry | store.Created, teams: Sequence[str],
        template: str | None, decision: Decision, ruleset: RuleSet, now: datetime, *,
        update: bool = False,
    ) -> int:
        if not template:
            return 0
        urgent = decision.priority == "urgent"
        context = {"update": update, "rule": decision.rule,
                   "reasons": [r for hit in decision.trace if hit.matched for r in hit.reasons]}
        queued = 0
        for team_id in teams:
            team = ruleset.teams.get(team_id)
            if team is None:
                log.error("enquiry %s: team %r is not defined; coordinator notified instead",
                          enquiry.reference, team_id)
                team = ruleset.teams.get("coordinator")
                if team is None:
                    continue
            if team.email:
                store.enqueue(session, kind="notify", channel=Channel.EMAIL, recipient=team.email,
                              template=template, due_at=now, now=now, domain=self._domain,
                              enquiry=enquiry, context={**context, "team": team.id},
                              urgent=urgent)
                queued += 1
            if urgent and team.sms:
                store.enqueue(session, kind="notify", channel=Channel.SMS, recipient=team.sms,
                              template="notify-urgent", due_at=now, now=now,
                              domain=self._domain, enquiry=enquiry,
                              context={**context, "team": team.id}, urgent=True)
                queued += 1
        return queued


def _duplicate(existing: Message) -> AcceptOutcome:
    enquiry = existing.enquiry
    return AcceptOutcome(enquiry.reference if enquiry else "", duplicate=True,
                         kind=existing.kind)
