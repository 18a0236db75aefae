"""The pytest plugin: fixture, marker, readable failures, options, cache, xdist, no cost unused.

Most sessions run in-process with `pytester` (torch is already imported here); the ones
that measure imports, use xdist or run the example project run in a subprocess. Every
session shares the demo model's cache through BASTION_CACHE (set by conftest.py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bastion.suites.profiles import FAST_N, fast_suite
from bastion.suites.session_report import Entry, session_html
from bastion.suites.suite import load_suite

pytest_plugins = ["pytester"]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ci"

TINY_TOML = """\
name = "tiny"

[[check]]
id = "fgsm"
attack = "FGSM"
eps = [0.05, 0.1]

[[check]]
id = "pgd"
attack = "PGD"
eps = [0.05, 0.1]
params = { steps = 5 }
cascade = true
"""

# counts the suites actually run (not served from a cache); restores the runner afterwards
COUNTING_CONFTEST = """\
import json
from bastion.suites import runner

def pytest_configure(config):
    original = runner.run_suite
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("seed"))
        return original(*args, **kwargs)

    runner.run_suite = counting
    config._bastion_counting = (original, calls)

def pytest_unconfigure(config):
    original, calls = config._bastion_counting
    runner.run_suite = original
    with open("run_suite_calls.json", "w") as f:
        json.dump(calls, f)
"""


@pytest.fixture(scope="module", autouse=True)
def _warm(demo, digits) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Import (and run once) what the in-process sessions use, so that pytester's restore
    of sys.modules after each session never unloads half of torch. Then one thread: on
    8×8 digits a second thread buys nothing, and on a busy machine it costs a lot."""
    import torch

    import bastion.suites.html_report
    import bastion.suites.pytest_fixture  # noqa: F401
    from bastion.suites.runner import run_suite

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    report = run_suite(demo, digits, load_suite_text(TINY_TOML), n=8, gallery=2)
    bastion.suites.html_report.render_html(report.model, report.gallery)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread_in_subprocesses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def load_suite_text(text: str) -> Any:
    import tomllib

    from bastion.suites.suite import suite_from_dict

    return suite_from_dict(tomllib.loads(text), "tiny")


def session_report(path: Path) -> dict[str, Any]:
    return json.loads((path / "report.json").read_text())  # type: ignore[no-any-return]


def run_suite_calls(pytester: pytest.Pytester) -> list[Any]:
    return json.loads((pytester.path / "run_suite_calls.json").read_text())  # type: ignore[no-any-return]


# ---------------------------------------------------------------- no cost when unused


