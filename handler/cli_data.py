"""`handler data export|erase|purge`: subject access, erasure and the retention purge.

CONTACT is an email address, a phone number or an enquiry reference; several may be given
for one person (e.g. their address and their mobile number).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from handler import db
from handler.clock import SystemClock
from handler.config import Settings
from handler.models import Contact
from handler.privacy import NotFound, find_contacts, purge_expired, remove_local_copies
from handler.privacy import erase_contacts as erase
from handler.subject_access import export_contacts

T = TypeVar("T")


def add_data_commands(sub: Any) -> None:
    data = sub.add_parser("data", help="personal data: subject access export, erasure, "
                          "retention purge").add_subparsers(dest="data_cmd", required=True)
    export = data.add_parser("export", help="write everything held about a person to a zip")
    export.add_argument("contact", nargs="+", metavar="CONTACT",
                        help="email address, phone number or enquiry reference")
    export.add_argument("-o", "--output", type=Path,
                        help="zip file to write (default: subject-access-<time>.zip)")
    export.set_defaults(func=cmd_data_export)
    erase_p = data.add_parser("erase", help="remove a person's personal data (keeps counts)")
    erase_p.add_argument("contact", nargs="+", metavar="CONTACT",
                         help="email address, phone number or enquiry reference")
    erase_p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    erase_p.set_defaults(func=cmd_data_erase)
    purge = data.add_parser("purge", help="erase closed enquiries older than the retention "
                            "period (what the nightly job does)")
    purge.add_argument("--days", type=int,
                       help="retention in days (default: the retention_days setting)")
    purge.set_defaults(func=cmd_data_purge)


def _now() -> datetime:
    return SystemClock().now()


def _on_contacts(
    settings: Settings, wanted: Sequence[str], work: Callable[[Session, list[Contact]], T]
) -> T | None:
    """Run `work` on the contacts named in one write transaction; None (after saying which
    one) when a name matches nobody."""
    engine = db.make_engine(settings.sqlalchemy_url)
    try:
        with db.make_sessionmaker(engine, write=True)() as session, session.begin():
            try:
                contacts = find_contacts(session, wanted)
            except NotFound as exc:
                print(str(exc), file=sys.stderr)
                return None
            return work(session, contacts)
    finally:
        engine.dispose()


def cmd_data_export(args: argparse.Namespace, settings: Settings) -> int:
    now = _now()
    output = args.output or Path(f"subject-access-{now.strftime('%Y%m%d-%H%M%S')}.zip")
    counts = _on_contacts(settings, args.contact,
                          lambda session, contacts: export_contacts(session, contacts, now, output))
    if counts is None:
        return 1
    print(f"wrote {output}: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    return 0


def cmd_data_erase(args: argparse.Namespace, settings: Settings) -> int:
    if not args.yes and sys.stdin.isatty():
        answer = input("This removes the person's messages, attachments and contact details "
                       "for good. Type ERASE to go on: ")
        if answer.strip() != "ERASE":
            print("nothing erased")
            return 1
    result = _on_contacts(settings, args.contact,
                          lambda session, contacts: erase(session, contacts, _now()))
    if result is None:
        return 1
    removed = remove_local_copies(settings, result.local_copies)
    counts = ", ".join(f"{n} {k}" for k, n in result.counts().items() if n) or "nothing"
    print(f"erased: {counts}" + (f"; {removed} local delivery copies removed" if removed else ""))
    return 0


def cmd_data_purge(args: argparse.Namespace, settings: Settings) -> int:
    days = settings.retention_days if args.days is None else args.days
    if days <= 0:
        print("retention is off (retention_days = 0): nothing purged")
        return 0
    engine = db.make_engine(settings.sqlalchemy_url)
    try:
        with db.make_sessionmaker(engine, write=True)() as session, session.begin():
            result = purge_expired(session, _now(), retention_days=days)
    finally:
        engine.dispose()
    removed = remove_local_copies(settings, result.local_copies)
    counts = ", ".join(f"{n} {k}" for k, n in result.counts().items() if n) or "nothing"
    print(f"purged data older than {days} days: {counts}"
          + (f"; {removed} local delivery copies removed" if removed else ""))
    return 0
