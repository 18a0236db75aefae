"""Bastion as a pytest plugin: robustness checks as tests that fail the build.

Registered through the `pytest11` entry point, so it is active wherever Bastion is
installed (`-p no:bastion` turns it off). It costs nothing in sessions that do not use it:
this module imports neither torch nor Bastion's internals; the `bastion` fixture and the
`robustness` marker import them when a check actually runs.

- `bastion` fixture: `bastion.check(model, data, suite=…)` returns the Report;
  `bastion.assert_robust(model, data, attack="pgd", eps=8/255, min_accuracy=0.4)` fails the
  test with the robustness table when the model falls short. The fixture also gives the
  package's API (`bastion.zoo.demo_model()`, `bastion.load_data("digits")`, …).
- `@pytest.mark.robustness(min_accuracy=…, attack=…, eps=…, suite=…, data=…)` on a test
  that returns or yields a model runs the check on that model.
- Options (command line beats ini): `--bastion-report DIR` (`bastion_report`),
  `--bastion-device` (`bastion_device`), `--bastion-seed` (`bastion_seed`), `--bastion-fast`
  / `--bastion-full` (`bastion_fast`), `--bastion-cache DIR` (`bastion_cache`).
- pytest-xdist: each worker appends its checks to DIR/parts/<worker>.jsonl; the controller
  merges them into DIR/report.json and DIR/report.html when the session ends.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from bastion.suites.check_cache import CheckCache
    from bastion.suites.pytest_fixture import BastionFixture
    from bastion.suites.session_report import Entry

MARKER = "robustness"
_DEVICE = re.compile(r"^[a-z][a-z0-9_]*(:\d+)?$")
_MARKER_HELP = (
    "robustness(min_accuracy=None, attack='pgd', eps=8/255, suite=None, data='digits', "
    "n=None, seed=None, norm=None, params=None): run a Bastion robustness check on the model "
    "the test returns or yields, and fail the test when robust accuracy is below min_accuracy"
)


@dataclass(frozen=True)
class Settings:
    """The plugin's options after command line and ini are combined (paths absolute)."""

    report_dir: Path | None = None
    cache_dir: Path | None = None
    device: str | None = None
    seed: int = 0
    fast: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "report_dir": str(self.report_dir) if self.report_dir else None,
            "cache_dir": str(self.cache_dir) if self.cache_dir else None,
            "device": self.device,
            "seed": self.seed,
            "fast": self.fast,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Settings:
        return cls(
            report_dir=Path(raw["report_dir"]) if raw.get("report_dir") else None,
            cache_dir=Path(raw["cache_dir"]) if raw.get("cache_dir") else None,
            device=raw.get("device"),
            seed=int(raw.get("seed", 0)),
            fast=bool(raw.get("fast", False)),
        )

    @property
    def profile(self) -> str:
        return "fast" if self.fast else "full"


@dataclass
class PluginSession:
    """What the plugin knows during one pytest process: settings, cache, entries."""

    settings: Settings
    rootdir: Path
    worker: str = "main"
    is_worker: bool = False
    threads_set: bool = False
    cache: CheckCache | None = None
    pending: dict[str, list[Entry]] = field(default_factory=dict)
    outcomes: dict[str, str] = field(default_factory=dict)
    finished: list[Entry] = field(default_factory=list)
    written: dict[str, Path] = field(default_factory=dict)
    datasets: dict[str, Any] = field(default_factory=dict)  # loaded data specs

    def record(self, entry: Entry) -> Entry:
        self.pending.setdefault(entry.nodeid, []).append(entry)
        return entry

    def next_index(self, nodeid: str) -> int:
        return len(self.pending.get(nodeid, ())) + sum(e.nodeid == nodeid for e in self.finished)

    def flush(self, nodeid: str | None = None) -> None:
        """Hand the finished entries of a test (or of all tests) to the session report."""
        nodeids = [nodeid] if nodeid is not None else list(self.pending)
        done = [e for n in nodeids for e in self.pending.pop(n, [])]
        if not done:
            return
        for entry in done:
            if entry.test_outcome is None:
                entry.test_outcome = self.outcomes.get(entry.nodeid)
        if self.settings.report_dir is not None:
            from bastion.suites.session_report import append_part

            append_part(self.settings.report_dir, self.worker, done)
        for entry in done:
            entry.gallery, entry.html = [], None  # keep the counts, not the images
        self.finished += done


