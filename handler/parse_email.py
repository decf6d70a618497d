"""Raw email bytes -> `InboundMessage`, for any input and without ever raising.

Owns MIME walking, body/attachment choice, address and Message-ID extraction (charset and
RFC 2047 decoding are in `mail_text`). What cannot be parsed cleanly is kept best-effort and
described in `defects`; work is bounded (parts, depth, text, headers) so hostile mail is cheap.
"""

from __future__ import annotations

import functools
import hashlib
import html as html_lib
import io
import re
from collections.abc import Sequence
from email._policybase import Compat32  # stdlib; public instance is email.policy.compat32
from email.feedparser import BytesFeedParser
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser
from email.utils import getaddresses

import inscriptis

from handler.inbound import Attachment, Channel, InboundMessage
from handler.mail_text import (
    Defects,
    clean_body,
    clean_line,
    decode_bytes,
    decode_words,
    header_to_text,
    scrub,
    unfold,
)

MAX_PARTS = 1000
MAX_DEPTH = 10
MAX_MULTIPARTS = 100
MAX_TEXT_CHARS = 1_000_000
MAX_HTML_CONVERT_CHARS = 300_000
MAX_HEADER_CHARS = 2000
MAX_RAW_HEADER_CHARS = 16_384  # what we feed to the decoders / address parser
MAX_RECIPIENTS = 100
MAX_REFERENCES = 50
MAX_ID_CHARS = 255  # message.external_id is String(255)
MAX_ADDRESS_CHARS = 320
MAX_NAME_CHARS = 200
MAX_FILENAME_CHARS = 255

SELECTED_HEADERS = (
    "from", "to", "cc", "reply-to", "date", "message-id", "in-reply-to", "references",
    "auto-submitted", "precedence", "list-id", "list-unsubscribe", "list-post",
    "x-auto-response-suppress", "return-path", "x-autoreply", "x-autorespond", "x-loop",
    "x-mailer", "content-type", "x-failed-recipients", "feedback-type", "x-spam-flag",
)
_WANTED = frozenset((*SELECTED_HEADERS, "subject"))
_JOINED = {"to": ", ", "cc": ", ", "references": " "}  # repeated headers we merge

