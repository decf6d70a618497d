"""parse_email: bytes -> InboundMessage for well-formed, odd and hostile mail; never raises."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import time
from email import message_from_bytes

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handler.inbound import Channel, InboundMessage
from handler.parse_email import (
    MAX_HEADER_CHARS,
    MAX_HTML_CONVERT_CHARS,
    MAX_PARTS,
    MAX_RECIPIENTS,
    MAX_TEXT_CHARS,
    normalise_address,
    parse_email,
)
from tests.builders import (
    CLINIC,
    PATIENT_ADDRESS,
    FileSpec,
    alternative_email,
    attachment_email,
    auto_reply_email,
    bounce_email,
    encode_word,
    forwarded_email,
    html_email,
    plain_email,
    reply_email,
)


def assert_storable(msg: InboundMessage) -> None:
    """Every string PostgreSQL will see: no NUL, valid UTF-8 (no lone surrogates)."""
    strings = [msg.external_id, msg.sender, msg.sender_name, msg.mailbox, msg.subject, msg.text,
               msg.html or "", msg.in_reply_to or "", msg.envelope_from or "",
               *msg.recipients, *msg.references, *msg.defects,
               *msg.headers, *msg.headers.values(),
               *(a.filename for a in msg.attachments), *(a.content_type for a in msg.attachments)]
    for value in strings:
        assert isinstance(value, str)
        assert "\x00" not in value
        value.encode("utf-8")
    assert msg.external_id and len(msg.external_id) <= 255
    for value in (msg.subject, msg.sender_name, *msg.headers.values()):
        assert "\r" not in value and "\n" not in value


# -- the common case -----------------------------------------------------------------------

def test_plain_email_fields() -> None:
    raw = plain_email("Hello,\nI need a second opinion.\n", message_id="<abc.123@mail.example.com>",
                      sender="Jane Patient <Jane.Patient@Example.COM>",
                      to="Enquiries <Enquiries@Clinic.Example>", cc="GP <gp@surgery.nhs.uk>")
    msg = parse_email(raw, envelope_from="Jane.Patient@Example.COM", envelope_rcpts=[CLINIC],
                      mailboxes=[CLINIC])
    assert msg.channel is Channel.EMAIL
    assert msg.external_id == "abc.123@mail.example.com"
    assert msg.sender == "jane.patient@example.com"
    assert msg.sender_name == "Jane Patient"
    assert msg.recipients == (CLINIC, "gp@surgery.nhs.uk")
    assert msg.mailbox == CLINIC
    assert msg.subject == "Second opinion on my breast biopsy results"
    assert msg.text == "Hello,\nI need a second opinion.\n"
    assert msg.html is None
    assert msg.attachments == ()
    assert msg.defects == ()
    assert msg.raw is raw
    assert msg.envelope_from == "jane.patient@example.com"
    assert msg.headers["message-id"] == "<abc.123@mail.example.com>"
    assert msg.headers["date"] == "Mon, 06 May 2024 09:30:00 +0100"
    assert msg.headers["to"] == "Enquiries <Enquiries@Clinic.Example>"
    assert "subject" not in msg.headers and "mime-version" not in msg.headers
    assert_storable(msg)


@pytest.mark.parametrize(("value", "expected"), [
    ("Jane@Example.COM", "jane@example.com"),
    ("  <Jane@Example.com>  ", "jane@example.com"),
    ('"Patient, Jane" <Jane@Example.com>', "jane@example.com"),
    ("Jane Patient <jane@example.com>", "jane@example.com"),
    ("jane@example.com (Jane)", "jane@example.com"),
    ('"staff@clinic.example" <evil@attacker.example>', "evil@attacker.example"),
    ("=?utf-8?q?J=C3=B6rg?= <jorg@example.de>", "jorg@example.de"),
    ("Jörg <JÖRG@exämple.de>", "jörg@exämple.de"),
    ("", ""),
    ("<>", ""),
    ("not an address", ""),
    ("undisclosed-recipients:;", ""),
    ("a@b@c", ""),
    ("jane@exa\x00mple.com", "jane@example.com"),
    ("(" * 5000, ""),
    ("x" * 400 + "@example.com", ""),
])
def test_normalise_address(value: str, expected: str) -> None:
    assert normalise_address(value) == expected


def test_from_header_tricks() -> None:
    raw = plain_email(sender='"staff@clinic.example" <evil@attacker.example>')
    msg = parse_email(raw)
    assert msg.sender == "evil@attacker.example"
    assert msg.sender_name == "staff@clinic.example"
    assert parse_email(plain_email(sender="nobody")).sender == ""
    assert "no usable From address" in parse_email(plain_email(sender="nobody")).defects


# -- RFC 2047 and headers --------------------------------------------------------------------

def test_rfc2047_subject_and_display_name() -> None:
    raw = plain_email(subject="Zweitmeinung – Brustkrebs, ärztlicher Bericht",
                      sender="Jörg Müller <jorg@example.de>")
    assert b"=?utf-8?" in raw  # the builder really encoded them
    msg = parse_email(raw)
    assert msg.subject == "Zweitmeinung – Brustkrebs, ärztlicher Bericht"
    assert msg.sender_name == "Jörg Müller"
    assert msg.headers["from"] == "Jörg Müller <jorg@example.de>"
    assert msg.defects == ()


def test_rfc2047_words_are_joined_and_split_characters_survive() -> None:
    data = "Résumé".encode()
    first, second = data[:2], data[2:]  # cuts the two-byte é in half
    subject = (f"=?UTF-8?B?{base64.b64encode(first).decode()}?=\r\n"
               f" =?UTF-8?B?{base64.b64encode(second).decode()}?= and "
               + encode_word("more ü", "iso-8859-1"))
    msg = parse_email(plain_email(subject=subject, encode_headers=False))
    assert msg.subject == "Résumé and more ü"


def test_rfc2047_newline_cannot_inject_headers() -> None:
    raw = plain_email(subject="hi =?UTF-8?Q?=0D=0ABcc:_x@evil.example?=",
                      sender="=?UTF-8?Q?Jane=0D=0ABcc=3A_x=40evil?= <jane@example.com>",
                      encode_headers=False)
    msg = parse_email(raw)
    assert msg.subject == "hi Bcc: x@evil.example"
    assert msg.sender_name == "Jane Bcc: x@evil"
    assert msg.sender == "jane@example.com"
    assert_storable(msg)


def test_rfc2047_unknown_charset_and_bad_base64() -> None:
    raw = plain_email(subject="=?x-unknown?Q?caf=C3=A9?= =?utf-8?B?Q?= ok", encode_headers=False)
    msg = parse_email(raw)
    assert msg.subject == "café =?utf-8?B?Q?= ok"
    assert "undecodable charset 'x-unknown' in header 'subject'" in msg.defects
    assert "bad encoded-word in header 'subject'" in msg.defects


def test_raw_utf8_headers_are_decoded_without_defect() -> None:
    raw = plain_email(subject="Café – naïve", sender="Zoë <zoe@example.com>",
                      encode_headers=False)
    msg = parse_email(raw)
    assert (msg.subject, msg.sender_name) == ("Café – naïve", "Zoë")
    assert msg.defects == ()


def test_raw_latin1_header_falls_back_with_defect() -> None:
    raw = plain_email(subject="placeholder").replace(b"placeholder", "café".encode("latin-1"))
    msg = parse_email(raw)
    assert msg.subject == "café"
    assert any("header 'subject'" in d and "windows-1252" in d for d in msg.defects)


def test_selected_headers_only_decoded_and_capped() -> None:
    long_value = "x" * (MAX_HEADER_CHARS + 500)
    raw = plain_email(headers=[
        ("X-Other", "not kept"), ("Auto-Submitted", "auto-replied"), ("List-Id", "<l.example>"),
        ("X-Mailer", encode_word("Mäiler")), ("Precedence", "bulk\r\n  folded"),
        ("X-Loop", long_value), ("To", "second@example.com"),
    ])
    msg = parse_email(raw)
    assert "x-other" not in msg.headers
    assert msg.headers["auto-submitted"] == "auto-replied"
    assert msg.headers["list-id"] == "<l.example>"
    assert msg.headers["x-mailer"] == "Mäiler"
    assert msg.headers["precedence"] == "bulk folded"
    assert msg.headers["x-loop"] == "x" * MAX_HEADER_CHARS
    assert f"header 'x-loop' truncated to {MAX_HEADER_CHARS} characters" in msg.defects
    assert msg.headers["to"] == f"{CLINIC}, second@example.com"
    assert msg.recipients == (CLINIC, "second@example.com")
    assert all(name == name.lower() for name in msg.headers)


def test_subject_whitespace_collapsed() -> None:
    msg = parse_email(plain_email(subject="  Second \t opinion\r\n   please  ",
                                  encode_headers=False))
    assert msg.subject == "Second opinion please"


# -- bodies --------------------------------------------------------------------------------

def test_alternative_prefers_plain_and_keeps_html() -> None:
    msg = parse_email(alternative_email(text="Plain version\n", html="<p>HTML version</p>"))
    assert msg.text == "Plain version\n"
    assert msg.html == "<p>HTML version</p>"
    assert msg.attachments == ()


def test_html_only_is_converted_to_text() -> None:
    msg = parse_email(html_email())
    assert "I would like a second opinion about my prostate MRI." in msg.text
    assert "Kind regards,\nJohn Patient" in msg.text
    assert "<" not in msg.text and "color" not in msg.text
    assert msg.html is not None and "<b>second opinion</b>" in msg.html


def test_blank_plain_part_falls_back_to_html() -> None:
    msg = parse_email(alternative_email(text="  \n", html="<p>Real content</p>"))
    assert msg.text.strip() == "Real content"


@pytest.mark.parametrize("cte", ["7bit", "8bit", "quoted-printable", "base64"])
def test_transfer_encodings(cte: str) -> None:
    body = "Line one – with a dash\nLine two " + "long " * 40 + "\n"
    if cte == "7bit":
        body = body.replace("–", "-")
    msg = parse_email(plain_email(body, transfer_encoding=cte))
    assert msg.text == body
    assert msg.defects == ()


@pytest.mark.parametrize(("charset", "text"), [
    ("iso-8859-1", "Café, crème brûlée"),
    ("windows-1252", "“Smart quotes” – and € sign"),
    ("iso-8859-15", "Prix: 20 €"),
    ("koi8-r", "Второе мнение"),
    ("shift_jis", "セカンドオピニオン"),
    ("iso-2022-jp", "セカンドオピニオン"),
    ("utf-16", "Second opinion ✓"),
])
def test_declared_charsets(charset: str, text: str) -> None:
    msg = parse_email(plain_email(text, charset=charset, transfer_encoding="base64"))
    assert msg.text == text
    assert msg.defects == ()


def test_latin1_label_read_as_windows_1252() -> None:
    """Outlook labels windows-1252 text as iso-8859-1; browsers decode it as 1252, so do we."""
    raw = plain_email("placeholder", charset="iso-8859-1").replace(
        b"placeholder", "“quoted” – text".encode("cp1252"))
    msg = parse_email(raw)
    assert msg.text == "“quoted” – text"
    assert msg.defects == ()


def test_undeclared_8bit_utf8_and_cp1252() -> None:
    msg = parse_email(plain_email("Café ✓", declare_charset=False))
    assert msg.text == "Café ✓"
    assert msg.defects == ("undeclared 8-bit text in part 1, decoded as utf-8",)
    msg = parse_email(plain_email("Café €", charset="cp1252", declare_charset=False))
    assert msg.text == "Café €"
    assert msg.defects == ("undeclared 8-bit text in part 1, decoded as windows-1252",)


def test_unknown_and_lying_charsets() -> None:
    raw = plain_email("Café", charset="utf-8").replace(b"charset=utf-8", b"charset=x-foo")
    msg = parse_email(raw)
    assert msg.text == "Café"
    assert msg.defects == ("undecodable charset 'x-foo' in part 1",)

    lying = plain_email("Café", charset="latin-1").replace(b"charset=latin-1", b"charset=utf-8")
    msg = parse_email(lying)
    assert msg.text == "Café"
    assert msg.defects == ("invalid utf-8 data in part 1",)

    for label in (b"zlib", b"base64", b"rot13", b"idna", b'"', b"x" * 300):
        raw = plain_email("Café").replace(b"charset=utf-8", b"charset=" + label)
        msg = parse_email(raw)
        assert msg.text == "Café", label
        assert_storable(msg)


def test_utf7_lone_surrogates_are_replaced() -> None:
    raw = plain_email("x").replace(b"charset=utf-8", b"charset=utf-7").replace(
        b"\r\n\r\nx", b"\r\n\r\nA+2AA-B")
    msg = parse_email(raw)
    assert msg.text.startswith("A") and msg.text.endswith("B") and "\ufffd" in msg.text
    assert_storable(msg)


def test_line_endings_normalised() -> None:
    msg = parse_email(b"From: a@example.com\nSubject: bare LF\n\nline1\rline2\r\nline3\n")
    assert msg.subject == "bare LF"
    assert msg.text == "line1\nline2\nline3\n"
    assert msg.sender == "a@example.com"


def test_nul_bytes_are_removed_and_recorded() -> None:
    raw = plain_email("body\x00text", subject="sub\x00ject", sender="Ja\x00ne <jane@example.com>",
                      encode_headers=False)
    msg = parse_email(raw)
    assert msg.text == "bodytext"
    assert msg.subject == "subject"
    assert msg.sender_name == "Jane"
    assert {"NUL bytes removed from body text", "NUL bytes removed from header 'subject'",
            "NUL bytes removed from header 'from'"} <= set(msg.defects)
    assert_storable(msg)


def test_text_is_capped() -> None:
    msg = parse_email(plain_email("a" * (MAX_TEXT_CHARS + 10), transfer_encoding="base64"))
    assert len(msg.text) == MAX_TEXT_CHARS
    assert f"body text truncated to {MAX_TEXT_CHARS} characters" in msg.defects


def test_html_conversion_is_capped() -> None:
    html = "<p>word</p>" * (MAX_HTML_CONVERT_CHARS // 10)
    msg = parse_email(html_email(html))
    assert msg.html == html
    assert 0 < msg.text.count("word") < MAX_HTML_CONVERT_CHARS // 10
    assert any(d.startswith("HTML longer than") for d in msg.defects)


# -- attachments ---------------------------------------------------------------------------

def test_attachments() -> None:
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 4
    dicom = b"\x00" * 128 + b"DICM" + b"\x01\x02"
    raw = attachment_email("See attached.", [
        FileSpec("Pathology report.pdf", "application/pdf", pdf),
        FileSpec(None, "application/dicom", dicom),
        FileSpec("notes.txt", "text/plain", b"my own notes\r\n"),
        FileSpec("scan.png", "image/png", b"\x89PNG\r\n", disposition="inline", content_id="c1"),
        FileSpec("letter.txt", "text/plain", b"GP letter", disposition="inline"),
    ], html="<p>See attached.</p>")
    msg = parse_email(raw)
    assert msg.text == "See attached."
    assert msg.html == "<p>See attached.</p>"
    names = [a.filename for a in msg.attachments]
    assert names == ["Pathology report.pdf", "part-6.dcm", "notes.txt", "scan.png", "letter.txt"]
    report = msg.attachments[0]
    assert (report.content_type, report.size, report.data) == ("application/pdf", len(pdf), pdf)
    assert report.sha256 == hashlib.sha256(pdf).hexdigest()
    assert msg.attachments[1].data == dicom
    assert msg.attachments[2].content_type == "text/plain"
    assert msg.attachments[2].data == b"my own notes\r\n"  # bytes as sent, not body text
    assert "my own notes" not in msg.text and "GP letter" not in msg.text
    assert msg.defects == ()


@pytest.mark.parametrize(("disposition", "expected"), [
    ('attachment; filename="../../etc/passwd"', "passwd"),
    ('attachment; filename="C:\\\\Users\\\\jane\\\\scan.jpg"', "scan.jpg"),
    ('attachment; filename="=?utf-8?B?w6l0w6kucGRm?="', "été.pdf"),
    ("attachment; filename*=utf-8''%E2%82%AC%20bill.pdf", "€ bill.pdf"),
    ('attachment; filename*0="long"; filename*1="name.pdf"', "longname.pdf"),
    ('attachment; filename="../.."', "part-3.bin"),
    ('attachment; filename="a\\\\b\r\n c"', "b c"),
    ('attachment; filename="' + "n" * 300 + '.pdf"', "n" * 251 + ".pdf"),
    ('attachment; filename="caf\xe9.pdf"', "café.pdf"),
])
def test_attachment_filenames(disposition: str, expected: str) -> None:
    raw = attachment_email("body", [FileSpec("PLACEHOLDER", "application/octet-stream", b"x")])
    raw = raw.replace(b'attachment; filename="PLACEHOLDER"', disposition.encode("latin-1"))
    raw = raw.replace(b'; name="PLACEHOLDER"', b"")
    (attachment,) = parse_email(raw).attachments
    assert attachment.filename == expected


def test_forwarded_message_is_one_attachment_and_adds_no_text() -> None:
    inner = plain_email("Inner secret words", subject="Inner subject")
    msg = parse_email(forwarded_email(inner, body="Please see below."))
    assert msg.text == "Please see below."
    assert "Inner secret words" not in msg.text
    (fwd,) = msg.attachments
    assert (fwd.filename, fwd.content_type) == ("forwarded.eml", "message/rfc822")
    assert message_from_bytes(fwd.data)["Subject"] == "Inner subject"
    assert fwd.size == len(fwd.data) and fwd.sha256 == hashlib.sha256(fwd.data).hexdigest()


def test_bounce() -> None:
    original = plain_email("Our reply", sender=CLINIC, to=PATIENT_ADDRESS)
    msg = parse_email(bounce_email(original), envelope_from="")
    assert msg.envelope_from == ""
    assert msg.sender == "mailer-daemon@mx.example.com"
    assert msg.text == f"Delivery to {PATIENT_ADDRESS} failed permanently."
    assert [(a.filename, a.content_type) for a in msg.attachments] == [
        ("delivery-status.txt", "message/delivery-status"), ("forwarded.eml", "message/rfc822")]
    assert b"Status: 5.1.1" in msg.attachments[0].data
    assert b"Our reply" in msg.attachments[1].data
    assert "content-type" in msg.headers and "multipart/report" in msg.headers["content-type"]


def test_auto_reply_headers_are_kept() -> None:
    msg = parse_email(auto_reply_email())
    assert msg.headers["auto-submitted"] == "auto-replied"
    assert msg.headers["x-auto-response-suppress"] == "All"


# -- identity and threading ----------------------------------------------------------------

def test_reply_threading() -> None:
    raw = reply_email("<enq-1@clinic.example>",
                      references=["root@patient.example", "<enq-1@clinic.example>"])
    msg = parse_email(raw)
    assert msg.in_reply_to == "enq-1@clinic.example"
    assert msg.references == ("root@patient.example", "enq-1@clinic.example")
    assert msg.thread_ids == ("enq-1@clinic.example", "root@patient.example")
    assert msg.subject == "Re: Your enquiry"


@pytest.mark.parametrize(("in_reply_to", "expected"), [
    ("<a@b> (Jane's message of Mon, 6 May 2024)", "a@b"),
    ("Your message of Monday <a@b>", "a@b"),
    ("a@b", "a@b"),
    ("garbage without id", None),
    ("<>", None),
])
def test_in_reply_to_variants(in_reply_to: str, expected: str | None) -> None:
    raw = plain_email(headers=[("In-Reply-To", in_reply_to)])
    assert parse_email(raw).in_reply_to == expected


def test_references_are_capped_keeping_root_and_latest() -> None:
    ids = [f"<id{i}@example.com>" for i in range(80)]
    msg = parse_email(plain_email(headers=[("References", "\r\n ".join(ids))]))
    assert len(msg.references) == 50
    assert msg.references[0] == "id0@example.com"
    assert msg.references[-1] == "id79@example.com"
    assert any("References" in d for d in msg.defects)


def test_missing_message_id_is_synthesised_from_the_bytes() -> None:
    raw = plain_email(message_id="")
    msg = parse_email(raw)
    assert msg.external_id == f"missing-{hashlib.sha256(raw).hexdigest()[:32]}@enquiry-handler"
    assert parse_email(raw).external_id == msg.external_id  # a re-delivery dedupes
    assert parse_email(raw + b"x").external_id != msg.external_id
    assert "missing Message-ID" in msg.defects
    assert parse_email(plain_email(message_id="<>")).external_id.startswith("missing-")
    assert parse_email(plain_email(message_id="  bare-id@x  ")).external_id == "bare-id@x"


def test_long_message_ids_stay_distinct_and_fit_the_column() -> None:
    a = parse_email(plain_email(message_id="<" + "a" * 300 + "1@x>")).external_id
    b = parse_email(plain_email(message_id="<" + "a" * 300 + "2@x>")).external_id
    assert len(a) <= 255 and len(b) <= 255 and a != b


@pytest.mark.parametrize(("rcpts", "to", "expected"), [
    (["other@clinic.example", "Enquiries@CLINIC.example"], CLINIC, CLINIC),
    ([CLINIC], "breast@clinic.example", CLINIC),  # the envelope beats the To header
    ([], "x@example.com, Enquiries@Clinic.Example", CLINIC),
    (["Someone@Else.example"], "x@example.com", "someone@else.example"),
    ([], "x@example.com", ""),
])
def test_mailbox_choice(rcpts: list[str], to: str, expected: str) -> None:
    msg = parse_email(plain_email(to=to), envelope_rcpts=rcpts,
                      mailboxes=[CLINIC, "Breast@Clinic.Example"])
    assert msg.mailbox == expected


@pytest.mark.parametrize(("given", "expected"), [
    (None, None), ("", ""), ("<>", ""),
    ("Bounce+X@Lists.Example.COM", "bounce+x@lists.example.com"),
])
def test_envelope_from(given: str | None, expected: str | None) -> None:
    assert parse_email(plain_email(), envelope_from=given).envelope_from == expected


# -- broken and hostile input --------------------------------------------------------------

def _timed(raw: bytes) -> InboundMessage:
    start = time.perf_counter()
    msg = parse_email(raw)
    assert time.perf_counter() - start < 2.0
    assert isinstance(msg, InboundMessage) and msg.raw == raw
    assert_storable(msg)
    return msg


def test_start_boundary_not_found_keeps_text() -> None:
    raw = (b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n"
           b"Please help, my scan results\r\n")
    msg = _timed(raw)
    assert "StartBoundaryNotFoundDefect" in msg.defects
    assert "Please help, my scan results" in msg.text


def test_missing_boundary_and_unclosed_boundary() -> None:
    msg = _timed(b"Content-Type: multipart/mixed\r\n\r\nhello there")
    assert "NoBoundaryInMultipartDefect" in msg.defects and msg.text == "hello there"
    raw = alternative_email(text="still readable")
    msg = _timed(raw[: raw.rindex(b"--=_")])  # closing boundary cut off
    assert msg.text == "still readable"
    assert any(d.startswith("CloseBoundaryNotFoundDefect") for d in msg.defects)


def test_bad_base64_body() -> None:
    raw = plain_email("x", transfer_encoding="base64").replace(b"eA==", b"aGVsbG8g!!d29ybGQ")
    msg = _timed(raw)
    assert msg.text.startswith("hello")
    assert "InvalidBase64CharactersDefect in part 1" in msg.defects or any(
        "Base64" in d for d in msg.defects)


def test_ten_thousand_parts_are_capped() -> None:
    part = b"--b\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\neA==\r\n"
    raw = (b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
           + part * 10_000 + b"--b--\r\n")
    msg = _timed(raw)
    assert len(msg.attachments) == MAX_PARTS - 1  # the root counts as a part
    assert f"more than {MAX_PARTS} MIME parts, the rest skipped" in msg.defects


def test_deep_multipart_nesting() -> None:
    body = b"Content-Type: text/plain\r\n\r\ndeep text\r\n"
    for i in range(40):
        body = (b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
                + body + b"\r\n--b%d--\r\n" % i)
    msg = _timed(b"From: a@example.com\r\n" + body)
    assert any("nesting deeper than" in d for d in msg.defects)


def test_deep_message_rfc822_nesting() -> None:
    body = b"Subject: innermost\r\n\r\nhello\r\n"
    for i in range(2000):
        body = b"Subject: level %d\r\nContent-Type: message/rfc822\r\n\r\n" % i + body
    msg = _timed(b"From: a@example.com\r\nMessage-ID: <deep@x>\r\n" + body)
    assert msg.sender == "a@example.com" and msg.external_id == "deep@x"
    assert any(d.startswith("parse error") for d in msg.defects)
    assert "hello" in msg.text  # worst case: the body as text


def test_huge_headers() -> None:
    many_to = ", ".join(f"user{i}@example.com" for i in range(50_000))
    raw = plain_email(subject="s" * 1_000_000, to=many_to, encode_headers=False,
                      headers=[(f"X-Filler-{i}", "v") for i in range(10_000)])
    msg = _timed(raw)
    assert len(msg.subject) == MAX_HEADER_CHARS
    assert len(msg.recipients) == MAX_RECIPIENTS
    assert f"more than {MAX_RECIPIENTS} recipients, the rest ignored" in msg.defects


@pytest.mark.parametrize("raw", [
    b"", b"\r\n", b"\x00" * 100, b"\xff\xfe" * 500, b"From: " + b"(" * 5000 + b"\r\n\r\nx",
    b"From: <" + b"<" * 5000 + b"\r\n\r\nx", b"Subject: =?utf-8?b?" + b"A" * 5001 + b"?=\r\n\r\n",
    b"Content-Type: text/html\r\n\r\n<?xml version='1.0' encoding='utf-8'?><p>x\x00y</p>",
    b"Content-Type: text/html\r\n\r\n" + b"<div>" * 5000,
    b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!",
    b"Content-Type: text/plain; charset*=x''\xff\r\nContent-Disposition: attachment; "
    b"filename*=bogus'x'%ZZ\r\n\r\nx",
    b"Content-Type: /\r\n\r\nbody", b"Content-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 x\r\n",
])
def test_garbage_never_raises(raw: bytes) -> None:
    _timed(raw)


def test_non_bytes_input_is_tolerated() -> None:
    msg = parse_email(bytearray(plain_email(message_id="<ba@x>")))  # type: ignore[arg-type]
    assert msg.external_id == "ba@x" and isinstance(msg.raw, bytes)


# -- property tests ------------------------------------------------------------------------

SEED = attachment_email(
    "Body with café\n", [FileSpec("r.pdf", "application/pdf", b"%PDF")], html="<p>hi</p>",
    subject="Zweitmeinung – ärztlich", sender="Jörg <jorg@example.de>", message_id="<seed@x>")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000))
def test_random_bytes_never_raise(raw: bytes) -> None:
    _check_invariants(raw)


MUTATION = st.tuples(st.integers(0, len(SEED)), st.integers(0, 64),
                     st.binary(max_size=64) | st.sampled_from(
                         [b"\r\n", b"\n", b"\r", b"\x00", b"--", b"=?", b"?=", b"\r\n\r\n",
                          b"boundary=", b"Content-Type: message/rfc822\r\n", b"\xff\xfe",
                          b"=?x?q?=0A?=", b"multipart/mixed;", b"base64", b"(", b"<", b'"']))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(MUTATION, max_size=8))
def test_mutated_valid_message_never_raises(mutations: list[tuple[int, int, bytes]]) -> None:
    raw = SEED
    for position, delete, insert in mutations:
        position = min(position, len(raw))
        raw = raw[:position] + insert + raw[position + delete:]
    _check_invariants(raw)


def _check_invariants(raw: bytes) -> None:
    msg = parse_email(raw, envelope_from="", envelope_rcpts=[CLINIC], mailboxes=[CLINIC])
    assert isinstance(msg, InboundMessage)
    assert msg.raw == raw and msg.mailbox == CLINIC
    assert_storable(msg)
    for field in dataclasses.fields(msg):
        value = getattr(msg, field.name)
        if isinstance(value, str):
            assert "\x00" not in value


def test_deep_multipart_nesting_is_cut_short_before_parsing() -> None:
    """The stdlib parser's time grows with the square of the nesting: past MAX_MULTIPARTS
    declared multipart types only the header block is parsed (the raw is still stored)."""
    from handler.parse_email import MAX_MULTIPARTS, _multiparts

    def nested(depth: int) -> bytes:
        deep = b"Content-Type: text/plain\r\n\r\ndeep text\r\n"
        for k in range(depth):
            deep = (b"Content-Type: Multipart/Mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (k, k)
                    + deep + b"\r\n--b%d--\r\n" % k)
        return (b"From: a@example.org\r\nSubject: deep\r\nMIME-Version: 1.0\r\n" + deep)

    def parse(data: bytes) -> InboundMessage:
        return parse_email(data, envelope_from="a@example.org",
                           envelope_rcpts=["enquiries@clinic.example"],
                           mailboxes=["enquiries@clinic.example"])

    fine, cut = parse(nested(MAX_MULTIPARTS)), parse(nested(MAX_MULTIPARTS + 1))
    assert not [d for d in fine.defects if "multipart types" in d]
    assert [d for d in cut.defects if "multipart types" in d]
    assert "deep text" in cut.text
    step = 1 << 20  # counted across the 1 MB steps, in any case, once each
    assert _multiparts(b"x" * (step - 4) + b"MULTIPART/" + b"y" * step + b"multipart/", 9) == 2
