"""The HTML report: self-contained, escaped, drawn from the typed report model (null
figures render as a dash; damaged report.json files are refused when read), and clean in a
browser."""

from __future__ import annotations

import base64
import copy
import io
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from bastion.errors import ConfigError
from bastion.suites.browser import find_chromium, screenshot_html
from bastion.suites.gallery import GalleryItem, amplified_difference, png_data_uri
from bastion.suites.html_report import render_html, write_html
from bastion.suites.report_model import (
    AttackResult,
    CheckEntry,
    DataInfo,
    Environment,
    Flag,
    NormPoint,
    Passes,
    ReportData,
    Timings,
)

# ---------------------------------------------------------------- fixtures


def make_report() -> ReportData:
    """A report as the runner builds it: two L∞ attacks, one L2 attack, one flag."""
    linf_eps = [2 / 255, 4 / 255, 8 / 255, 16 / 255]

    def rows(accs: list[float], eps: list[float], backward: int) -> list[AttackResult]:
        return [
            AttackResult(
                eps=e,
                robust_accuracy=a,
                success_rate=round(1 - a / 0.97, 4),
                attacked=194,
                mean_l2=None if a >= 0.97 else round(e * 6.1, 4),
                mean_linf=None if a >= 0.97 else e,
                median_l2=None if a >= 0.97 else round(e * 5.8, 4),
                seconds=0.21 + e,
                forward=194 * (backward + 1),
                backward=194 * backward,
            )
            for e, a in zip(eps, accs, strict=True)
        ]

    def check(ident: str, attack: str, norm: str, eps: list[float], **rest: object) -> CheckEntry:
        entry = CheckEntry(
            id=ident, kind="attack", attack=attack, norm=norm, eps=eps, params={}, n=200,
            cascade=False, criterion=None,
        )  # fmt: skip
        for k, v in rest.items():
            setattr(entry, k, v)
        return entry

    return ReportData(
        bastion_version="0.1.0",
        created="2026-11-21T06:40:00Z",
        environment=Environment(
            python="3.11.7",
            torch="2.13.0",
            bastion="0.1.0",
            platform="Linux-6.1.0-x86_64-with-glibc2.36",
            device="cpu",
            threads=2,
            cpu_count=2,
            cuda=None,
        ),  # fmt: skip
        model={
            "source": "demo",
            "format": "torchscript",
            "sha256": "ab12cd34ef56ab12cd34ef56ab12cd34ef56ab12cd34ef56ab12cd34ef56ab12",
            "num_classes": 10,
            "input_shape": [1, 8, 8],
        },
        data=DataInfo("digits", "test", 200, [str(i) for i in range(10)], [1, 8, 8]),
        suite={"name": "quick"},
        seed=0,
        normalization=None,
        clean_accuracy=0.97,
        threat_models=[],
        robust_accuracy=0.035,
        robust_accuracy_n=200,
        robust_accuracy_by_norm={
            "linf": [
                NormPoint(e, 200, a)
                for e, a in zip(linf_eps, [0.81, 0.55, 0.16, 0.035], strict=True)
            ],
            "l2": [NormPoint(e, 200, a) for e, a in [(0.25, 0.74), (0.5, 0.43), (1.0, 0.09)]],
        },
        checks=[
            check(
                "fgsm",
                "FGSM",
                "linf",
                linf_eps,
                params={"eps": linf_eps},
                results=rows([0.86, 0.68, 0.37, 0.12], linf_eps, 1),
                seconds=0.9,
            ),
            check(
                "pgd",
                "PGD",
                "linf",
                linf_eps,
                cascade=True,
                params={"eps": linf_eps, "steps": 40, "rel_stepsize": 0.0333, "random_start": True},
                results=rows([0.81, 0.55, 0.16, 0.035], linf_eps, 40),
                criterion="robust_accuracy >= 0.4",
                passed=False,
                seconds=7.4,
            ),
            check(
                "cw-l2",
                "CarliniWagnerL2",
                "l2",
                [0.25, 0.5, 1.0],
                params={"steps": 100, "binary_search_steps": 5},
                results=rows([0.74, 0.43, 0.09], [0.25, 0.5, 1.0], 500),
                seconds=3.1,
            ),
        ],  # fmt: skip
        flags=[
            Flag(
                "probability_outputs",
                "warning",
                "The model's outputs sum to 1 on every sample: they look like "
                "probabilities, not logits, which can mask gradients.",
            )
        ],
        sanity={},
        timings=Timings(total_seconds=12.3, clean_seconds=0.1, attack_seconds=11.4),
        passes=Passes(forward=123456, backward=98765),
        passed=False,
    )


