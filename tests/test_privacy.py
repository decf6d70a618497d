"""Privacy: the log scan that watches the whole suite, no patient data in a full flow's logs,
and staff texts that carry no clinical content."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import aiosmtplib
import pytest
from sqlalchemy import select

from handler.app import Service
from handler.clock import FakeClock
from handler.db import make_sessionmaker
from handler.models import Enquiry, OutboxItem
from handler.privacy import erase_contacts, find_contacts, scrub
from tests.builders import BODY, SUBJECT, bounce_email, plain_email
from tests.conftest import CLINIC, Sink, eventually
from tests.logscan import LogScan, find_patient_data

PATIENT = "jane.patient@example.com"


# --- the scanner itself -----------------------------------------------------------------------

@pytest.mark.parametrize("line", [
    "enquiry from jane.patient@example.com", "From: Someone <x.y+z@mail.example.org>",
    "texted from +447700900123", "call 07700 900123", "call 020 7946 0001",
    f"subject was {SUBJECT}", "diagnosed with Invasive Ductal Carcinoma",
    "Traceback ... [parameters: ('Jane Patient',)]",
])
def test_the_scan_sees_patient_data(line: str) -> None:
    assert find_patient_data(line)


@pytest.mark.parametrize("line", [
    "enquiry ENQ-ABC234 opened: breast/normal -> breast (rule breast)",
    "outbox 12 sent (ack email, attempt 1)", "retry at 2026-11-25T10:00:00+00:00",
    "SMTP   listening on 127.0.0.1:8025 for enquiries@clinic.example",
    "sms keyword stop from h:3f2a9c0d1e", "clinic phone +44 20 7946 0000 / +442079460000",
    "25 November 2026, 10:00 GMT", "version 0.12.345",
    "store  postgresql://postgres@127.0.0.1:5432/test?options=-csearch_path%3Dt_c52",
])
def test_the_scan_leaves_clean_lines_alone(line: str) -> None:
    assert find_patient_data(line) == []


def test_the_scan_records_info_and_above_only(tmp_path: Path) -> None:
    scan = LogScan(tmp_path)
    scan.current = "here"
    logger = logging.getLogger("tests.privacy.isolated")
    logger.propagate = False  # keep this deliberate leak away from the session's own scan
    logger.addHandler(scan.recorder)
    logger.setLevel(logging.DEBUG)
    try:
        logger.debug("debug may name %s", PATIENT)
        logger.info("enquiry opened")
        logger.warning("oops %s", PATIENT)
        try:
            raise ValueError(f"bad value {PATIENT}")
        except ValueError:
            logger.error("failed", exc_info=True)  # tracebacks are scanned too
    finally:
        logger.removeHandler(scan.recorder)
    assert [leak.where for leak in scan.leaks] == ["here", "here"]
    assert "WARNING" in scan.leaks[0].line and PATIENT in scan.leaks[1].line


def test_scrub() -> None:
    assert scrub("550 <jane@x.org>: no; call 07700 900123 ok", ["Jane Doe"]) == (
        "550 <[erased]>: no; call [erased] ok")
    assert scrub("Jane Doe wrote", ["Jane Doe"]) == "[erased] wrote"


# --- a whole flow, logged at INFO -------------------------------------------------------------

async def test_a_whole_flow_logs_no_patient_data(
    service: Service, sink: Sink, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=service.smtp_port) as client:
        await client.sendmail(PATIENT, [CLINIC], plain_email(BODY))
        await client.sendmail(PATIENT, ["nobody@clinic.example", CLINIC], plain_email(
            "I have chest pain and can't breathe", subject="Urgent please"))
        received = await sink.wait_for(3)
        ack = next(m for m in received if m["To"] == PATIENT)
        await client.sendmail("", [CLINIC], bounce_email(bytes(ack)))
    await eventually(lambda: any(r.name == "handler.bounces" for r in caplog.records))
    sessions = make_sessionmaker(service.engine, write=True)
    with sessions() as session, session.begin():
        erase_contacts(session, find_contacts(session, [PATIENT]), clock.now())
    lines = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records
             if r.levelno >= logging.INFO]
    assert any("opened" in line for line in lines)  # the flow did log
    assert any("RCPT refused" in line for line in lines)
    assert any("bounced" in line for line in lines)
    assert any("personal data erased" in line for line in lines)
    leaks = [(line, find_patient_data(line)) for line in lines if find_patient_data(line)]
    assert leaks == []
    assert not [r for r in caplog.records if r.name == "mail.log" and r.levelno < 30]


# --- staff texts ------------------------------------------------------------------------------

async def test_staff_texts_carry_reference_and_category_only(
    service: Service, sink: Sink
) -> None:
    words = "Since my chemo started I have chest pain and I can't breathe properly at night."
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=service.smtp_port) as client:
        _, response = await client.sendmail(PATIENT, [CLINIC], plain_email(
            words, subject="Breathless after chemo"))
    reference = response.rsplit(" ", 1)[1]
    def texts_sent() -> bool:
        with make_sessionmaker(service.engine)() as session:
            rows = session.scalars(select(OutboxItem).where(OutboxItem.channel == "sms")).all()
            return bool(rows) and all(r.status == "sent" for r in rows)

    await eventually(texts_sent)  # written in full (the file is not read half-written)
    files = sorted(service.settings.sms_dir_path.glob("*.json"))
    texts = [json.loads(p.read_text(encoding="utf-8")) for p in files]
    assert texts and all(t["to"].startswith("+44") for t in texts)
    with make_sessionmaker(service.engine)() as session:
        enquiry = session.scalars(select(Enquiry).where(Enquiry.reference == reference)).one()
    for text in texts:
        body = text["body"]
        assert reference in body and enquiry.priority.upper() in body.upper()
        for private in ("chest", "breath", "chemo", "Jane", PATIENT, "Breathless"):
            assert private.lower() not in body.lower(), (private, body)


def test_log_pseudonyms_are_keyed_with_the_installations_own_secret(tmp_path: Path) -> None:
    """Unkeyed, a pseudonym is reversed by hashing every UK mobile number; keyed with a
    secret kept (owner-readable only) beside the data, it is stable across the service's
    processes and restarts, and useless without the key."""
    import hashlib
    import stat

    from handler import logs

    var = tmp_path / "var"
    key = logs.pseudonym_key(var)
    path = var / logs.PSEUDONYM_KEY_FILE
    assert len(key) == 32 and logs.pseudonym_key(var) == key  # made once, then reused
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    kept = logs._Key.value
    try:
        logs.use_pseudonym_key(key)
        token = logs.pseudonym(PATIENT)
        assert token == logs.pseudonym(f" {PATIENT.upper()} ")  # normalised first
        assert token != "h:" + hashlib.sha256(PATIENT.lower().encode()).hexdigest()[:10]
        logs.use_pseudonym_key(logs.pseudonym_key(tmp_path / "elsewhere"))
        assert logs.pseudonym(PATIENT) != token  # another installation, another token
    finally:
        logs._Key.value = kept