_ADDR_SPEC = re.compile(r"[^\s@<>()\[\]\\,;:\"\x00-\x1f\x7f]+@[^\s@<>()\[\]\\,;:\"\x00-\x1f\x7f]+")
_NOT_SIMPLE = re.compile(r"[\"()\\;:\[\]]")
_SIMPLE_ITEM = re.compile(r"\s*(?:([^<>]*?)\s*<([^<>]*)>|([^<>\s]+))?\s*")
_MSG_ID = re.compile(r"<([^<>\s]+)>")
_MIME_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]{1,63}/[a-z0-9!#$&^_.+-]{1,63}")
_NESTED_TYPE = re.compile(rb"multipart/|message/", re.IGNORECASE)
"""Must occur in a header block whose Content-Type is multipart/* or message/*."""
_EXTENSIONS = {
    "application/pdf": ".pdf", "image/jpeg": ".jpg", "image/png": ".png", "image/gif": ".gif",
    "image/tiff": ".tif", "application/dicom": ".dcm", "text/calendar": ".ics",
    "text/plain": ".txt", "text/html": ".html", "text/csv": ".csv", "application/zip": ".zip",
    "message/rfc822": ".eml", "message/delivery-status": ".txt", "text/rfc822-headers": ".txt",
}


class _RawHeaders(Compat32):
    """compat32, but header reads return the raw string (8-bit bytes as surrogate escapes)
    instead of a lossy `Header` object; we decode them ourselves, with fallbacks."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        return value


_POLICY = _RawHeaders()
_EML_POLICY = _POLICY.clone(linesep="\r\n", max_line_length=0)


def parse_email(
    raw: bytes, *, envelope_from: str | None = None,
    envelope_rcpts: Sequence[str] = (), mailboxes: Sequence[str] = (),
) -> InboundMessage:
    """Build an `InboundMessage` from the bytes received in SMTP DATA. Never raises."""
    data = raw if type(raw) is bytes else _coerce_bytes(raw)
    defects = Defects()
    try:
        return _parse(data, envelope_from, envelope_rcpts, mailboxes, defects)
    except Exception as exc:  # last resort: intake must store *something* for any input
        defects.add(f"parse error: {_describe(exc)}")
        return InboundMessage(
            channel=Channel.EMAIL, external_id=_synthetic_id(data), sender="",
            text=clean_body(decode_bytes(data, None, "message", defects), defects, MAX_TEXT_CHARS),
            raw=data, defects=tuple(defects.items), envelope_from=_envelope(envelope_from),
        )


def normalise_address(value: str) -> str:
    """Lower-case bare addr-spec from a header value or envelope address; "" if none."""
    try:
        text = scrub(unfold(header_to_text(str(value)[:MAX_RAW_HEADER_CHARS])))
        simple = text.strip().strip("<>").lower()
        if _ADDR_SPEC.fullmatch(simple):
            return simple if len(simple) <= MAX_ADDRESS_CHARS else ""
        return next((a for a, _n in _addresses(text)), "")
    except Exception:
        return ""


def _parse(data: bytes, envelope_from: str | None, envelope_rcpts: Sequence[str],
           mailboxes: Sequence[str], defects: Defects) -> InboundMessage:
    msg, complete = _parse_mime(data, defects)
    raw_headers = _raw_headers(msg, defects)
    headers = {name: _header_text(name, values, defects)
               for name, values in raw_headers.items() if name != "subject"}

    froms = raw_headers.get("from", [])
    sender, sender_name = next(iter(_addresses(unfold(froms[0]) if froms else "")), ("", ""))
    if not sender:
        defects.add("no usable From address")
    sender_name = clean_line(decode_words(sender_name, "From name", defects))[:MAX_NAME_CHARS]

    recipients: dict[str, None] = {}
    for raw_value in raw_headers.get("to", []) + raw_headers.get("cc", []):
        for address, _name in _addresses(unfold(raw_value)):
            recipients.setdefault(address, None)
    if len(recipients) > MAX_RECIPIENTS:
        defects.add(f"more than {MAX_RECIPIENTS} recipients, the rest ignored")

    ids = _message_ids(raw_headers.get("message-id", [""])[0], bare_needs_at=False)
    external_id = _shorten_id(ids[0]) if ids else ""
    if not external_id:
        defects.add("missing Message-ID")
        external_id = _synthetic_id(data)
    reply_ids = _message_ids(" ".join(raw_headers.get("in-reply-to", [])), bare_needs_at=True)
    references = _references(" ".join(raw_headers.get("references", [])), defects)

    body = _Body()
    if complete:
        _walk(msg, body, defects)
    else:  # only the header block could be parsed: keep the rest as text
        body.plain.append(_payload_text(msg, defects))
    for defect in msg.defects[:20]:
        defects.add(type(defect).__name__)
    text, html = _choose_text(body, defects)

    rcpts = [normalise_address(r) for r in envelope_rcpts]
    recipient_list = tuple(recipients)[:MAX_RECIPIENTS]
    subject = raw_headers.get("subject", [""])[0]
    return InboundMessage(
        channel=Channel.EMAIL,
        external_id=external_id,
        sender=sender,
        sender_name=sender_name,
        mailbox=_choose_mailbox(rcpts, recipient_list, mailboxes),
        recipients=recipient_list,
        subject=_header_text("subject", [subject], defects) if subject else "",
        text=text,
        html=html,
        headers=headers,
        attachments=tuple(body.attachments),
        raw=data,
        defects=tuple(defects.items),
        in_reply_to=_shorten_id(reply_ids[0]) if reply_ids else None,
        references=references,
        envelope_from=_envelope(envelope_from),
    )


def _parse_mime(data: bytes, defects: Defects) -> tuple[Message, bool]:
    """Full parse; if the stdlib parser fails (e.g. RecursionError on deep nesting), the
    header block only; if even that fails, an empty message (text comes from the raw).
    A message declaring more than `MAX_MULTIPARTS` multipart types gets the header block only
    as well: the stdlib parser's time grows with the square of the nesting (1,000 nested
    parts took ~0.7 s here), and no real mail nests that deep (siblings share one type)."""
    if _multiparts(data, MAX_MULTIPARTS) > MAX_MULTIPARTS:
        defects.add(f"more than {MAX_MULTIPARTS} multipart types declared: only the header "
                    "block was parsed")
    else:
        try:
            return _parse_bytes(data), True
        except Exception as exc:
            defects.add(f"parse error: {_describe(exc)}")
    try:
        return BytesParser(policy=_POLICY).parsebytes(data, headersonly=True), False
    except Exception as exc:
        defects.add(f"parse error (headers): {_describe(exc)}")
    empty = Message(policy=_POLICY)
    empty.set_payload(data.decode("ascii", "surrogateescape"))
    return empty, False


def _multiparts(data: bytes, limit: int) -> int:
    """How many times "multipart/" appears, in any case, counting no further than `limit` + 1:
    in 1 MB steps (a lower-case copy of one step at a time, not of a 25 MB message). Every
    nested multipart needs its own; the parser reads no other spelling as multipart."""
    step, word = 1 << 20, b"multipart/"
    found = 0
    for start in range(0, len(data), step):
        chunk = data[start:start + step + len(word) - 1].lower()
        found += chunk.count(word, 0, step + len(word) - 1)  # those starting in this step
        if found > limit:
            break
    return found


def _parse_bytes(data: bytes) -> Message:
    """What BytesParser.parsebytes does (see `_feed`), but for a message that is not
    multipart or message/*, only the header block goes through the parser: its body is the
    rest of `data` verbatim, which the parser would otherwise collect line by line in Python
    (~25% of parsing a small plain message)."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or _NESTED_TYPE.search(data, 0, end):
        return _feed(data)
    msg = _feed(data[:end + 4])
    # The parser ended the headers at our blank line (else what follows the end it found is
    # already payload) and saw no nested type (the search above is a superset): the payload
    # of the whole message is exactly the rest, decoded as BytesFeedParser decodes.
    if (msg.is_multipart() or msg.get_content_maintype() in ("multipart", "message")
            or msg.get_payload() != ""):
        return _feed(data)
    msg.set_payload(data[end + 4:].decode("ascii", "surrogateescape"))
    return msg


def _feed(data: bytes) -> Message:
    """What BytesParser.parsebytes does, in the same 8 KB steps, without first decoding all
    of `data` into one str that it then copies into a StringIO (4 bytes per character in
    CPython): for a 25 MB message that was ~125 MB of the parse's peak memory."""
    parser = BytesFeedParser(policy=_POLICY)
    view = memoryview(data)
    for start in range(0, len(data), 8192):
        parser.feed(bytes(view[start:start + 8192]))
    return parser.close()


def _raw_headers(msg: Message, defects: Defects) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, value in msg.raw_items():
        key = str(name).strip().lower()
        if key in _WANTED:
            value = str(value)
            if "\x00" in value:  # PostgreSQL text cannot hold NUL
                defects.add(f"NUL bytes removed from header {key!r}")
                value = value.replace("\x00", "")
            found.setdefault(key, []).append(value)
    for key in ("from", "subject", "message-id"):
        if len(found.get(key, ())) > 1:
            defects.add(f"more than one {key!r} header")
    return found


def _header_text(name: str, values: list[str], defects: Defects) -> str:
    """Decoded, single-line, capped value of the header(s) `name`."""
    joined = _JOINED.get(name, "")
    raw = joined.join(values) if joined else values[0]
    if len(raw) > MAX_RAW_HEADER_CHARS:
        raw = raw[:MAX_RAW_HEADER_CHARS]
    text = clean_line(decode_words(unfold(header_to_text(raw, f"header {name!r}", defects)),
                                     f"header {name!r}", defects))
    if len(text) > MAX_HEADER_CHARS:
        defects.add(f"header {name!r} truncated to {MAX_HEADER_CHARS} characters")
        text = text[:MAX_HEADER_CHARS]
    return text


class _Body:
    __slots__ = ("attachments", "html", "plain")

    def __init__(self) -> None:
        self.plain: list[str] = []
        self.html: list[str] = []
        self.attachments: list[Attachment] = []


def _walk(root: Message, body: _Body, defects: Defects) -> None:
    """Depth-first, in document order, within the part and depth caps. message/* parts are
    kept whole as attachments and not walked into (a forwarded mail or bounce is evidence,
    not the sender's own words)."""
    stack: list[tuple[Message, int]] = [(root, 0)]
    part_no = 0
    while stack:
        part, depth = stack.pop()
        part_no += 1
        if part_no > MAX_PARTS:
            defects.add(f"more than {MAX_PARTS} MIME parts, the rest skipped")
            return
        where = f"part {part_no}"
        try:
            ctype = _content_type(part)
            # is_multipart() rather than get_payload(): for 8-bit leaves the latter decodes
            # with the declared charset and can raise (charset=idna) or waste time
            if part.is_multipart():
                if ctype.startswith("multipart/"):
                    if depth >= MAX_DEPTH:
                        defects.add(f"MIME nesting deeper than {MAX_DEPTH}, inner parts skipped")
                    else:
                        children = part.get_payload()[:MAX_PARTS]
                        stack.extend((p, depth + 1) for p in reversed(children))
                else:
                    body.attachments.append(_message_attachment(part, ctype, where, defects))
            else:
                if ctype.startswith("multipart/"):  # no usable boundary: read it as text
                    ctype = "text/plain"
                _leaf(part, ctype, part_no, body, defects)
        except Exception as exc:
            defects.add(f"parse error in {where}: {_describe(exc)}")
        if part is not root:  # the root's defects are added by the caller
            for defect in part.defects[:20]:
                defects.add(f"{type(defect).__name__} in {where}")


def _leaf(part: Message, ctype: str, part_no: int, body: _Body, defects: Defects) -> None:
    where = f"part {part_no}"
    raw_name = part.get_filename()
    filename = _filename(raw_name, where, defects) if raw_name else ""
    disposition = part.get_content_disposition()
    data = part.get_payload(decode=True)
    data = data if isinstance(data, bytes) else b""
    if ctype in ("text/plain", "text/html") and not raw_name and disposition != "attachment":
        text = decode_bytes(data, part.get_content_charset(), where, defects)
        (body.plain if ctype == "text/plain" else body.html).append(text)
        return
    if ctype in ("message/rfc822", "message/global"):  # an undecodable embedded message
        filename = filename or "forwarded.eml"
    name = filename or f"part-{part_no}{_EXTENSIONS.get(ctype, '.bin')}"
    body.attachments.append(_attachment(name, ctype, data))


def _message_attachment(part: Message, ctype: str, where: str, defects: Defects) -> Attachment:
    out = io.BytesIO()
    try:
        for inner in part.get_payload():
            BytesGenerator(out, mangle_from_=False, policy=_EML_POLICY).flatten(inner)
    except Exception as exc:
        defects.add(f"could not re-serialise {ctype} in {where}: {_describe(exc)}")
    if ctype in ("message/rfc822", "message/global"):
        name = "forwarded.eml"
    else:
        name = ctype.partition("/")[2] + ".txt"
    return _attachment(name, ctype, out.getvalue())


def _attachment(name: str, ctype: str, data: bytes) -> Attachment:
    return Attachment(filename=name, content_type=ctype, size=len(data),
                      sha256=hashlib.sha256(data).hexdigest(), data=data)


def _payload_text(msg: Message, defects: Defects) -> str:
    try:
        payload = msg.get_payload(decode=True)
    except Exception as exc:
        defects.add(f"parse error (body): {_describe(exc)}")
        return ""
    return decode_bytes(payload, None, "body", defects) if isinstance(payload, bytes) else ""


def _choose_text(body: _Body, defects: Defects) -> tuple[str, str | None]:
    plain = clean_body("\n".join(body.plain), defects, MAX_TEXT_CHARS)
    html = clean_body("\n".join(body.html), defects, MAX_TEXT_CHARS) if body.html else None
    if html is not None and not plain.strip():
        plain = clean_body(_html_to_text(html, defects), defects, MAX_TEXT_CHARS)
    return plain, html


def _html_to_text(html: str, defects: Defects) -> str:
    if len(html) > MAX_HTML_CONVERT_CHARS:  # inscriptis takes ~0.5 s per MB
        defects.add(f"HTML longer than {MAX_HTML_CONVERT_CHARS} characters, only that converted")
        html = html[:MAX_HTML_CONVERT_CHARS]
    try:
        return inscriptis.get_text(html)
    except Exception as exc:
        defects.add(f"HTML conversion failed: {_describe(exc)}")
        return html_lib.unescape(re.sub(r"<[^>]*>", " ", html))


def _addresses(value: str) -> list[tuple[str, str]]:
    """(normalised address, raw display name) pairs; invalid addresses dropped."""
    value = header_to_text(value[:MAX_RAW_HEADER_CHARS])
    pairs = _simple_addresses(value)
    if pairs is None:
        try:
            pairs = getaddresses([value])
        except Exception:  # e.g. RecursionError on "((((..." in the stdlib comment parser
            return []
    found = []
    for name, address in pairs:
        address = address.strip().lower()
        if len(address) <= MAX_ADDRESS_CHARS and _ADDR_SPEC.fullmatch(address):
            found.append((address, name))
    return found


def _simple_addresses(value: str) -> list[tuple[str, str]] | None:
    """Fast path for lists without quotes, comments or groups (most mail): the stdlib parser
    walks the header character by character in Python and is the costliest step here."""
    if _NOT_SIMPLE.search(value):
        return None
    pairs = []
    for item in value.split(","):
        match = _SIMPLE_ITEM.fullmatch(item)
        if match is None:
            return None
        if match.group(2) is not None:
            pairs.append((match.group(1), match.group(2)))
        elif match.group(3) is not None:
            pairs.append(("", match.group(3)))
    return pairs


def _message_ids(value: str, *, bare_needs_at: bool) -> list[str]:
    value = scrub(unfold(header_to_text(value[:MAX_RAW_HEADER_CHARS])))
    ids = [clean_line(i) for i in _MSG_ID.findall(value)]
    if not ids:  # no angle brackets: tolerate a bare id
        tokens = value.replace(",", " ").split()
        ids = [t.strip("<>") for t in tokens if not bare_needs_at or "@" in t][:1]
    return [i for i in ids if i]


def _references(value: str, defects: Defects) -> tuple[str, ...]:
    ids = list(dict.fromkeys(_shorten_id(i) for i in _message_ids(value, bare_needs_at=True)))
    if len(ids) > MAX_REFERENCES:  # keep the thread root and the most recent ones
        defects.add(f"more than {MAX_REFERENCES} References, middle ones dropped")
        ids = ids[:1] + ids[-(MAX_REFERENCES - 1):]
    return tuple(ids)


def _shorten_id(value: str) -> str:
    """Ids longer than the column are cut, keeping a hash so distinct ids stay distinct."""
    if len(value) <= MAX_ID_CHARS:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:32]
    return f"{value[:MAX_ID_CHARS - 33]}~{digest}"


def _synthetic_id(data: bytes) -> str:
    return f"missing-{hashlib.sha256(data).hexdigest()[:32]}@enquiry-handler"


def _choose_mailbox(rcpts: Sequence[str], recipients: Sequence[str],
                    mailboxes: Sequence[str]) -> str:
    ours = _our_addresses(tuple(mailboxes))
    for address in (*rcpts, *recipients):
        if address in ours:
            return address
    return next((r for r in rcpts if r), "")


@functools.lru_cache(maxsize=16)
def _our_addresses(mailboxes: tuple[str, ...]) -> frozenset[str]:
    """The configured mailboxes, normalised: the same few per process, so computed once."""
    return frozenset(normalise_address(m) for m in mailboxes) - {""}


def _content_type(part: Message) -> str:
    ctype = header_to_text(part.get_content_type()).lower()
    return ctype if _MIME_TYPE.fullmatch(ctype) else "application/octet-stream"


def _filename(raw_name: str, where: str, defects: Defects) -> str:
    name = header_to_text(unfold(str(raw_name))[:MAX_RAW_HEADER_CHARS])
    name = decode_words(name, where, defects)
    name = clean_line(re.split(r"[/\\]", name)[-1]).strip(". ")
    if len(name) > MAX_FILENAME_CHARS:
        _stem, dot, ext = name.rpartition(".")
        ext = ext if dot and len(ext) <= 16 else ""
        name = name[:MAX_FILENAME_CHARS - len(ext) - 1] + "." + ext if ext \
            else name[:MAX_FILENAME_CHARS]
    return name


def _envelope(value: str | None) -> str | None:
    if value is None:
        return None
    return clean_line(str(value)).strip("<>").lower()


def _coerce_bytes(raw: object) -> bytes:
    if isinstance(raw, bytes | bytearray | memoryview):
        return bytes(raw)
    if isinstance(raw, str):
        return raw.encode("utf-8", "surrogateescape")
    return b""


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"