def _glyph(kind: str) -> np.ndarray:
    """A small digit-like 8×8 grey image (drawn at 32×32, then box-filtered like sklearn's)."""
    canvas = Image.new("L", (32, 32), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "0":
        draw.ellipse((7, 3, 25, 29), outline=255, width=5)
    else:
        draw.line((18, 3, 18, 29), fill=255, width=6)
        draw.line((11, 10, 18, 3), fill=255, width=5)
    return (
        np.asarray(canvas.resize((8, 8), Image.Resampling.BOX), dtype=np.float64)[:, :, None] / 255
    )


def _scene() -> np.ndarray:
    """A 32×32 colour image: a sky-to-grass gradient with a red disc."""
    yy, xx = np.mgrid[0:32, 0:32] / 31
    image = np.stack([0.35 + 0.2 * yy, 0.6 + 0.1 * xx, 0.95 - 0.7 * yy], axis=-1)
    disc = (yy - 0.45) ** 2 + (xx - 0.5) ** 2 < 0.06
    image[disc] = (0.85, 0.2, 0.15)
    return image


def make_gallery(seed: int = 0) -> list[GalleryItem]:
    """Two 8×8 grey digits (L∞ sign perturbations) and one 32×32 colour image (L2)."""
    rng = np.random.default_rng(seed)
    cases = [
        (_glyph("0"), "fgsm", "FGSM", 8 / 255, "0", "8"),
        (_glyph("1"), "pgd", "PGD", 16 / 255, "1", "7"),
        (_scene(), "cw-l2", "CarliniWagnerL2", 0.5, "ship", "<frog & toad>"),
    ]
    items = []
    for i, (clean, check, attack, eps, label, adv_pred) in enumerate(cases):
        if check == "cw-l2":
            delta = rng.normal(0, 1, clean.shape) * (np.abs(clean - clean.mean()) + 0.05)
            delta *= eps / np.linalg.norm(delta)
        else:
            delta = eps * rng.choice([-1.0, 1.0], clean.shape)
        adv = np.clip(clean + delta, 0, 1)
        items.append(
            GalleryItem(
                check=check,
                attack=attack,
                eps=eps,
                index=17 * i + 3,
                label=label,
                clean_pred=label,
                clean_conf=0.97 - 0.05 * i,
                adv_pred=adv_pred,
                adv_conf=0.64 + 0.1 * i,
                l2=float(np.linalg.norm(adv - clean)),
                linf=float(np.abs(adv - clean).max()),
                clean=clean,
                adv=adv,
            )
        )
    return items


class PageParser(HTMLParser):
    """Collects the tags the tests look at: gallery items, their images, scripts, SVG charts."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.gallery_depth: int | None = None
        self.items: list[dict] = []
        self.scripts = 0
        self.charts: list[dict] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        if tag == "script":
            self.scripts += 1
        if tag == "svg" and "chart" in classes:
            self.charts.append(a)
        for key in ("src", "href"):
            if key in a:
                self.urls.append(a[key])
        if "gallery" in classes and self.gallery_depth is None:
            self.gallery_depth = len(self.stack)
        if "gallery-item" in classes:
            assert self.gallery_depth is not None, "a gallery item outside the .gallery element"
            self.items.append({"attrs": a, "images": []})
        if tag == "img" and self.items and self.gallery_depth is not None:
            self.items[-1]["images"].append(a)
        if tag not in ("img", "meta", "br", "link", "input", "hr"):
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.stack:
            while self.stack.pop() != tag:
                pass
        if self.gallery_depth is not None and len(self.stack) <= self.gallery_depth:
            self.gallery_depth = None


def parse(html: str) -> PageParser:
    parser = PageParser()
    parser.feed(html)
    parser.close()
    return parser


def decode_png(uri: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(uri[len(prefix) :], validate=True)))
    image.load()
    assert image.format == "PNG"
    return image


# ---------------------------------------------------------------- the page


def test_gallery_has_one_item_per_sample_with_three_decodable_images():
    gallery = make_gallery()
    page = parse(render_html(make_report(), gallery))
    assert len(page.items) == len(gallery)
    for item, parsed in zip(gallery, page.items, strict=True):
        assert parsed["attrs"]["data-check"] == item.check
        assert float(parsed["attrs"]["data-eps"]) == item.eps
        images = parsed["images"]
        assert [img["class"] for img in images] == ["clean", "adversarial", "difference"]
        expected = {8: (112, 112), 32: (96, 96)}[item.clean.shape[0]]
        for img in images:
            assert img["alt"]
            picture = decode_png(img["src"])
            assert picture.size == expected
            assert (int(img["width"]), int(img["height"])) == expected
            assert picture.mode == ("L" if item.clean.shape[2] == 1 else "RGB")


def test_upscaling_is_nearest_neighbour_and_round_trips_pixels():
    image = np.random.default_rng(1).integers(0, 256, (8, 8, 3)) / 255
    picture = np.asarray(decode_png(png_data_uri(image, scale=3)))
    assert picture.shape == (24, 24, 3)
    assert np.array_equal(picture[::3, ::3], np.rint(image * 255).astype(np.uint8))
    assert np.array_equal(picture[2::3, 2::3], picture[::3, ::3])
    assert decode_png(png_data_uri(np.zeros((224, 224, 1)))).size == (224, 224)


def test_report_text_is_escaped():
    report = make_report()
    evil = "<script>alert(1)</script>"
    report.data.classes[3] = evil
    report.model["source"] = f'/models/"{evil}.pt'
    report.checks[0].id = evil
    report.flags[0].message = evil
    gallery = make_gallery()
    gallery[0].label = gallery[0].adv_pred = evil
    gallery[0].check = evil
    html = render_html(report, gallery)
    page = parse(html)
    assert page.scripts == 0
    assert "<script>" not in html
    assert "&lt;script&gt;" in html
    assert page.items[0]["attrs"]["data-check"] == evil  # the parser unescapes it back


def test_one_chart_per_norm_with_every_check_and_the_worst_case():
    html = render_html(make_report(), [])
    page = parse(html)
    assert [c["data-norm"] for c in page.charts] == ["linf", "l2"]
    linf_svg = html[html.index('data-norm="linf"') : html.index('data-norm="l2"')]
    assert linf_svg.count("<polyline") == 3  # fgsm, pgd, worst case
    assert "worst case" in linf_svg and "fgsm" in linf_svg and "pgd" in linf_svg
    assert linf_svg.count("<circle") >= 8  # 4 markers per check, plus legend swatches


def test_chart_handles_a_single_eps_and_eps_zero():
    report = make_report()
    report.checks = [report.checks[0]]
    first = report.checks[0].results[0]
    report.checks[0].results = [replace(first, eps=0.0, robust_accuracy=0.97)]
    report.robust_accuracy_by_norm = {"linf": [NormPoint(0.0, 200, 0.97)]}
    page = parse(render_html(report, []))
    assert len(page.charts) == 1
    report.checks[0].results = [replace(first, eps=0.03, robust_accuracy=0.5)]
    assert "nan" not in render_html(report, []).lower()


def test_page_is_self_contained():
    html = render_html(make_report(), make_gallery())
    page = parse(html)
    assert page.urls and all(u.startswith(("data:", "#")) for u in page.urls)
    assert "@import" not in html and "url(" not in html
    assert "Content-Security-Policy" in html


def _nulls(r: ReportData) -> None:
    """Every figure a check may lack is null (no success, a check without timing)."""
    for row in r.checks[2].results:
        row.success_rate = row.mean_l2 = row.median_l2 = row.mean_linf = None
        row.seconds = row.forward = row.backward = None


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r.checks.clear(),
        lambda r: setattr(r, "model", {}),
        lambda r: r.flags.clear(),
        lambda r: setattr(r, "robust_accuracy_by_norm", {}),
        lambda r: setattr(r.checks[1], "norm", None),
        _nulls,
        lambda r: setattr(r, "model", {"input_shape": None}),
    ],
)
def test_empty_and_null_parts_render(mutate):
    report = make_report()
    mutate(report)
    html = render_html(report, make_gallery())
    assert html.startswith("<!doctype html>")
    assert len(parse(html).items) == 3


def test_report_json_round_trips_and_damaged_files_are_refused():
    report = make_report()
    back = ReportData.from_json(report.to_json())
    assert back == report
    assert render_html(back, []) == render_html(report, [])
    raw = report.to_dict()
    assert raw["schema_version"] == 2 and raw["checks"][1]["results"][0]["robust_accuracy"] == 0.81
    with pytest.raises(ConfigError, match="schema version 1"):
        ReportData.from_dict({k: v for k, v in raw.items() if k != "schema_version"})
    with pytest.raises(ConfigError, match="unknown key"):
        ReportData.from_dict({**raw, "checks": [{**raw["checks"][0], "colour": 1}]})
    with pytest.raises(ConfigError, match="should be a JSON array"):
        ReportData.from_dict({**raw, "flags": "none"})
    with pytest.raises(ConfigError, match="not JSON"):
        ReportData.from_json("{")


def test_report_without_worst_case_draws_the_checks_alone():
    report = make_report()
    report.robust_accuracy_by_norm = {}
    html = render_html(report, [])
    charts = html[html.index('<svg class="chart"') : html.index('id="checks"')]
    assert "fgsm" in charts and "worst case" not in charts


def test_flags_are_shown_with_their_severity():
    html = render_html(make_report(), [])
    assert 'class="flag warning"' in html
    assert "probability_outputs" in html


def test_amplified_difference_of_identical_images_is_uniform_grey():
    image = np.random.default_rng(2).random((8, 8, 1))
    diff = amplified_difference(image, image.copy())
    assert diff.shape == image.shape
    assert np.all(diff == 0.5)


def test_amplified_difference_stretches_the_perturbation_to_the_full_range():
    clean = np.full((4, 4, 3), 0.5)
    adv = clean.copy()
    adv[0, 0, 0] += 0.02  # the largest increase becomes white
    adv[1, 1, 2] -= 0.02  # the largest decrease becomes black
    adv[2, 2, 1] += 0.01
    diff = amplified_difference(clean, adv)
    assert diff[0, 0, 0] == pytest.approx(1.0)
    assert diff[1, 1, 2] == pytest.approx(0.0)
    assert diff[2, 2, 1] == pytest.approx(0.75)
    assert diff.max() == pytest.approx(1.0) and diff.min() == pytest.approx(0.0)
    assert np.count_nonzero(diff != 0.5) == 3
    with pytest.raises(ValueError):
        amplified_difference(clean, adv[:2])


def test_rendering_does_not_modify_the_report_or_images():
    report, gallery = make_report(), make_gallery()
    before = copy.deepcopy(report), [item.adv.copy() for item in gallery]
    render_html(report, gallery)
    assert report == before[0]
    assert all(np.array_equal(a, item.adv) for a, item in zip(before[1], gallery, strict=True))


# ---------------------------------------------------------------- writing


def test_write_html_replaces_atomically_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "report.html"
    target.write_text("old report")
    (tmp_path / "results.jsonl").write_text("{}\n")
    write_html(make_report(), make_gallery(), target)
    assert target.read_text(encoding="utf-8").startswith("<!doctype html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "results.jsonl"]
    write_html(replace(make_report(), checks=[], model={"source": "new"}), [], target)
    assert "old report" not in target.read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "results.jsonl"]


def test_write_html_keeps_the_old_file_when_rendering_fails(tmp_path):
    target = tmp_path / "report.html"
    target.write_text("old report")
    broken = make_gallery()
    broken[0].adv = broken[0].adv[:2]  # a shape mismatch fails while rendering
    with pytest.raises(ValueError):
        write_html(make_report(), broken, target)
    assert target.read_text() == "old report"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


# ---------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("headless Chromium not found on PATH (Debian: apt-get install -y chromium)")
    return path


def _assert_not_blank(png: Path, size: tuple[int, int]) -> None:
    assert png.stat().st_size > 10_000
    with Image.open(png) as image:
        assert image.size == size
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 16, "the screenshot is (nearly) a single colour"


@pytest.mark.browser
def test_report_renders_in_chromium_without_console_errors(chromium, tmp_path):
    html_path = tmp_path / "report.html"
    write_html(make_report(), make_gallery(), html_path)
    png = tmp_path / "report.png"
    errors = screenshot_html(html_path, png, chromium)
    assert errors == []
    _assert_not_blank(png, (1280, 1600))


@pytest.mark.browser
def test_console_error_detection_catches_a_script_error(chromium, tmp_path):
    # Proves the check above can fail: the same page with a broken script is caught, whether
    # the script runs (before the Content-Security-Policy) or is refused (after it).
    html = render_html(make_report(), [])
    broken = html.replace("<head>", "<head><script>undefinedFunction()</script>", 1)
    broken = broken.replace("</body>", "<script>console.log('late')</script></body>", 1)
    html_path = tmp_path / "broken.html"
    html_path.write_text(broken, encoding="utf-8")
    errors = screenshot_html(html_path, tmp_path / "broken.png", chromium)
    assert any("undefinedFunction" in line for line in errors), errors
    assert any("Content Security Policy" in line for line in errors), errors


def test_eps_labels_show_k_over_255_only_where_the_decimal_is_not_short() -> None:
    from bastion.suites.formatting import fmt_eps

    assert fmt_eps(0.2) == "0.2" and fmt_eps(0.1) == "0.1" and fmt_eps(0.5) == "0.5"
    assert fmt_eps(8 / 255) == "0.03137 (8/255)" and fmt_eps(2 / 255) == "0.007843 (2/255)"
