"""Tests for handler.render: the shipped templates, escaping, limits, checks, SMS segments."""

from __future__ import annotations

import itertools
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from handler.render import (
    GSM7_BASIC,
    MAX_SUBJECT_CHARS,
    PATIENT_TEMPLATE_NAMES,
    STAFF_TEMPLATE_NAMES,
    TEMPLATE_NAMES,
    TemplateError,
    Templates,
    clean_subject,
    format_datetime,
    sample_context,
    sms_segments,
)

REPO_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
ACK_NAMES = [n for n in PATIENT_TEMPLATE_NAMES if n.startswith("ack-")
             and n not in ("ack-press", "ack-insurer")]
SMS_NAMES = [*PATIENT_TEMPLATE_NAMES, "notify-team", "notify-urgent"]


@pytest.fixture(scope="module")
def shipped() -> Templates:
    return Templates(REPO_TEMPLATES)


@pytest.fixture
def copied(tmp_path: Path) -> Path:
    """A private copy of the shipped templates that a test may break."""
    target = tmp_path / "templates"
    shutil.copytree(REPO_TEMPLATES, target)
    return target


def render_source(tmp_path: Path, source: str, context: dict[str, Any] | None = None,
                  **limits: Any) -> str:
    """Renders `source` as an SMS template in a fresh folder."""
    (tmp_path / "sms").mkdir(exist_ok=True)
    (tmp_path / "sms" / "t.txt").write_text(source, encoding="utf-8")
    return Templates(tmp_path, **limits).render_sms("t", context or sample_context())


# -- the shipped templates ----------------------------------------------------------------------

def test_shipped_templates_pass_check(shipped: Templates) -> None:
    assert shipped.check(TEMPLATE_NAMES) == []


def test_names_lists_every_contract_template(shipped: Templates) -> None:
    names = shipped.names()
    assert set(TEMPLATE_NAMES) <= names["email"]
    assert set(SMS_NAMES) <= names["sms"]
    assert not any(n.startswith("_") for n in names["email"] | names["sms"])


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_every_email_renders(shipped: Templates, name: str, sparse: bool) -> None:
    email = shipped.render_email(name, sample_context(sparse=sparse))
    assert email.subject and "\n" not in email.subject
    assert "ENQ-7K3QXM" in email.text
    assert email.text.endswith("\n") and not email.text.endswith("\n\n")
    assert email.html.startswith("<!DOCTYPE html>")
    assert '<html lang="en-GB">' in email.html
    assert "ENQ-7K3QXM" in email.html
    for external in ("<img", "<link", "<script", "src=", "@import"):
        assert external not in email.html


def test_help_renders_without_an_enquiry(shipped: Templates) -> None:
    context = {**sample_context(sparse=True), "enquiry": None}  # HELP from an unknown number
    email = shipped.render_email("help", context)
    assert "ENQ-" not in email.text and "ENQ-" not in email.html
    assert "+44 20 7946 0000" in email.text
    assert "+44 20 7946 0000" in shipped.render_sms("help", context)


def test_check_tries_help_without_an_enquiry(copied: Path) -> None:
    (copied / "sms" / "help.txt").write_text("Ref {{ enquiry.reference }}")
    errors = Templates(copied).check(["help"])
    assert len(errors) == 1 and errors[0].startswith(f"{copied}/sms/help.txt:1: ")


@pytest.mark.parametrize("name", SMS_NAMES)
def test_every_sms_is_short_gsm_text(shipped: Templates, name: str) -> None:
    text = shipped.render_sms(name, sample_context())
    assert text == text.strip()
    assert sms_segments(text) in (("GSM-7", 1), ("GSM-7", 2))
    assert "ENQ-7K3QXM" in text or name == "help"


@pytest.mark.parametrize("name", ACK_NAMES)
def test_patient_acknowledgements_say_what_happens_next(shipped: Templates, name: str) -> None:
    email = shipped.render_email(name, sample_context())
    assert "ENQ-7K3QXM" in email.subject
    for body in (email.text, email.html):
        assert "Thank you" in body
        assert "within 2 working days" in body
        assert "reports" in body
        assert "reply to this email" in body.lower()
        assert "999" in body and "NHS 111" in body
    assert "If you feel very unwell, call 999; for urgent advice call NHS 111." in email.text
    assert "Dear Sarah," in email.text
    assert shipped.render_email(name, sample_context(sparse=True)).text.startswith("Hello,")


