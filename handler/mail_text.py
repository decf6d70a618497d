"""Text decoding for inbound mail: charsets with fallbacks, RFC 2047 encoded words, and
strings cleaned so that PostgreSQL can store them and no CR/LF reaches a header we write.

Nothing here raises on odd input; every fallback is reported to a `Defects` collector.
"""

from __future__ import annotations

import binascii
import codecs
import encodings
import encodings.aliases
import pkgutil
import re

MAX_DEFECTS = 100

_CONTROLS = dict.fromkeys([*range(32), 127, *range(128, 160)], " ")
_FOLD = re.compile(r"\r\n|\r|\n")
_ENCODED_WORD = re.compile(r"=\?([^?\s]{1,64})\?([bBqQ])\?([^?]*)\?=")
_CHARSET_LABEL = re.compile(r"[a-z0-9][a-z0-9._:+-]{0,39}")
_ASCII_SUPERSET = re.compile(r"utf-?8|us-ascii|ascii|iso[-_]?8859-\d+|windows-125\d|cp125\d")
_ASCII_LABELS = frozenset({"us-ascii", "ascii", "us", "ansi_x3.4-1968", "iso646-us"})
_LATIN1_LABELS = frozenset({"iso-8859-1", "iso8859-1", "iso_8859-1", "latin1", "latin-1", "l1"})
# Every codec name the interpreter knows, so a hostile charset label never makes the codec
# registry search the file system (and grow its failure cache). Some are refused: not mail
# charsets, and slow or surprising on arbitrary bytes.
_CODEC_NAMES = frozenset(encodings.aliases.aliases) | frozenset(
    m.name for m in pkgutil.iter_modules(encodings.__path__))
_REFUSED_CODECS = frozenset({
    "idna", "punycode", "unicode-escape", "raw-unicode-escape", "undefined", "mbcs", "oem",
})


class Defects:
    """Ordered, de-duplicated, capped list of defect descriptions for one message."""

    def __init__(self) -> None:
        self.items: dict[str, None] = {}

    def add(self, text: str) -> None:
        if len(self.items) < MAX_DEFECTS:
            self.items.setdefault(text[:300], None)
        elif len(self.items) == MAX_DEFECTS:
            self.items.setdefault("too many defects, the rest not recorded", None)


def decode_bytes(data: bytes, charset: str | None, where: str, defects: Defects,
                 *, header: bool = False) -> str:
    """Declared charset -> UTF-8 -> windows-1252 (with replacement); a defect on fallback.
    ISO-8859-1 and US-ASCII labels are read as windows-1252, as browsers do (WHATWG)."""
    label = (charset or "").strip().strip("\"'").lower()
    if data.isascii() and (not label or _ASCII_SUPERSET.fullmatch(label)):
        return data.decode("ascii")
    if not label or label in _ASCII_LABELS:
        text = _try_decode(data, "utf-8")
        if text is not None:
            if not header:  # raw UTF-8 headers are legitimate (RFC 6532)
                defects.add(f"undeclared 8-bit text in {where}, decoded as utf-8")
            return text
        defects.add(f"undeclared 8-bit text in {where}, decoded as windows-1252")
        return data.decode("cp1252", "replace")
    if label in _LATIN1_LABELS:
        return _try_decode(data, "cp1252") or data.decode("latin-1")
    if _CHARSET_LABEL.fullmatch(label) and _known_codec(label):
        text = _try_decode(data, label)
        if text is not None:
            return text
        defects.add(f"invalid {label} data in {where}")
    else:
        defects.add(f"undecodable charset {label[:40]!r} in {where}")
    text = _try_decode(data, "utf-8")
    if text is not None:
        return text
    return data.decode("cp1252", "replace")


def _try_decode(data: bytes, codec: str) -> str | None:
    try:
        return data.decode(codec)
    except (UnicodeError, LookupError):
        return None


def _known_codec(label: str) -> bool:
    if encodings.normalize_encoding(label).replace(".", "_") not in _CODEC_NAMES:
        return False
    try:
        info = codecs.lookup(label)
        b"".decode(label)  # LookupError for bytes-to-bytes codecs (zlib, base64, rot13...)
    except LookupError:
        return False
    return info.name not in _REFUSED_CODECS


def header_to_text(value: str, where: str = "header", defects: Defects | None = None) -> str:
    """Header string with 8-bit bytes as surrogate escapes -> real text."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    try:
        data = value.encode("utf-8", "surrogateescape")  # text stays, escapes -> their bytes
    except UnicodeEncodeError:  # a surrogate that is not an escape: not from our parser
        return scrub(value)
    return decode_bytes(data, None, where, defects or Defects(), header=True)


def decode_words(text: str, where: str, defects: Defects) -> str:
    """RFC 2047 encoded words -> text. Adjacent words are joined as bytes before decoding,
    so a multi-byte character split across two words (common in practice) survives."""
    if "=?" not in text:
        return text
    out: list[str] = []
    pending = bytearray()
    pending_charset = ""
    pos = 0
    after_word = False
    for match in _ENCODED_WORD.finditer(text):
        between = text[pos:match.start()]
        pos = match.end()
        decoded = _decode_word(match.group(2), match.group(3))
        if decoded is None:
            defects.add(f"bad encoded-word in {where}")
            out.append(_flush(pending, pending_charset, where, defects) + between + match.group())
            pending, pending_charset, after_word = bytearray(), "", False
            continue
        charset = match.group(1).split("*")[0].lower()
        if between and not (after_word and between.isspace()):
            out.append(_flush(pending, pending_charset, where, defects) + between)
            pending = bytearray()
        elif charset != pending_charset:
            out.append(_flush(pending, pending_charset, where, defects))
            pending = bytearray()
        pending += decoded
        pending_charset, after_word = charset, True
    out.append(_flush(pending, pending_charset, where, defects) + text[pos:])
    return "".join(out)


def _decode_word(encoding: str, encoded: str) -> bytes | None:
    try:
        if encoding in "qQ":
            return binascii.a2b_qp(encoded.encode("utf-8"), header=True)
        encoded = encoded.strip()
        return binascii.a2b_base64(encoded + "=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError):
        return None


def _flush(pending: bytearray, charset: str, where: str, defects: Defects) -> str:
    return decode_bytes(bytes(pending), charset, where, defects) if pending else ""


def unfold(value: str) -> str:
    """Header unfolding (RFC 5322 2.2.3): line breaks go, the whitespace after them stays."""
    return _FOLD.sub("", value) if ("\n" in value or "\r" in value) else value


def clean_line(value: str) -> str:
    """One line of text: control characters (CR, LF, NUL ...) as spaces, whitespace runs
    collapsed, lone surrogates replaced."""
    if not value.isprintable():  # cheap test first: most header values are printable
        value = value.translate(_CONTROLS)
    return scrub(" ".join(value.split()))


def scrub(value: str) -> str:
    """Text PostgreSQL can store: no NUL, no lone surrogates."""
    if "\x00" in value:
        value = value.replace("\x00", "")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return value


def clean_body(text: str, defects: Defects, max_chars: int) -> str:
    """Body text: newlines normalised to LF, NUL removed, capped, storable."""
    if "\r" in text:  # as _FOLD.sub("\n", text), at a third of the cost
        text = text.replace("\r\n", "\n")
        if "\r" in text:
            text = text.replace("\r", "\n")
    if "\x00" in text:
        defects.add("NUL bytes removed from body text")
        text = text.replace("\x00", "")
    if len(text) > max_chars:
        defects.add(f"body text truncated to {max_chars} characters")
        text = text[:max_chars]
    return scrub(text)
