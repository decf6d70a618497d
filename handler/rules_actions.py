"""Read a rule's actions (and the `defaults:` section): category, priority, team, tags, reply,
notify, reminders, stop/continue; and check the templates they name.

`ActionReader` reports every mistake with its place and records every template used; with the
known template names it also checks each exists for every channel it will be rendered on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import yaml

from handler.decision import ReminderSpec
from handler.yamlnodes import Problems, Reader, Where, suggest

if TYPE_CHECKING:
    from handler.rules import Team

PRIORITIES = ("urgent", "high", "normal", "low")
"""Most urgent first; stacked rules keep the most urgent priority any of them set."""
REMINDER_KEYS = ("name", "after", "template", "to", "unless")
REMINDER_UNLESS = ("answered", "patient-replied", "closed")
KEBAB = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_TEMPLATE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_AFTER = re.compile(r"^\s*(\d+)\s*([mhdw])\s*$")


def parse_after(text: str) -> int | None:
    """Seconds in "30m", "4h", "2d", "1w"; None when not of that form or zero."""
    m = _AFTER.match(text)
    if not m or int(m.group(1)) == 0:
        return None
    return int(m.group(1)) * {"m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


class ActionReader:
    """Shared by every rule of one load (it collects `templates_used`)."""

    def __init__(
        self, *, teams: Mapping[str, Team], known: Mapping[str, set[str]] | None,
        problems: Problems,
    ) -> None:
        self.teams = teams
        self.known = known
        self.problems = problems
        self.templates_used: set[str] = set()

    def read(
        self, r: Reader, pairs: list[tuple[str, yaml.Node, yaml.Node]]
    ) -> tuple[dict[str, Any], dict[str, yaml.Node]]:
        """Action values by key, and the node of each (for template checks)."""
        out: dict[str, Any] = {}
        nodes: dict[str, yaml.Node] = {}
        for key, _, value in pairs:
            nodes[key] = value
            if key == "category":
                text = r.text(value, "category")
                if text is not None and not KEBAB.match(text):
                    r.error(value, f"category '{text}' must be lower-case words joined by '-'")
                elif text is not None:
                    out[key] = text
            elif key == "priority":
                text = r.text(value, "priority")
                if text is not None and text not in PRIORITIES:
                    r.error(value, f"priority must be one of {', '.join(PRIORITIES)}, "
                            f"got '{text}'{suggest(text, PRIORITIES)}")
                elif text is not None:
                    out[key] = text
            elif key == "team":
                teams = []
                for name, item in r.texts(value, "team"):
                    if name not in self.teams:
                        r.error(item, f"unknown team '{name}'{suggest(name, self.teams)}")
                    elif name not in teams:
                        teams.append(name)
                out[key] = tuple(teams)
            elif key == "tags":
                tags = []
                for tag, item in r.texts(value, "tags", allow_empty=True):
                    if not KEBAB.match(tag):
                        r.error(item, f"tag '{tag}' must be lower-case words joined by '-'")
                    elif tag not in tags:
                        tags.append(tag)
                out[key] = tuple(tags)
            elif key in ("reply", "notify"):
                ok, name = r.optional_text(value, key)
                if ok and name is not None and not _TEMPLATE.match(name):
                    r.error(value, f"'{name}' is not a template name (like ack-general)")
                elif ok:
                    out[key] = name
            elif key == "reminders":
                out[key] = self._reminders(r, value, nodes)
            elif key in ("stop", "continue"):
                flag = r.boolean(value, key)
                if flag is not None:
                    out[key] = flag
        return out, nodes

    def _reminders(
        self, r: Reader, node: yaml.Node, nodes: dict[str, yaml.Node]
    ) -> tuple[ReminderSpec, ...]:
        if isinstance(node, yaml.ScalarNode) and r.optional_text(node, "reminders") == (True, None):
            return ()
        specs: list[ReminderSpec] = []
        for i, item in enumerate(r.sequence(node, "reminders") or []):
            values: dict[str, str] = {}
            for key, key_node, value in r.mapping(item, "a reminder") or []:
                if key not in REMINDER_KEYS:
                    r.unknown_key(key, key_node, "reminder key", REMINDER_KEYS)
                    continue
                text = r.text(value, f"reminder {key}")
                if text is None:
                    continue
                values[key] = text.strip()
                nodes[f"reminder:{i}:{key}"] = value
            missing = [k for k in ("name", "after", "template") if k not in values]
            if missing:
                r.error(item, f"reminder needs {', '.join(missing)}")
                continue
            bad = False
            if not KEBAB.match(values["name"]):
                r.error(nodes[f"reminder:{i}:name"], "reminder name must be lower-case words "
                        "joined by '-'")
                bad = True
            if parse_after(values["after"]) is None:
                r.error(nodes[f"reminder:{i}:after"], f"after '{values['after']}' must be a "
                        "number and a unit: 30m, 4h, 2d or 1w")
                bad = True
            to = values.get("to", "team")
            if to not in ("team", "patient"):
                r.error(nodes[f"reminder:{i}:to"], f"reminder 'to' must be team or patient, "
                        f"got '{to}'{suggest(to, ('team', 'patient'))}")
                bad = True
            unless = values.get("unless", "answered" if to == "team" else "patient-replied")
            if unless not in REMINDER_UNLESS:
                r.error(nodes[f"reminder:{i}:unless"], f"reminder 'unless' must be one of "
                        f"{', '.join(REMINDER_UNLESS)}{suggest(unless, REMINDER_UNLESS)}")
                bad = True
            if any(spec.name == values["name"] for spec in specs):
                r.error(nodes[f"reminder:{i}:name"], f"reminder '{values['name']}' is listed twice")
                bad = True
            if not bad:
                specs.append(ReminderSpec(values["name"], values["after"].replace(" ", ""),
                                          values["template"], to, unless))
        return tuple(specs)

    def check_templates(
        self, values: dict[str, Any], where: dict[str, Where],
        channels: frozenset[str], teams: tuple[str, ...], role: str,
    ) -> None:
        """Record the templates used; with `known` templates, check each exists on every
        channel it will be rendered for (patient channels, staff email, on-call SMS)."""
        staff = {"email"} | {"sms" for t in teams if t in self.teams and self.teams[t].sms}
        wanted: list[tuple[str, Where, frozenset[str], str]] = []
        if values.get("reply"):
            wanted.append((values["reply"], where["reply"], channels, f"the reply of {role}"))
        if values.get("notify"):
            wanted.append((values["notify"], where["notify"], frozenset(staff),
                           f"the staff notification of {role}"))
        for i, spec in enumerate(values.get("reminders", ())):
            need = channels if spec.to == "patient" else frozenset({"email"})
            at = where.get(f"reminder:{i}:template", where.get("reminders"))
            if at is not None:
                wanted.append((spec.template, at, need, f"reminder '{spec.name}' of {role}"))
        for name, at, need, what in wanted:
            self.templates_used.add(name)
            if self.known is None:
                continue
            everywhere = set().union(*self.known.values()) if self.known else set()
            if name not in everywhere:
                self.problems.add(at, f"unknown template '{name}'{suggest(name, everywhere)}")
                continue
            for channel in sorted(need):
                if name not in self.known.get(channel, set()):
                    self.problems.add(
                        at, f"template '{name}' has no {channel} version, needed for {what}"
                    )