def test_safety_net_leads_with_emergency_advice(shipped: Templates) -> None:
    email = shipped.render_email("safety-net", sample_context())
    assert "999" in email.subject
    for body in (email.text, email.html):
        assert body.index("999") < body.index("Thank you for your message")
        assert "NHS 111" in body and "A&" in body and "116 123" in body
        assert "on-call clinician" in body
    sms = shipped.render_sms("safety-net", sample_context())
    assert sms.index("999") < sms.index("on-call clinician")


def test_staff_notification_carries_the_routing_facts(shipped: Templates) -> None:
    context = sample_context()
    email = shipped.render_email("notify-team", context)
    for body in (email.text, email.html):
        for fact in ("ENQ-7K3QXM", "normal", "breast", "Breast team", "email",
                     "sarah.jones@example.org", "+447700900123", "pathology-report.pdf",
                     "breast-second-opinion", "no open enquiry from this sender",
                     "I would like a second opinion"):
            assert fact in body, fact
    urgent = shipped.render_email("notify-urgent", context)
    assert urgent.subject.startswith("URGENT")


def test_staff_sms_has_no_clinical_content(shipped: Templates) -> None:
    context = sample_context()
    for name in ("notify-team", "notify-urgent"):
        text = shipped.render_sms(name, context)
        assert "ENQ-7K3QXM" in text and "breast" in text and "normal" in text
        for private in ("Sarah", "diagnosed", "chemotherapy", "pathology", "+447700900123"):
            assert private not in text
    assert shipped.render_sms("notify-urgent", context).startswith("URGENT")


# -- patient text is data ---------------------------------------------------------------------

HOSTILE = "<script>alert(1)</script> {{ 7*7 }} {% for x in range(3) %}x{% endfor %} & \"q\""


def test_patient_text_is_escaped_in_html_and_literal_in_text(shipped: Templates) -> None:
    context = sample_context()
    context["message"]["excerpt"] = HOSTILE
    context["patient"]["name"] = "<b>Eve</b>"
    email = shipped.render_email("notify-team", context)
    assert "<script>" not in email.html and "<b>Eve</b>" not in email.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in email.html
    assert "&lt;b&gt;Eve&lt;/b&gt;" in email.html
    assert "{{ 7*7 }}" in email.html
    assert "{% for x in range(3) %}x{% endfor %}" in email.text
    assert "<script>alert(1)</script>" in email.text  # plain text is not HTML-escaped


def test_subject_is_one_line_whatever_the_patient_wrote(shipped: Templates) -> None:
    context = sample_context()
    context["message"]["subject"] = "Help\r\nBcc: someone@example.com\n\tnow\x00\x1b[31m\u2028x"
    subject = shipped.render_email("notify-team", context).subject
    assert subject.endswith("Help Bcc: someone@example.com now [31m x")
    assert not any(ord(c) < 32 or c == "\u2028" for c in subject)


def test_clean_subject() -> None:
    assert clean_subject("  a\r\n\r\n b\t\tc\x7f d  ") == "a b c d"
    assert clean_subject("\n\n") == ""
    long = clean_subject("x" * 100 + " " + "y" * 400)
    assert len(long) == MAX_SUBJECT_CHARS and long.startswith("x" * 100 + " y")


def test_empty_subject_is_an_error(tmp_path: Path) -> None:
    email = tmp_path / "email"
    email.mkdir()
    (email / "x.subject.txt").write_text("{{ message.subject }}\n")
    (email / "x.txt").write_text("text")
    (email / "x.html").write_text("<p>html</p>")
    context = sample_context(sparse=True)
    with pytest.raises(TemplateError, match=r"email/x\.subject\.txt: renders as empty text"):
        Templates(tmp_path).render_email("x", context)


# -- errors ------------------------------------------------------------------------------------

