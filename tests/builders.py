"""MIME builders for tests: realistic patient emails as the bytes an SMTP client sends.

Every builder returns CRLF-terminated bytes and takes the same header options (`sender`, `to`,
`cc`, `subject`, `message_id`, `date`, `headers`, `encode_headers`). Non-ASCII subjects and
display names are RFC 2047 encoded unless `encode_headers=False` (raw UTF-8, as with SMTPUTF8).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formataddr, getaddresses

CLINIC = "enquiries@clinic.example"
PATIENT = "Jane Patient <jane.patient@example.com>"
PATIENT_ADDRESS = "jane.patient@example.com"
DATE = "Mon, 06 May 2024 09:30:00 +0100"
SUBJECT = "Second opinion on my breast biopsy results"
BODY = (
    "Dear clinic,\n\n"
    "I was diagnosed with invasive ductal carcinoma last month at my local hospital and would\n"
    "like a second opinion before I start treatment. I can send my pathology report and scans.\n\n"
    "Kind regards,\nJane Patient\n07700 900123\n"
)
HTML = (
    "<html><head><style>p {color: #333}</style></head><body>"
    "<p>Dear clinic,</p><p>I would like a <b>second opinion</b> about my prostate MRI.</p>"
    "<p>Kind regards,<br>John Patient</p></body></html>"
)

Header = tuple[str, str]
Common = str | Sequence[Header] | bool | None


@dataclass(frozen=True)
class FileSpec:
    """One attachment for `attachment_email`."""

    filename: str | None
    content_type: str
    data: bytes
    disposition: str = "attachment"
    content_id: str | None = None


def new_message_id(domain: str = "mail.example.com") -> str:
    return f"<{uuid.uuid4().hex}@{domain}>"


def encode_word(text: str, charset: str = "utf-8", encoding: str = "q") -> str:
    """One RFC 2047 encoded word (no length limit: the parser must cope either way)."""
    data = text.encode(charset)
    if encoding.lower() == "b":
        return f"=?{charset}?B?{base64.b64encode(data).decode('ascii')}?="
    quoted = "".join(
        chr(b) if chr(b).isalnum() and b < 128 else "_" if b == 32 else f"={b:02X}" for b in data
    )
    return f"=?{charset}?Q?{quoted}?="


def format_addresses(value: str) -> str:
    """'Jörg <j@x>, a@b' -> RFC 5322 form, non-ASCII display names RFC 2047 encoded."""
    return ", ".join(formataddr(pair, charset="utf-8") for pair in getaddresses([value]))


def plain_email(
    body: str = BODY, *, charset: str = "utf-8", transfer_encoding: str = "8bit",
    declare_charset: bool = True, **common: Common,
) -> bytes:
    """text/plain. `declare_charset=False` leaves out the charset parameter (8-bit mail
    without a declaration); `transfer_encoding` is 7bit, 8bit, quoted-printable or base64."""
    return _message(_text_part("plain", body, charset, transfer_encoding, declare_charset),
                    **common)


def html_email(html: str = HTML, *, charset: str = "utf-8", **common: Common) -> bytes:
    """HTML-only mail (no text/plain alternative), as some webmail and phone clients send."""
    return _message(_text_part("html", html, charset, "quoted-printable"), **common)


def alternative_email(
    text: str = BODY, html: str = HTML, *, charset: str = "utf-8", **common: Common,
) -> bytes:
    """multipart/alternative with text/plain and text/html, as most mail clients send."""
    return _message(_multipart("alternative", [
        _text_part("plain", text, charset, "quoted-printable"),
        _text_part("html", html, charset, "quoted-printable"),
    ]), **common)


def attachment_email(
    body: str = BODY, attachments: Sequence[FileSpec] = (), *, html: str | None = None,
    **common: Common,
) -> bytes:
    """multipart/mixed: the body (alternative when `html` is given), then the files."""
    first = (_multipart("alternative", [_text_part("plain", body, "utf-8", "quoted-printable"),
                                        _text_part("html", html, "utf-8", "quoted-printable")])
             if html is not None else _text_part("plain", body, "utf-8", "quoted-printable"))
    return _message(_multipart("mixed", [first, *(_file_part(f) for f in attachments)]),
                    **common)


def reply_email(
    in_reply_to: str, *, references: Sequence[str] = (), body: str = "Thank you, that is fine.",
    subject: str = "Re: Your enquiry", **common: Common,
) -> bytes:
    """A reply: In-Reply-To and References (ids given with or without angle brackets)."""
    refs = [_bracket(r) for r in references] or [_bracket(in_reply_to)]
    extra = [("In-Reply-To", _bracket(in_reply_to)), ("References", "\r\n ".join(refs))]
    headers = [*extra, *_headers_arg(common.pop("headers", ()))]
    quoted = "\n".join("> " + line for line in BODY.splitlines())
    return plain_email(f"{body}\n\nOn Mon, 6 May 2024, the clinic wrote:\n{quoted}\n",
                       subject=subject, headers=headers, **common)


def forwarded_email(inner: bytes, *, body: str = "See the message below.",
                    **common: Common) -> bytes:
    """A mail forwarded as an attachment (message/rfc822)."""
    head = b'Content-Type: message/rfc822\r\nContent-Disposition: inline\r\n'
    return _message(_multipart("mixed", [
        _text_part("plain", body, "utf-8", "7bit"), head + b"\r\n" + inner]), **common)


def bounce_email(original: bytes, *, failed_recipient: str = PATIENT_ADDRESS,
                 **common: Common) -> bytes:
    """A delivery status notification (RFC 3464) from MAILER-DAEMON with the original."""
    common.setdefault("sender", "Mail Delivery System <MAILER-DAEMON@mx.example.com>")
    common.setdefault("subject", "Undelivered Mail Returned to Sender")
    status = (f"Reporting-MTA: dns; mx.example.com\r\n\r\n"
              f"Final-Recipient: rfc822; {failed_recipient}\r\nAction: failed\r\n"
              f"Status: 5.1.1\r\n").encode()
    report = _multipart("report", [
        _text_part("plain", f"Delivery to {failed_recipient} failed permanently.",
                   "us-ascii", "7bit"),
        b"Content-Type: message/delivery-status\r\n\r\n" + status,
        b"Content-Type: message/rfc822\r\n\r\n" + original,
    ], params='; report-type="delivery-status"')
    return _message(report, **common)


def auto_reply_email(**common: Common) -> bytes:
    """An out-of-office reply (RFC 3834 Auto-Submitted)."""
    common.setdefault("subject", "Automatic reply: Your enquiry")
    headers = [("Auto-Submitted", "auto-replied"), ("X-Auto-Response-Suppress", "All"),
               *_headers_arg(common.pop("headers", ()))]
    return plain_email("I am out of the office until Monday.", headers=headers, **common)


# -- assembly -------------------------------------------------------------------------------

def _message(
    part: bytes, *, sender: str = PATIENT, to: str = CLINIC, cc: str | None = None,
    subject: str | None = SUBJECT, message_id: str | None = None, date: str | None = DATE,
    headers: Sequence[Header] = (), encode_headers: bool = True,
) -> bytes:
    lines: list[Header] = [("From", format_addresses(sender) if encode_headers else sender),
                           ("To", format_addresses(to) if encode_headers else to)]
    if cc:
        lines.append(("Cc", format_addresses(cc) if encode_headers else cc))
    if subject is not None:
        lines.append(("Subject", _encode_text(subject) if encode_headers else subject))
    if date is not None:
        lines.append(("Date", date))
    lines.append(("Message-ID", message_id if message_id is not None else new_message_id()))
    lines += [("MIME-Version", "1.0"), *headers]
    head = "".join(f"{name}: {value}\r\n" for name, value in lines if value is not None)
    return head.encode("utf-8") + part


def _text_part(subtype: str, text: str, charset: str, cte: str,
               declare_charset: bool = True) -> bytes:
    data = text.replace("\r\n", "\n").encode(charset)
    if cte == "base64":
        body = base64.encodebytes(data)
    elif cte == "quoted-printable":
        body = binascii.b2a_qp(data, istext=True)
    else:
        body = data
    param = f"; charset={charset}" if declare_charset else ""
    head = f"Content-Type: text/{subtype}{param}\r\nContent-Transfer-Encoding: {cte}\r\n"
    return head.encode("ascii") + b"\r\n" + _crlf(body)


def _file_part(spec: FileSpec) -> bytes:
    head = f"Content-Type: {spec.content_type}"
    disposition = spec.disposition
    if spec.filename is not None:
        name = spec.filename if spec.filename.isascii() else encode_word(spec.filename)
        head += f'; name="{name}"'
        disposition += f'; filename="{name}"'
    head += f"\r\nContent-Disposition: {disposition}\r\nContent-Transfer-Encoding: base64\r\n"
    if spec.content_id:
        head += f"Content-ID: {_bracket(spec.content_id)}\r\n"
    return head.encode("ascii") + b"\r\n" + _crlf(base64.encodebytes(spec.data))


def _multipart(subtype: str, parts: Sequence[bytes], params: str = "") -> bytes:
    boundary = "=_" + hashlib.sha256(b"".join(parts)).hexdigest()[:24]
    # the CRLF before a boundary belongs to the boundary, so a part's own last line break
    # survives only if we add one more
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + p + b"\r\n" for p in parts)
    head = f'Content-Type: multipart/{subtype}; boundary="{boundary}"{params}\r\n\r\n'
    return (head.encode("ascii") + b"This is a multi-part message in MIME format.\r\n" + body
            + b"--" + boundary.encode() + b"--\r\n")


def _encode_text(text: str) -> str:
    return text if text.isascii() else encode_word(text)


def _bracket(message_id: str) -> str:
    return message_id if message_id.startswith("<") else f"<{message_id}>"


def _crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _headers_arg(value: Common) -> list[Header]:
    return list(value) if isinstance(value, list | tuple) else []
