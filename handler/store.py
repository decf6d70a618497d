"""Database reads and writes for intake and delivery, on a caller's (synchronous) Session.

Functions here never commit: the caller owns the transaction. Intake reads what it needs
about each message of a group commit with one query (`look_up`), inserts with prebuilt Core
statements run straight on the DBAPI cursor (`_Raw`), and leaves the rows nothing in the group
needs back (messages, outbox rows, events, reminders) to one executemany per table at the
group's end (`Deferred`); the dispatcher claims and marks outbox rows.
"""

from __future__ import annotations

import functools
import operator
import re
import secrets
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    Column,
    Executable,
    Insert,
    Result,
    Row,
    Table,
    bindparam,
    func,
    insert,
    inspect,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.orm import Session, make_transient_to_detached

from handler.decision import Decision, Facts, ReminderSpec
from handler.inbound import Channel, InboundMessage
from handler.models import (
    OUTBOX_WORK,
    Attachment,
    Base,
    Blob,
    Contact,
    Enquiry,
    Event,
    Message,
    OutboxItem,
    Reminder,
)

_Row = TypeVar("_Row", bound=Base)
_REF_ALPHABET = "ABCDEFGHJKMNPQRSTVWXYZ23456789"  # no 0/O, 1/I/L, U: easy to read aloud
REFERENCE_RE = re.compile(r"\bENQ-([A-HJ-NP-TV-Z2-9]{6})\b", re.IGNORECASE)
_DURATION_RE = re.compile(r"^\s*(\d+)\s*([mhdw])\s*$")
_DEFERRED = "handler.deferred"  # key in Session.info

# Intake's hot-path queries, built once as Core statements on the tables: an ORM query costs
# ~140 µs of Python per call (building the expression, loading entities), these ~25 µs.
_contact, _enquiry = Contact.__table__, Enquiry.__table__
_message, _outbox = Message.__table__, OutboxItem.__table__
_CONTACT_BY_EMAIL = select(_contact.c.id).where(_contact.c.email == bindparam("sender"))
_CONTACT_BY_PHONE = select(_contact.c.id).where(_contact.c.phone == bindparam("sender"))
_INBOUND = select(_message.c.id).where(
    _message.c.channel == bindparam("channel"), _message.c.direction == "in",
    _message.c.external_id == bindparam("external_id"))
