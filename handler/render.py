"""Renders the administrators' email and SMS templates, and checks them before they go live.

Owns the file layout (`templates/email/<name>.subject.txt|.txt|.html`, `templates/sms/<name>.txt`),
the limits on every render (output size, time; see `handler.sandbox`), single-line subjects and
trimmed text, the sample context `check` renders with, and SMS segment counting.
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jinja2
from jinja2 import FileSystemLoader, StrictUndefined, select_autoescape

from handler.sandbox import BoundedSandbox, LimitError

PATIENT_TEMPLATE_NAMES = (
    "ack-general", "ack-breast", "ack-urology", "ack-lung", "ack-colorectal",
    "ack-haematology", "ack-gynaecology", "ack-skin", "ack-existing-patient", "safety-net",
    "ack-press", "ack-insurer", "reminder-patient-documents", "help",
)
STAFF_TEMPLATE_NAMES = ("notify-team", "notify-urgent", "reminder-team-unanswered")
TEMPLATE_NAMES = PATIENT_TEMPLATE_NAMES + STAFF_TEMPLATE_NAMES
"""Every name in the shared contract: pass them to `check` with the names the rules use."""

CODE_TEMPLATE_NAMES = ("help", "notify-urgent")
"""Templates the code sends whatever the rules say (the answer to HELP, the on-call text of
an urgent enquiry): checked with the rules' own at every load, so an edit that breaks one is
refused like any other."""
STAFF_SMS_NAMES = frozenset({"notify-team", "notify-urgent"})
NO_ENQUIRY_NAMES = frozenset({"help"})
"""Templates that may be rendered with `enquiry` set to None (HELP from an unknown number)."""
EMAIL_SUFFIXES = (".subject.txt", ".txt", ".html")
MAX_SUBJECT_CHARS = 250
NAME_RE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_TRAILING_SPACE_RE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_LINES_RE = re.compile(r"\n{3,}")
_MARKER = "zqxvj"
_PATIENT_WORDS = " ".join([_MARKER] * 8)  # stands in for patient text when checking SMS

# GSM 03.38: the 127 printable characters of the default alphabet (ESC excluded) and the
# extension table, whose characters are sent as ESC + character and so count twice.
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")


class TemplateError(Exception):
    """A template is missing, does not compile, or failed or hit a limit while rendering.

    The message starts with the file (and line when known): "templates/sms/help.txt:3: ...".
    """


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str


class Templates:
    """The template folder administrators edit; edits take effect at the next render."""

    def __init__(
        self,
        templates_dir: Path,
        *,
        max_output_chars: int = 200_000,
        max_render_seconds: float = 2.0,
        timer: Callable[[], float] | None = None,
        frozen: bool = False,
    ) -> None:
        """`frozen=True` compiles every file now and never looks at the disk again for them:
        the running service uses frozen snapshots, swapped whole when a reload validates."""
        self._dir = Path(templates_dir)
        self._max_chars = max_output_chars
        self._max_seconds = max_render_seconds
        self._timer = timer or time.monotonic  # for the time limit; tests may pass their own
        self._env = BoundedSandbox(
            max_chars=max_output_chars,
            timer=self._timer,
            filters={"format_datetime": format_datetime},
            loader=FileSystemLoader(str(self._dir)),
            auto_reload=not frozen,
            cache_size=-1 if frozen else 400,
            undefined=StrictUndefined,
            autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False,
                                         default=False),
            trim_blocks=True,
            lstrip_blocks=True,
        )

        if frozen:
            self._preload()

    def _preload(self) -> None:
        for path in sorted(self._dir.rglob("*")):
            if path.is_file() and path.suffix in (".txt", ".html"):
                try:
                    self._env.get_template(path.relative_to(self._dir).as_posix())
                except Exception:
                    continue

    def names(self) -> dict[str, set[str]]:
        """Names with a complete email set (subject, text, HTML) and names with an SMS file."""
        email_dir = self._dir / "email"
        candidates = {p.name.removesuffix(".subject.txt") for p in email_dir.glob("*.subject.txt")}
        email = {
            name for name in candidates
            if NAME_RE.fullmatch(name)
            and all((email_dir / f"{name}{suffix}").is_file() for suffix in EMAIL_SUFFIXES)
        }
        sms = {p.stem for p in (self._dir / "sms").glob("*.txt") if NAME_RE.fullmatch(p.stem)}
        return {"email": email, "sms": sms}

    def render_email(self, name: str, context: Mapping[str, Any]) -> RenderedEmail:
        self._check_name(name)
        deadline = self._timer() + self._max_seconds
        subject, text, html = (
            self._render_part(f"email/{name}{suffix}", context, deadline)
            for suffix in EMAIL_SUFFIXES
        )
        return RenderedEmail(subject=subject, text=text, html=html)

    def render_sms(self, name: str, context: Mapping[str, Any]) -> str:
        self._check_name(name)
        return self._render_part(f"sms/{name}.txt", context, self._timer() + self._max_seconds)

    def check(self, names: Iterable[str], *, max_sms_segments: int = 3) -> list[str]:
        """Every problem with these templates, one line each: "<file>[:line]: <problem>".

        For each name: the email subject, text and HTML exist; the SMS exists for patient
        templates and `notify-team`/`notify-urgent` (and is checked wherever it exists); each
        compiles and renders with `sample_context()`, with the sparse SMS-enquiry variant and,
        for `NO_ENQUIRY_NAMES`, with no enquiry at all; SMS texts fit `max_sms_segments` and
        never contain the patient's own words.
        """
        errors: list[str] = []
        for name in sorted(set(names)):
            if not NAME_RE.fullmatch(name):
                errors.append(f"{self._path(name)}: not a template name "
                              "(use lower-case letters, digits and hyphens)")
                continue
            for suffix in EMAIL_SUFFIXES:
                errors += self._check_file(f"email/{name}{suffix}")
            sms = f"sms/{name}.txt"
            if _needs_sms(name) or (self._dir / sms).is_file():
                errors += self._check_sms(sms, max_sms_segments)
        return errors

    # -- internals ------------------------------------------------------------------------------

    def _check_name(self, name: str) -> None:
        if not NAME_RE.fullmatch(name):
            raise TemplateError(f"{name!r} is not a template name")

    def _path(self, name: str) -> str:
        """How a template is named in messages; matches the loader's file names."""
        return os.path.normpath(posixpath.join(str(self._dir), name))

    def _check_file(self, name: str) -> list[str]:
        if not (self._dir / name).is_file():
            return [f"{self._path(name)}: missing"]
        contexts = [sample_context(), sample_context(sparse=True)]
        if _template_name(name) in NO_ENQUIRY_NAMES:
            contexts.append({**sample_context(sparse=True), "enquiry": None})
        for context in contexts:
            try:
                self._render_part(name, context, self._timer() + self._max_seconds)
            except TemplateError as exc:
                return [str(exc)]
        return []

    def _check_sms(self, name: str, max_segments: int) -> list[str]:
        errors = self._check_file(name)
        if errors:
            return errors
        deadline = self._timer() + self._max_seconds
        text = self._render_part(name, sample_context(), deadline)
        encoding, segments = sms_segments(text)
        if segments > max_segments:
            errors.append(f"{self._path(name)}: {segments} SMS segments ({encoding}, "
                          f"{len(text)} characters) with the sample data; the limit is "
                          f"{max_segments}")
        try:
            marked = self._render_part(name, _marked_context(), deadline)
        except TemplateError as exc:
            return [*errors, str(exc)]
        if _MARKER in marked:
            errors.append(f"{self._path(name)}: includes the patient's own words (message, "
                          "enquiry.subject, attachment names or decision.reasons); an SMS may "
                          "be read on a shared phone or aloud on a landline")
        return errors

    def _render_part(self, name: str, context: Mapping[str, Any], deadline: float) -> str:
        """Renders one file and tidies it the way its kind needs; never returns empty."""
        raw = self._render(name, context, deadline)
        if name.endswith(".subject.txt"):
            text = clean_subject(raw)
        elif name.startswith("sms/"):
            text = tidy_text(raw)
        else:
            text = tidy_text(raw) if name.endswith(".txt") else raw.strip()
            text = text + "\n" if text else ""
        if not text:
            raise TemplateError(f"{self._path(name)}: renders as empty text")
        return text

    def _render(self, name: str, context: Mapping[str, Any], deadline: float) -> str:
        try:
            template = self._env.get_template(name)
        except jinja2.TemplateNotFound as exc:
            if exc.name == name:
                raise TemplateError(f"{self._path(name)}: missing") from None
            raise self._error(name, exc) from exc
        except Exception as exc:
            raise self._error(name, exc) from exc
        chunks: list[str] = []
        append = chunks.append
        size, limit, timer = 0, self._max_chars, self._timer
        # The template's own generator rather than `generate()`, whose wrapper costs a frame
        # per chunk (a notification is ~140 chunks); its traceback rewriting is done below.
        stream = template.root_render_func(template.new_context(context))
        try:
            with self._env.deadline(deadline, self._max_seconds):
                late = False
                try:
                    for chunk in stream:
                        size += len(chunk)
                        if size > limit:
                            break
                        # The sandbox reads the clock in every loop, call, filter and operator:
                        # straight template text needs no more than an occasional look.
                        if not len(chunks) & 31 and timer() > deadline:
                            late = True
                            break
                        append(chunk)
                except Exception:
                    self._env.handle_exception()  # re-raised with the template's line numbers
                if size > limit:
                    raise LimitError(f"output is longer than {limit:,} characters")
                if late:
                    raise LimitError(f"rendering took longer than {self._max_seconds:g} s")
        except Exception as exc:
            raise self._error(name, exc) from exc
        finally:
            stream.close()
        return "".join(chunks)

    def _error(self, name: str, exc: Exception) -> TemplateError:
        """A TemplateError naming the file and line the failure came from."""
        where = self._path(name)
        line: int | None = None
        if isinstance(exc, jinja2.TemplateSyntaxError):
            where = self._path(exc.name) if exc.name else where
            line = exc.lineno
            message = exc.message or "syntax error"
        else:
            inside = self._path("") + os.sep
            for frame in reversed(traceback.extract_tb(exc.__traceback__)):
                if frame.filename.startswith(inside):
                    where, line = frame.filename, frame.lineno
                    break
            if isinstance(exc, jinja2.TemplateNotFound):
                message = f"template {exc.name!r} not found"
            elif isinstance(exc, jinja2.TemplateError | LimitError):
                message = str(exc)
            else:
                message = f"{type(exc).__name__}: {exc}"
        if len(message) > 300:
            message = message[:297] + "..."
        return TemplateError(f"{where}:{line}: {message}" if line else f"{where}: {message}")