def test_undefined_variable_is_an_error_with_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match=r"sms/t\.txt:2: .*middle_name"):
        render_source(tmp_path, "Hello\n{{ patient.middle_name }}\n")
    with pytest.raises(TemplateError, match=r"sms/t\.txt:1: 'pateint' is undefined"):
        render_source(tmp_path, "{{ pateint.name }}")


def test_missing_template_and_bad_names(tmp_path: Path) -> None:
    templates = Templates(tmp_path)
    with pytest.raises(TemplateError, match=r"sms/nothing\.txt: missing"):
        templates.render_sms("nothing", sample_context())
    for bad in ("../etc/passwd", "_base", "Ack-Breast", "a b", ""):
        with pytest.raises(TemplateError, match="not a template name"):
            templates.render_email(bad, sample_context())


def test_missing_include_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match=r"sms/t\.txt:2: template 'sms/_gone\.txt' not found"):
        render_source(tmp_path, "a\n{% include 'sms/_gone.txt' %}")


def test_runtime_error_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match=r"sms/t\.txt:3: ZeroDivisionError"):
        render_source(tmp_path, "a\nb\n{{ 1 / 0 }}")


def test_edits_take_effect_without_restart(copied: Path) -> None:
    templates = Templates(copied)
    before = templates.render_sms("help", sample_context())
    path = copied / "sms" / "help.txt"
    path.write_text("Call {{ clinic.phone }}.", encoding="utf-8")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    after = templates.render_sms("help", sample_context())
    assert before != after == "Call +44 20 7946 0000."


# -- the sandbox -------------------------------------------------------------------------------

ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__['os'] }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ ''|attr('__class__') }}",
    "{{ (''|attr('__class__'))|attr('__mro__') }}",
    "{{ self._TemplateReference__context }}",
    "{{ self.__dict__ }}",
    "{{ '{0.__class__}'.format('x') }}",
    "{{ '{0.__class__.__mro__}'.format_map({'0': 'x'}) }}",
    "{{ ('{0.__class__}'|attr('format'))('x') }}",
    "{% set f = '{0.__class__}'.format %}{{ f('x') }}",
    "{{ '%s'|format(''.__class__) }}",
    "{{ message.__class__ }}",
    "{{ message['__class__'] }}",
    "{{ enquiry.created_at.__class__.__init__ }}",
    "{{ range.__globals__ }}",
    "{{ lipsum.__globals__ }}",
    "{{ enquiry.tags.append('x') }}",
    "{% set l = [] %}{{ l.append(1) }}",
    "{{ message.update({'text': 'x'}) }}",
    "{{ loop }}",
    "{{ config }}",
    "{{ request }}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_sandbox_escapes_raise(tmp_path: Path, source: str) -> None:
    with pytest.raises(TemplateError, match=r"sms/t\.txt:1: "):
        render_source(tmp_path, source)


