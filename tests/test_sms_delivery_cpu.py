"""The cheaper way texts go out and are recorded: the local SMS folder writes the texts of one
event-loop turn in one worker-thread hand-off (each send still answered for its own file), and
the dispatcher marks accepted texts sent with one executemany that keeps a delivery status a
status callback set first; failures still go through the SMS policy (21610, backoff)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, text, update
from sqlalchemy.orm import Session as DbSession

from handler import db
from handler.bench_data import populate
from handler.clock import FakeClock
from handler.config import Settings
from handler.dispatch import Dispatcher, next_attempt
from handler.live import LiveRules
from handler.models import Contact, Event, OutboxItem
from handler.sms_out import ApiHttpClient
from handler.sms_policy import OPTED_OUT_CODE
from handler.transports import FileSmsTransport, Outcome, SendResult, SmsRequest

NUMBER = "+447700900{:03d}"


def request(n: int, body: str = "Your reference is ENQ-ABC234") -> SmsRequest:
    return SmsRequest(to=NUMBER.format(n), body=body, idempotency_key=f"k{n}@clinic.example")


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def test_texts_sent_together_are_each_written_and_answered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    transport = FileSmsTransport(tmp_path / "sms")
    caplog.set_level(logging.INFO, "handler.sms")
    results = await asyncio.gather(*(transport.send(request(n, f"body {n} é…")) for n in range(20)))
    for n, result in enumerate(results):
        name = f"k{n}@clinic.example.json"
        assert (result.outcome, result.provider_id, result.status) == (
            Outcome.OK, f"file:{name}", "written")
        assert json.loads((tmp_path / "sms" / name).read_text("utf-8")) == {
            "to": NUMBER.format(n), "body": f"body {n} é…", "key": f"k{n}@clinic.example"}
    # one turn of the loop, one group: one line, without numbers or text
    lines = [r.getMessage() for r in caplog.records if r.name == "handler.sms"]
    assert lines == [f"20 sms written to {tmp_path / 'sms'}/ (no Twilio credentials: nothing "
                     "was sent)"]
    assert not any("+4477" in line or "body" in line for line in lines)


async def test_texts_arriving_during_a_write_go_in_the_next_group(tmp_path: Path) -> None:
    transport = FileSmsTransport(tmp_path)
    first = asyncio.ensure_future(transport.send(request(1)))
    await asyncio.sleep(0)  # the first group is on its way to the thread
    later = [asyncio.ensure_future(transport.send(request(n))) for n in range(2, 6)]
    assert (await first).outcome is Outcome.OK
    assert [(await s).outcome for s in later] == [Outcome.OK] * 4
    assert files(tmp_path) == [f"k{n}@clinic.example.json" for n in range(1, 6)]
    # a resend (same key) replaces the file, a shorter text leaves nothing of the longer one
    assert (await transport.send(request(1, "x"))).outcome is Outcome.OK
    assert json.loads((tmp_path / "k1@clinic.example.json").read_text("utf-8"))["body"] == "x"


async def test_a_file_that_cannot_be_written_fails_alone(tmp_path: Path) -> None:
    transport = FileSmsTransport(tmp_path)
    (tmp_path / "k2@clinic.example.json").mkdir()  # in the way: IsADirectoryError
    bad_key = SmsRequest(to=NUMBER.format(3), body="b", idempotency_key="k3\0")
    results = await asyncio.gather(transport.send(request(1)), transport.send(request(2)),
                                   transport.send(bad_key), transport.send(request(4)),
                                   return_exceptions=True)
    ok, blocked, invalid, also_ok = results
    assert isinstance(ok, SendResult) and ok.outcome is Outcome.OK
    assert isinstance(also_ok, SendResult) and also_ok.outcome is Outcome.OK
    assert isinstance(blocked, SendResult) and blocked.outcome is Outcome.TEMPORARY
    assert blocked.error.startswith("sms folder write failed")
    assert isinstance(invalid, ValueError)  # raised to its own sender, as before
    # and the transport keeps working
    assert (await transport.send(request(5))).outcome is Outcome.OK


def test_one_transport_serves_successive_event_loops(tmp_path: Path) -> None:
    transport = FileSmsTransport(tmp_path)

    async def send_two(first: int) -> list[Outcome]:
        results = await asyncio.gather(transport.send(request(first)),
                                       transport.send(request(first + 1)))
        return [r.outcome for r in results]

    assert asyncio.run(send_two(1)) == [Outcome.OK, Outcome.OK]
    assert asyncio.run(send_two(3)) == [Outcome.OK, Outcome.OK]
    assert len(files(tmp_path)) == 4


async def test_a_cancelled_send_does_not_stop_the_others(tmp_path: Path) -> None:
    transport = FileSmsTransport(tmp_path)
    cancelled = asyncio.ensure_future(transport.send(request(1)))
    kept = asyncio.ensure_future(transport.send(request(2)))
    await asyncio.sleep(0)
    cancelled.cancel()
    assert (await kept).outcome is Outcome.OK
    assert cancelled.cancelled()
    assert (await transport.send(request(3))).outcome is Outcome.OK


# --- recording ----------------------------------------------------------------------------------


class ScriptedSms:
    """An SMS provider double: answers each number as told; "delivered" numbers get their status
    callback (here: the row's delivery_status written by another connection) before the send
    returns, as a fast callback can beat the dispatcher's record."""

    description = "scripted"

    def __init__(self, engine: Engine, answers: dict[str, SendResult | str]) -> None:
        self.engine = engine
        self.answers = answers
        self.sent: list[str] = []

    async def send(self, request: SmsRequest) -> SendResult:
        self.sent.append(request.to)
        answer = self.answers.get(request.to, SendResult.ok("SM-default", status="queued"))
        if answer in ("delivered", "undelivered"):
            error = {} if answer == "delivered" else {
                "error_code": "30003", "last_error": "twilio status undelivered, error 30003"}
            with self.engine.begin() as connection:
                connection.execute(update(OutboxItem).where(
                    OutboxItem.message_id == request.idempotency_key).values(
                        delivery_status=answer, provider_id="SM-callback", **error))
            return SendResult.ok("SM-callback", status="queued")
        assert isinstance(answer, SendResult)
        return answer

    async def close(self) -> None:
        return None


class NoEmail:
    description = "none"

    async def send(self, message: bytes, *, sender: str, recipient: str) -> SendResult:
        return SendResult.ok("none")

    async def close(self) -> None:
        return None


class BouncedMeanwhile(NoEmail):
    """The first email's bounce is processed (the row marked failed by another connection)
    before the dispatcher records the send, as a fast bounce under load can be."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.bounced = ""

    async def send(self, message: bytes, *, sender: str, recipient: str) -> SendResult:
        if not self.bounced:
            found = re.search(rb"^Message-ID: <([^>]+)>", message, re.MULTILINE | re.IGNORECASE)
            assert found
            self.bounced = found[1].decode()
            with self.engine.begin() as connection:
                connection.execute(update(OutboxItem).where(
                    OutboxItem.message_id == self.bounced).values(
                        status="failed", delivery_status="bounced", error_code="5.1.1",
                        last_error="bounced: 5.1.1 user unknown"))
        return SendResult.ok("relay-id")


async def test_texts_are_recorded_sent_together_and_failures_keep_their_meaning(
    make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(quiet_hours="off")
    await asyncio.to_thread(populate, settings, 7, tag="smscpu")
    engine = db.make_engine(settings.sqlalchemy_url)
    try:
        with engine.begin() as connection:  # the acknowledgements become texts
            acks = [r[0] for r in connection.execute(text(
                "SELECT id FROM outbox_item WHERE kind = 'ack' ORDER BY id"))]
            for n, row_id in enumerate(acks):
                connection.execute(update(OutboxItem).where(OutboxItem.id == row_id).values(
                    channel="sms", template="ack-general", recipient=NUMBER.format(n),
                    last_error="an earlier attempt"))
        numbers = [NUMBER.format(n) for n in range(7)]
        sms = ScriptedSms(engine, {
            numbers[0]: SendResult.ok("SM-0", status="queued"),
            numbers[1]: SendResult.ok("SM-1"),  # no status from the provider: "sent"
            numbers[2]: "delivered",
            numbers[3]: SendResult.temporary("twilio 503: busy", "503"),
            numbers[4]: SendResult.permanent("twilio 400: unsubscribed", OPTED_OUT_CODE),
            numbers[5]: SendResult.permanent("twilio 400: invalid", "21211"),
            numbers[6]: "undelivered",
        })
        email = BouncedMeanwhile(engine)
        clock = FakeClock(datetime.now(UTC) + timedelta(minutes=1))
        rules = LiveRules(rules_dir=settings.rules_dir, templates_dir=settings.templates_dir,
                          max_sms_segments=settings.sms_max_segments, now=clock.now())
        dispatcher = Dispatcher(sessions=db.make_sessionmaker(engine, write=True),
                                templates=rules, ruleset=rules.current, email=email,
                                sms=sms, clock=clock, settings=settings)
        assert await dispatcher.run_until_idle() == 14
        assert sorted(sms.sent) == numbers

        with DbSession(engine) as session:
            rows = {r.recipient: r for r in session.scalars(
                select(OutboxItem).where(OutboxItem.channel == "sms"))}
            for n, (provider_id, delivery) in enumerate(
                    [("SM-0", "queued"), ("SM-1", "sent"), ("SM-callback", "delivered")]):
                row = rows[numbers[n]]
                assert (row.status, row.provider_id, row.delivery_status, row.last_error,
                        row.lease_until, row.sent_at) == (
                    "sent", provider_id, delivery, "", None, clock.now())
                assert row.rendered is not None and "thank you" in row.rendered["body"]
            # a callback that beat the record keeps what it said, error included
            late = rows[numbers[6]]
            assert (late.status, late.delivery_status, late.error_code, late.last_error) == (
                "sent", "undelivered", "30003", "twilio status undelivered, error 30003")
            retry = rows[numbers[3]]
            assert (retry.status, retry.error_code, retry.sent_at, retry.delivery_status) == (
                "pending", "503", None, "")
            assert retry.due_at == next_attempt(1, clock.now())
            for n, code in ((4, OPTED_OUT_CODE), (5, "21211")):
                row = rows[numbers[n]]
                assert (row.status, row.error_code, row.sent_at, row.delivery_status) == (
                    "failed", code, None, "")
            opted = session.scalars(select(Contact.phone).where(
                Contact.sms_opted_out_at.is_not(None))).all()
            assert opted == [numbers[4]]
            failed = session.scalars(select(Event).where(Event.kind == "delivery-failed")).all()
            assert sorted(e.detail["code"] for e in failed) == sorted([OPTED_OUT_CODE, "21211"])
            emails = {r.message_id: r for r in session.scalars(select(OutboxItem).where(
                OutboxItem.channel == "email"))}
            bounced = emails.pop(email.bounced)  # the bounce's verdict stands; the send is kept
            assert (bounced.status, bounced.delivery_status, bounced.last_error,
                    bounced.provider_id, bounced.sent_at) == (
                "failed", "bounced", "bounced: 5.1.1 user unknown", "relay-id", clock.now())
            assert bounced.rendered is not None
            assert [r.status for r in emails.values()] == ["sent"] * 6
    finally:
        engine.dispose()


def test_the_basic_header_follows_the_credentials_it_is_given() -> None:
    client = ApiHttpClient()
    for auth in [("AC1", "t1"), ("AC1", "t1"), ("AC2", "t:2"), ("AC1", "t1")]:
        expected = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode("ascii")
        assert client._authorization(auth) == f"Basic {expected}"


async def test_a_reader_of_the_folder_never_sees_half_a_text(tmp_path: Path) -> None:
    """Each file appears whole (written beside it, then renamed): a reader polling the folder
    while large texts are written, and rewritten by resends, parses every file it finds."""
    import threading

    folder = tmp_path / "sms"
    transport = FileSmsTransport(folder)
    stop = threading.Event()
    seen: list[int] = []
    broken: list[str] = []

    def read() -> None:
        while not stop.is_set():
            for path in folder.glob("*.json"):
                try:
                    data = path.read_bytes()
                except FileNotFoundError:
                    continue
                try:
                    json.loads(data)
                except ValueError:
                    broken.append(f"{path.name}: {len(data)} bytes")
                seen.append(len(data))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for round_ in range(3):  # the same keys again: resends replace the files
            await asyncio.gather(*(transport.send(request(n, f"{round_} " + "x" * 300_000))
                                   for n in range(8)))
    finally:
        stop.set()
        reader.join()
    assert broken == []
    assert seen  # the reader did look while texts were written
    assert files(folder) == sorted(f"k{n}@clinic.example.json" for n in range(8))
