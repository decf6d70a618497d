"""Twilio's inbound-message form fields -> InboundMessage (the SMS edge of the intake path).

Numbers are normalised once, to E.164 (`phonenumbers`, default region GB); MMS media stay at
Twilio and are kept as URLs. Only a few non-identifying Twilio fields are kept as "headers";
the sender's city, postcode and state are dropped on purpose.
"""

from __future__ import annotations

import functools
import mimetypes
import re
from collections.abc import Mapping
from urllib.parse import urlsplit

import phonenumbers

from handler.inbound import Attachment, Channel, InboundMessage

MAX_BODY_CHARS = 10_000  # Twilio caps inbound SMS at 1,600 characters; this is a backstop
MAX_MEDIA = 10  # Twilio's own limit per MMS
_SID_RE = re.compile(r"^[A-Z]{2}[0-9a-fA-F]{32}$")
_KEPT_FIELDS = {
    "AccountSid": "account-sid", "MessagingServiceSid": "messaging-service-sid",
    "NumSegments": "num-segments", "NumMedia": "num-media", "FromCountry": "from-country",
    "SmsStatus": "sms-status", "ApiVersion": "api-version", "OptOutType": "opt-out-type",
}
SMS_HEADERS = tuple(_KEPT_FIELDS.values())
"""The names a text's kept form fields are stored (and tested by rules) under."""


class SmsParseError(ValueError):
    """The form is not an inbound Twilio message (missing MessageSid or From)."""


def normalise_number(raw: str, region: str = "GB") -> str | None:
    """"07700 900123" -> "+447700900123"; None when it is not a possible phone number."""
    text = raw.strip()
    if not text:
        return None
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


# The number a text was sent to is one of the clinic's own few: parsed once. (Senders' numbers
# are not cached: no patient's number stays in memory after its request.)
_our_number = functools.lru_cache(maxsize=64)(normalise_number)


def parse_sms(form: Mapping[str, str], *, region: str = "GB") -> InboundMessage:
    """Build the InboundMessage for one inbound SMS/MMS webhook request."""
    sid = (form.get("MessageSid") or form.get("SmsMessageSid") or "").strip()
    raw_from = (form.get("From") or "").strip()
    if not sid or not raw_from:
        raise SmsParseError("not an inbound message: MessageSid and From are required")
    defects: list[str] = []
    if not _SID_RE.match(sid):
        defects.append("MessageSid has an unexpected form")
    sender = normalise_number(raw_from, region)
    if sender is None:  # short code or alphanumeric sender: keep what Twilio gave us
        sender = raw_from[:32]
        defects.append("sender is not a phone number")
    to_raw = (form.get("To") or "").strip()
    mailbox = _our_number(to_raw, region) or to_raw[:32]
    text = (form.get("Body") or "").replace("\r\n", "\n").replace("\r", "\n")
    if len(text) > MAX_BODY_CHARS:
        text = text[:MAX_BODY_CHARS]
        defects.append(f"body longer than {MAX_BODY_CHARS} characters, truncated")
    headers = {name: str(form[field])[:200] for field, name in _KEPT_FIELDS.items()
               if form.get(field)}
    return InboundMessage(
        channel=Channel.SMS, external_id=sid[:255], sender=sender, mailbox=mailbox,
        recipients=(mailbox,) if mailbox else (), text=text, headers=headers,
        attachments=_media(form, defects), defects=tuple(defects),
    )


def _media(form: Mapping[str, str], defects: list[str]) -> tuple[Attachment, ...]:
    try:
        count = int(form.get("NumMedia") or 0)
    except ValueError:
        defects.append("NumMedia is not a number")
        count = 0
    if count > MAX_MEDIA:
        defects.append(f"NumMedia {count} is more than {MAX_MEDIA}")
        count = MAX_MEDIA
    media = []
    for n in range(max(count, 0)):
        url = (form.get(f"MediaUrl{n}") or "").strip()
        if not url.startswith(("https://", "http://")):
            defects.append(f"MediaUrl{n} missing or not a URL")
            continue
        content_type = (form.get(f"MediaContentType{n}") or "application/octet-stream").strip()
        media.append(Attachment(filename=_media_name(url, content_type),
                                content_type=content_type.lower()[:255], size=0, sha256="",
                                url=url))
    return tuple(media)


def _media_name(url: str, content_type: str) -> str:
    """A readable file name: the media SID (last path segment) plus an extension."""
    stem = urlsplit(url).path.rstrip("/").rpartition("/")[2] or "media"
    extension = mimetypes.guess_extension(content_type.split(";")[0].strip().lower()) or ""
    return f"{stem[:64]}{extension}"
