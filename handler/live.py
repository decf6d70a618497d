"""The rules and templates in force, swapped whole on a successful reload.

A reload that fails validation keeps the previous rule set and records the error, so an
administrator's broken edit never replaces rules that work.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from handler.render import CODE_TEMPLATE_NAMES, RenderedEmail, Templates
from handler.rules import RulesError, RuleSet, load_ruleset

log = logging.getLogger("handler.rules")


@dataclass(frozen=True, slots=True)
class LoadStatus:
    version: str
    loaded_at: datetime
    last_error: str = ""
    last_error_at: datetime | None = None


def load_checked(rules_dir: Path, templates: Templates, *, max_sms_segments: int) -> RuleSet:
    """Load the rules and check every template they name and those the code sends itself
    (`CODE_TEMPLATE_NAMES`); raise RulesError listing all."""
    ruleset = load_ruleset(rules_dir, known_templates=templates.names())
    errors = templates.check(sorted(ruleset.templates_used | set(CODE_TEMPLATE_NAMES)),
                             max_sms_segments=max_sms_segments)
    if errors:
        raise RulesError(errors)
    return ruleset


def failing_tests(ruleset: RuleSet) -> list[str]:
    """The rule files' own `tests:` that the rule set fails, one line each with its place.
    What administrators wrote down must hold: a reload that breaks one is refused."""
    from handler.rules_cli import run_rule_tests

    return [f"{r.where}: test {r.name!r} fails with these rules: {'; '.join(r.failures)}"
            for r in run_rule_tests(ruleset) if not r.passed]


class LiveRules:
    """Rules and a frozen snapshot of the templates, replaced together only when both
    validate. Renders go through it, so a broken template edit never reaches a patient."""

    def __init__(self, *, rules_dir: Path, templates_dir: Path, max_sms_segments: int,
                 now: datetime) -> None:
        self.rules_dir = rules_dir
        self.templates_dir = templates_dir
        self._max_sms_segments = max_sms_segments
        self.templates = Templates(templates_dir, frozen=True)
        self._ruleset = load_checked(rules_dir, self.templates,
                                     max_sms_segments=max_sms_segments)
        self.status = LoadStatus(self._ruleset.version, now)
        failing = failing_tests(self._ruleset)
        if failing:  # no earlier rules to keep: start (mail must still be taken), loudly
            message = "; ".join(failing[:20])
            self.status = LoadStatus(self._ruleset.version, now, message, now)
            log.error("rules loaded but their own tests fail: %s", message)

    @property
    def ruleset(self) -> RuleSet:
        return self._ruleset

    def current(self) -> RuleSet:
        return self._ruleset

    def reload(self, now: datetime) -> bool:
        """Try to load the files as they are now; True when the new rules are in force."""
        try:
            templates = Templates(self.templates_dir, frozen=True)
            ruleset = load_checked(self.rules_dir, templates,
                                   max_sms_segments=self._max_sms_segments)
            failing = failing_tests(ruleset)
            if failing:
                raise RulesError(failing)
        except RulesError as exc:
            message = "; ".join(exc.errors[:20])
            self.status = LoadStatus(self.status.version, self.status.loaded_at, message, now)
            log.error("rules reload refused, previous rules stay in force: %s", message)
            return False
        changed = ruleset.version != self._ruleset.version
        self._ruleset, self.templates = ruleset, templates
        self.status = LoadStatus(ruleset.version, now)
        if changed:
            log.info("rules reloaded: version %s", ruleset.version[:12])
        else:
            log.info("templates reloaded")
        return True

    def render_email(self, name: str, context: Mapping[str, Any]) -> RenderedEmail:
        return self.templates.render_email(name, context)

    def render_sms(self, name: str, context: Mapping[str, Any]) -> str:
        return self.templates.render_sms(name, context)