BLOW_UPS = [
    ("{{ 'a' * 10**9 }}", "1,000,000,000 characters"),
    ("{{ [0] * 10**8 }}", "the limit is"),
    ("{{ 10 ** (10 ** 10) }}", "number larger than"),
    ("{% set n = 2 ** 2000 %}{{ n * n * n }}", "number larger than"),
    ("{{ 'x'.center(10**9) }}", "the limit is"),
    ("{{ 'x'.encode().ljust(10**9) }}", "the limit is"),
    ("{{ 'x'|center(10**9) }}", "the limit is"),
    ("{{ 'a'|indent(10**9) }}", "the limit is"),
    ("{{ '{:>1000000000}'.format('x') }}", "the limit is"),
    ("{{ '{0:{1}}'.format('x', 10**9) }}", "the limit is"),
    ("{{ '%1000000000s' % 'x' }}", "the limit is"),
    ("{{ '%*s' % (10**9, 'x') }}", "the limit is"),
    ("{{ '%.1000000000f'|format(1.5) }}", "the limit is"),
    ("{{ ('a' * 100000).replace('a', 'a' * 100000) }}", "the limit is"),
    ("{{ ('a' * 100000)|replace('a', 'a' * 1000) }}", "the limit is"),
    ("{{ ('x' * 100000).join(['a'] * 1000) }}", "the limit is"),
    ("{{ ('a' * 1000).translate({97: 'b' * 1000}) }}", "the limit is"),
    ("{{ ('\t' * 1000).expandtabs(1000000) }}", "the limit is"),
    ("{{ [1]|batch(10**9, 'x')|list }}", "the limit is"),
    ("{{ [1, [2]]|tojson(indent=10**8) }}", "the limit is"),
    ("{% set f = '{0}' * 60000 %}{{ f.format('x' * 1000) }}", "the limit is"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}{{ ns.s|length }}", "the limit is"),
    ("{% macro grow(s, n) %}{{ grow(s ~ s, n - 1) if n else s|length }}{% endmacro %}"
     "{{ grow('ab', 64) }}", "the limit is"),
    ("{% set a = ['x' * 1000] %}{% set b = [a, a, a, a, a, a, a, a, a, a] %}"
     "{% set c = [b, b, b, b, b, b, b, b, b, b] %}{% set d = [c, c, c, c, c, c, c, c, c, c] %}"
     "{{ d }}", "the limit is"),
    ("{{ ([[1]] * 1000)|sum(start=[]) }}", "sum adds numbers only"),
    ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "output is longer than"),
    ("{{ range(10**9)|list }}", "MAX_RANGE"),
]


@pytest.mark.parametrize(("source", "message"), BLOW_UPS)
def test_blow_ups_fail_fast(tmp_path: Path, source: str, message: str) -> None:
    started = time.monotonic()
    with pytest.raises(TemplateError, match=message):
        render_source(tmp_path, source, max_render_seconds=30)
    assert time.monotonic() - started < 5  # refused before the work, not after it


def fake_timer(step: float) -> Any:
    """A clock that moves on by `step` seconds each time it is read."""
    ticks = itertools.count()
    return lambda: next(ticks) * step


LONG_RUNNING = [
    # no output, calls or operators inside the loops: only the loop guard reads the clock
    "{% set r = range(100000) %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}",
    "{% set s = 'x' * 100000 %}{% for c in s %}{% for d in s %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{{ i }}{% endfor %}",
    "{{ range(100000)|select('in', range(20000)|list)|list|length }}",
    "{% macro f(n) %}{{ f(n - 1) if n else '' }}{% endmacro %}{{ f(500) }}",
    "{% for x in range(99999) recursive %}{{ loop([]) }}{% endfor %}",
]


@pytest.mark.parametrize("source", LONG_RUNNING)
def test_time_limit_is_checked_inside_loops_calls_and_filters(tmp_path: Path,
                                                              source: str) -> None:
    # every clock read costs 0.01 s, so the 1 s limit is reached after ~100 checks
    with pytest.raises(TemplateError, match=r"rendering took longer than 1 s"):
        render_source(tmp_path, source, max_render_seconds=1.0, timer=fake_timer(0.01))


