"""Word normalisation and the shared phrase index (handler.textmatch)."""

from __future__ import annotations

import pytest

from handler.textmatch import MAX_SCAN_CHARS, PhraseIndex, phrase_words, split_words


@pytest.mark.parametrize(("text", "words"), [
    ("I CAN'T breathe!", ["i", "can", "not", "breathe"]),
    ("I can\u2019t\nbreathe", ["i", "can", "not", "breathe"]),
    ("I can`t breathe", ["i", "can", "not", "breathe"]),  # ASCII text: as in the rest
    ("I can`t breathe, Jos\u00e9", ["i", "can", "not", "breathe", "jose"]),
    ("cannot / can not / cant", ["can", "not", "can", "not", "can", "not"]),
    ("It won't stop; it doesn't", ["it", "will", "not", "stop", "it", "does", "not"]),
    ("HER2-positive (ER+)", ["her2", "positive", "er"]),
    ("Leucémie, naïve", ["leucemie", "naive"]),
    ("Straße", ["strasse"]),
    ("my patient's scan_report", ["my", "patients", "scan", "report"]),
    ("  \t\n", []),
])
def test_split_words(text: str, words: list[str]) -> None:
    assert split_words(text) == words


def test_phrase_words_use_the_same_normalisation() -> None:
    assert phrase_words("Can't breathe!") == ("can", "not", "breathe")
    assert phrase_words("!!!") == ()


def test_index_gives_one_id_per_distinct_phrase() -> None:
    index = PhraseIndex()
    a = index.add(phrase_words("chest pain"))
    assert index.add(phrase_words("Chest-Pain")) == a
    assert index.add(phrase_words("chest")) != a
    assert len(index) == 2


def test_scan_finds_multi_word_phrases_and_marks_negation() -> None:
    index = PhraseIndex()
    chest = index.add(phrase_words("chest pain"))
    pain = index.add(phrase_words("pain"))
    breathe = index.add(phrase_words("can't breathe"))
    assert index.scan("no chest pain").found == {chest: "no", pain: None}
    assert index.scan("No. Chest pain").found == {chest: None, pain: None}
    assert index.scan("I cannot breathe").found == {breathe: None}
    assert index.scan("chest").found == {}
    assert index.scan("").found == {}
    assert index.scan("no chest pain, chest pain").found[chest] is None


def test_scan_negation_works_after_contractions_shift_the_words() -> None:
    index = PhraseIndex()
    bleeding = index.add(phrase_words("heavy bleeding"))
    text = "I can't sleep. It isn't heavy bleeding. Yesterday: not heavy bleeding"
    assert index.scan(text).found == {bleeding: "not"}
    assert index.scan("I can't sleep and it's not. heavy bleeding").found == {bleeding: None}


def test_only_the_first_part_of_a_huge_body_is_scanned() -> None:
    index = PhraseIndex()
    late = index.add(phrase_words("chest pain"))
    assert index.scan("x " * 10 + "chest pain").found == {late: None}
    assert index.scan("x" * MAX_SCAN_CHARS + " chest pain").found == {}
