"""Rule sets: load `rules/*.yaml`, validate every part, and compile it once for `classify`.

Sections, in any file: `calendars`, `teams`, `defaults`, `rules` (one ordered list; files are
read in name order) and `tests`. Every problem is reported as `file:line:col: message` and
`RulesError` carries them all. docs/rules.md is the reference for administrators.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from handler import conditions as c
from handler.calendars import Calendar, read_calendar
from handler.decision import ReminderSpec
from handler.rule_cases import RuleTest, read_tests
from handler.rules_actions import KEBAB, PRIORITIES, ActionReader
from handler.rules_plan import ChannelPlan, Gate, plan_channel, rule_gate
from handler.rules_when import (
    ACTION_KEYS,
    CHANNELS,
    CONDITIONS,
    WhenContext,
    channels_of,
    is_catch_all,
    read_when,
)
from handler.textmatch import PhraseIndex
from handler.yamlnodes import Problems, Reader, Where, compose, suggest

SECTIONS = ("calendars", "teams", "defaults", "rules", "tests")
RULE_KEYS = ("name", "description", "when")
TEAM_KEYS = ("id", "display_name", "email", "sms", "hours")
DEFAULT_KEYS = ("category", "priority", "team", "reply", "notify", "reminders")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
E164 = re.compile(r"^\+[1-9]\d{6,14}$")


class RulesError(Exception):
    """The rule files are invalid; `errors` lists every problem as "file:line:col: message"."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class Team:
    id: str
    display_name: str
    email: str
    sms: str | None = None
    hours: Calendar | None = None


@dataclass(frozen=True, slots=True)
class Actions:
    """What a rule (or `defaults:`) sets. `sets` names the single-valued fields it sets, so
    `reply: none` (set, to None) differs from no `reply:` at all."""

    category: str | None = None
    priority: str | None = None
    teams: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    reply: str | None = None
    notify: str | None = None
    reminders: tuple[ReminderSpec, ...] = ()
    sets: frozenset[str] = frozenset()


BUILTIN_DEFAULTS = Actions(
    category="general", priority="normal", teams=("coordinator",), reply="ack-general",
    notify="notify-team", sets=frozenset({"category", "priority", "reply", "notify", "reminders"}),
)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    where: Where
    condition: c.Condition
    """A top-level `channel:` is moved first, so it is checked first."""
    actions: Actions
    stop: bool = True
    description: str = ""
    channels: frozenset[str] = frozenset(CHANNELS)
    """The channels the rule can match at all (its top-level `channel:`)."""
    gate: Gate | None = None
    """Words at least one of which must occur for the rule to match (see `gate_of`)."""


EARLIER_ENQUIRIES_COUNTED = 10
"""A sender's earlier enquiries are counted at least this far (shown in traces), further
when a rule's `earlier_enquiries` needs it."""


@dataclass(frozen=True)
class RuleSet:
    version: str
    """Content hash of the rule files (changes whenever any file changes)."""
    teams: dict[str, Team]
    rules: tuple[Rule, ...]
    defaults: Actions
    phrases: PhraseIndex
    """Every phrase of every rule: a message is scanned once, whatever the number of rules."""
    plans: dict[str, ChannelPlan]
    calendars: dict[str, Calendar] = field(default_factory=dict)
    tests: tuple[RuleTest, ...] = ()
    templates_used: set[str] = field(default_factory=set)
    files: tuple[Path, ...] = ()
    earlier_enquiries_cap: int = EARLIER_ENQUIRIES_COUNTED
    """Intake counts a sender's earlier enquiries up to here (see `Facts`)."""

    def rule(self, name: str) -> Rule | None:
        return next((rule for rule in self.rules if rule.name == name), None)


