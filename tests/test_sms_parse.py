"""The pure parts of the SMS channel: form parsing, numbers, keywords, quiet hours, status
order, Twilio error mapping and the URL a signature covers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from handler.inbound import Channel
from handler.parse_sms import SmsParseError, normalise_number, parse_sms
from handler.quiet import parse_quiet_hours, release_time
from handler.sms_keywords import keyword_of
from handler.sms_out import classify_api_error, with_key
from handler.sms_status import advance_status
from handler.sms_webhook import signed_url
from handler.transports import Outcome
from tests.twilio_fake import OUR_NUMBER, inbound_form

LONDON = "Europe/London"


def test_inbound_form_becomes_an_sms_message() -> None:
    form = inbound_form("Hello, I'd like a second opinion", sender="07700 900123",
                        extra={"FromCity": "LONDON", "FromZip": "SW1A 1AA"})
    msg = parse_sms(form)
    assert msg.channel is Channel.SMS
    assert msg.external_id == form["MessageSid"]
    assert msg.sender == "+447700900123"
    assert msg.mailbox == OUR_NUMBER and msg.recipients == (OUR_NUMBER,)
    assert msg.text == "Hello, I'd like a second opinion"
    assert msg.attachments == () and msg.defects == ()
    assert msg.headers["account-sid"] == form["AccountSid"]
    assert "LONDON" not in str(msg.headers) and "SW1A" not in str(msg.headers)


def test_mms_media_are_kept_as_urls() -> None:
    base = "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/Media/"
    form = inbound_form("", media=[(base + "ME1", "image/jpeg"),
                                   (base + "ME2", "application/pdf")])
    msg = parse_sms(form)
    assert [(a.filename, a.content_type, a.url, a.data) for a in msg.attachments] == [
        ("ME1.jpg", "image/jpeg", base + "ME1", b""),
        ("ME2.pdf", "application/pdf", base + "ME2", b""),
    ]
    assert msg.text == ""


def test_odd_forms() -> None:
    with pytest.raises(SmsParseError):
        parse_sms({"Body": "no sid"})
    msg = parse_sms(inbound_form("x", sender="VODAFONE", extra={"NumMedia": "3"}))
    assert msg.sender == "VODAFONE"
    assert "sender is not a phone number" in msg.defects
    assert any("MediaUrl0" in d for d in msg.defects)


@pytest.mark.parametrize(("raw", "expected"), [
    ("+447700900123", "+447700900123"), ("07700 900123", "+447700900123"),
    ("+1 415 555 2671", "+14155552671"), ("0044 7700 900123", "+447700900123"),
    ("hello", None), ("", None), ("12", None),
])
def test_numbers_are_normalised_to_e164(raw: str, expected: str | None) -> None:
    assert normalise_number(raw) == expected


@pytest.mark.parametrize(("body", "kind"), [
    ("STOP", "opt-out"), (" stop ", "opt-out"), ("Stop.", "opt-out"), ("stopall", "opt-out"),
    ("UNSUBSCRIBE", "opt-out"), ("cancel", "opt-out"), ("End", "opt-out"), ("quit!", "opt-out"),
    ("START", "opt-in"), ("unstop", "opt-in"), ("help", "help"), (" HELP\n", "help"),
    ("please stop texting me", None), ("stop it", None), ("", None), ("helpful", None),
])
def test_only_a_bare_keyword_is_a_keyword(body: str, kind: str | None) -> None:
    keyword = keyword_of(parse_sms(inbound_form(body)))
    assert (keyword.kind if keyword else None) == kind


def test_yes_is_an_opt_in_only_for_opted_out_numbers_and_advanced_opt_out_wins() -> None:
    yes = keyword_of(parse_sms(inbound_form("Yes")))
    assert yes is not None and yes.kind == "opt-in" and yes.conditional
    custom = keyword_of(parse_sms(inbound_form("Arret", extra={"OptOutType": "STOP"})))
    assert custom is not None and custom.kind == "opt-out"


def test_quiet_hours_release_at_the_end_of_the_window() -> None:
    quiet = parse_quiet_hours("21:00-08:00", LONDON)
    # winter: London is UTC
    assert release_time(datetime(2026, 11, 25, 10, 0, tzinfo=UTC), quiet) is None
    assert release_time(datetime(2026, 11, 25, 20, 59, tzinfo=UTC), quiet) is None
    assert release_time(datetime(2026, 11, 25, 21, 0, tzinfo=UTC), quiet) == datetime(
        2026, 11, 26, 8, 0, tzinfo=UTC)
    assert release_time(datetime(2026, 11, 26, 3, 0, tzinfo=UTC), quiet) == datetime(
        2026, 11, 26, 8, 0, tzinfo=UTC)
    assert release_time(datetime(2026, 11, 26, 8, 0, tzinfo=UTC), quiet) is None
    # summer: 20:30 UTC is 21:30 BST; the window ends at 08:00 BST = 07:00 UTC
    assert release_time(datetime(2026, 7, 1, 20, 30, tzinfo=UTC), quiet) == datetime(
        2026, 7, 2, 7, 0, tzinfo=UTC)
    # the night the clocks go forward (29 March 2026)
    assert release_time(datetime(2026, 3, 28, 23, 0, tzinfo=UTC), quiet) == datetime(
        2026, 3, 29, 7, 0, tzinfo=UTC)
    lunch = parse_quiet_hours("12:00-13:30", LONDON)
    assert release_time(datetime(2026, 11, 25, 12, 10, tzinfo=UTC), lunch) == datetime(
        2026, 11, 25, 13, 30, tzinfo=UTC)
    assert release_time(datetime(2026, 11, 25, 14, 0, tzinfo=UTC), lunch) is None


def test_quiet_hours_setting() -> None:
    assert parse_quiet_hours("off", LONDON) is None
    assert parse_quiet_hours("", LONDON) is None
    for bad, zone in (("21-08", LONDON), ("25:00-08:00", LONDON), ("21:00-08:00", "Mars/Base")):
        with pytest.raises(ValueError):
            parse_quiet_hours(bad, zone)


def test_delivery_status_only_moves_forward() -> None:
    assert advance_status("", "queued") == "queued"
    assert advance_status("queued", "sent") == "sent"
    assert advance_status("delivered", "sent") == "delivered"  # late callback
    assert advance_status("sent", "undelivered") == "undelivered"
    assert advance_status("undelivered", "delivered") == "undelivered"


@pytest.mark.parametrize(("status", "code", "outcome"), [
    (400, 21211, Outcome.PERMANENT), (400, 21610, Outcome.PERMANENT),
    (400, 21408, Outcome.PERMANENT), (400, 21614, Outcome.PERMANENT),
    (404, 20404, Outcome.TEMPORARY), (400, 21606, Outcome.TEMPORARY),
    (400, 21611, Outcome.TEMPORARY), (400, 21659, Outcome.TEMPORARY),
    (429, 20429, Outcome.TEMPORARY), (500, 20500, Outcome.TEMPORARY),
    (503, None, Outcome.TEMPORARY), (401, 20003, Outcome.TEMPORARY),
])
def test_twilio_errors_are_temporary_or_permanent(
    status: int, code: int | None, outcome: Outcome
) -> None:
    result = classify_api_error(status, code, "message")
    assert result.outcome is outcome
    assert result.code == str(code or status)


def test_signed_url_is_the_public_one() -> None:
    assert signed_url("https://h.example/", "/sms/twilio", "") == "https://h.example/sms/twilio"
    assert signed_url("https://h.example/base", "/sms/twilio/status", "key=a%40b") == (
        "https://h.example/base/sms/twilio/status?key=a%40b")
    assert with_key("https://h.example/sms/twilio/status", "a@b") == (
        "https://h.example/sms/twilio/status?key=a%40b")
