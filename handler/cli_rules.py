"""`handler rules test`, `handler route` and `handler rules replay`: the administrator's
tools for trying rules safely. None of them writes to the database or sends anything."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from handler import db
from handler.clock import SystemClock
from handler.config import Settings
from handler.decision import Facts
from handler.inbound import Channel, InboundMessage
from handler.live import load_checked
from handler.models import Enquiry, Message
from handler.parse_email import parse_email
from handler.render import Templates
from handler.rule_cases import make_message
from handler.rules import RulesError, RuleSet
from handler.rules_cli import Stored, format_replay, format_test_table, replay, route_dry_run
from handler.rules_cli import run_rule_tests as run_tests
from handler.store import parse_duration


def _load(settings: Settings, rules_dir: Path | None) -> RuleSet | None:
    try:
        return load_checked(rules_dir or settings.rules_dir, Templates(settings.templates_dir),
                            max_sms_segments=settings.sms_max_segments)
    except RulesError as exc:
        for line in exc.errors:
            print(line)
        print(f"rules are invalid: {len(exc.errors)} problem(s)")
        return None


def cmd_rules_test(args: argparse.Namespace, settings: Settings) -> int:
    ruleset = _load(settings, args.rules_dir)
    if ruleset is None:
        return 1
    results = run_tests(ruleset)
    print(format_test_table(results))
    if not results:
        print("no tests: add `tests:` cases to the rule files")
        return 1
    return 0 if all(r.passed for r in results) else 1


def cmd_route(args: argparse.Namespace, settings: Settings) -> int:
    ruleset = _load(settings, args.rules_dir)
    if ruleset is None:
        return 1
    msg: InboundMessage
    if args.sms:
        text = " ".join(args.message)
        if not text:
            print("usage: handler route --sms NUMBER \"text of the message\"", file=sys.stderr)
            return 2
        msg = make_message(channel="sms", sender=args.sms, body=text, external_id="dry-run")
    else:
        if len(args.message) != 1:
            print("usage: handler route message.eml  |  handler route --sms NUMBER \"text\"",
                  file=sys.stderr)
            return 2
        path = Path(args.message[0])
        raw = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
        msg = parse_email(raw, mailboxes=settings.mailboxes)
    facts = Facts(is_reply=args.reply, earlier_enquiries=args.earlier)
    print(route_dry_run(msg, ruleset, facts, SystemClock().now()))
    return 0


def stored_enquiries(settings: Settings, since: datetime) -> list[Stored]:
    """Each enquiry since `since` with its first inbound message, as the rules saw it."""
    engine = db.make_engine(settings.sqlalchemy_url)
    sessions = db.make_sessionmaker(engine)
    out: list[Stored] = []
    with sessions() as session:
        enquiries = session.scalars(select(Enquiry).where(Enquiry.created_at >= since)
                                    .order_by(Enquiry.created_at)).all()
        for enquiry in enquiries:
            first = session.scalars(select(Message).where(
                Message.enquiry_id == enquiry.id, Message.direction == "in")
                .order_by(Message.id).limit(1)).first()
            if first is None:
                continue
            earlier = session.scalar(select(func.count()).select_from(Enquiry).where(
                Enquiry.contact_id == enquiry.contact_id,
                Enquiry.created_at < enquiry.created_at)) or 0
            out.append((enquiry.reference, enquiry.decision, _as_inbound(first, settings),
                        Facts(earlier_enquiries=int(earlier)), enquiry.created_at))
    engine.dispose()
    return out


def _as_inbound(message: Message, settings: Settings) -> InboundMessage:
    if message.channel == Channel.EMAIL.value and message.raw:
        return parse_email(message.raw, envelope_rcpts=message.recipients,
                           mailboxes=settings.mailboxes)
    return make_message(channel=message.channel, sender=message.sender, body=message.text,
                        subject=message.subject, headers=dict(message.headers),
                        external_id=message.external_id)


def cmd_rules_replay(args: argparse.Namespace, settings: Settings) -> int:
    candidate = _load(settings, args.rules_dir)
    if candidate is None:
        return 1
    try:
        since = SystemClock().now() - parse_duration(args.since)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    report = replay(stored_enquiries(settings, since), candidate)
    print(format_replay(report, show_traces=not args.brief))
    return 0


def add_rules_commands(sub: Any) -> None:
    rules = sub.add_parser("rules", help="test and replay routing rules").add_subparsers(
        dest="rules_cmd", required=True)
    test = rules.add_parser("test", help="run the example messages inside the rule files")
    test.add_argument("--rules-dir", type=Path)
    test.set_defaults(func=cmd_rules_test)
    rep = rules.add_parser("replay", help="re-decide stored enquiries with candidate rules "
                           "(read-only) and show what would change")
    rep.add_argument("--since", default="30d", help="how far back, e.g. 7d, 30d, 12w")
    rep.add_argument("--rules-dir", type=Path, help="the candidate rules (default: rules_dir)")
    rep.add_argument("--brief", action="store_true", help="omit the traces")
    rep.set_defaults(func=cmd_rules_replay)

    route = sub.add_parser("route", help="dry run: how one message would be routed, and why")
    route.add_argument("message", nargs="*", help="an .eml file (or - for stdin), or the SMS text")
    route.add_argument("--sms", metavar="NUMBER", help="route an SMS from NUMBER")
    route.add_argument("--rules-dir", type=Path)
    route.add_argument("--reply", action="store_true", help="treat it as a reply in a thread")
    route.add_argument("--earlier", type=int, default=0, metavar="N",
                       help="the sender's number of earlier enquiries")
    route.set_defaults(func=cmd_route)


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - via handler.cli
    from handler.cli import main as cli_main

    return cli_main(argv)
