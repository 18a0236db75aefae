"""Check kinds as plug-ins: the one place that maps a suite's `kind = "…"` to its module.

A kind is an object with the `CheckKind` interface: `validate` a check before any work,
`run` it through the public `RunContext` (results.jsonl items, the per-sample state, the
gallery shots and figures), `summarise` its items into the report's `CheckEntry`, and
render that entry (`table` and `notes` for the terminal; `html` for the page: the
`template` part of templates/ that shows it, and its view's extra keys).
To add a kind, write a module with such an object and add it to `_MODULES` below; no other
file compares kind names (docs/extending.md walks through one).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from bastion.suites.gallery import GalleryItem
    from bastion.suites.json_codec import JsonObject
    from bastion.suites.report_model import CheckEntry
    from bastion.suites.results_log import Item
    from bastion.suites.run_context import RunContext, RunState
    from bastion.suites.suite import Check

# kind name -> the module that defines it (its `KIND` object)
_MODULES = {
    "attack": "bastion.suites.kind_attack",
    "verify": "bastion.suites.kind_verify",
    "fooling": "bastion.suites.kind_fooling",
    "scaling": "bastion.suites.kind_scaling",
    "adaptive": "bastion.suites.kind_adaptive",
    "transfer": "bastion.suites.kind_transfer",
}


def kind_names() -> tuple[str, ...]:
    """The registered kinds, in registration order."""
    return tuple(_MODULES)


@dataclass(frozen=True)
class Column:
    """A terminal table column: header, the row key, the format spec."""

    header: str
    key: str
    spec: str


@dataclass(frozen=True)
class Table:
    """What the terminal prints for one check: a title and rows under columns."""

    title: str
    columns: Sequence[Column]
    rows: list[JsonObject]


class CheckKind(Protocol):
    """What a kind of check provides (see the module docstring)."""

    name: str
    robustness: bool  # counts towards robust accuracy (its breaks enter the worst case)
    metrics: tuple[str, ...]  # the metrics a criterion of this kind may read
    threat_twins: bool  # `threats = true` expands it at the run's threat models
    sees_defense: bool  # can run behind a preprocessing defense

    def attack_name(self, raw: JsonObject, where: str) -> str: ...
    def default_norm(self, attack: str) -> str: ...
    def bounded(self, check: Check) -> bool: ...
    def validate(self, check: Check) -> None: ...
    def run(self, ctx: RunContext, check: Check) -> None: ...
    def summarise(
        self, check: Check, state: RunState, items: list[Item], total: int
    ) -> CheckEntry: ...
    def gallery(self, ctx: RunContext, check: Check) -> list[GalleryItem]: ...
    def table(self, entry: CheckEntry) -> Table: ...
    def notes(self, entry: CheckEntry) -> list[str]: ...
    def html(self, entry: CheckEntry, figures: object, names: list[str]) -> dict[str, object]: ...


@cache
def get_kind(name: str) -> CheckKind:
    """The kind called `name`; ConfigError naming the kinds for any other."""
    from bastion.errors import ConfigError

    if name not in _MODULES:
        raise ConfigError(f"unknown check kind {name!r}; use one of {', '.join(kind_names())}")
    kind: CheckKind = importlib.import_module(_MODULES[name]).KIND
    return kind


def kind_of(check: Check | CheckEntry) -> CheckKind:
    """The kind of a check or of a report entry."""
    return get_kind(check.kind)
