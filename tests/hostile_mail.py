"""A corpus of hostile and broken email, as the bytes an SMTP client sends in DATA (every line
at most 998 octets plus CRLF, so the listener's line limit is not what stops them), and
hypothesis strategies that generate more of the same."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import strategies as st

from tests.builders import encode_word

TEMPLATE_MARK = "{{ 7*191 }}"  # rendered by a template engine, it would read 1337
INJECTED = "X-Injected"


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    defects: tuple[str, ...] = ()
    """Substrings each expected in some stored defect."""
    sender: str | None = None
    """The sender address that must be stored (display-name tricks must not change it)."""
    checks: tuple[Callable[[dict[str, object]], object], ...] = field(default=())
    """Extra checks on the stored row's fields (subject, text, sender, defects, raw)."""


def head(n: int, *, subject: bytes | None = b"Hostile case", sender: bytes | None = None,
         message_id: bytes | None = None, extra: bytes = b"") -> bytes:
    """The header block's first lines (no blank line); `subject=None` leaves it out."""
    sender = sender or b"Patient %d <patient%d@example.org>" % (n, n)
    message_id = message_id or b"<hostile-%d@test.example>" % n
    return (b"From: " + sender + b"\r\nTo: enquiries@clinic.example\r\n"
            + (b"Subject: " + subject + b"\r\n" if subject is not None else b"")
            + b"Date: Mon, 06 May 2024 09:30:00 +0100\r\nMessage-ID: " + message_id
            + b"\r\n" + extra)


def fold(name: bytes, words: list[bytes], width: int = 900) -> bytes:
    """A header folded over as many lines as it takes (each line under `width`)."""
    lines, line = [], name + b":"
    for word in words:
        if len(line) + 1 + len(word) > width:
            lines.append(line)
            line = b""
        line += b" " + word
    return b"\r\n".join([*lines, line]) + b"\r\n"


def multipart(n: int, parts: list[bytes], *, boundary: bytes = b"BOUNDARY",
              close: bool = True, extra: bytes = b"") -> bytes:
    body = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts)
    return (head(n, extra=extra) + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; "
            b"boundary=\"" + boundary + b"\"\r\n\r\nPreamble.\r\n" + body
            + (b"--" + boundary + b"--\r\n" if close else b""))


def text_part(body: bytes, ctype: bytes = b"text/plain; charset=utf-8",
              cte: bytes = b"8bit") -> bytes:
    return b"Content-Type: " + ctype + b"\r\nContent-Transfer-Encoding: " + cte + b"\r\n\r\n" + body


def _row_has(field_name: str, needle: str) -> Callable[[dict[str, object]], object]:
    def check(row: dict[str, object]) -> object:
        assert needle in str(row[field_name]), (field_name, needle, str(row[field_name])[:200])
        return True
    return check


def _row_lacks(field_name: str, *needles: str) -> Callable[[dict[str, object]], object]:
    def check(row: dict[str, object]) -> object:
        value = str(row[field_name])
        assert not any(n in value for n in needles), (field_name, needles, value[:200])
        return True
    return check


