"""`handler data export|erase|purge`: a person's data out, a person's data gone (counts kept),
and the nightly retention purge on a FakeClock."""

from __future__ import annotations

import json
import mailbox
import zipfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import aiosmtplib
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from handler.app import Service, running
from handler.cli import main
from handler.clock import FakeClock, SystemClock
from handler.config import Settings
from handler.db import make_sessionmaker
from handler.inbound import Channel, InboundMessage
from handler.models import Base, Contact, Enquiry, Event, OutboxItem, Reminder
from handler.privacy import RetentionJob
from tests.builders import BODY, SUBJECT, FileSpec, attachment_email, plain_email, reply_email
from tests.conftest import CLINIC, eventually

JANE = "jane.patient@example.com"
JANE_PHONE = "+447700900123"
BOB = "bob@example.org"
SCAN = b"%PDF-1.4 JANE-SCAN-0001 pathology report"
JANE_DATA = (JANE, "Jane Patient", "447700900123", "07700 900123", SUBJECT,
             "invasive ductal carcinoma", "JANE-SCAN-0001", "texting about my biopsy")


@dataclass
class World:
    service: Service
    settings: Settings
    config: Path
    jane_refs: list[str]
    bob_ref: str

    def cli(self, *args: str) -> int:
        return main(["--config", str(self.config), *args])

    def db(self) -> Session:
        return make_sessionmaker(self.service.engine)()


def write_config(settings: Settings, path: Path) -> Path:
    path.write_text(f'database_url = "{settings.database_url}"\nvar_dir = "{settings.var_dir}"\n'
                    f'rules_dir = "{settings.rules_dir}"\n'
                    f'templates_dir = "{settings.templates_dir}"\n', encoding="utf-8")
    return path


async def deliver(service: Service, raw: bytes, sender: str) -> str:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=service.smtp_port) as client:
        _, response = await client.sendmail(sender, [CLINIC], raw)
    return response.rsplit(" ", 1)[1]


def outbox(world_db: Session) -> list[OutboxItem]:
    with world_db as session:
        return list(session.scalars(select(OutboxItem)))


@pytest.fixture
async def world(
    make_settings: Callable[..., Settings], clock: FakeClock, tmp_path: Path
) -> AsyncIterator[World]:
    """Jane wrote by email (with a scan), replied in the thread and texted; Bob wrote once.
    Everything goes to the embedded Maildir and SMS folder (local copies to clean up)."""
    settings = make_settings()
    async with running(settings, clock=clock) as service:
        sessions = make_sessionmaker(service.engine)
        first = await deliver(service, attachment_email(
            BODY, [FileSpec("scan.pdf", "application/pdf", SCAN)],
            sender=f"Jane Patient <{JANE}>"), JANE)
        ack = await eventually(lambda: next((o for o in outbox(sessions())
                                             if o.kind == "ack" and o.status == "sent"), None))
        await deliver(service, reply_email(ack.message_id, sender=JANE,
                                           body="Here is my pathology report."), JANE)
        sms = await service.intake.accept(InboundMessage(
            channel=Channel.SMS, external_id="SM" + "1" * 32, sender=JANE_PHONE,
            mailbox="+442079460000", text="Hi, Jane Patient here, texting about my biopsy"))
        bob = await deliver(service, plain_email("I would like a second opinion on my "
                                                 "prostate MRI.", sender=BOB,
                                                 subject="Prostate"), BOB)
        await eventually(lambda: (rows := outbox(sessions())) and len(rows) >= 6 and all(
            o.status == "sent" for o in rows))
        yield World(service, settings, write_config(settings, tmp_path / "handler.toml"),
                    [first, sms.reference], bob)


def dump(session: Session) -> str:
    """Every row of every table, as text (bytes as their repr)."""
    return "\n".join(repr(row) for table in Base.metadata.sorted_tables
                     for row in session.execute(select(table)))


def local_copies(settings: Settings) -> str:
    box = mailbox.Maildir(str(settings.maildir_path), create=False)
    mails = "\n".join(box.get_bytes(key).decode("utf-8", "replace") for key in box.iterkeys())
    texts = "\n".join(p.read_text(encoding="utf-8")
                      for p in sorted(settings.sms_dir_path.glob("*.json")))
    return mails + texts