def clean_subject(text: str) -> str:
    """One line: control characters (CR, LF, tab, ...) become spaces, runs of space collapse."""
    return " ".join(_CONTROL_RE.sub(" ", text).split())[:MAX_SUBJECT_CHARS].rstrip()


def tidy_text(text: str) -> str:
    """Trailing spaces and surplus blank lines that template tags leave behind, removed."""
    text = text.replace("\r\n", "\n")
    # The regexes only where they have work: trying `[ \t]+$` at every space of a page of
    # text costs more than the rest of this function (trailing blanks go with strip()).
    if " \n" in text or "\t\n" in text:
        text = _TRAILING_SPACE_RE.sub("", text)
    if "\n\n\n" in text:
        text = _BLANK_LINES_RE.sub("\n\n", text)
    return text.strip()


def format_datetime(value: datetime, fmt: str = "%-d %B %Y, %H:%M %Z",
                    timezone: str = "Europe/London") -> str:
    """Template filter: an aware datetime as London time (naive ones are taken as UTC).

    `%-d` is the day without a leading zero on every platform.
    """
    if not isinstance(value, datetime):
        raise TypeError("format_datetime needs a date and time")
    if isinstance(fmt, str) and isinstance(timezone, str):
        return _format_datetime(value, fmt, timezone)
    return _format_datetime.__wrapped__(value, fmt, timezone)