def load_ruleset(
    rules_dir: Path, *, known_templates: Mapping[str, set[str]] | None = None
) -> RuleSet:
    """Read and compile every `*.yaml` in `rules_dir` (name order); RulesError if invalid."""
    if not rules_dir.is_dir():
        raise RulesError([f"{rules_dir}: no such directory"])
    files = sorted(
        p for p in rules_dir.iterdir()
        if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and p.is_file()
    )
    if not files:
        raise RulesError([f"{rules_dir}: no rule files (*.yaml)"])
    sources: list[tuple[str, str]] = []
    errors: list[str] = []
    for path in files:
        try:
            sources.append((str(path), path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(f"{path}:1:1: cannot read: {exc}")
    if errors:
        raise RulesError(errors)
    return replace(parse_ruleset(sources, known_templates=known_templates), files=tuple(files))


def check_rules(
    rules_dir: Path, *, known_templates: Mapping[str, set[str]] | None = None
) -> list[str]:
    """Every problem in `rules_dir` ([] when valid): what `handler check` prints."""
    try:
        load_ruleset(rules_dir, known_templates=known_templates)
    except RulesError as exc:
        return exc.errors
    return []


def parse_ruleset(
    sources: Sequence[tuple[str, str]], *, known_templates: Mapping[str, set[str]] | None = None
) -> RuleSet:
    """The string twin of `load_ruleset`: sources are (file label, YAML text) in order."""
    return _Compiler(sources, known_templates).run()


def ruleset_version(sources: Sequence[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for label, text in sources:
        digest.update(Path(label).name.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()[:16]


class _Compiler:
    """One load: reads sections in dependency order, collecting every problem."""

    def __init__(
        self, sources: Sequence[tuple[str, str]], known: Mapping[str, set[str]] | None
    ) -> None:
        self.sources = sources
        self.known = known
        self.problems = Problems(label for label, _ in sources)
        self.sections: dict[str, list[tuple[Reader, yaml.Node, yaml.Node]]] = {
            s: [] for s in SECTIONS
        }
        self.calendars: dict[str, Calendar] = {}
        self.teams: dict[str, Team] = {}
        self.phrases = PhraseIndex()
        self.actions = ActionReader(teams=self.teams, known=known, problems=self.problems)
        self.calendar_ids: set[str] = set()
        self.team_ids: set[str] = set()
        self.rule_names: set[str] = set()

    def run(self) -> RuleSet:
        for label, text in self.sources:
            r = Reader(label, self.problems)
            root = compose(label, text, self.problems)
            if root is None:
                continue
            for key, key_node, value in r.mapping(root, "a rule file") or []:
                if key in SECTIONS:
                    self.sections[key].append((r, key_node, value))
                else:
                    r.unknown_key(key, key_node, "section", SECTIONS)
        self._read_calendars()
        self._read_teams()
        defaults = self._read_defaults()
        rules = self._read_rules()
        tests = read_tests(self.sections["tests"], self.rule_names, self.team_ids, PRIORITIES)
        if self.problems:
            raise RulesError(self.problems.lines())
        return RuleSet(
            version=ruleset_version(self.sources), teams=self.teams, rules=tuple(rules),
            defaults=defaults, phrases=self.phrases,
            plans={channel: plan_channel(rules, channel) for channel in CHANNELS},
            calendars=self.calendars,
            tests=tuple(tests), templates_used=self.actions.templates_used,
            earlier_enquiries_cap=max([EARLIER_ENQUIRIES_COUNTED, *(
                c.earlier_enquiries_needed(rule.condition) for rule in rules)]),
        )

    # --- calendars and teams -------------------------------------------------------------

    def _read_calendars(self) -> None:
        first: dict[str, Where] = {}
        for r, _, node in self.sections["calendars"]:
            for cal_id, key_node, value in r.mapping(node, "calendars") or []:
                if cal_id in first:
                    r.error(key_node, f"calendar '{cal_id}' is already defined at {first[cal_id]}")
                    continue
                first[cal_id] = r.at(key_node)
                self.calendar_ids.add(cal_id)  # known even if invalid: no knock-on errors
                calendar = read_calendar(r, cal_id, value)
                if calendar is not None:
                    self.calendars[cal_id] = calendar

    def _read_teams(self) -> None:
        first: dict[str, Where] = {}
        for r, _, node in self.sections["teams"]:
            for item in r.sequence(node, "teams") or []:
                values: dict[str, tuple[str, yaml.Node]] = {}
                for key, key_node, value in r.mapping(item, "a team") or []:
                    if key not in TEAM_KEYS:
                        r.unknown_key(key, key_node, "team key", TEAM_KEYS)
                        continue
                    text = r.text(value, key)
                    if text is not None:
                        values[key] = (text.strip(), value)
                if "id" not in values or "email" not in values:
                    missing = [k for k in ("id", "email") if k not in values]
                    r.error(item, f"team needs {' and '.join(missing)}")
                    continue
                team_id, id_node = values["id"]
                if team_id in first:
                    r.error(id_node, f"team '{team_id}' is already defined at {first[team_id]}")
                    continue
                first[team_id] = r.at(id_node)
                self.team_ids.add(team_id)
                # Registered even when invalid (the load fails anyway), so that rules naming
                # it do not add "unknown team" errors on top of the real one.
                self.teams[team_id] = self._team(r, values)

    def _team(self, r: Reader, values: dict[str, tuple[str, yaml.Node]]) -> Team:
        team_id, id_node = values["id"]
        if not KEBAB.match(team_id):
            r.error(id_node, f"team id '{team_id}' must be lower-case words joined by '-'")
        email, email_node = values["email"]
        if not _EMAIL.match(email):
            r.error(email_node, f"'{email}' is not an email address")
        sms = values.get("sms")
        if sms and not E164.match(sms[0]):
            r.error(sms[1], f"sms '{sms[0]}' must be a phone number in +44... (E.164) form")
        hours = None
        if "hours" in values:
            name, hours_node = values["hours"]
            hours = self.calendars.get(name)
            if name not in self.calendar_ids:
                r.error(hours_node, f"unknown calendar '{name}'{suggest(name, self.calendar_ids)}")
        display = values["display_name"][0] if "display_name" in values else (
            team_id.replace("-", " ").capitalize())
        return Team(team_id, display, email.lower(), sms[0] if sms else None, hours)

    # --- defaults and rules --------------------------------------------------------------

    def _read_defaults(self) -> Actions:
        found = self.sections["defaults"]
        for r, key_node, _ in found[1:]:
            r.error(key_node, f"'defaults' is already given at {found[0][0].at(found[0][1])}")
        values: dict[str, Any] = {}
        where: dict[str, Where] = {}
        if found:
            r, key_node, node = found[0]
            at = r.at(key_node)
            pairs = r.mapping(node, "defaults") or []
            for key, k_node, _ in pairs:
                if key not in DEFAULT_KEYS:
                    r.unknown_key(key, k_node, "default", DEFAULT_KEYS)
            values, nodes = self.actions.read(r, [p for p in pairs if p[0] in DEFAULT_KEYS])
            where = {key: r.at(n) for key, n in nodes.items()}
            if "team" in values and len(values["team"]) != 1:
                self.problems.add(where["team"], "the default team must be exactly one team")
        else:
            at = Where(self.sources[0][0] if self.sources else "rules", 1, 1)
        merged = {
            "category": values.get("category", BUILTIN_DEFAULTS.category),
            "priority": values.get("priority", BUILTIN_DEFAULTS.priority),
            "teams": values.get("team") or BUILTIN_DEFAULTS.teams,
            "reply": values.get("reply", BUILTIN_DEFAULTS.reply),
            "notify": values.get("notify", BUILTIN_DEFAULTS.notify),
            "reminders": values.get("reminders", ()),
        }
        for team in merged["teams"]:
            if team not in self.teams and "team" not in values:
                self.problems.add(at, f"the default team '{team}' is not defined in 'teams' "
                                  "(add it, or set defaults: team:)")
        for key in ("reply", "notify"):
            where.setdefault(key, at)  # a built-in default is reported at 'defaults:'
        self.actions.check_templates(
            merged, where, frozenset(CHANNELS), merged["teams"], "the defaults"
        )
        return replace(BUILTIN_DEFAULTS, **merged)

    def _read_rules(self) -> list[Rule]:
        rules: list[Rule] = []
        names: dict[str, Where] = {}
        catch_all: tuple[str, Where] | None = None
        ctx = WhenContext(
            self.phrases, {t.id: t.hours for t in self.teams.values()}, self.calendars
        )
        for r, _, node in self.sections["rules"]:
            for item in r.sequence(node, "rules") or []:
                rule, name, stops_all = self._read_rule(r, item, ctx, names)
                if catch_all is not None and name:
                    r.error(item, f"rule '{name}' can never match: catch-all rule "
                            f"'{catch_all[0]}' ({catch_all[1]}) matches every message "
                            "and stops first")
                elif stops_all:
                    catch_all = (name or "?", r.at(item))
                if rule is not None:
                    rules.append(rule)
        self.rule_names = set(names)
        return rules

    def _read_rule(
        self, r: Reader, node: yaml.Node, ctx: WhenContext, names: dict[str, Where]
    ) -> tuple[Rule | None, str | None, bool]:
        """(the rule or None after errors, its name, whether it matches all and stops)."""
        pairs = r.mapping(node, "a rule")
        if pairs is None:
            return None, None, False
        errors_before = len(self.problems)
        name: str | None = None
        description = ""
        when_node: yaml.Node | None = None
        action_pairs = []
        misplaced = False  # a condition outside 'when:', or a typo: then not a catch-all
        for key, key_node, value in pairs:
            if key == "name":
                name = self._rule_name(r, value, names)
            elif key == "description":
                description = r.text(value, "description") or ""
            elif key == "when":
                when_node = value
            elif key in ACTION_KEYS:
                action_pairs.append((key, key_node, value))
            elif key in CONDITIONS:
                r.error(key_node, f"'{key}' is a condition: put it under 'when:'")
                misplaced = True
            else:
                r.unknown_key(key, key_node, "action", (*ACTION_KEYS, *RULE_KEYS))
                misplaced = True
        if name is None and not any(key == "name" for key, _, _ in pairs):
            r.error(node, "rule has no 'name'")
        condition = c.Always() if when_node is None else read_when(r, when_node, ctx)
        values, nodes = self.actions.read(r, action_pairs)
        stop = self._stop(r, values, nodes)
        label = f"rule '{name}'"
        if stop is False and not set(values) - {"stop", "continue"}:
            r.error(node, f"{label} does nothing: it has no actions and continues")
        channels = channels_of(condition) if condition is not None else frozenset(CHANNELS)
        where = {key: r.at(n) for key, n in nodes.items()}
        self.actions.check_templates(values, where, channels, values.get("team", ()), label)
        stops_all = bool(stop) and not misplaced and condition is not None and is_catch_all(
            condition
        )
        if len(self.problems) > errors_before or None in (name, condition, stop):
            return None, name, stops_all
        assert name is not None and condition is not None and stop is not None
        if isinstance(condition, c.AllOf):  # check channel first: cheap, and often decisive
            kids = condition.children
            condition = c.AllOf(tuple(sorted(kids, key=lambda k: not isinstance(k, c.ChannelIs))))
        actions = Actions(
            category=values.get("category"), priority=values.get("priority"),
            teams=values.get("team", ()), tags=values.get("tags", ()),
            reply=values.get("reply"), notify=values.get("notify"),
            reminders=values.get("reminders", ()),
            sets=frozenset(k for k in ("category", "priority", "reply", "notify", "reminders")
                           if k in values),
        )
        rule = Rule(name, r.at(node), condition, actions, stop, description, channels,
                    rule_gate(condition))
        return rule, name, stops_all

    def _rule_name(self, r: Reader, node: yaml.Node, names: dict[str, Where]) -> str | None:
        name = r.text(node, "name")
        if name is None:
            return None
        if not KEBAB.match(name) or name == "default":
            r.error(node, f"rule name '{name}' must be lower-case words joined by '-' "
                    "(and not 'default')")
        elif name in names:
            r.error(node, f"duplicate rule name '{name}' (first at {names[name]})")
        else:
            names[name] = r.at(node)
        return name

    @staticmethod
    def _stop(r: Reader, values: dict[str, Any], nodes: dict[str, yaml.Node]) -> bool | None:
        """True (the default) or False from `stop:` / `continue:`; None if they contradict."""
        if "continue" in values and "stop" in values and values["continue"] == values["stop"]:
            r.error(nodes["continue"], "'stop' and 'continue' contradict each other: use one")
            return None
        if "continue" in values:
            return not values["continue"]
        return bool(values.get("stop", True))
