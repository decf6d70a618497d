"""The `handler` command: serve, check, db upgrade, enquiries list/show (and more).

Each sub-command is a small function taking the parsed arguments and Settings; exit status
0 on success, 1 on a problem the user must fix, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from handler import __version__, db
from handler.cli_data import add_data_commands
from handler.cli_rules import add_rules_commands
from handler.config import ConfigError, Settings, load_settings
from handler.logs import configure_logging, pseudonym_key
from handler.models import Enquiry, Event, Message, OutboxItem, Reminder

Command = Callable[[argparse.Namespace, Settings], int]


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from handler.app import serve
    from handler.rules import RulesError

    configure_logging(settings.log_level, pseudonym_key=pseudonym_key(settings.var_dir))
    print(f"enquiry-handler {__version__}: bringing the database schema up to date", flush=True)
    try:
        asyncio.run(serve(settings))
    except RulesError as exc:
        print("rules or templates are invalid, not starting:", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # found while building (quiet hours, Twilio sender, ...)
        print(f"configuration error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    from handler.live import failing_tests, load_checked
    from handler.render import Templates
    from handler.rules import RulesError

    problems: list[str] = []
    for path, what in ((settings.rules_dir, "rules"), (settings.templates_dir, "templates")):
        if not path.is_dir():
            problems.append(f"{path}: {what} directory not found")
    ruleset = None
    if not problems:
        try:
            ruleset = load_checked(settings.rules_dir, Templates(settings.templates_dir),
                                   max_sms_segments=settings.sms_max_segments)
        except RulesError as exc:
            problems.extend(exc.errors)
        else:
            problems.extend(failing_tests(ruleset))
    if settings.templates_dir.is_dir():  # SMS: segment counts, templates sent outside rules
        from handler.sms_check import check_sms, segment_report

        sms_templates = Templates(settings.templates_dir)
        print("SMS templates with sample data:")
        print("\n".join(segment_report(sms_templates, settings.sms_max_segments)))
        if ruleset is not None:
            problems.extend(check_sms(settings, sms_templates, ruleset.templates_used))
    for line in problems:
        print(line)
    if problems:
        print(f"check failed: {len(problems)} problem(s)")
        return 1
    assert ruleset is not None
    print(f"config ok; {len(ruleset.rules)} rules, {len(ruleset.teams)} teams, "
          f"{len(ruleset.templates_used)} templates checked; rules version {ruleset.version[:12]}")
    return 0


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    db.upgrade(settings)
    print("database schema is up to date")
    return 0


def _open(settings: Settings) -> Any:
    engine = db.make_engine(settings.sqlalchemy_url)
    return engine, db.make_sessionmaker(engine)


def cmd_enquiries_list(args: argparse.Namespace, settings: Settings) -> int:
    engine, sessions = _open(settings)
    with sessions() as session:
        query = select(Enquiry).order_by(Enquiry.created_at.desc()).limit(args.limit)
        if args.status:
            query = query.where(Enquiry.status == args.status)
        if args.team:
            query = query.where(Enquiry.team == args.team)
        rows = list(session.scalars(query))
        counts = dict(session.execute(
            select(Message.enquiry_id, func.count()).where(
                Message.enquiry_id.in_([r.id for r in rows])).group_by(Message.enquiry_id)).all())
    engine.dispose()
    data = [{"reference": e.reference, "created_at": e.created_at.isoformat(),
             "channel": e.channel, "category": e.category, "priority": e.priority,
             "team": e.team, "status": e.status, "messages": counts.get(e.id, 0),
             "rule": e.rule} for e in rows]
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(_table(["reference", "created", "channel", "category", "priority", "team", "status",
                  "msgs", "rule"],
                 [[d["reference"], _short_time(e.created_at), d["channel"], d["category"],
                   d["priority"], d["team"], d["status"], str(d["messages"]), d["rule"]]
                  for d, e in zip(data, rows, strict=True)]))
    if not data:
        print("(no enquiries)")
    return 0


def cmd_enquiries_show(args: argparse.Namespace, settings: Settings) -> int:
    engine, sessions = _open(settings)
    with sessions() as session:
        enquiry = session.scalars(
            select(Enquiry).where(Enquiry.reference == args.reference.upper())).first()
        if enquiry is None:
            print(f"no enquiry {args.reference}", file=sys.stderr)
            return 1
        data = enquiry_detail(session, enquiry)
    engine.dispose()
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(format_enquiry(data))
    return 0


def cmd_enquiries_close(args: argparse.Namespace, settings: Settings) -> int:
    from handler import store
    from handler.clock import SystemClock

    reference = args.reference.upper()
    engine = db.make_engine(settings.sqlalchemy_url)
    try:
        with db.make_sessionmaker(engine, write=True)() as session, session.begin():
            enquiry = session.scalars(
                select(Enquiry).where(Enquiry.reference == reference)).first()
            if enquiry is None:
                print(f"no enquiry {args.reference}", file=sys.stderr)
                return 1
            if enquiry.status != "open":
                print(f"{reference} is {enquiry.status}"
                      + (f" (since {_short_time(enquiry.closed_at)})" if enquiry.closed_at
                         else "") + ": nothing to do", file=sys.stderr)
                return 0 if enquiry.status == "closed" else 1
            cancelled = store.close_enquiry(session, enquiry, SystemClock().now(),
                                            by=args.by, note=args.note)
    finally:
        engine.dispose()
    retention = (f"; its data is erased {settings.retention_days} days from now unless the "
                 "patient writes again" if settings.retention_days > 0 else "")
    print(f"{reference} closed; {cancelled} pending reminder(s) cancelled{retention}")
    return 0


def enquiry_detail(session: Any, enquiry: Enquiry) -> dict[str, Any]:
    contact = enquiry.contact
    return {
        "reference": enquiry.reference, "status": enquiry.status, "channel": enquiry.channel,
        "category": enquiry.category, "priority": enquiry.priority, "team": enquiry.team,
        "teams": enquiry.teams, "tags": enquiry.tags, "subject": enquiry.subject,
        "rule": enquiry.rule, "reply_template": enquiry.reply_template,
        "notify_template": enquiry.notify_template,
        "created_at": enquiry.created_at.isoformat(),
        "contact": {"email": contact.email, "phone": contact.phone, "name": contact.name},
        "trace": enquiry.decision.get("trace", []),
        "messages": [{"id": m.id, "direction": m.direction, "kind": m.kind,
                      "channel": m.channel, "external_id": m.external_id, "sender": m.sender,
                      "subject": m.subject, "created_at": m.created_at.isoformat(),
                      "text": m.text, "defects": m.defects,
                      "attachments": [{"filename": a.filename, "content_type": a.content_type,
                                       "size": a.size} for a in m.attachments]}
                     for m in enquiry.messages],
        "outbox": [{"id": o.id, "kind": o.kind, "channel": o.channel, "recipient": o.recipient,
                    "template": o.template, "status": o.status, "attempts": o.attempts,
                    "due_at": o.due_at.isoformat(), "provider_id": o.provider_id,
                    "last_error": o.last_error, "message_id": o.message_id}
                   for o in session.scalars(select(OutboxItem).where(
                       OutboxItem.enquiry_id == enquiry.id).order_by(OutboxItem.id))],
        "reminders": [{"name": r.name, "to": r.to, "due_at": r.due_at.isoformat(),
                       "status": r.status, "cancel_reason": r.cancel_reason}
                      for r in session.scalars(select(Reminder).where(
                          Reminder.enquiry_id == enquiry.id).order_by(Reminder.id))],
        "events": [{"at": e.at.isoformat(), "kind": e.kind, "detail": e.detail}
                   for e in session.scalars(select(Event).where(
                       Event.enquiry_id == enquiry.id).order_by(Event.id))],
    }


def format_enquiry(d: dict[str, Any]) -> str:
    who = d["contact"]["email"] or d["contact"]["phone"] or "?"
    lines = [
        f"{d['reference']}  {d['status']}  {d['priority']}  {d['category']} -> "
        f"{', '.join(d['teams']) or d['team']}",
        f"  from     {d['contact']['name'] or ''} <{who}> by {d['channel']}",
        f"  subject  {d['subject']}",
        f"  opened   {d['created_at']}",
        f"  rule     {d['rule']}  (reply: {d['reply_template'] or 'none'}, "
        f"notify: {d['notify_template'] or 'none'})",
        "", "why (rules considered, in order):",
    ]
    for hit in d["trace"]:
        mark = "MATCH" if hit.get("matched") else "  -  "
        reasons = "; ".join(hit.get("reasons", []))
        lines.append(f"  {mark} {hit.get('rule')}: {reasons}")
    lines += ["", "messages:"]
    for m in d["messages"]:
        lines.append(f"  #{m['id']} {m['direction']} {m['kind']} {m['created_at']} "
                     f"{m['subject']!r} ({len(m['attachments'])} attachment(s))")
        if m["defects"]:
            lines.append(f"      defects: {', '.join(m['defects'][:5])}")
    lines += ["", "outbox:"]
    for o in d["outbox"]:
        err = f" error: {o['last_error']}" if o["last_error"] else ""
        lines.append(f"  #{o['id']} {o['kind']} {o['channel']} -> {o['recipient']} "
                     f"[{o['template']}] {o['status']} (attempts {o['attempts']}){err}")
    if d["reminders"]:
        lines += ["", "reminders:"]
        for r in d["reminders"]:
            lines.append(f"  {r['name']} to {r['to']} due {r['due_at']} {r['status']} "
                         f"{r['cancel_reason']}")
    return "\n".join(lines)


def _short_time(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    def fmt(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="handler", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--config", help="path to handler.toml (default ./handler.toml)")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("serve", help="run the service (SMTP, HTTP, dispatcher)").set_defaults(
        func=cmd_serve)
    sub.add_parser("check", help="validate config, rules and templates").set_defaults(
        func=cmd_check)
    dbp = sub.add_parser("db", help="database schema").add_subparsers(dest="db_cmd",
                                                                      required=True)
    dbp.add_parser("upgrade", help="bring the schema up to date").set_defaults(
        func=cmd_db_upgrade)

    enq = sub.add_parser("enquiries", help="look at stored enquiries").add_subparsers(
        dest="enq_cmd", required=True)
    lst = enq.add_parser("list", help="most recent enquiries")
    lst.add_argument("--limit", type=int, default=50)
    lst.add_argument("--status", choices=["open", "closed", "erased"])
    lst.add_argument("--team")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_enquiries_list)
    show = enq.add_parser("show", help="one enquiry: messages, decision trace, outbox")
    show.add_argument("reference")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_enquiries_show)
    close = enq.add_parser("close", help="close an enquiry: a person has closed the loop "
                                         "(cancels its reminders; starts its retention period)")
    close.add_argument("reference")
    close.add_argument("--by", default="cli", help="who closed it (kept in the audit trail)")
    close.add_argument("--note", default="", help="why (kept in the audit trail)")
    close.set_defaults(func=cmd_enquiries_close)
    add_rules_commands(sub)
    add_data_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(config_file=_path(args.config))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 1
    result: int = args.func(args, settings)
    return result


def _path(value: str | None) -> Any:
    from pathlib import Path

    return Path(value) if value else None


if __name__ == "__main__":
    raise SystemExit(main())