@functools.lru_cache(maxsize=256)
def _format_datetime(value: datetime, fmt: str, timezone: str) -> str:
    """Cached: a notification shows its enquiry's time in its text and again in its HTML,
    and strftime (names of months, time zones) is most of the cost. Equal datetimes are the
    same instant, which is all the result depends on."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    local = value.astimezone(ZoneInfo(timezone))
    return local.strftime(fmt.replace("%-d", str(local.day)))


def sms_segments(text: str) -> tuple[str, int]:
    """("GSM-7" | "UCS-2", number of SMS segments) as the networks will count them.

    GSM-7: 160 septets in one message, 153 per part when split; extension-table characters
    (€ [ ] { } ^ ~ | \\ and form feed) take two. Anything else makes the whole text UCS-2:
    70 UTF-16 code units, 67 per part; characters beyond the BMP (most emoji) take two.
    An escape pair or a surrogate pair is never split across parts. Empty text is 0 segments.
    """
    if all(c in GSM7_BASIC or c in GSM7_EXTENSION for c in text):
        encoding, single, part = "GSM-7", 160, 153
        weights = [2 if c in GSM7_EXTENSION else 1 for c in text]
    else:
        encoding, single, part = "UCS-2", 70, 67
        weights = [2 if ord(c) > 0xFFFF else 1 for c in text]
    total = sum(weights)
    if total <= single:
        return encoding, (1 if total else 0)
    segments, used = 1, 0
    for weight in weights:
        if used + weight > part:
            segments, used = segments + 1, 0
        used += weight
    return encoding, segments


def sample_context(*, sparse: bool = False) -> dict[str, Any]:
    """Example data with every key the dispatcher passes to templates.

    The default is an email enquiry about breast cancer with an attachment; `sparse=True` is
    an SMS from an unknown number (no name, email, subject or attachments) so templates are
    also tried with the blanks real enquiries have.
    """
    text = (
        "Hello,\n\nI was diagnosed with breast cancer in September and my hospital has "
        "recommended surgery followed by chemotherapy. I would like a second opinion on the "
        "treatment plan before I decide.\n\nI have my pathology report and my MRI report and "
        "can send both. My next appointment is on 9 December.\n\nThank you,\nSarah Jones"
    )
    context: dict[str, Any] = {
        "clinic": {
            "name": "London Second Opinion Clinic",
            "address": "enquiries@clinic.example",
            "phone": "+44 20 7946 0000",
            "website": "https://www.clinic.example",
        },
        "enquiry": {
            "reference": "ENQ-7K3QXM",
            "category": "breast",
            "priority": "normal",
            "team": "breast",
            "team_name": "Breast team",
            "subject": "Second opinion on my breast cancer treatment plan",
            "channel": "email",
            "created_at": datetime(2026, 11, 25, 9, 41, tzinfo=UTC),
            "status": "open",
            "tags": ["second-opinion", "has-attachments"],
        },
        "patient": {
            "name": "Sarah Jones",
            "first_name": "Sarah",
            "email": "sarah.jones@example.org",
            "phone": "+447700900123",
        },
        "message": {
            "subject": "Second opinion on my breast cancer treatment plan",
            "text": text,
            "excerpt": text[:600],
            "attachments": [
                {"filename": "pathology-report.pdf", "content_type": "application/pdf",
                 "size": 248_133},
                {"filename": "MRI report.pdf", "content_type": "application/pdf",
                 "size": 91_402},
            ],
        },
        "team": {"id": "breast", "display_name": "Breast team",
                 "email": "breast-team@clinic.example"},
        "decision": {
            "rule": "breast-second-opinion",
            "reasons": [
                "subject contains \"breast\"",
                "body contains \"second opinion\"",
                "no open enquiry from this sender",
            ],
        },
        "reminder": {"name": "documents-after-2-days",
                     "due_at": datetime(2026, 11, 27, 9, 41, tzinfo=UTC)},
        "update": False,
    }
    if sparse:
        sms_text = "Hi, can I get a second opinion on my treatment? Please call me."
        context["enquiry"].update(channel="sms", subject="", category="general",
                                  team="coordinator", team_name="Patient coordinators", tags=[])
        context["patient"] = {"name": "", "first_name": "", "email": "", "phone": "+447700900123"}
        context["message"] = {"subject": "", "text": sms_text, "excerpt": sms_text,
                              "attachments": []}
        context["team"] = {"id": "coordinator", "display_name": "Patient coordinators",
                           "email": "coordinators@clinic.example"}
        context["decision"] = {"rule": "default", "reasons": []}
        context["update"] = True  # so templates are also tried as a follow-up's notice
    return context


def _marked_context() -> dict[str, Any]:
    """The sample context with every piece of patient-written text replaced by a marker."""
    context = sample_context()
    context["enquiry"]["subject"] = _PATIENT_WORDS
    context["message"] = {
        "subject": _PATIENT_WORDS, "text": _PATIENT_WORDS, "excerpt": _PATIENT_WORDS,
        "attachments": [{"filename": _PATIENT_WORDS, "content_type": "application/pdf",
                         "size": 1000}],
    }
    context["decision"]["reasons"] = [_PATIENT_WORDS]
    return context


def _template_name(path: str) -> str:
    """"email/help.subject.txt" -> "help"."""
    return path.split("/", 1)[-1].split(".", 1)[0]


def _needs_sms(name: str) -> bool:
    is_staff = name.startswith(("notify-", "reminder-team-"))
    return not is_staff or name in STAFF_SMS_NAMES
