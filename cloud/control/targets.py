"""Target selectors: which devices a deployment (or a listing) is about.

Grammar: comma-separated terms, all of which must hold:

    site=plant-a            the label `site` equals `plant-a`
    group=line-2            the device is in group `line-2`
    device=gw-07            that one device
    *                       every device

Keys and values are identifiers (`[A-Za-z0-9][A-Za-z0-9_.:-]*`, at most 128 characters).
Anything else is refused with the reason. Selectors are matched in Python against each
device's labels and groups; they never become SQL, so a crafted filter can only fail to
parse.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["IDENT", "TARGET_PATTERN", "Target", "parse_target"]

IDENT: Final = r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}"
# The grammar's shape, for API schemas (parse_target also refuses a label set twice, and a
# second device= term).
TARGET_PATTERN: Final = rf"^\s*(\*|{IDENT}={IDENT}(\s*,\s*{IDENT}={IDENT}){{0,15}})\s*$"
_TERM: Final = re.compile(rf"^({IDENT})=({IDENT})$")
_MAX_TERMS: Final = 16


@dataclass(frozen=True)
class Target:
    labels: tuple[tuple[str, str], ...] = ()
    groups: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()

    def matches(self, device: str, labels: Mapping[str, Any], groups: Iterable[str]) -> bool:
        if self.devices and device not in self.devices:
            return False
        if any(str(labels.get(key)) != value for key, value in self.labels):
            return False
        mine = set(groups)
        return all(group in mine for group in self.groups)

    def text(self) -> str:
        terms = ([f"{k}={v}" for k, v in self.labels] + [f"group={g}" for g in self.groups]
                 + [f"device={d}" for d in self.devices])
        return ",".join(terms) or "*"


def parse_target(text: str) -> Target:
    """A selector from its text; ValueError says what is wrong."""
    text = text.strip()
    if text == "*":
        return Target()
    if not text:
        raise ValueError("empty target selector (use * for every device)")
    terms = [t.strip() for t in text.split(",")]
    if len(terms) > _MAX_TERMS:
        raise ValueError(f"target selector has {len(terms)} terms, at most {_MAX_TERMS}")
    labels: dict[str, str] = {}
    groups: list[str] = []
    devices: list[str] = []
    for term in terms:
        match = _TERM.match(term)
        if match is None:
            raise ValueError(f"target term {term[:60]!r} is not key=value of identifiers "
                             "(letters, digits, _ . : -)")
        key, value = match.groups()
        if key == "group":
            groups.append(value)
        elif key == "device":
            devices.append(value)
        elif key in labels and labels[key] != value:
            raise ValueError(f"target selector sets label {key} twice")
        else:
            labels[key] = value
    if len(devices) > 1:
        raise ValueError("a target names at most one device= term")
    return Target(tuple(sorted(labels.items())), tuple(sorted(set(groups))), tuple(devices))