async def test_export_holds_everything_about_the_person(world: World, tmp_path: Path) -> None:
    target = tmp_path / "out" / "jane.zip"
    assert world.cli("data", "export", JANE, "07700 900123", "-o", str(target)) == 0
    with zipfile.ZipFile(target) as archive:
        names = archive.namelist()
        data = json.loads(archive.read("data.json"))
        scan = next(n for n in names if n.startswith("attachments/"))
        assert archive.read(scan) == SCAN
        raws = [n for n in names if n.startswith("raw/")]
        assert len(raws) == 2 and b"invasive ductal carcinoma" in archive.read(raws[0])
    assert {c["email"] for c in data["contacts"]} == {JANE, None}
    assert {c["phone"] for c in data["contacts"]} == {None, JANE_PHONE}
    assert sorted(e["reference"] for e in data["enquiries"]) == sorted(world.jane_refs)
    received = data["messages_received"]
    assert [m["channel"] for m in received] == ["email", "email", "sms"]
    assert "invasive ductal carcinoma" in received[0]["text"]
    assert received[1]["kind"] == "reply"
    sent = data["messages_sent"]
    ack = next(o for o in sent if o["kind"] == "ack" and o["channel"] == "email")
    assert ack["recipient"] == JANE and ack["rendered"]["text"]
    assert {o["kind"] for o in sent} >= {"ack", "notify"}  # what staff were sent about her
    assert {"enquiry-opened", "message-added"} <= {e["kind"] for e in data["events"]}
    assert BOB not in json.dumps(data) and "prostate MRI" not in json.dumps(data)
    with world.db() as session:
        assert session.scalars(select(Event).where(
            Event.kind == "personal-data-exported")).all()


async def test_erase_removes_personal_data_and_keeps_counts(world: World) -> None:
    with world.db() as session:
        before = dump(session)
        enquiries_before = session.scalars(select(Enquiry).order_by(Enquiry.id)).all()
        old_ack = session.scalars(select(OutboxItem).where(OutboxItem.kind == "ack")).first()
    assert all(word in before for word in (JANE, "JANE-SCAN-0001", "invasive ductal carcinoma"))
    assert "Jane Patient" in local_copies(world.settings)

    assert world.cli("data", "erase", JANE, JANE_PHONE, "--yes") == 0

    with world.db() as session:
        after = dump(session)
        for word in JANE_DATA:
            assert word not in after, word
        assert BOB in after and "prostate MRI" in after  # other people are untouched
        enquiries = session.scalars(select(Enquiry).order_by(Enquiry.id)).all()
        assert [(e.category, e.team, e.priority, e.channel) for e in enquiries] == [
            (e.category, e.team, e.priority, e.channel) for e in enquiries_before]
        jane = [e for e in enquiries if e.reference in world.jane_refs]
        assert {e.status for e in jane} == {"erased"}
        contacts = session.scalars(select(Contact).where(Contact.erased_at.is_not(None))).all()
        assert len(contacts) == 2
        assert not session.scalars(select(Reminder).where(
            Reminder.enquiry_id.in_([e.id for e in jane]), Reminder.status == "pending")).all()
        event = session.scalars(select(Event).where(
            Event.kind == "personal-data-erased")).first()
        assert event is not None and event.detail["messages"] == 3
        assert event.detail["attachments"] == 1 and event.detail["blobs"] == 1
    copies = local_copies(world.settings)
    assert "Jane Patient" not in copies and "ENQ-" in copies  # Bob's copies stay

    # the same person writing again is a new contact: nothing joins the erased enquiry
    again = await deliver(world.service, reply_email(old_ack.message_id, sender=JANE), JANE)
    assert again not in world.jane_refs


async def test_erase_by_reference_and_unknown_contacts(world: World) -> None:
    assert world.cli("data", "erase", "nobody@example.net", "--yes") == 1
    assert world.cli("data", "export", "ENQ-ZZZZZZ", "-o", "/nonexistent/x.zip") == 1
    assert world.cli("data", "erase", world.bob_ref.lower(), "--yes") == 0
    with world.db() as session:
        assert BOB not in dump(session)
        assert JANE in dump(session)