SESSION_KEY = pytest.StashKey[PluginSession]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bastion", "Bastion robustness checks")
    group.addoption(
        "--bastion-report",
        metavar="DIR",
        default=None,
        help="write DIR/report.json and DIR/report.html covering every robustness check of "
        "the session (ini: bastion_report)",
    )
    group.addoption(
        "--bastion-device",
        metavar="DEVICE",
        default=None,
        help="run robustness checks on DEVICE (cpu, cuda, cuda:1, mps); default: the model's "
        "device (ini: bastion_device)",
    )
    group.addoption(
        "--bastion-seed",
        metavar="N",
        default=None,
        help="seed of the attacks' randomness, e.g. PGD's random start; default 0 "
        "(ini: bastion_seed)",
    )
    group.addoption(
        "--bastion-fast",
        action="store_true",
        dest="bastion_fast",
        default=None,
        help="fast profile for pull requests: at most 64 samples, PGD 10 steps, CW-L2 2×100 "
        "(ini: bastion_fast)",
    )
    group.addoption(
        "--bastion-full",
        action="store_false",
        dest="bastion_fast",
        help="full profile, even where the ini file sets bastion_fast (nightly runs)",
    )
    group.addoption(
        "--bastion-cache",
        metavar="DIR",
        default=None,
        help="reuse the results of identical checks across sessions from DIR (ini: bastion_cache)",
    )
    parser.addini("bastion_report", "directory for the session's robustness report", default="")
    parser.addini("bastion_device", "device for robustness checks", default="")
    parser.addini("bastion_seed", "seed of the attacks' randomness", default="")
    parser.addini("bastion_fast", "use the fast profile", type="bool", default=False)
    parser.addini("bastion_cache", "directory of cached robustness checks", default="")


def _value(config: pytest.Config, name: str) -> tuple[str | None, Path]:
    """An option's value and the directory relative paths in it are relative to."""
    cli = config.getoption(name)
    if cli is not None:
        return str(cli), config.invocation_params.dir
    ini = str(config.getini(name) or "").strip()
    base = config.inipath.parent if config.inipath is not None else config.rootpath
    return (ini or None), base


def _path(config: pytest.Config, name: str) -> Path | None:
    value, base = _value(config, name)
    return (base / Path(value).expanduser()).resolve() if value else None


