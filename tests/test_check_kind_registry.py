"""Check kinds are plug-ins: a kind registered in `suites/kinds.py` loads from a suite
file, runs through the public RunContext (resumably), lands in the typed report and in
every writer, with no other file of the harness changed."""

from __future__ import annotations

import io
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from bastion.errors import ConfigError
from bastion.suites import kinds
from bastion.suites.gallery import GalleryItem, png_bytes
from bastion.suites.json_codec import JsonObject
from bastion.suites.kinds import Column, Table
from bastion.suites.report_builder import check_entry
from bastion.suites.report_model import CheckEntry, ReportData
from bastion.suites.results_log import Item, item_key
from bastion.suites.run_context import RunContext, RunState
from bastion.suites.runner import run_suite
from bastion.suites.suite import Check, suite_from_dict, unknown_params


class ConfidentKind:
    """A toy kind: the fraction of the first n images classified with at least
    `threshold` confidence (from the run's clean pass), one item per check."""

    name = "confident"
    robustness = False
    metrics = ("robust_accuracy",)
    threat_twins = False
    sees_defense = True
    calls = 0

    def attack_name(self, raw: JsonObject, where: str) -> str:
        return "Confidence"

    def default_norm(self, attack: str) -> str:
        return ""

    def bounded(self, check: Check) -> bool:
        return False

    def validate(self, check: Check) -> None:
        unknown_params(check, ("threshold",))

    def run(self, ctx: RunContext, check: Check) -> None:
        key = item_key(self.name, check.id, None, 0)
        if ctx.log.get(key) is None:
            ConfidentKind.calls += 1
            n = min(check.n or len(ctx.data), len(ctx.data))
            conf = ctx.state.conf[:n]
            sure = int((conf >= float(check.params.get("threshold", 0.9))).sum())
            ctx.log.put(key, {"kind": self.name, "check": check.id, "eps": None, "sure": sure,
                              "n": n, "seconds": 0.0, "forward": 0, "backward": 0})  # fmt: skip

    def summarise(self, check: Check, state: RunState, items: list[Item], total: int) -> CheckEntry:
        rec = next(r for r in items if r.get("kind") == self.name and r["check"] == check.id)
        return check_entry(check, n=rec["n"], params={**check.params, "sure": rec["sure"]})

    def gallery(self, ctx: RunContext, check: Check) -> list[GalleryItem]:
        return []

    def table(self, entry: CheckEntry) -> Table:
        return Table(f"{entry.id}: confident", (Column("sure", "sure", "d"),),
                     [{"sure": entry.params["sure"]}])  # fmt: skip

    def notes(self, entry: CheckEntry) -> list[str]:
        return [f"{entry.id}: {entry.params['sure']} of {entry.n} images classified confidently"]

    def html(self, entry: CheckEntry, figures: object, names: list[str]) -> dict[str, object]:
        return {}


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    module = types.ModuleType("toy_confident_kind")
    module.KIND = ConfidentKind()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "toy_confident_kind", module)
    monkeypatch.setitem(kinds._MODULES, "confident", "toy_confident_kind")
    kinds.get_kind.cache_clear()
    yield
    kinds.get_kind.cache_clear()


SUITE = {"check": [{"id": "sure", "kind": "confident", "n": 20, "params": {"threshold": 0.99}}]}


def test_a_registered_kind_runs_resumes_and_reaches_every_writer(
    registered: None, demo: torch.nn.Module, digits: object, tmp_path: Path
) -> None:
    suite = suite_from_dict(SUITE, "toy")
    ConfidentKind.calls = 0
    report = run_suite(demo, digits, suite, n=20, out=tmp_path, junit=tmp_path / "j.xml")  # type: ignore[arg-type]
    with torch.no_grad():
        conf = demo(digits.x[:20]).double().softmax(1).amax(1)  # type: ignore[attr-defined]
    (entry,) = report.model.checks
    assert entry.kind == "confident" and entry.params["sure"] == int((conf >= 0.99).sum())
    stored = ReportData.from_json((tmp_path / "report.json").read_text())
    assert stored.checks[0].params["sure"] == entry.params["sure"]
    assert "sure" in (tmp_path / "report.html").read_text()
    assert 'name="sure"' in (tmp_path / "j.xml").read_text()
    buf = io.StringIO()
    from bastion.suites.terminal import print_summary

    print_summary(report.model, Console(file=buf, width=200))
    assert f"{entry.params['sure']} of 20 images classified confidently" in buf.getvalue()
    again = run_suite(demo, digits, suite, n=20, out=tmp_path, resume=True)  # type: ignore[arg-type]
    assert ConfidentKind.calls == 1  # the finished item was read back, not recomputed
    assert again.model.checks[0].params == entry.params
    assert json.loads(again.to_json())["robust_accuracy"] == report.model.robust_accuracy


def test_unregistered_kinds_and_bad_parameters_are_refused(registered: None) -> None:
    with pytest.raises(ConfigError, match="unknown kind 'confidnt'.*confident"):
        suite_from_dict({"check": [{"id": "x", "kind": "confidnt"}]}, "toy")
    with pytest.raises(ConfigError, match="unknown confident parameter"):
        suite_from_dict({"check": [{"id": "x", "kind": "confident", "params": {"t": 1}}]}, "t")


def test_the_one_png_encoder_writes_the_pixels_in_either_layout() -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (5, 7, 3)) / 255
    for data in (png_bytes(hwc), png_bytes(hwc.transpose(2, 0, 1), channels_first=True)):
        picture = np.asarray(Image.open(io.BytesIO(data)))
        assert picture.shape == (5, 7, 3)
        assert np.array_equal(picture, np.rint(hwc * 255).astype(np.uint8))
    grey = np.asarray(
        Image.open(io.BytesIO(png_bytes(np.full((1, 2, 2), 1.5), channels_first=True)))
    )
    assert grey.shape == (2, 2) and (grey == 255).all()  # one channel: grey, clipped to 1