async def test_retention_purge_on_the_fake_clock(world: World, clock: FakeClock) -> None:
    sessions = make_sessionmaker(world.service.engine, write=True)
    start = clock.now()
    with sessions() as session, session.begin():
        session.execute(update(Enquiry).where(Enquiry.reference == world.jane_refs[0])
                        .values(status="closed", closed_at=start))
        session.execute(update(Enquiry).where(Enquiry.reference == world.bob_ref)
                        .values(status="closed", closed_at=start + timedelta(days=20)))
    job = RetentionJob(sessions=sessions, clock=clock,
                       settings=world.settings.replace(retention_days=30))
    clock.advance(timedelta(days=29))
    assert (await job()).enquiries == 0
    clock.advance(timedelta(days=2))
    result = await job()
    assert result.enquiries == 1 and result.messages == 2
    with sessions() as session:
        by_ref = {e.reference: e for e in session.scalars(select(Enquiry))}
        assert by_ref[world.jane_refs[0]].status == "erased"
        assert by_ref[world.jane_refs[0]].subject == ""
        assert by_ref[world.jane_refs[1]].status == "open"  # her SMS enquiry is still open
        assert by_ref[world.bob_ref].status == "closed"  # closed only 11 days ago
        assert "invasive ductal carcinoma" not in dump(session)
        assert "texting about my biopsy" in dump(session)
        assert session.scalars(select(Event).where(Event.kind == "retention-purge")).one()
    assert (await job()).enquiries == 0  # nothing twice

    clock.advance(timedelta(days=30))  # once Bob's is old enough, Bob goes entirely
    await job()
    with sessions() as session:
        assert BOB not in dump(session)


async def test_the_purge_runs_nightly_only_when_configured(
    make_settings: Callable[..., Settings], clock: FakeClock
) -> None:
    async with running(make_settings(retention_days=365), clock=clock) as service:
        job = service.ticker.scheduler.get_job("retention-purge")
        assert job is not None
        fields = {f.name: str(f) for f in job.trigger.fields}
        assert (fields["hour"], fields["minute"]) == ("3", "30")
        assert str(job.trigger.timezone) == "Europe/London"
    async with running(make_settings(), clock=clock) as service:
        assert service.ticker.scheduler.get_job("retention-purge") is None


async def test_purge_command(world: World) -> None:
    assert world.cli("data", "purge") == 0  # retention off: nothing
    with world.db() as session:
        assert JANE in dump(session)
    sessions = make_sessionmaker(world.service.engine, write=True)
    with sessions() as session, session.begin():
        session.execute(update(Enquiry).values(
            status="closed", closed_at=SystemClock().now() - timedelta(days=10)))
    assert world.cli("data", "purge", "--days", "7") == 0
    with world.db() as session:
        text = dump(session)
        assert "invasive ductal carcinoma" not in text and "prostate MRI" not in text
        assert {e.status for e in session.scalars(select(Enquiry))} == {"erased"}


async def test_closing_an_enquiry_cancels_its_reminders_and_starts_its_retention(
    world: World, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = world.bob_ref
    sessions = make_sessionmaker(world.service.engine, write=True)
    with world.db() as session:  # what the rules set for it
        pending = session.scalars(select(Reminder).join(Enquiry).where(
            Enquiry.reference == ref, Reminder.status == "pending")).all()
    assert pending
    assert world.cli("enquiries", "close", ref.lower(), "--by", "dr.smith",
                     "--note", "second opinion given by phone") == 0
    assert f"{ref} closed; {len(pending)} pending reminder(s) cancelled" in (
        capsys.readouterr().out)
    with world.db() as session:
        enquiry = session.scalars(select(Enquiry).where(Enquiry.reference == ref)).one()
        assert enquiry.status == "closed" and enquiry.closed_at is not None
        assert set(session.scalars(select(Reminder.cancel_reason).where(
            Reminder.enquiry_id == enquiry.id))) == {"enquiry closed"}
        event = session.scalars(select(Event).where(Event.kind == "enquiry-closed")).one()
        assert (event.actor, event.detail["note"]) == ("dr.smith", "second opinion given by phone")
    assert world.cli("enquiries", "close", ref) == 0  # again: nothing to do
    assert "is closed" in capsys.readouterr().err
    assert world.cli("enquiries", "close", "ENQ-ZZZZZZ") == 1

    job = RetentionJob(sessions=sessions, clock=clock,
                       settings=world.settings.replace(retention_days=30))
    clock.advance(timedelta(days=31))
    assert (await job()).enquiries == 1  # the closed one, and only it
    with world.db() as session:
        assert BOB not in dump(session)
        assert session.scalars(select(Enquiry.status).where(Enquiry.reference == ref)).one() \
            == "erased"
    assert world.cli("enquiries", "close", ref) == 1  # erased: cannot be closed