def test_time_limit_with_the_real_clock(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(TemplateError, match=r"longer than 0.2 s"):
        render_source(tmp_path, LONG_RUNNING[0], max_render_seconds=0.2)
    assert time.monotonic() - started < 3


def test_output_cap_is_configurable(tmp_path: Path) -> None:
    assert render_source(tmp_path, "{{ 'x' * 50 }}", max_output_chars=50) == "x" * 50
    with pytest.raises(TemplateError, match="output is longer than 50 characters"):
        render_source(tmp_path, "{{ 'x' * 25 }}{{ 'y' * 26 }}", max_output_chars=50)


ORDINARY = [
    ("{{ '-' * 10 }}", "----------"),
    ("{{ 2 ** 10 }} {{ 10**10**2 > 0 }}", "1024 True"),
    ("{% for a, b in [(1, 2), (3, 4)] %}{{ a }}{{ b }}{{ loop.length }}{% endfor %}", "122342"),
    ("{% for x in [] %}{% else %}none{% endfor %}", "none"),
    ("{% for x in range(10) if x is even %}{{ x }}{% endfor %}", "02468"),
    ("{% for i in [{'c': [{'c': []}]}] recursive %}<{{ loop(i.c) }}>{% endfor %}", "<<>>"),
    ("{% set ns = namespace(n=0) %}{% for i in range(5) %}{% set ns.n = ns.n + i %}"
     "{% endfor %}{{ ns.n }}", "10"),
    ("[{{ '{:>6}|{:.2f}'.format('ab', 1) }} {{ '%05d' % 42 }} {{ '%s-%s'|format(1, 2) }}",
     "[    ab|1.00 00042 1-2"),
    ("{{ message.attachments|map(attribute='filename')|join(', ') }}",
     "pathology-report.pdf, MRI report.pdf"),
    ("{{ message.attachments|sum(attribute='size')|filesizeformat }}", "339.5 kB"),
    ("{{ enquiry.tags|join(' / ')|upper|replace('-', ' ') }}", "SECOND OPINION / HAS ATTACHMENTS"),
    ("[{{ 'x'|center(5) }}]|{{ 'a\nb'|indent(2, first=True) }}", "[  x  ]|  a\n  b"),
    ("{{ enquiry.created_at|format_datetime('%A %-d %B') }}", "Wednesday 25 November"),
]


@pytest.mark.parametrize(("source", "expected"), ORDINARY)
def test_the_limits_leave_ordinary_templates_alone(tmp_path: Path, source: str,
                                                   expected: str) -> None:
    assert render_source(tmp_path, source) == expected


def test_format_datetime_uses_london_time() -> None:
    summer = datetime(2026, 7, 1, 23, 30, tzinfo=UTC)
    assert format_datetime(summer) == "2 July 2026, 00:30 BST"
    assert format_datetime(datetime(2026, 1, 5, 9, 5)) == "5 January 2026, 09:05 GMT"
    with pytest.raises(TypeError):
        format_datetime("2026-01-05")  # type: ignore[arg-type]


# -- check() -----------------------------------------------------------------------------------

def test_check_reports_a_missing_file(copied: Path) -> None:
    (copied / "sms" / "ack-lung.txt").unlink()
    (copied / "email" / "notify-team.subject.txt").unlink()
    errors = Templates(copied).check(TEMPLATE_NAMES)
    assert errors == [
        f"{copied}/sms/ack-lung.txt: missing",
        f"{copied}/email/notify-team.subject.txt: missing",
    ]


def test_missing_file_hides_the_name_from_names(copied: Path) -> None:
    (copied / "email" / "ack-skin.html").unlink()
    (copied / "sms" / "ack-skin.txt").unlink()
    names = Templates(copied).names()
    assert "ack-skin" not in names["email"] and "ack-skin" not in names["sms"]
    assert "ack-lung" in names["email"]


def test_check_reports_a_syntax_error_with_its_line(copied: Path) -> None:
    path = copied / "email" / "ack-breast.html"
    lines = path.read_text().splitlines()
    lines[4] = "<p>{{ patient.first_name </p>"
    path.write_text("\n".join(lines))
    errors = Templates(copied).check(["ack-breast"])
    assert len(errors) == 1
    assert errors[0].startswith(f"{copied}/email/ack-breast.html:5: ")


def test_check_reports_errors_in_a_layout_against_the_layout(copied: Path) -> None:
    path = copied / "email" / "_base.html"
    path.write_text(path.read_text().replace("{% endblock %}", "{% endblok %}", 1))
    errors = Templates(copied).check(["ack-lung"])
    assert len(errors) == 1 and errors[0].startswith(f"{copied}/email/_base.html:")


def test_check_tries_the_sparse_context(copied: Path) -> None:
    (copied / "email" / "help.txt").write_text("{{ message.attachments[0].filename }}\n")
    errors = Templates(copied).check(["help"])
    assert len(errors) == 1
    assert errors[0].startswith(f"{copied}/email/help.txt:1: ")


def test_check_enforces_sms_segments(shipped: Templates) -> None:
    assert shipped.check(["help", "notify-team"], max_sms_segments=2) == []
    errors = shipped.check(["help", "notify-team"], max_sms_segments=1)
    assert errors == [f"{REPO_TEMPLATES}/sms/help.txt: 2 SMS segments (GSM-7, 209 characters) "
                      "with the sample data; the limit is 1"]


@pytest.mark.parametrize("leak", [
    "{{ message.excerpt }}", "{{ enquiry.subject }}", "{{ message['text'][:20] }}",
    "{{ decision.reasons|join }}",
    "{% for a in message.attachments %}{{ a.filename }}{% endfor %}",
])
def test_check_refuses_patient_words_in_sms(copied: Path, leak: str) -> None:
    (copied / "sms" / "ack-general.txt").write_text("Ref {{ enquiry.reference }}: " + leak)
    errors = Templates(copied).check(["ack-general"])
    assert len(errors) == 1 and "patient's own words" in errors[0]


def test_check_knows_which_names_need_sms(copied: Path) -> None:
    (copied / "sms" / "notify-team.txt").unlink()
    assert not (copied / "sms" / "reminder-team-unanswered.txt").exists()
    errors = Templates(copied).check(["reminder-team-unanswered", "notify-team"])
    assert errors == [f"{copied}/sms/notify-team.txt: missing"]


def test_check_rejects_bad_names(copied: Path) -> None:
    assert Templates(copied).check(["Ack-Breast"]) == [
        f"{copied}/Ack-Breast: not a template name (use lower-case letters, digits and hyphens)"
    ]


def test_check_reports_limits(copied: Path) -> None:
    (copied / "sms" / "help.txt").write_text("{{ 'a' * 10**9 }}")
    errors = Templates(copied).check(["help"])
    assert errors == [f"{copied}/sms/help.txt:1: value of 1,000,000,000 characters or items; "
                      "the limit is 200,000"]


def test_staff_and_patient_names_cover_the_contract() -> None:
    assert set(PATIENT_TEMPLATE_NAMES).isdisjoint(STAFF_TEMPLATE_NAMES)
    assert len(TEMPLATE_NAMES) == 17


# -- SMS segments ------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("", ("GSM-7", 0)),
    ("Hello", ("GSM-7", 1)),
    ("a" * 160, ("GSM-7", 1)),
    ("a" * 161, ("GSM-7", 2)),
    ("a" * 306, ("GSM-7", 2)),
    ("a" * 307, ("GSM-7", 3)),
    ("£$¥@ èéùìò ÄÖÑÜ äöñüà ¿¡§ ΔΦΓΛΩΠΨΣΘΞ", ("GSM-7", 1)),
    ("€" * 80, ("GSM-7", 1)),  # extension characters take two septets
    ("€" * 81, ("GSM-7", 2)),
    ("[]{}|^~\\" * 10, ("GSM-7", 1)),
    ("[]{}|^~\\" * 11, ("GSM-7", 2)),
    ("a" * 152 + "€" + "a" * 152, ("GSM-7", 3)),  # an escape pair is never split
    ("a" * 153 + "€" + "a" * 151, ("GSM-7", 2)),
    ("a" * 151 + "€" + "a" * 153, ("GSM-7", 2)),
    ("ë", ("UCS-2", 1)),  # not in GSM 03.38
    ("It’s", ("UCS-2", 1)),  # curly apostrophe
    ("a" * 70 + "\u2019", ("UCS-2", 2)),
    ("x" * 69 + "\u2019", ("UCS-2", 1)),
    ("😀" * 35, ("UCS-2", 1)),  # two UTF-16 code units each
    ("😀" * 36, ("UCS-2", 2)),
    ("😀" * 67, ("UCS-2", 3)),  # 33 pairs per 67-unit part
    ("a" * 66 + "😀" + "a" * 66, ("UCS-2", 3)),  # a surrogate pair is never split
    ("a" * 134, ("GSM-7", 1)),
])
def test_sms_segments(text: str, expected: tuple[str, int]) -> None:
    assert sms_segments(text) == expected


def test_gsm_basic_alphabet_has_127_printable_characters() -> None:
    assert len(GSM7_BASIC) == 127
    assert "\x1b" not in GSM7_BASIC and "`" not in GSM7_BASIC and "€" not in GSM7_BASIC
