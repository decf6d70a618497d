"""Subject access export: everything held about a person, as a zip of JSON and files.

`data.json` holds the contact records, enquiries (with the routing decision), messages in
both directions (inbound as received, outbound as rendered when sent), reminders and the
audit events; `attachments/` and `raw/` hold the files and original email sources.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from handler import store
from handler.models import Blob, Contact
from handler.privacy import Holdings, holdings

FORMAT = "enquiry-handler subject access export, version 1"


def export_contacts(
    session: Session, contacts: Sequence[Contact], now: datetime, path: Path, *,
    actor: str = "cli",
) -> dict[str, int]:
    """Write the export to `path` and record that it was made; returns counts."""
    rows = holdings(session, contacts)
    files: dict[str, bytes] = {}
    data = _document(session, rows, now, files)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("data.json", json.dumps(data, indent=2, ensure_ascii=False,
                                                 default=_json_default))
        archive.writestr("README.txt", _readme(now))
        for name, content in files.items():
            archive.writestr(name, content)
    tmp.replace(path)
    counts = {"contacts": len(rows.contacts), "enquiries": len(rows.enquiries),
              "messages": len(rows.messages), "sent": len(rows.outbox),
              "events": len(rows.events), "files": len(files)}
    for contact in contacts:
        store.record_event(session, "personal-data-exported", now, contact=contact,
                           actor=actor, **counts)
    return counts


def _document(session: Session, rows: Holdings, now: datetime, files: dict[str, bytes]
              ) -> dict[str, Any]:
    references = {e.id: e.reference for e in rows.enquiries}
    messages = []
    for m in rows.messages:
        attachments = []
        for n, a in enumerate(m.attachments, 1):
            entry: dict[str, Any] = {"filename": a.filename, "content_type": a.content_type,
                                     "size": a.size, "sha256": a.sha256, "url": a.url}
            blob = session.get(Blob, a.sha256) if a.sha256 else None
            if blob is not None:
                name = f"attachments/{m.id}/{n}-{_safe(a.filename) or 'file'}"
                files[name] = blob.data
                entry["file"] = name
            attachments.append(entry)
        raw_file = None
        if m.raw:
            raw_file = f"raw/message-{m.id}.eml"
            files[raw_file] = m.raw
        messages.append({
            "id": m.id, "enquiry": references.get(m.enquiry_id or 0), "direction": m.direction,
            "kind": m.kind, "channel": m.channel, "external_id": m.external_id,
            "sender": m.sender, "recipients": m.recipients, "subject": m.subject,
            "text": m.text, "html": m.html, "headers": m.headers, "defects": m.defects,
            "received_at": m.created_at, "attachments": attachments, "raw_file": raw_file,
        })
    return {
        "format": FORMAT,
        "exported_at": now,
        "contacts": [{
            "id": c.id, "email": c.email, "phone": c.phone, "name": c.name,
            "created_at": c.created_at, "sms_opted_out_at": c.sms_opted_out_at,
            "email_suppressed_at": c.email_suppressed_at,
            "email_suppressed_reason": c.email_suppressed_reason, "erased_at": c.erased_at,
        } for c in rows.contacts],
        "enquiries": [{
            "reference": e.reference, "channel": e.channel, "mailbox": e.mailbox,
            "subject": e.subject, "category": e.category, "priority": e.priority,
            "team": e.team, "teams": e.teams, "tags": e.tags, "status": e.status,
            "created_at": e.created_at, "updated_at": e.updated_at,
            "last_inbound_at": e.last_inbound_at, "last_staff_reply_at": e.last_staff_reply_at,
            "closed_at": e.closed_at, "rule": e.rule, "decision": e.decision,
        } for e in rows.enquiries],
        "messages_received": messages,
        "messages_sent": [{
            "id": o.id, "enquiry": references.get(o.enquiry_id or 0), "kind": o.kind,
            "channel": o.channel, "recipient": o.recipient, "template": o.template,
            "status": o.status, "message_id": o.message_id, "created_at": o.created_at,
            "due_at": o.due_at, "sent_at": o.sent_at, "delivery_status": o.delivery_status,
            "last_error": o.last_error, "cancel_reason": o.cancel_reason,
            "rendered": o.rendered,
        } for o in rows.outbox],
        "reminders": [{
            "enquiry": references.get(r.enquiry_id), "name": r.name, "to": r.to,
            "due_at": r.due_at, "status": r.status, "cancel_reason": r.cancel_reason,
        } for r in rows.reminders],
        "events": [{
            "at": ev.at, "kind": ev.kind, "enquiry": references.get(ev.enquiry_id or 0),
            "actor": ev.actor, "detail": ev.detail,
        } for ev in rows.events],
    }


def _readme(now: datetime) -> str:
    return (
        f"{FORMAT}\nMade {now.isoformat()}.\n\n"
        "data.json            contact details, enquiries (with how each was routed), messages\n"
        "                     received and sent, reminders, and the audit trail\n"
        "attachments/<id>/    files attached to received message <id>\n"
        "raw/                 original email messages exactly as received\n"
    )


def _safe(name: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "._- " else "_" for ch in name)
    return keep.strip(" .")[:100]


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(type(value).__name__)