def test_importing_the_plugin_imports_neither_torch_nor_bastion_internals() -> None:
    code = (
        "import sys, bastion.suites.pytest_plugin; "
        "heavy = [m for m in ('torch', 'numpy', 'bastion.suites.runner') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_session_that_runs_no_check_does_not_import_torch(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import sys

        def pytest_sessionfinish(session):
            assert session.config.pluginmanager.has_plugin("bastion")  # active, via pytest11
            with open("modules.txt", "w") as f:
                f.write(" ".join(m for m in sys.modules if m.split(".")[0] in ("torch", "bastion")))
        """
    )
    pytester.makepyfile("def test_arithmetic():\n    assert 1 + 1 == 2\n")
    result = pytester.runpytest_subprocess("--bastion-fast", "--bastion-seed", "3")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["bastion: fast profile, seed 3*"])
    modules = (pytester.path / "modules.txt").read_text().split()
    assert "torch" not in modules
    assert "bastion.suites.pytest_fixture" not in modules


# ---------------------------------------------------------------- fixture and thresholds


def test_assert_robust_passes_and_fails_with_the_robustness_table(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        def test_small_eps_holds(bastion):
            model = bastion.zoo.demo_model()          # the package's API, through the fixture
            data = bastion.load_data("digits")
            report = bastion.assert_robust(model, data, attack="fgsm", eps=0.02,
                                           min_accuracy=0.5, n=32)
            assert report.clean_accuracy > 0.9 and not report.cached

        def test_large_eps_breaks(bastion):
            bastion.assert_robust(bastion.zoo.demo_model(), "digits", attack="pgd", eps=0.2,
                                  min_accuracy=0.9, n=32, params={"steps": 5})
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "robust accuracy 0.0" in out and "is below the required 0.9: pgd at eps 0.2" in out
    result.stdout.fnmatch_lines(
        [
            "*PGD (check 'pgd', L∞) broke it at eps 0.2: robust accuracy * < 0.9*",
            "*clean accuracy 1.000",
            "*check  attack  norm*eps  robust acc  success  attacked",
            "*pgd    PGD     L∞*0.2 *<- below 0.9",
        ]
    )
    # without --bastion-report the failing check's own report is written under basetemp
    match = re.search(r"report: (\S+report\.html) \(and report\.json beside it\)", out)
    assert match, out
    html_path = Path(match.group(1))
    assert html_path.is_file() and (html_path.parent / "report.json").is_file()


def test_a_plain_assert_on_the_report_prints_the_table(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", tiny=TINY_TOML)
    pytester.makepyfile(
        """
        import torch

        def test_plain_assert(bastion):
            report = bastion.check(bastion.zoo.demo_model(), "digits", suite="tiny.toml", n=32)
            assert report.robust_accuracy("pgd", eps=0.1) >= 0.99

        def test_probabilities_raise_a_sanity_warning(bastion):
            model = torch.nn.Sequential(bastion.zoo.demo_model(), torch.nn.Softmax(dim=1))
            bastion.check(model, "digits", suite="tiny.toml", n=16)
        """
    )
    result = pytester.runpytest("-W", "default")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*assert robust accuracy of pgd at eps 0.1: 0.* >= 0.99",
            "*PGD (check 'pgd', L∞) broke it at eps 0.05*",
            "*report: *report.html (and report.json beside it)",
        ]
    )
    result.stdout.fnmatch_lines(["*SanityFlagWarning*"])


def test_a_model_loaded_from_a_file_is_named_by_its_path(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import torch

        def test_named(bastion, tmp_path):
            from bastion.model_io import save_model

            path = tmp_path / "net.pt2"
            save_model(bastion.zoo.demo_model(), path, torch.rand(2, 1, 8, 8))
            report = bastion.assert_robust(bastion.load_model(path), "digits", attack="fgsm",
                                           eps=0.02, min_accuracy=0.5, n=8)
            assert report.data["model"]["source"] == str(path)
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)


def test_threat_models_through_check_and_marker(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", tiny=TINY_TOML.replace("eps = [0.05, 0.1]\n", "threats = true\n"))
    pytester.makepyfile(
        """
        import pytest

        def test_check_reads_a_threat_model(bastion):
            report = bastion.check(bastion.zoo.demo_model(), "digits", suite="tiny.toml",
                                   threats=["linf:0.05"], n=32)
            assert [t.threat for t in report.threat_models] == ["linf:0.05"]
            assert report.robust_accuracy("linf:0.05") >= 0.5

        @pytest.mark.robustness(suite="tiny.toml", threats=["linf:0.2"], min_accuracy=0.9, n=32)
        def test_marker_fails_below_the_threshold_at_the_threat():
            import bastion
            return bastion.zoo.demo_model()
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*below the required 0.9*linf:0.2*"])


def test_suite_criteria_fail_the_check(pytester: pytest.Pytester) -> None:
    pytester.makefile(
        ".toml",
        gate=TINY_TOML + 'criterion = "robust_accuracy >= 0.99"\ncriterion_eps = 0.1\n',
    )
    pytester.makepyfile(
        """
        def test_gate(bastion):
            bastion.check(bastion.zoo.demo_model(), "digits", suite="gate.toml", n=16)
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*suite 'tiny': pass criteria failed: check 'pgd': robust_accuracy >= 0.99 at eps 0.1",
            "*check  attack  norm*",
        ]
    )


def test_user_mistakes_fail_in_one_sentence(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        def test_bad_data(bastion):
            bastion.check(bastion.zoo.demo_model(), "nope:data")

        def test_bad_attack(bastion):
            bastion.assert_robust(bastion.zoo.demo_model(), "digits", attack="deepfool")

        @pytest.mark.robustness(min_acc=0.5)
        def test_bad_marker_option():
            import bastion
            return bastion.zoo.demo_model()

        @pytest.mark.robustness(min_accuracy=0.5)
        def test_returns_nothing():
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=4)
    result.stdout.fnmatch_lines(
        [
            '>*bastion.check(bastion.zoo.demo_model(), "nope:data")',
            "E*bastion.errors.DataError: unknown data spec 'nope:data'*",
            "E*bastion.errors.ConfigError: unknown attack 'deepfool'*",
            "*bastion: @pytest.mark.robustness takes keyword options only*got min_acc",
            "*must return or yield the model to check*",
        ],
        consecutive=False,
    )


# ---------------------------------------------------------------- the marker


def test_marker_checks_returned_and_yielded_models(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", tiny=TINY_TOML)
    pytester.makepyfile(
        """
        import bastion
        import pytest

        @pytest.mark.robustness(attack="fgsm", eps=0.02, min_accuracy=0.5, n=32)
        def test_returned():
            return bastion.zoo.demo_model()

        @pytest.mark.robustness(attack="fgsm", eps=0.02, min_accuracy=0.5, n=32)
        def test_yielded(tmp_path_factory):
            yield bastion.zoo.demo_model()
            (tmp_path_factory.getbasetemp() / "teardown-passed").write_text("ran")

        @pytest.mark.robustness(suite="tiny.toml", min_accuracy=0.99, n=32)
        def test_yielded_and_broken(tmp_path_factory):
            yield bastion.zoo.demo_model(), bastion.load_data("digits")
            (tmp_path_factory.getbasetemp() / "teardown-failed").write_text("ran")

        @pytest.mark.robustness(n=16)   # no threshold: recorded only
        def test_recorded(bastion):
            return bastion.zoo.demo_model()
        """
    )
    result = pytester.runpytest("--bastion-report=out", "--basetemp", str(pytester.path / "bt"))
    result.assert_outcomes(passed=3, failed=1)
    out = result.stdout.str()
    assert re.search(
        r"robust accuracy 0\.\d+ is below the required 0\.99: worst case over the suite", out
    )
    result.stdout.fnmatch_lines(["*worst case  (all checks)  L∞*<- below 0.99"])
    assert "traceback entries are hidden" not in out
    for name in ("teardown-passed", "teardown-failed"):  # teardown runs, failure or not
        assert (pytester.path / "bt" / name).read_text() == "ran"
    entries = {
        e["nodeid"].split("::")[1]: e for e in session_report(pytester.path / "out")["checks"]
    }
    assert entries["test_recorded"]["threshold"] is None
    assert entries["test_recorded"]["report"]["suite"]["checks"][0]["attack"] == "PGD"
    assert entries["test_yielded_and_broken"]["threshold"]["passed"] is False
    assert entries["test_returned"]["threshold"] == {
        "min_accuracy": 0.5,
        "attack": "fgsm",
        "eps": 0.02,
        "value": entries["test_returned"]["threshold"]["value"],
        "passed": True,
    }


# ---------------------------------------------------------------- options


def test_report_option_writes_one_section_per_check(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nbastion_report = from-ini\n")
    pytester.makepyfile(
        """
        def test_two_checks(bastion):
            model = bastion.zoo.demo_model()
            bastion.assert_robust(model, "digits", attack="fgsm", eps=0.02, min_accuracy=0.5, n=16)
            bastion.assert_robust(model, "digits", attack="fgsm", eps=0.05, min_accuracy=0.99, n=16)

        def test_one_check(bastion):
            bastion.assert_robust(bastion.zoo.demo_model(), "digits", attack="fgsm", eps=0.1,
                                  min_accuracy=0.1, n=16)
        """
    )
    result = pytester.runpytest("--bastion-report=out")  # the command line beats the ini
    result.assert_outcomes(passed=1, failed=1)
    assert not (pytester.path / "from-ini").exists()
    out_dir = pytester.path / "out"
    assert sorted(p.name for p in out_dir.iterdir()) == ["report.html", "report.json"]
    data = session_report(out_dir)
    assert data["summary"] == {"checks": 3, "tests": 2, "failed": 1, "cached": 0}
    keys = [(e["nodeid"], e["index"]) for e in data["checks"]]
    assert keys == [
        ("test_report_option_writes_one_section_per_check.py::test_one_check", 0),
        ("test_report_option_writes_one_section_per_check.py::test_two_checks", 0),
        ("test_report_option_writes_one_section_per_check.py::test_two_checks", 1),
    ]
    for entry in data["checks"]:
        assert entry["report"]["checks"][0]["attack"] == "FGSM"  # each a full report.json
    failing = data["checks"][2]
    assert failing["test_outcome"] == "failed" and failing["threshold"]["passed"] is False
    html = (out_dir / "report.html").read_text()
    assert html.count('<section class="session-check"') == 3
    for entry in data["checks"]:
        assert f'id="{entry["anchor"]}"' in html
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids))  # each check's page is scoped
    assert "Content-Security-Policy" in html and not re.search(r"(src|href)=\"https?:", html)
    # the failure message points into the session report
    result.stdout.fnmatch_lines([f"*report: {out_dir / 'report.html'}#{failing['anchor']}*"])
    result.stdout.fnmatch_lines(["bastion: 3 robustness checks (1 failed, 0 cached); report *"])

    # and without the option, the ini value is used
    result = pytester.runpytest("-k", "one_check")
    assert session_report(pytester.path / "from-ini")["summary"]["checks"] == 1


def test_seed_option_sets_pgd_random_start_and_is_recorded(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nbastion_seed = 3\n")
    pytester.makepyfile(
        """
        from bastion.suites.suite import Check, Suite

        ONE_STEP = Suite("one-step", (Check("pgd", "PGD", (0.1,), params={"steps": 1}),))

        def test_pgd(bastion):
            bastion.check(bastion.zoo.demo_model(), "digits", ONE_STEP, n=32)
        """
    )
    pytester.runpytest("--bastion-report=ini").assert_outcomes(passed=1)
    pytester.runpytest("--bastion-report=cli", "--bastion-seed", "7").assert_outcomes(passed=1)
    ini, cli = (session_report(pytester.path / d)["checks"][0]["report"] for d in ("ini", "cli"))
    assert (ini["seed"], cli["seed"]) == (3, 7)
    # a different random start lands on different adversarial points
    assert ini["checks"][0]["results"][0]["mean_l2"] != cli["checks"][0]["results"][0]["mean_l2"]
    result = pytester.runpytest("--bastion-seed", "x")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--bastion-seed must be an integer, got 'x'*"])


def test_device_option(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import torch

        def test_on_device(bastion):
            bastion.assert_robust(bastion.zoo.demo_model(), "digits", attack="fgsm",
                                  eps=0.02, min_accuracy=0.5, n=16)
        """
    )
    pytester.runpytest("--bastion-device", "cpu", "--bastion-report=out").assert_outcomes(passed=1)
    entry = session_report(pytester.path / "out")["checks"][0]
    assert entry["report"]["environment"]["device"] == "cpu"
    result = pytester.runpytest("--bastion-device", "a gpu please")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    import torch

    if not torch.cuda.is_available():
        result = pytester.runpytest("--bastion-device", "cuda")
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(["*device 'cuda' asked for but CUDA is not available*"])


def test_fast_profile_caps_samples_and_iterations() -> None:
    quick = fast_suite(load_suite("quick"))
    params = {c.id: c.params for c in quick.checks}
    assert params["pgd"]["steps"] == 10
    assert (params["cw"]["binary_search_steps"], params["cw"]["max_iterations"]) == (2, 100)
    assert all(c.n is not None and c.n <= FAST_N for c in quick.checks)
    assert [c.eps for c in quick.checks] == [c.eps for c in load_suite("quick").checks]


def test_fast_option_really_runs_the_fast_profile(pytester: pytest.Pytester) -> None:
    pytester.makefile(
        ".toml",
        heavy="""\
name = "heavy"

[[check]]
id = "pgd"
attack = "PGD"
eps = [0.05]
params = { steps = 40 }

[[check]]
id = "cw"
attack = "CarliniWagnerL2"
norm = "l2"
eps = [1.0]
n = 4
""",
    )
    pytester.makeini("[pytest]\nbastion_fast = true\n")
    pytester.makepyfile(
        """
        from bastion.suites.suite import Check, Suite

        def test_heavy(bastion):
            bastion.check(bastion.zoo.demo_model(), "digits", "heavy.toml")

        def test_fgsm_all(bastion):
            bastion.check(bastion.zoo.demo_model(), "digits",
                          Suite("f", (Check("fgsm", "FGSM", (0.05,)),)))
        """
    )
    pytester.runpytest("--bastion-report=fast").assert_outcomes(passed=2)
    fast = {
        e["nodeid"].split("::")[1]: e["report"]
        for e in session_report(pytester.path / "fast")["checks"]
    }
    heavy = fast["test_heavy"]
    assert heavy["profile"] == "fast" and heavy["data"]["n"] == FAST_N
    checks = {c["id"]: c for c in heavy["checks"]}
    assert checks["pgd"]["params"]["steps"] == 10 and checks["pgd"]["n"] == FAST_N
    assert checks["cw"]["params"] == {"binary_search_steps": 2, "max_iterations": 100}
    assert checks["cw"]["n"] == 4
    # the PGD check ran 10 steps per point: one gradient per step, at most
    assert checks["pgd"]["backward"] <= 10 * checks["pgd"]["results"][0]["attacked"]
    assert fast["test_fgsm_all"]["data"]["n"] == FAST_N

    pytester.runpytest("--bastion-full", "--bastion-report=full", "-k", "fgsm_all").assert_outcomes(
        passed=1
    )
    full = session_report(pytester.path / "full")["checks"][0]["report"]
    assert full["profile"] == "full" and full["data"]["n"] == 450


# ---------------------------------------------------------------- cache


def test_identical_checks_are_not_recomputed_in_a_session(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(COUNTING_CONFTEST)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("k", [1, 2])
        def test_same_check(bastion, k):
            report = bastion.assert_robust(bastion.zoo.demo_model(), "digits", attack="fgsm",
                                           eps=0.05, min_accuracy=0.3, n=32)
            assert report.cached == (k == 2)

        def test_other_eps(bastion):
            bastion.assert_robust(bastion.zoo.demo_model(), "digits", attack="fgsm",
                                  eps=0.1, min_accuracy=0.1, n=32)
        """
    )
    pytester.runpytest("--bastion-report=out").assert_outcomes(passed=3)
    assert len(run_suite_calls(pytester)) == 2
    entries = session_report(pytester.path / "out")["checks"]
    assert [(e["cached"], e["cache_source"]) for e in entries] == [
        (False, None),
        (False, None),
        (True, "session"),
    ]
    assert entries[1]["key"] == entries[2]["key"]


def test_cache_directory_is_reused_across_sessions(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(COUNTING_CONFTEST)
    pytester.makepyfile(
        """
        def test_check(bastion):
            bastion.assert_robust(bastion.zoo.demo_model(), "digits", attack="pgd", eps=0.05,
                                  min_accuracy=0.3, n=32, params={"steps": 5})
        """
    )
    pytester.makeini("[pytest]\nbastion_cache = .bastion-cache\n")
    pytester.runpytest("--bastion-report=first").assert_outcomes(passed=1)
    assert len(run_suite_calls(pytester)) == 1
    assert len(list((pytester.path / ".bastion-cache").glob("*.json"))) == 1

    pytester.runpytest("--bastion-report=second").assert_outcomes(passed=1)
    assert run_suite_calls(pytester) == []
    first, second = (session_report(pytester.path / d)["checks"][0] for d in ("first", "second"))
    assert (second["cached"], second["cache_source"]) == (True, "directory")
    assert second["report"]["checks"] == first["report"]["checks"]

    pytester.runpytest("--bastion-seed", "5").assert_outcomes(passed=1)  # changed: recomputed
    assert run_suite_calls(pytester) == [5]
    assert len(list((pytester.path / ".bastion-cache").glob("*.json"))) == 2


# ---------------------------------------------------------------- xdist


def test_xdist_workers_reports_are_merged(pytester: pytest.Pytester) -> None:
    for name, eps in (("test_first", 0.02), ("test_second", 0.05)):
        pytester.makepyfile(
            **{
                name: f"""
                def test_check(bastion):
                    bastion.assert_robust(bastion.zoo.demo_model(), "digits", attack="fgsm",
                                          eps={eps}, min_accuracy=0.3, n=16)
                """
            }
        )
    result = pytester.runpytest_subprocess("-p", "xdist", "-n", "2", "--bastion-report=out")
    result.assert_outcomes(passed=2)
    out_dir = pytester.path / "out"
    assert not (out_dir / "parts").exists()
    data = session_report(out_dir)
    assert [e["nodeid"] for e in data["checks"]] == [
        "test_first.py::test_check",
        "test_second.py::test_check",
    ]
    assert {e["worker"] for e in data["checks"]} <= {"gw0", "gw1"}
    assert [e["report"]["checks"][0]["results"][0]["eps"] for e in data["checks"]] == [0.02, 0.05]
    assert (out_dir / "report.html").read_text().count('<section class="session-check"') == 2
    result.stdout.fnmatch_lines(["bastion: 2 robustness checks (0 failed, 0 cached); report *"])


# ---------------------------------------------------------------- the example project


def test_the_ci_example_project_passes(pytester: pytest.Pytester) -> None:
    for path in EXAMPLE.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            target = pytester.path / path.relative_to(EXAMPLE)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    assert (pytester.path / ".github" / "workflows" / "robustness.yml").is_file()
    result = pytester.runpytest_subprocess()  # options from the example's pyproject.toml
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["bastion: fast profile, seed 0, device cpu, report *"])
    data = session_report(pytester.path / "bastion-report")
    assert data["summary"]["checks"] == 3 and data["summary"]["failed"] == 0
    assert {e["report"]["profile"] for e in data["checks"]} == {"fast"}
    assert list((pytester.path / ".bastion-cache").glob("*.json"))


# ---------------------------------------------------------------- session report unit


def test_session_page_scopes_each_check_page(demo, digits) -> None:  # type: ignore[no-untyped-def]
    from bastion.suites.html_report import render_html
    from bastion.suites.runner import run_suite

    report = run_suite(demo, digits, load_suite_text(TINY_TOML), n=8, gallery=2)
    entries = [
        Entry(nodeid=f"t.py::test_{i}", index=0, kind="suite", report=report.model)
        for i in range(2)
    ]
    for entry in entries:
        entry.html = render_html(report.model, report.gallery)
    page = session_html({"summary": {"checks": 2}, "options": {}}, entries)
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids)) and "check-t.py-test_1-0-summary" in ids
    for link in re.findall(r'href="#([^"]+)"', page):
        assert link in ids
    assert page.count("<html") == 1 and page.count("<body") == 1
