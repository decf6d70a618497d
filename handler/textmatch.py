"""Word and phrase matching for rules: normalisation, and one index over every rule's phrases.

Text and phrases go through the same `split_words`, so matching is case-insensitive, on whole
words, and blind to punctuation, line breaks, accents and apostrophes ("can't" = "cant" =
"cannot" = "can not"). `PhraseIndex.scan` finds every phrase of every rule in one pass.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

MAX_SCAN_CHARS = 100_000
"""Only this much of a subject or body is scanned for words (a 2 KB enquiry is typical)."""

NEGATORS = frozenset({"no", "not"})
"""A phrase right after one of these (same line, no punctuation between) counts as negated.
Not "without": "I can't climb the stairs without chest pain" is a red flag, and a false
alarm costs a phone call where a miss costs more."""

_BREAK = "|"
"""Stands for sentence punctuation and line breaks: they stop negation, not phrase matches."""
_BREAKERS = ".!?;:,()[]{}<>\"\n\r|"
_ASCII_MAP = str.maketrans(
    {i: (_BREAK if chr(i) in _BREAKERS else " ") for i in range(128) if not chr(i).isalnum()}
)
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'", "\u00b4": "'"})
_COMBINING = re.compile(r"[\u0300-\u036f]")
_SPACED_DASH = re.compile(r"\s-+(?=\s)")
_DASHES = re.compile("[\u2013\u2014\u2015]")  # en and em dashes, a horizontal bar
_OTHER = re.compile(r"[^\w|\s]|_")
_CONTRACTIONS: dict[str, tuple[str, str]] = {
    short: (long, "not") for short, long in {
        "cant": "can", "cannot": "can", "wont": "will", "shant": "shall", "dont": "do",
        "doesnt": "does", "didnt": "did", "isnt": "is", "arent": "are", "wasnt": "was",
        "werent": "were", "hasnt": "has", "havent": "have", "hadnt": "had",
        "couldnt": "could", "wouldnt": "would", "shouldnt": "should", "mustnt": "must",
        "neednt": "need",
    }.items()
}


def mark(text: str) -> str:
    """Casefolded words separated by spaces, with `|` where punctuation or a line break was.
    Apostrophes vanish ("can't" -> "cant") and accents are dropped ("café" -> "cafe")."""
    text = text[:MAX_SCAN_CHARS].casefold()
    if " -" in text:  # a dash between words ends a negation like a comma ("No - chest pain")
        text = _SPACED_DASH.sub(_BREAK, text)
    if text.isascii():
        return text.replace("'", "").replace("`", "").translate(_ASCII_MAP)
    text = _DASHES.sub(_BREAK, text)
    text = _COMBINING.sub("", unicodedata.normalize("NFKD", text.translate(_QUOTES)))
    text = text.replace("'", "").translate(_ASCII_MAP)
    return _OTHER.sub(" ", text)


def _expand(words: list[str]) -> list[str]:
    """Negative contractions spelled out: "cant" -> "can not" (so all spellings agree)."""
    if _CONTRACTIONS.keys().isdisjoint(words):
        return words
    out: list[str] = []
    for word in words:
        pair = _CONTRACTIONS.get(word)
        if pair is None:
            out.append(word)
        else:
            out += pair
    return out


def _breaks(marked: str) -> set[int]:
    """Indexes of the words that follow punctuation or a line break (used only when a
    phrase follows a negating word)."""
    out: set[int] = set()
    n = 0
    for part in marked.split(_BREAK):
        n += len(_expand(part.split()))
        out.add(n)
    return out


def split_words(text: str) -> list[str]:
    """The words matching sees: "I can't\nbreathe!" -> ["i", "can", "not", "breathe"]."""
    return _expand(mark(text).replace(_BREAK, " ").split())


def phrase_words(phrase: str) -> tuple[str, ...]:
    """The words a phrase matches, e.g. "Can't breathe!" -> ("can", "not", "breathe")."""
    return tuple(split_words(phrase))


@dataclass(slots=True)
class FieldScan:
    """Which phrases occur in one field: phrase id -> None (plain) or the negating word."""

    found: dict[int, str | None] = field(default_factory=dict)


class PhraseIndex:
    """Every phrase of every rule, keyed by its first word, scanned once per field."""

    def __init__(self) -> None:
        self._ids: dict[tuple[str, ...], int] = {}
        self._first: dict[str, list[tuple[tuple[str, ...], int]]] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, words: tuple[str, ...]) -> int:
        """The id of a phrase (the same words always get the same id)."""
        pid = self._ids.get(words)
        if pid is None:
            pid = self._ids[words] = len(self._ids)
            self._first.setdefault(words[0], []).append((words[1:], pid))
        return pid

    def scan(self, text: str) -> FieldScan:
        scan = FieldScan()
        if not text:
            return scan
        marked = mark(text)
        words = _expand(marked.replace(_BREAK, " ").split())
        first = self._first
        if first.keys().isdisjoint(words):
            return scan
        found = scan.found
        breaks: set[int] | None = None
        for i, word in enumerate(words):
            entries = first.get(word)
            if entries is None:
                continue
            negator = None
            if i and words[i - 1] in NEGATORS:
                if breaks is None:
                    breaks = _breaks(marked)
                if i not in breaks:
                    negator = words[i - 1]
            for rest, pid in entries:
                if rest and tuple(words[i + 1 : i + 1 + len(rest)]) != rest:
                    continue
                if negator is None:
                    found[pid] = None
                elif pid not in found:
                    found[pid] = negator
        return scan