class _Raw:
    """A prebuilt Core statement run on the DBAPI cursor of the session's connection.

    Compiled once per dialect, with its parameters put in bind order and through the
    types' bind processors (JSON, UTC datetimes) by a precomputed list: this skips the
    ~50 µs per statement that `Connection.execute` spends on the execution context,
    `construct_params` and result set-up. `params` names the keys the caller supplies;
    other bound values are the statement's constants. With `returning_id`, `insert_id`
    gives the new row's id (RETURNING on PostgreSQL, lastrowid on SQLite)."""

    __slots__ = ("_by_dialect", "_params", "_returning_id", "_statement")

    def __init__(self, statement: Executable, params: Iterable[str], *,
                 returning_id: bool = False) -> None:
        self._statement = statement
        self._params = frozenset(params)
        self._returning_id = returning_id
        self._by_dialect: dict[tuple[str, str], _Prepared] = {}

    def prepared(self, dialect: Dialect) -> _Prepared:
        key = (dialect.name, dialect.driver)
        prepared = self._by_dialect.get(key)
        if prepared is None:
            prepared = self._by_dialect[key] = self._prepare(dialect)
        return prepared

    def _prepare(self, dialect: Dialect) -> _Prepared:
        statement = self._statement
        kw: dict[str, Any] = {}
        lastrowid = False
        if isinstance(statement, Insert):
            if self._returning_id and dialect.name != "sqlite":
                table = statement.table
                statement = statement.returning(table.c.id)  # type: ignore[attr-defined]
            else:
                lastrowid = self._returning_id
                kw["for_executemany"] = True  # no implicit RETURNING of the primary key
            kw["column_keys"] = sorted(self._params)
        compiled = statement.compile(dialect=dialect, **kw)
        if getattr(compiled, "insert_prefetch", None) or getattr(
                compiled, "postfetch", None):
            # A column left out would need its Python default: the caller must give it.
            raise ValueError(f"{self._statement}: give every column with a default")
        positional = compiled.positiontup is not None
        names = list(compiled.positiontup or dict.fromkeys(compiled.bind_names.values()))
        escaped = compiled.escaped_bind_names
        entries: list[_Entry] = []
        for name in names:
            bind = compiled.binds[name]
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if bind.key in self._params:
                entries.append((escaped.get(name, name), bind.key, None, processor))
            else:  # a constant of the statement: processed once, here
                value = bind.effective_value
                entries.append((escaped.get(name, name), None,
                                processor(value) if processor else value, None))
        return _Prepared(compiled.string, positional, tuple(entries), lastrowid)

    def execute(self, session: Session, values: Mapping[str, Any]) -> Any:
        """Run with one set of values; returns the DBAPI cursor."""
        connection = session.connection()
        prepared = self.prepared(connection.dialect)
        return _run(connection, prepared, prepared.params(values), many=False)

    def executemany(self, session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
        connection = session.connection()
        prepared = self.prepared(connection.dialect)
        _run(connection, prepared, [prepared.params(row) for row in rows], many=True)

    def insert_id(self, session: Session, values: Mapping[str, Any]) -> int | None:
        """Run an INSERT; the new row's id (None when ON CONFLICT DO NOTHING skipped it)."""
        connection = session.connection()
        prepared = self.prepared(connection.dialect)
        cursor = _run(connection, prepared, prepared.params(values), many=False)
        if prepared.lastrowid:
            return int(cursor.lastrowid)
        rows = cursor.fetchall()  # all: SQLite finishes a RETURNING statement on the last row
        return int(rows[0][0]) if rows else None


class _Prepared:
    """A `_Raw` statement compiled for one dialect, and how to build its parameters."""

    __slots__ = ("_constants", "_get", "_names", "_processors", "lastrowid", "positional",
                 "sql")

    def __init__(self, sql: str, positional: bool, entries: Sequence[_Entry],
                 lastrowid: bool) -> None:
        self.sql, self.positional, self.lastrowid = sql, positional, lastrowid
        self._names = tuple(name for name, _key, _constant, _processor in entries)
        # The statement's own constants (already processed) under their bind names, merged
        # under the caller's values; one C-level itemgetter then puts all in bind order.
        self._constants = {name: constant for name, key, constant, _ in entries
                           if key is None}
        keys = [name if key is None else key for name, key, _constant, _ in entries]
        self._get = operator.itemgetter(*keys) if len(keys) > 1 else (
            lambda values, key=keys[0]: (values[key],))
        self._processors = tuple((i, _last_value_cached(processor))
                                 for i, (_name, _key, _constant, processor)
                                 in enumerate(entries) if processor is not None)

    def params(self, values: Mapping[str, Any]) -> Any:
        out = list(self._get({**self._constants, **values} if self._constants else values))
        for i, processor in self._processors:
            out[i] = processor(out[i])
        if self.positional:
            return tuple(out)
        return dict(zip(self._names, out, strict=True))


_Entry = tuple[str, str | None, Any, Callable[[Any], Any] | None]
"""(parameter name, caller's key or None for a constant, constant, bind processor)."""


def _last_value_cached(processor: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`processor` remembering its last argument: a group's rows carry the same `now` in
    several columns, formatted once. Identity, not equality: the cache holds the value, so
    no other object can take its id; one tuple swapped whole, so threads may share it."""
    last: list[tuple[Any, Any]] = [(object(), None)]

    def process(value: Any) -> Any:
        seen, result = last[0]
        if value is seen:
            return result
        result = processor(value)
        if isinstance(value, datetime):  # immutable; JSON values (dicts, lists) are not
            last[0] = (value, result)
        return result

    return process


def _run(connection: Connection, prepared: _Prepared, params: Any, *, many: bool) -> Any:
    cursor = None
    try:
        cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        if many:
            cursor.executemany(prepared.sql, params)
        else:
            cursor.execute(prepared.sql, params)
    except Exception as exc:
        # What Connection.execute does with a driver error: SQLAlchemy's IntegrityError etc.,
        # and a lost connection invalidated. Parameters never shown (patient data).
        connection._handle_dbapi_exception(exc, prepared.sql, None, cursor, None)
    return cursor


def _columns(table: Table, *, leave_out: Iterable[str] = ()) -> tuple[str, ...]:
    """The columns an intake INSERT gives: all but the id (and `leave_out`)."""
    skip = {"id", *leave_out}
    return tuple(c.key for c in table.columns if c.key not in skip)


_OUTBOX_COLUMNS = _columns(_outbox, leave_out=("rendered",))  # rendered: SQL NULL, not JSON null
_INSERT_EVENT = _Raw(insert(Event.__table__), _columns(Event.__table__))
_INSERT_REMINDER = _Raw(insert(Reminder.__table__), _columns(Reminder.__table__))
_INSERT_CONTACT = _Raw(insert(_contact), _columns(_contact), returning_id=True)
_INSERT_MESSAGE = _Raw(insert(_message), _columns(_message), returning_id=True)
_INSERT_OUTBOX = _Raw(insert(_outbox), _OUTBOX_COLUMNS, returning_id=True)
_INSERT_MESSAGES = _Raw(insert(_message), _columns(_message))  # a group's, no ids back
_INSERT_OUTBOXES = _Raw(insert(_outbox), _OUTBOX_COLUMNS)
# A new reference is taken by the INSERT itself: ON CONFLICT DO NOTHING returns no id when
# the random reference exists already (no separate SELECT per enquiry).
_INSERT_ENQUIRY = {
    name: _Raw(dialect_insert(_enquiry).on_conflict_do_nothing(
        index_elements=[_enquiry.c.reference]).returning(_enquiry.c.id), _columns(_enquiry))
    for name, dialect_insert in (("postgresql", postgresql.insert), ("sqlite", sqlite.insert))}


def _known_statement(contact_column: Column[Any], *, email: bool) -> Executable:
    """Everything intake reads about a message before routing it, as one row: its id if it
    was stored before, the sender's contact (if any), the contact's earlier enquiries, the
    acknowledgements sent to the sender since :since, and (email) whether its Message-ID is
    one of ours. One round trip instead of six."""
    one_row = select(literal(1).label("one")).subquery()
    columns: list[Any] = [
        _INBOUND.scalar_subquery(),
        _contact.c.id, _contact.c.name != "", _contact.c.sms_opted_out_at.is_not(None),
        _contact.c.email_suppressed_at.is_not(None),
        # counted up to :earlier_cap only: a referrer with thousands of enquiries would
        # otherwise cost a scan of all of them per message (~1 ms at 5,000 on PostgreSQL)
        # (correlated explicitly: inside a derived table SQLAlchemy would otherwise give the
        # inner SELECT a contact of its own and count any contact's enquiries)
        select(func.count()).select_from(
            select(_enquiry.c.id).where(_enquiry.c.contact_id == _contact.c.id)
            .correlate(_contact).limit(bindparam("earlier_cap")).subquery()).scalar_subquery(),
        select(func.count()).select_from(_outbox).where(
            _outbox.c.recipient == bindparam("sender"), _outbox.c.kind == "ack",
            # a failed (bounced, refused) acknowledgement never arrived: it does not count
            # (two comparisons, not NOT IN: an IN list is re-rendered at every execution)
            _outbox.c.status != "cancelled", _outbox.c.status != "failed",
            _outbox.c.created_at >= bindparam("since")).scalar_subquery(),
    ]
    if email:
        columns.append(select(_outbox.c.id).where(
            _outbox.c.message_id == bindparam("external_id")).exists())
    return select(*columns).select_from(
        one_row.outerjoin(_contact, contact_column == bindparam("sender")))


_LOOK_UP_PARAMS = ("channel", "external_id", "sender", "since", "earlier_cap")
_KNOWN_EMAIL = _Raw(_known_statement(_contact.c.email, email=True), _LOOK_UP_PARAMS)
_KNOWN_SMS = _Raw(_known_statement(_contact.c.phone, email=False), _LOOK_UP_PARAMS)


def _core(session: Session, statement: Executable, **params: Any) -> Result[Any]:
    """Run a prebuilt Core statement in the session's transaction. Flushes pending objects
    first, as an ORM query would (Core statements skip the session's autoflush)."""
    if session.autoflush:
        session.flush()
    return session.connection().execute(statement, params)


def _add_now(session: Session, obj: _Row) -> _Row:
    """INSERT `obj`'s row at once with Core and attach `obj` to the session as though it had
    been loaded: a third of the cost of session.add + flush. Columns left unset get their
    column defaults, as a flush would give them. (After a failed savepoint such objects are
    not expunged by the rollback: the intake writer expunges everything itself.)"""
    table = obj.__table__
    given = inspect(obj).dict
    values: dict[str, Any] = {}
    for column in table.columns:
        if column.key in given:
            values[column.key] = given[column.key]
        elif not column.primary_key and _has_python_default(column):
            values[column.key] = _python_default(column)
            setattr(obj, column.key, values[column.key])
    result = session.connection().execute(_insert_into(table), values)
    obj.id = result.inserted_primary_key[0]
    make_transient_to_detached(obj)
    session.add(obj)
    return obj


@functools.cache
def _insert_into(table: Table) -> Insert:
    """One INSERT construct per table: a new one each time costs its cache key."""
    return insert(table)


def _has_python_default(column: Column[Any]) -> bool:
    default = column.default
    return default is None or bool(default.is_scalar or default.is_callable)


def _python_default(column: Column[Any]) -> Any:
    default = column.default
    if default is None:
        return None
    return default.arg if default.is_scalar else default.arg(None)  # type: ignore[attr-defined]


_REF_SPACE = len(_REF_ALPHABET) ** 6


def new_reference() -> str:
    # One draw for all six letters (secrets.choice per letter cost ~15 µs), uniformly.
    n = secrets.randbelow(_REF_SPACE)
    letters = []
    for _ in range(6):
        n, i = divmod(n, len(_REF_ALPHABET))
        letters.append(_REF_ALPHABET[i])
    return "ENQ-" + "".join(letters)


def new_message_id(domain: str) -> str:
    return f"{uuid.uuid4().hex}@{domain}"


@functools.lru_cache(maxsize=256)  # the rules' few durations, for every reminder of every enquiry
def parse_duration(text: str) -> timedelta:
    """"30m", "4h", "2d", "1w" -> timedelta."""
    m = _DURATION_RE.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30m, 4h, 2d, 1w)")
    n, unit = int(m.group(1)), m.group(2)
    return {"m": timedelta(minutes=n), "h": timedelta(hours=n), "d": timedelta(days=n),
            "w": timedelta(weeks=n)}[unit]


@dataclass(frozen=True, slots=True)
class Created:
    """A row just inserted with Core: its id (and an enquiry's reference). Building the ORM
    object instead costs ~100 µs, and nothing in the transaction needs one."""

    id: int
    reference: str = ""


@dataclass(frozen=True, slots=True)
class Thread:
    enquiry: Enquiry | None
    how: str = ""


def find_contact(session: Session, msg: InboundMessage) -> Contact | None:
    statement = _CONTACT_BY_PHONE if msg.channel is Channel.SMS else _CONTACT_BY_EMAIL
    contact_id = _core(session, statement, sender=msg.sender).scalar()
    return None if contact_id is None else session.get(Contact, contact_id)


def create_contact(session: Session, msg: InboundMessage, now: datetime) -> Created:
    """A new contact for the sender, with a Core insert."""
    contact_id = _INSERT_CONTACT.insert_id(session, {
        "email": None if msg.channel is Channel.SMS else msg.sender,
        "phone": msg.sender if msg.channel is Channel.SMS else None,
        "name": msg.sender_name[:200], "sms_opted_out_at": None, "email_suppressed_at": None,
        "email_suppressed_reason": "", "created_at": now, "erased_at": None})
    assert contact_id is not None
    return Created(contact_id)


def get_or_create_contact(
    session: Session, msg: InboundMessage, now: datetime, *, known: Contact | None = None
) -> Contact:
    """The sender's contact, created if new; `known` saves the lookup when the caller has
    just found it."""
    contact = known or find_contact(session, msg)
    if contact is None:
        contact = Contact(created_at=now, name=msg.sender_name[:200])
        if msg.channel is Channel.SMS:
            contact.phone = msg.sender
        else:
            contact.email = msg.sender
        _add_now(session, contact)
    elif msg.sender_name and not contact.name:
        contact.name = msg.sender_name[:200]
    return contact


def find_thread(
    session: Session, msg: InboundMessage, contact: Contact | Created | None, *, now: datetime,
    sms_thread_days: int,
) -> Thread:
    """The enquiry this message continues, if any: by our Message-IDs, the patient's earlier
    Message-IDs, a reference in the subject (same contact only), or for SMS an open enquiry
    from the same number inside the window."""
    ids = list(msg.thread_ids)
    if ids:
        enquiry_id = session.scalar(
            select(OutboxItem.enquiry_id).where(OutboxItem.message_id.in_(ids)).limit(1))
        if enquiry_id is None:
            enquiry_id = session.scalar(
                select(Message.enquiry_id)
                .where(Message.channel == msg.channel.value, Message.external_id.in_(ids))
                .limit(1))
        if enquiry_id is not None:
            return Thread(session.get(Enquiry, enquiry_id), "thread headers")
    if contact is None:
        return Thread(None)
    if msg.channel is Channel.EMAIL:
        m = REFERENCE_RE.search(msg.subject)
        if m:
            enquiry = session.scalars(select(Enquiry).where(
                Enquiry.reference == "ENQ-" + m.group(1).upper(),
                Enquiry.contact_id == contact.id)).first()
            if enquiry is not None:
                return Thread(enquiry, "reference in subject")
    else:
        enquiry = session.scalars(
            select(Enquiry)
            .where(Enquiry.contact_id == contact.id, Enquiry.status == "open",
                   Enquiry.last_inbound_at >= now - timedelta(days=sms_thread_days))
            .order_by(Enquiry.last_inbound_at.desc())
            .limit(1)).first()
        if enquiry is not None:
            return Thread(enquiry, f"open SMS enquiry within {sms_thread_days} days")
    return Thread(None)


@dataclass(frozen=True, slots=True)
class Known:
    """What the database says about an inbound message before it is routed."""

    stored_id: int | None
    """The message's row when this (channel, external id) was stored before."""
    contact_id: int | None
    contact_named: bool
    sms_opted_out: bool
    email_suppressed: bool
    earlier_enquiries: int
    """Counted up to the cap given to `look_up`."""
    acks: int
    """Acknowledgements sent to the sender inside the window (failed ones don't count)."""
    own_message_id: bool
    """Its Message-ID is one of ours (email)."""


def look_up(session: Session, msg: InboundMessage, *, since: datetime,
            earlier_cap: int) -> Known:
    """One query (see `_known_statement`); `since` starts the acknowledgement window;
    earlier enquiries are counted up to `earlier_cap`."""
    email = msg.channel is Channel.EMAIL
    if session.autoflush:  # as an ORM query would: changed objects first
        session.flush()
    row = (_KNOWN_EMAIL if email else _KNOWN_SMS).execute(session, {
        "channel": msg.channel.value, "external_id": msg.external_id, "sender": msg.sender,
        "since": since, "earlier_cap": earlier_cap}).fetchone()
    return Known(row[0], row[1], bool(row[2]), bool(row[3]), bool(row[4]), int(row[5] or 0),
                 int(row[6] or 0), bool(row[7]) if email else False)


def gather_facts(known: Known, thread: Thread, *, earlier_cap: int) -> Facts:
    if known.contact_id is None:
        return Facts(is_reply=thread.enquiry is not None)
    return Facts(
        is_reply=thread.enquiry is not None,
        earlier_enquiries=known.earlier_enquiries,
        earlier_enquiries_at_least=known.earlier_enquiries >= earlier_cap,
        acks_last_24h=known.acks,
        sms_opted_out=known.sms_opted_out,
        email_suppressed=known.email_suppressed,
    )


def find_inbound(session: Session, msg: InboundMessage) -> Message | None:
    found = _core(session, _INBOUND, channel=msg.channel.value,
                  external_id=msg.external_id).scalar()
    return None if found is None else session.get(Message, found)


def _store_attachments(session: Session, message_id: int, msg: InboundMessage) -> None:
    # One query for the blobs we already have: a hostile message can carry ~1000 parts, and
    # a lookup (plus autoflush) per part took over a second on PostgreSQL.
    shas = {att.sha256 for att in msg.attachments if att.data}
    known = set(session.scalars(select(Blob.sha256).where(Blob.sha256.in_(shas)))) \
        if shas else set()
    for att in msg.attachments:
        sha = None
        if att.data:
            sha = att.sha256
            if sha not in known:
                known.add(sha)
                session.add(Blob(sha256=sha, size=len(att.data), data=att.data))
                session.flush()
        session.add(Attachment(message_id=message_id, filename=att.filename,
                               content_type=att.content_type, size=att.size, sha256=sha,
                               url=att.url))


def add_message(
    session: Session, msg: InboundMessage, *, enquiry: Enquiry | Created | None,
    contact: Contact | Created | None, kind: str, now: datetime,
) -> int | None:
    """Store an inbound message; returns its id, or None when the row waits for the group
    commit's end (`Deferred`). A message with attachments is written at once (they need its
    id), after what the group deferred: inbound ids follow arrival, which is how an
    enquiry's latest message and its history are read. A Core insert: nothing in the
    transaction needs it as an object."""
    row = {
        "enquiry_id": enquiry.id if enquiry else None,
        "contact_id": contact.id if contact else None,
        "direction": "in", "channel": msg.channel.value, "external_id": msg.external_id,
        "sender": msg.sender, "recipients": list(msg.recipients), "subject": msg.subject,
        "text": msg.text, "html": msg.html, "headers": dict(msg.headers),
        "raw": msg.raw or None, "defects": list(msg.defects), "kind": kind, "created_at": now}
    deferred = _deferred(session)
    if deferred is not None:
        if not msg.attachments:
            deferred.add_message(row)
            return None
        deferred.write(session)
    message_id = _INSERT_MESSAGE.insert_id(session, row)
    assert message_id is not None
    if msg.attachments:
        _store_attachments(session, message_id, msg)
    return message_id


def create_enquiry(
    session: Session, msg: InboundMessage, contact: Contact | Created, decision: Decision,
    now: datetime,
) -> Created:
    values: dict[str, Any] = {
        "contact_id": contact.id, "channel": msg.channel.value, "mailbox": msg.mailbox,
        "subject": msg.subject[:500], "category": decision.category,
        "priority": decision.priority, "team": decision.team, "teams": list(decision.teams),
        "tags": list(decision.tags), "rule": decision.rule,
        "reply_template": decision.reply_template, "notify_template": decision.notify_template,
        "decision": decision.to_json(), "ruleset_version": decision.ruleset_version,
        "status": "open", "created_at": now, "updated_at": now, "last_inbound_at": now,
        "last_staff_reply_at": None, "closed_at": None,
    }
    statement = _INSERT_ENQUIRY[session.connection().dialect.name]
    enquiry_id = None
    while enquiry_id is None:  # None: the reference was taken; draw another
        values["reference"] = new_reference()
        enquiry_id = statement.insert_id(session, values)
    return Created(enquiry_id, values["reference"])


def enqueue(
    session: Session, *, kind: str, channel: Channel | str, recipient: str, template: str,
    due_at: datetime, now: datetime, domain: str, enquiry: Enquiry | Created | None = None,
    contact: Contact | Created | None = None, context: dict[str, Any] | None = None,
    urgent: bool = False, reminder: Reminder | None = None,
) -> Created | None:
    """A new outbox row; returns its id, or None when the row waits for the group commit's
    end (`Deferred`)."""
    row = {
        "enquiry_id": enquiry.id if enquiry else None,
        "contact_id": contact.id if contact else None,
        "reminder_id": reminder.id if reminder else None, "kind": kind,
        "channel": str(channel), "recipient": recipient, "template": template,
        "context": context or {}, "urgent": urgent, "message_id": new_message_id(domain),
        "status": "pending", "due_at": due_at, "attempts": 0, "lease_until": None,
        "last_error": "", "error_code": "", "provider_id": "", "delivery_status": "",
        "cancel_reason": "", "created_at": now, "sent_at": None}
    deferred = _deferred(session)
    if deferred is not None:
        deferred.add_outbox(row)
        return None
    outbox_id = _INSERT_OUTBOX.insert_id(session, row)
    assert outbox_id is not None
    return Created(outbox_id)


@dataclass(slots=True)
class Deferred:
    """Rows that a group commit writes at its end, one executemany per table (one pipelined
    round trip on PostgreSQL) instead of a statement per row: inbound messages and outbox
    rows whose ids nothing in the transaction needs, audit events, and reminders.

    A later message of the same group may need to see some of them; `write_deferred` with
    that message writes everything first when it could (`needed_by`): the same (channel,
    external id) again (a duplicate), thread ids naming a message or an outbox Message-ID of
    the group, or a sender who was sent an acknowledgement in the group (intake counts
    those). Interceptors that act on a message (keywords, bounces, our own mail) and
    `cancel_patient_reminders` write it all first, whatever the message."""

    events: list[dict[str, Any]] = field(default_factory=list)
    reminders: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    outbox: list[dict[str, Any]] = field(default_factory=list)
    _inbound: set[tuple[str, str]] = field(default_factory=set)
    """(channel, external id) of the deferred messages."""
    _ids: set[str] = field(default_factory=set)
    """Their external ids and the outbox rows' Message-IDs: what thread headers can name."""
    _acked: set[str] = field(default_factory=set)
    """Recipients of deferred acknowledgements."""

    def add_message(self, row: dict[str, Any]) -> None:
        self.messages.append(row)
        self._inbound.add((row["channel"], row["external_id"]))
        self._ids.add(row["external_id"])

    def add_outbox(self, row: dict[str, Any]) -> None:
        self.outbox.append(row)
        self._ids.add(row["message_id"])
        if row["kind"] == "ack":
            self._acked.add(row["recipient"])

    def needed_by(self, msg: InboundMessage) -> bool:
        """Could reading the database for `msg` miss a row that waits here?"""
        if not (self.messages or self.outbox):
            return False
        ids = self._ids
        return ((msg.channel.value, msg.external_id) in self._inbound
                or msg.sender in self._acked or msg.external_id in ids
                or any(i in ids for i in msg.thread_ids))

    def write(self, session: Session) -> None:
        for statement, rows in ((_INSERT_MESSAGES, self.messages),
                                (_INSERT_OUTBOXES, self.outbox),
                                (_INSERT_EVENT, self.events),
                                (_INSERT_REMINDER, self.reminders)):
            if rows:
                statement.executemany(session, rows)
                rows.clear()
        self._inbound.clear()
        self._ids.clear()
        self._acked.clear()


def defer_writes(session: Session) -> Deferred:
    """Until `Deferred.write`, the rows `Deferred` takes that are recorded on `session` wait
    in memory.
    Not under savepoints: a rolled-back savepoint would lose rows written inside it."""
    deferred = session.info[_DEFERRED] = Deferred()
    return deferred


def _deferred(session: Session) -> Deferred | None:
    deferred: Deferred | None = session.info.get(_DEFERRED)
    return deferred


def write_deferred(session: Session, msg: InboundMessage | None = None) -> None:
    """Write what the group deferred now: for code about to read or change rows that may be
    among them (an interceptor acting on a message). With `msg`, before intake reads the
    database about it: only if those reads could miss some of it (`Deferred.needed_by`)."""
    deferred = _deferred(session)
    if deferred is not None and (msg is None or deferred.needed_by(msg)):
        deferred.write(session)


def add_reminders(
    session: Session, enquiry: Enquiry | Created, specs: Sequence[ReminderSpec], now: datetime
) -> None:
    rows = [{"enquiry_id": enquiry.id, "name": spec.name, "template": spec.template,
             "to": spec.to, "unless": spec.unless, "due_at": now + parse_duration(spec.after),
             "status": "pending", "created_at": now, "cancelled_at": None,
             "cancel_reason": ""} for spec in specs]
    deferred = _deferred(session)
    if deferred is not None:
        deferred.reminders += rows
    elif rows:  # a Core insert: nobody needs these rows as objects in this transaction
        _INSERT_REMINDER.executemany(session, rows)


def cancel_patient_reminders(session: Session, enquiry: Enquiry, now: datetime) -> None:
    """The patient wrote again: reminders that chase the patient are no longer needed."""
    deferred = _deferred(session)
    if deferred is not None:
        deferred.write(session)  # this enquiry's reminders may be among them
    reminder = Reminder.__table__
    session.connection().execute(
        update(reminder)
        .where(reminder.c.enquiry_id == enquiry.id, reminder.c.status == "pending",
               reminder.c.to == "patient")
        .values(status="cancelled", cancelled_at=now, cancel_reason="patient replied"))


def close_enquiry(session: Session, enquiry: Enquiry, now: datetime, *, by: str,
                  note: str = "") -> int:
    """A person closed the loop: the enquiry is closed (the retention period runs from now),
    its pending reminders are cancelled, and the audit trail says who and why. Returns how
    many reminders were cancelled. A patient who writes again reopens it."""
    enquiry.status = "closed"
    enquiry.closed_at = enquiry.updated_at = now
    reminder = Reminder.__table__
    cancelled = session.connection().execute(
        update(reminder)
        .where(reminder.c.enquiry_id == enquiry.id, reminder.c.status == "pending")
        .values(status="cancelled", cancelled_at=now, cancel_reason="enquiry closed")).rowcount
    record_event(session, "enquiry-closed", now, enquiry=enquiry, actor=by[:64],
                 note=note[:500], reminders_cancelled=cancelled)
    return int(cancelled or 0)


def record_event(
    session: Session, kind: str, now: datetime, *, enquiry: Enquiry | Created | None = None,
    contact: Contact | Created | None = None, actor: str = "system", **detail: Any,
) -> None:
    # A Core insert (a quarter of an ORM add + flush), at once or with the group commit.
    row = {"at": now, "kind": kind, "enquiry_id": enquiry.id if enquiry else None,
           "contact_id": contact.id if contact else None, "actor": actor, "detail": detail}
    deferred = _deferred(session)
    if deferred is not None:
        deferred.events.append(row)
    else:
        _INSERT_EVENT.execute(session, row)


# --- delivery -------------------------------------------------------------------------------

_CLAIMED = [_outbox.c[name] for name in (
    "id", "enquiry_id", "contact_id", "reminder_id", "kind", "channel", "recipient", "template",
    "context", "urgent", "message_id", "due_at", "attempts")]
"""What sending a claimed row needs, and what the claim-time gates look at."""
_OUTBOX_WORK = text(OUTBOX_WORK)  # ix_outbox_item_work's predicate, word for word


def claim_due_outbox(
    session: Session, now: datetime, *, limit: int, lease: timedelta
) -> list[Row[Any]]:
    """Mark up to `limit` due rows as sending under a lease; a crashed worker's rows become
    claimable again once the lease has passed. SKIP LOCKED lets PostgreSQL instances share.

    One UPDATE ... RETURNING (SQLite >= 3.35) hands back the claimed rows' columns (attempts
    already counted), in due order: no ORM objects to load, change and flush."""
    due = (select(_outbox.c.id)
           .where(_OUTBOX_WORK, _outbox.c.due_at <= now,
                  or_(_outbox.c.status == "pending", _outbox.c.lease_until < now))
           .order_by(_outbox.c.urgent.desc(), _outbox.c.due_at, _outbox.c.id)
           .limit(limit))
    if session.get_bind().dialect.name == "postgresql":
        due = due.with_for_update(skip_locked=True)
    claim = (update(_outbox).where(_outbox.c.id.in_(due.scalar_subquery()))
             .values(status="sending", lease_until=now + lease, attempts=_outbox.c.attempts + 1)
             .returning(*_CLAIMED))
    rows = list(_core(session, claim))
    rows.sort(key=lambda row: (not row.urgent, row.due_at, row.id))
    return rows


def cancel_pending(
    session: Session, where: Iterable[Any], reason: str, now: datetime
) -> int:
    result = session.execute(
        update(OutboxItem)
        .where(OutboxItem.status == "pending", *where)
        .values(status="cancelled", cancel_reason=reason, lease_until=None))
    return int(getattr(result, "rowcount", 0) or 0)