def corpus() -> list[Case]:
    cases: list[Case] = []

    def add(name: str, data: bytes, **kwargs: object) -> None:
        cases.append(Case(name, data, **kwargs))  # type: ignore[arg-type]

    n = iter(range(1, 10_000))
    # --- broken MIME structure
    i = next(n)
    add("boundary-not-found", head(i) + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; "
        b"boundary=AAA\r\n\r\n--BBB\r\nContent-Type: text/plain\r\n\r\nmy scan results\r\n"
        b"--BBB--\r\n", defects=("StartBoundaryNotFoundDefect",),
        checks=(_row_has("text", "my scan results"),))
    i = next(n)
    add("boundary-never-closed", multipart(i, [text_part(b"unclosed but readable")],
                                           close=False),
        defects=("CloseBoundaryNotFoundDefect",),
        checks=(_row_has("text", "unclosed but readable"),))
    i = next(n)
    add("boundary-missing", head(i) + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed\r\n"
        b"\r\nno boundary at all\r\n", defects=("NoBoundaryInMultipartDefect",))
    i = next(n)
    add("boundary-inside-boundary", multipart(i, [
        text_part(b"outer"), b"Content-Type: multipart/alternative; boundary=BOUNDARY\r\n\r\n"
        b"--BOUNDARY\r\nContent-Type: text/plain\r\n\r\ninner\r\n--BOUNDARY--"]))
    i = next(n)
    add("base64-and-qp-garbage", multipart(i, [
        text_part(b"!!!not base64@@@\r\n====", cte=b"base64"),
        text_part(b"broken =ZZ soft=\r\nbreak =", cte=b"quoted-printable"),
        b"Content-Type: application/pdf; name=r.pdf\r\nContent-Transfer-Encoding: base64\r\n"
        b"\r\nJVBER###$$$\r\n"]))
    # --- charsets
    i = next(n)
    add("charset-unknown", head(i) + b"MIME-Version: 1.0\r\n"
        + text_part(b"caf\xe9 and \xff\xfe", b"text/plain; charset=x-unknown-zz"),
        defects=("undecodable charset",))
    i = next(n)
    add("charset-lying-ascii", head(i) + b"MIME-Version: 1.0\r\n"
        + text_part("Zweitmeinung für Brustkrebs".encode(), b"text/plain; charset=us-ascii"),
        checks=(_row_has("text", "für"),))
    i = next(n)
    add("charset-lying-utf8", head(i) + b"MIME-Version: 1.0\r\n"
        + text_part(b"\xff\xfe caf\xe9 \xc3\x28", b"text/plain; charset=utf-8"),
        defects=("invalid utf-8",))
    for codec in (b"zlib", b"rot13", b"idna", b"utf-16", b"base64_codec", b"x" * 500):
        i = next(n)
        add(f"charset-{codec[:12].decode()}", head(i) + b"MIME-Version: 1.0\r\n"
            + text_part(b"abc\xe9\x00\x01", b"text/plain; charset=" + codec))
    # --- encoded words that decode to line breaks or control characters
    i = next(n)
    injection = f"Hello\r\nBcc: victim@elsewhere.example\r\n{INJECTED}: yes".encode()
    add("rfc2047-crlf-subject", head(i, subject=encode_word(injection.decode()).encode()),
        checks=(_row_lacks("subject", "\r", "\n"), _row_has("subject", "Hello")))
    i = next(n)
    add("rfc2047-crlf-display-name", head(i, sender=encode_word(
        f"Jane\r\nBcc: victim@elsewhere.example\r\n{INJECTED}: yes").encode()
        + b" <patient%d@example.org>" % i), sender=f"patient{i}@example.org")
    i = next(n)
    add("rfc2047-crlf-filename", multipart(i, [text_part(b"see attached"),
        b"Content-Type: application/pdf\r\nContent-Disposition: attachment; filename=\""
        + encode_word("../../etc/passwd\r\nX-Injected: yes.pdf").encode()
        + b"\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n"]))
    i = next(n)
    add("rfc2047-controls", head(i, subject=b"=?UTF-8?B?" + base64.b64encode(
        "\x00\x07\x1b[31mred\u202eevil\u200b\x7f".encode()) + b"?="),
        checks=(_row_lacks("subject", "\x00", "\x1b", "\x07"),))
    # --- NUL bytes (PostgreSQL text cannot hold them)
    i = next(n)
    add("nul-bytes", head(i, subject=b"NUL\x00in subject", sender=b"Ja\x00ne <patient%d@example."
        b"org>" % i, extra=b"X-Nul: a\x00b\r\n") + b"MIME-Version: 1.0\r\n"
        + text_part(b"body with \x00 NUL\x00\x00 bytes"), defects=("NUL",),
        checks=(_row_lacks("subject", "\x00"), _row_lacks("text", "\x00"),
                _row_has("text", "body with")))
    # --- line endings and 8-bit
    i = next(n)
    add("bare-lf", (head(i) + b"\r\nLF only\nsecond line\n.\nnot the end\n").replace(
        b"\r\n", b"\n") + b"\r\n", defects=("bare CR or LF",),
        checks=(_row_has("text", "not the end"),))
    i = next(n)
    add("bare-cr", (head(i) + b"\r\nCR only\rsecond line\r.\rnot the end\r").replace(
        b"\r\n", b"\r") + b"\r\n", defects=("bare CR or LF",))
    i = next(n)
    add("smuggling-lf-dot", head(i) + b"\r\nbefore\n.\r\nMAIL FROM:<admin@clinic.example>\r\n"
        b"RCPT TO:<enquiries@clinic.example>\r\nDATA\r\nSubject: smuggled\r\n\r\nsmuggled\r\n",
        checks=(_row_has("text", "smuggled"),))
    i = next(n)
    add("eight-bit-undeclared", head(i) + b"\r\nLatin-1: caf\xe9. UTF-8: caf\xc3\xa9 "
        b"\xe2\x80\x93 Zweitmeinung.\r\n", defects=("undeclared 8-bit",))
    i = next(n)
    add("utf8-headers-undeclared", head(
        i, subject="Zweite Meinung – Brustkrebs ü".encode(),
        sender="Jörg Müller <patient%d@example.org>".encode() % i) + b"\r\nhello\r\n",
        checks=(_row_has("subject", "Brustkrebs ü"),))
    # --- size of headers and structure
    i = next(n)
    add("header-1mb", fold(b"Subject", [b"s" * 800] * 1300) + head(i, subject=None)
        + b"\r\nbody after a 1 MB subject\r\n", defects=("truncated",))
    i = next(n)
    add("headers-10000", head(i, extra=b"".join(b"X-Filler-%d: v\r\n" % k
                                                   for k in range(10_000))) + b"\r\nbody\r\n")
    i = next(n)
    add("to-5000-addresses", head(i).replace(b"To: enquiries@clinic.example\r\n", fold(
        b"To", [b"user%d@example.com," % k for k in range(5000)] + [b"enquiries@clinic.example"]
    )) + b"\r\nbody\r\n", defects=("recipients",))
    i = next(n)
    add("content-type-params-10000", head(i) + b"MIME-Version: 1.0\r\n" + fold(
        b"Content-Type", [b"text/plain;"] + [b"p%d=x;" % k for k in range(10_000)])
        + b"\r\nparams\r\n")
    i = next(n)
    add("parts-10000", multipart(i, [
        b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\neA=="] * 10_000),
        defects=("MIME parts",))
    i = next(n)
    inner = b"Subject: innermost\r\n\r\nthe innermost text\r\n"
    for k in range(1000):
        inner = b"Subject: level %d\r\nContent-Type: message/rfc822\r\n\r\n" % k + inner
    add("rfc822-nested-1000", head(i) + b"MIME-Version: 1.0\r\n" + inner)
    i = next(n)
    deep = b"Content-Type: text/plain\r\n\r\ndeep text\r\n"
    for k in range(1000):
        deep = (b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (k, k) + deep
                + b"\r\n--b%d--\r\n" % k)
    add("multipart-nested-1000", head(i) + b"MIME-Version: 1.0\r\n" + deep,
        defects=("multipart types",))
    i = next(n)
    add("html-1mb-nested", head(i) + b"MIME-Version: 1.0\r\nContent-Type: text/html\r\n\r\n"
        + b"<div>\r\n" * 150_000 + b"deep html\r\n")
    i = next(n)
    add("header-garbage", head(i) + b" continuation without a header\r\nNo colon here\r\n"
        b"\xff\xfe: binary name\r\nX-Empty:\r\n: empty name\r\n\r\nbody\r\n")
    i = next(n)
    add("message-id-990", head(i, message_id=b"<" + b"m" * 980 + b"@x>") + b"\r\nbody\r\n")
    add("no-headers-at-all", b"\r\njust a body, no headers\r\n", defects=("missing Message-ID",))
    add("empty", b"\r\n")
    # --- spoofing
    i = next(n)
    add("display-name-spoof", head(i, sender=b'"enquiries@clinic.example" <evil%d@elsewhere.'
                                   b'example>' % i) + b"\r\nI am the clinic.\r\n",
        sender=f"evil{i}@elsewhere.example")
    i = next(n)
    add("display-name-spoof-angle", head(i, sender=b'"Clinic Staff <staff@clinic.example>" '
                                         b'<evil%d@elsewhere.example>' % i) + b"\r\nhi\r\n",
        sender=f"evil{i}@elsewhere.example")
    i = next(n)
    add("homoglyph-domain", head(i, sender="Jane <jane@сlinic.example>".encode())
        + b"\r\nCyrillic es in the domain.\r\n",
        checks=(_row_lacks("sender", "jane@clinic.example"),))
    i = next(n)
    add("punycode-domain", head(i, sender=b"Jane <jane@xn--linic-5ve.example>")
        + b"\r\nPunycode domain.\r\n", sender="jane@xn--linic-5ve.example")
    # --- injection text: stored verbatim, never executed
    i = next(n)
    sql = "Robert'); DROP TABLE message;-- ' OR 1=1 --"
    add("sql-injection", head(i, subject=sql.encode()) + b"\r\n" + sql.encode()
        + b"\r\nSELECT * FROM contact; \\x00 ; COPY x TO PROGRAM 'id';\r\n",
        checks=(_row_has("subject", sql), _row_has("text", "COPY x TO PROGRAM 'id'")))
    i = next(n)
    jinja = (f"{TEMPLATE_MARK} {{% for x in range(10**9) %}}x{{% endfor %}} "
             "{{ ''.__class__.__mro__ }} {% include '/etc/passwd' %}")
    add("template-injection", head(i, subject=jinja.encode(), sender=b"%s <patient%d@example."
                                   b"org>" % (TEMPLATE_MARK.encode(), i))
        + b"\r\nBreast cancer second opinion. " + jinja.encode() + b"\r\n",
        checks=(_row_has("subject", jinja), _row_has("text", TEMPLATE_MARK)))
    return cases


# --- hypothesis: generated messages -----------------------------------------------------------

_NASTY = st.sampled_from([
    "\r\n", "\n", "\r", "\x00", "=?utf-8?q?=0D=0A?=", "=?x-unknown?b?!!?=", "{{ 7*191 }}",
    "{% raw %}", "'); DROP TABLE message;--", "\u202e", "\udcff", "é", "сlinic", "<", ">", '"',
    "\\", ",", ";", ":", "@", "(", ")", "--BOUNDARY", "\t", " ",
])
_TEXT = st.lists(st.text(max_size=12) | _NASTY, max_size=12).map("".join)
_CHARSETS = st.sampled_from(["utf-8", "us-ascii", "iso-8859-1", "windows-1252", "utf-16",
                             "x-unknown", "idna", "rot13", "zlib", "", "utf-7", "gb2312"])
_CTES = st.sampled_from(["7bit", "8bit", "base64", "quoted-printable", "binary", "x-uuencode",
                         "bogus"])


def _header_bytes(text: str) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    return data.replace(b"\r\n", b"\r\n ")  # keep "lines" short-ish but leave bare CR/LF


@st.composite
def generated_part(draw: st.DrawFn, depth: int = 0) -> bytes:
    if depth < 3 and draw(st.booleans()):
        boundary = draw(st.sampled_from([b"BOUNDARY", b"b1", b"", b"x" * 80, b"--"]))
        children = draw(st.lists(generated_part(depth + 1), max_size=4))
        close = draw(st.booleans())
        body = b"".join(b"--" + boundary + b"\r\n" + c + b"\r\n" for c in children)
        return (b"Content-Type: multipart/" + draw(st.sampled_from([b"mixed", b"alternative",
                                                                    b"related", b"report"]))
                + b"; boundary=\"" + boundary + b"\"\r\n\r\n" + body
                + (b"--" + boundary + b"--\r\n" if close else b""))
    ctype = draw(st.sampled_from(["text/plain", "text/html", "application/pdf",
                                  "message/rfc822", "image/png", "bogus", "text/x-weird"]))
    charset = draw(_CHARSETS)
    cte = draw(_CTES)
    payload = draw(st.binary(max_size=200) | _TEXT.map(
        lambda t: t.encode("utf-8", "surrogatepass")))
    filename = draw(st.none() | _TEXT)
    head = f"Content-Type: {ctype}; charset={charset}\r\nContent-Transfer-Encoding: {cte}\r\n"
    data = head.encode()
    if filename is not None:
        data += (b"Content-Disposition: attachment; filename=\""
                 + _header_bytes(filename) + b"\"\r\n")
    return data + b"\r\n" + payload


TOKEN = b"tok-placeholder-tok"
"""In generated messages; the test replaces it with a fresh value, so every example is a
new message (hypothesis repeats examples, and a repeat would rightly be a duplicate)."""


@st.composite
def generated_message(draw: st.DrawFn) -> bytes:
    """DATA payload of a message with hostile headers and MIME (contains TOKEN)."""
    token = TOKEN
    name = _header_bytes(draw(_TEXT))
    subject = _header_bytes(draw(_TEXT))
    extra = draw(st.lists(st.tuples(st.sampled_from([
        b"Cc", b"Reply-To", b"In-Reply-To", b"References", b"Auto-Submitted", b"Precedence",
        b"Content-Type", b"X-Other", b"Subject", b"From"]), _TEXT.map(_header_bytes)),
        max_size=5))
    message = (b"From: " + name + b" <gen-" + token + b"@example.org>\r\n"
               b"To: enquiries@clinic.example\r\nSubject: " + subject + b"\r\n"
               b"Message-ID: <" + token + b"@generated.example>\r\n" + b"X-Token: " + token
               + b"\r\n"
               + b"".join(k + b": " + v + b"\r\n" for k, v in extra)
               + b"MIME-Version: 1.0\r\n" + draw(generated_part()))
    # what SMTP can carry: CRLF line ends for the transport, no line over 998 octets
    lines = message.split(b"\r\n")
    lines = [line[k:k + 990] for line in lines for k in range(0, max(len(line), 1), 990)]
    return b"\r\n".join(lines) + b"\r\n" + token + b"\r\n"
