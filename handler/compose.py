"""Outbound email written straight to bytes.

`EmailMessage` parses every header into objects and the generator folds them back again
(~1.2 ms a mail, with the relay's flattening). Our mail always has the same simple shape, so it
is written directly; the encodings themselves (RFC 2047 words, quoted-printable, base64) stay
with the stdlib. The result is 7-bit except for non-ASCII addresses, which are written as raw
UTF-8 only when the envelope needs SMTPUTF8 anyway.
"""

from __future__ import annotations

import base64
import binascii
import functools
import secrets
from dataclasses import dataclass
from datetime import datetime
from email.charset import Charset
from email.header import Header
from email.policy import SMTP
from email.utils import format_datetime, formataddr

from handler.render import RenderedEmail

MAX_LINE = 78  # RFC 5322's SHOULD; its hard limit is 998
MAX_ID = 900  # a message id longer than this (never seen: intake keeps 255) gets encoded
_EW_MAX = 75  # RFC 2047's longest encoded word
_UTF8 = Charset("utf-8")


@dataclass(frozen=True, slots=True)
class ComposedEmail:
    data: bytes
    """The whole message as sent: CRLF line endings, no line over 998 bytes."""
    subject: str
    """The Subject as sent, decoded."""


def compose_email(
    rendered: RenderedEmail, *, sender: str, sender_name: str, recipient: str, message_id: str,
    date: datetime, auto_submitted: str, reference: str = "", in_reply_to: str | None = None,
    references: list[str] | None = None, reply_to: str | None = None,
) -> ComposedEmail:
    """multipart/alternative (text + HTML), or text/plain when there is no HTML; headers never
    carry CR/LF (whitespace is collapsed)."""
    utf8 = not (sender.isascii() and recipient.isascii())  # the relay will ask for SMTPUTF8
    subject = " ".join(rendered.subject.split())
    if reference and reference not in subject:
        subject = f"{subject} [{reference}]"
    head = [
        _header("Subject", subject),
        _from(sender_name, sender),
        _address("To", recipient, utf8),
        _fold("Date", [format_datetime(date)]),
        _header("Message-ID", f"<{message_id}>", ids=True),
    ]
    if in_reply_to:
        head.append(_header("In-Reply-To", f"<{in_reply_to}>", ids=True))
        head.append(_header("References", " ".join(
            f"<{r}>" for r in (references or [in_reply_to])), ids=True))
    if reply_to:
        head.append(_address("Reply-To", reply_to, utf8))
    head.append(_flags(auto_submitted))
    if reference:
        head.append(_header("X-Enquiry-Reference", reference))
    head.append("MIME-Version: 1.0\r\n")
    text = _part("plain", rendered.text)
    if not rendered.html:
        return ComposedEmail("".join(head).encode() + text, subject)
    # 128 random bits, and "=_" never occurs in quoted-printable or base64: no body can hold it
    boundary = f"=_{secrets.token_hex(16)}"
    head.append(_fold("Content-Type", ["multipart/alternative;", f'boundary="{boundary}"']))
    delimiter = f"\r\n--{boundary}\r\n".encode()
    data = b"".join([
        "".join(head).encode(), delimiter, text, delimiter, _part("html", rendered.html),
        f"\r\n--{boundary}--\r\n".encode()])
    return ComposedEmail(data, subject)


def _part(subtype: str, content: str) -> bytes:
    """Content-Type, Content-Transfer-Encoding, blank line, body: 7bit when the text is ASCII
    in short lines, otherwise the shorter of quoted-printable and base64 (as the stdlib does)."""
    lines = content.encode("utf-8").splitlines()
    body = b"\r\n".join(lines) + b"\r\n"
    if body.isascii() and max(map(len, lines), default=0) <= MAX_LINE:
        cte = "7bit"
    else:
        qp = b"".join(map(_qp_line, lines))
        b64_size = -(-len(body) // 57) * 78  # base64 in lines of 76 characters and CRLF
        if len(qp) <= b64_size:
            cte, body = "quoted-printable", qp
        else:
            cte, body = "base64", base64.encodebytes(body).replace(b"\n", b"\r\n")
    head = f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}'
    return head.encode() + b"\r\n\r\n" + body