def read_settings(config: pytest.Config) -> Settings:
    """Combine command line and ini options; bad values are usage errors."""
    seed_text, _ = _value(config, "bastion_seed")
    try:
        seed = int(seed_text) if seed_text is not None else 0
    except ValueError:
        raise pytest.UsageError(
            f"--bastion-seed must be an integer, got {seed_text!r}; e.g. --bastion-seed 0"
        ) from None
    device, _ = _value(config, "bastion_device")
    if device is not None and not _DEVICE.match(device):
        raise pytest.UsageError(
            f"--bastion-device {device!r} is not a device name; use cpu, cuda, cuda:N or mps"
        )
    fast = config.getoption("bastion_fast")
    return Settings(
        report_dir=_path(config, "bastion_report"),
        cache_dir=_path(config, "bastion_cache"),
        device=device,
        seed=seed,
        fast=bool(config.getini("bastion_fast")) if fast is None else bool(fast),
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", _MARKER_HELP)
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and "bastion" in workerinput:
        # xdist worker: take the controller's settings, so that paths resolve alike
        settings = Settings.from_dict(workerinput["bastion"])
    else:
        settings = read_settings(config)
    worker = str(workerinput["workerid"]) if workerinput is not None else "main"
    config.stash[SESSION_KEY] = PluginSession(
        settings, config.rootpath, worker, workerinput is not None
    )
    if workerinput is None and settings.report_dir is not None:
        from bastion.suites.session_report import clear_parts

        clear_parts(settings.report_dir)  # parts of an earlier, interrupted session


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller: hand the resolved settings to each worker."""
    node.workerinput["bastion"] = node.config.stash[SESSION_KEY].settings.to_dict()


def pytest_report_header(config: pytest.Config) -> str | None:
    s = config.stash[SESSION_KEY].settings
    if s == Settings():
        return None
    parts = [f"{s.profile} profile", f"seed {s.seed}", f"device {s.device or 'model'}"]
    if s.report_dir:
        parts.append(f"report {s.report_dir}")
    if s.cache_dir:
        parts.append(f"cache {s.cache_dir}")
    return "bastion: " + ", ".join(parts)


def _marked(obj: object, collector: pytest.Collector) -> bool:
    marks = getattr(obj, "pytestmark", [])
    return any(getattr(m, "name", None) == MARKER for m in marks) or (
        collector.get_closest_marker(MARKER) is not None
    )


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> Any:
    """Collect marked tests that *yield* a model (pytest refuses generator tests)."""
    if not (inspect.isgeneratorfunction(obj) and _marked(obj, collector)):
        return None

    def stand_in(*args: Any, **kwargs: Any) -> Any:  # never called: the item calls `obj`
        return obj(*args, **kwargs)

    stand_in.__dict__.update(getattr(obj, "__dict__", {}))
    stand_in.__signature__ = inspect.signature(obj)  # type: ignore[attr-defined]
    stand_in.__name__ = name
    return collector.ihook.pytest_pycollect_makeitem(collector=collector, name=name, obj=stand_in)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = getattr(item, "fixturenames", None)
        if names is not None and "bastion" not in names and item.get_closest_marker(MARKER):
            names.append("bastion")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run a marked test, then check the model it returned or yielded."""
    marker = pyfuncitem.get_closest_marker(MARKER)
    if marker is None:
        return None
    __tracebackhide__ = True
    checker: BastionFixture = pyfuncitem.funcargs["bastion"]  # type: ignore[assignment]
    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    checker.run_marked(pyfuncitem.obj, args, marker.args, marker.kwargs)
    return True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    session = item.config.stash[SESSION_KEY]
    if report.when == "call" or (report.when == "setup" and not report.passed):
        session.outcomes[item.nodeid] = report.outcome
    elif report.when == "teardown" and item.nodeid in session.pending:
        session.flush(item.nodeid)


def pytest_assertrepr_compare(
    config: pytest.Config, op: str, left: object, right: object
) -> list[str] | None:
    # a RobustAccuracy exists only once a check ran, and then its module is loaded
    thresholds = sys.modules.get("bastion.suites.thresholds")
    return thresholds.compare_repr(op, left, right) if thresholds is not None else None


def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash[SESSION_KEY]
    state.flush()
    directory = state.settings.report_dir
    if state.is_worker or directory is None:
        return
    from bastion.suites.session_report import clear_parts, read_parts, write_session

    entries = read_parts(directory)
    state.written = write_session(directory, entries, state.settings.to_dict())
    clear_parts(directory)
    state.finished = entries


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = config.stash[SESSION_KEY]
    if not state.finished and not state.written:
        return
    n = len(state.finished)
    cached = sum(e.cached for e in state.finished)
    failed = sum(e.failed for e in state.finished)
    line = (
        f"bastion: {n} robustness check{'s' if n != 1 else ''} ({failed} failed, {cached} cached)"
    )
    if state.written:
        line += f"; report {state.written['html']} and report.json beside it"
    terminalreporter.write_line(line)


@pytest.fixture
def bastion(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> BastionFixture:
    """Robustness checks for this test, and the `bastion` package's API.

    `bastion.check(model, data="digits", suite="quick", eps=None, n=None, seed=None)` runs
    a suite (or reuses an identical earlier check) and returns its Report;
    `bastion.assert_robust(model, data, attack="pgd", eps=8/255, min_accuracy=0.4)` fails the
    test with the robustness table when robust accuracy is below `min_accuracy`.
    `bastion.zoo.demo_model()`, `bastion.load_data("digits")`, … work as on the package.
    """
    from bastion.suites.pytest_fixture import BastionFixture

    return BastionFixture(request.config.stash[SESSION_KEY], request.node.nodeid, tmp_path_factory)