# Headers that repeat from mail to mail (our own name and address, a team's address, the
# auto-reply flags) are folded once; the caches hold a few hundred short strings at most.

@functools.lru_cache(maxsize=64)
def _from(sender_name: str, sender: str) -> str:
    return _fold("From", _mailbox(sender_name, sender))


@functools.lru_cache(maxsize=16)
def _flags(auto_submitted: str) -> str:
    return "".join([
        _header("Auto-Submitted", auto_submitted),
        _header("X-Auto-Response-Suppress", "All"),  # ask Exchange & co. not to answer us
        _header("Precedence", "auto_reply" if auto_submitted == "auto-replied" else "bulk"),
    ])


@functools.lru_cache(maxsize=4096)
def _qp_line(line: bytes) -> bytes:
    """One line (no line ending) as quoted-printable, with its CRLF.

    What `quopri.encodestring` (`binascii.b2a_qp`) writes for a whole CRLF body, line by
    line: it keeps no state across a line break, so the lines can be encoded one at a time.
    b2a_qp costs ~15 ns a byte and most lines of a message are the template's own, the same
    in every mail (the HTML layout, the headings): those are encoded once."""
    return binascii.b2a_qp(line + b"\r\n")


def _header(name: str, value: str, *, ids: bool = False) -> str:
    """An unstructured header: words that are not plain ASCII, that a reader would take for
    encoded words, or that are too long to fold become RFC 2047 encoded words. `ids`: message
    ids, which must stay unencoded to thread, may be long."""
    words: list[str] = []
    run: list[str] = []  # consecutive words to encode together
    for word in value.split():
        first = not (words or run)
        if _plain(word, MAX_ID if ids else MAX_LINE - 1 - (len(name) + 1 if first else 0)):
            if run:
                words += _encoded(" ".join(run), None if words else name)
                run = []
            words.append(word)
        else:
            run.append(word)
    if run:
        words += _encoded(" ".join(run), None if words else name)
    return _fold(name, words)


def _plain(word: str, limit: int) -> bool:
    return word.isascii() and "=?" not in word and len(word) <= limit


def _encoded(text: str, first_of: str | None) -> list[str]:
    """`text` as encoded words; `first_of`: the header whose name shares the first line."""
    word = _UTF8.header_encode(text)
    if len(word) <= _EW_MAX and (not first_of or len(first_of) + 2 + len(word) <= MAX_LINE):
        return [word]
    return Header(text, _UTF8, maxlinelen=_EW_MAX, header_name=first_of).encode().split()


def _mailbox(name: str, address: str) -> list[str]:
    """`Display Name <address>` as words to fold; the address alone when there is no name."""
    name = " ".join(name.split())
    address = " ".join(address.split())
    if not name:
        return [address]
    if all(_plain(word, MAX_LINE - 8) for word in name.split(" ")):
        return formataddr((name, address)).split(" ")  # quotes the name when it needs it
    return [*_encoded(name, "From"), f"<{address}>"]


@functools.lru_cache(maxsize=512)
def _address(name: str, address: str, utf8: bool) -> str:
    """An address header. A non-ASCII address has no 7-bit form: without SMTPUTF8 it gets what
    the stdlib writes (encoded words, as before), which readers may not make sense of."""
    if address.isascii() or utf8:
        return _fold(name, address.split())
    return SMTP.header_factory(name, " ".join(address.split())).fold(policy=SMTP)


def _fold(name: str, words: list[str]) -> str:
    """`Name: words` and CRLF, folded between words into lines of at most 78 characters
    unless a single word is longer; the first word stays on the name's line."""
    lines = [f"{name}:"]
    for i, word in enumerate(words):
        if i and len(lines[-1]) + 1 + len(word) > MAX_LINE:
            lines.append("")
        lines[-1] += " " + word
    return "\r\n".join(lines) + "\r\n"
