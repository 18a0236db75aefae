"""The `bastion` fixture's object: robustness checks for one test, and the package's API.

`check` runs a suite on a model and data (or reuses an identical check: same model
fingerprint, data, suite, eps, seed, device) and records it in the session report;
`assert_robust` is a one-check suite held to `min_accuracy`; `run_marked` serves the
`robustness` marker. Every check is a kind (`suite` today) that goes through the same
steps — key, cache, run, record, require — so verification and detector checks can plug
in as further kinds with their own key, runner and page renderer (see session_report).
Attribute access falls through to the `bastion` package, so that inside a test taking the
fixture, `bastion.zoo.demo_model()` and `bastion.load_data("digits")` work as usual.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import pytest
import torch

import bastion as package
from bastion.data import Dataset, load_data
from bastion.errors import BastionError, ConfigError
from bastion.model_io import model_source
from bastion.suites import runner
from bastion.suites.check_cache import CheckCache, check_key, key_digest, model_fingerprint
from bastion.suites.check_report import CheckReport, surface
from bastion.suites.json_codec import JsonObject
from bastion.suites.profiles import fast_n, fast_suite
from bastion.suites.pytest_plugin import PluginSession
from bastion.suites.session_report import Entry
from bastion.suites.suite import BUILTIN, Suite, load_suite
from bastion.suites.suite import one_check_suite as one_check
from bastion.suites.thresholds import RobustnessFailure, SanityFlagWarning, robustness_table

DataLike = str | Dataset | tuple[torch.Tensor, torch.Tensor]
EpsLike = float | Sequence[float]
MARKER_OPTIONS = (
    "suite", "min_accuracy", "eps", "attack", "data", "n", "seed", "norm", "params", "threats",
)  # fmt: skip


def _fail(message: str) -> NoReturn:
    """Fail the test with `message` alone: no traceback through the plugin, no chain.
    (This frame stays visible: were every frame hidden, pytest would add a note saying so.)"""
    raise pytest.fail.Exception(message, pytrace=False) from None


def one_check_suite(
    attack: str, eps: float, norm: str | None = None, params: Mapping[str, Any] | None = None
) -> Suite:
    """A suite of one check: `attack` at `eps` (its first norm unless given)."""
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise ConfigError(f"eps must be one number for a single-attack check, got {eps!r}")
    return one_check(
        attack, (float(eps),), norm=norm, params=dict(params or {}),
        name=f"assert-{attack.lower()}",
    )  # fmt: skip


class BastionFixture:
    """Robustness checks for one test (see the module docstring)."""

    def __init__(
        self, session: PluginSession, nodeid: str, tmp_path_factory: pytest.TempPathFactory
    ) -> None:
        self._session = session
        self._nodeid = nodeid
        self._tmp = tmp_path_factory

    def __getattr__(self, name: str) -> Any:
        return getattr(package, name)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(package.__all__))

    def __repr__(self) -> str:
        s = self._session.settings
        return f"<bastion fixture for {self._nodeid} ({s.profile} profile, seed {s.seed})>"

    # ------------------------------------------------------------------ public

    def check(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        data: DataLike = "digits",
        suite: str | Path | Suite = "quick",
        *,
        eps: EpsLike | None = None,
        threats: Sequence[str] | None = None,
        n: int | None = None,
        seed: int | None = None,
        device: str | None = None,
        batch_size: int = 128,
    ) -> CheckReport:
        """Run `suite` on `model` and `data` (a spec such as "digits", a Dataset, or `(x, y)`)
        and return its Report. `threats` (`["linf:8/255"]`) are the threat models the report
        is about (default: the data set's; `report.robust_accuracy("linf:8/255")` reads one);
        `eps` replaces the L∞ eps sweep (curves); `n` keeps the first n
        samples; `seed` and `device` default to --bastion-seed and --bastion-device. An
        identical check done before (this session, or in --bastion-cache) is reused. Fails
        the test only when the suite's own pass criteria fail."""
        __tracebackhide__ = True
        try:
            suite_obj = self._suite(suite)
            if eps is not None:
                eps_list = [eps] if isinstance(eps, (int, float)) else list(eps)
                suite_obj = suite_obj.with_eps(tuple(float(e) for e in eps_list))
            if isinstance(threats, str):
                threats = [threats]
            report = self._run_suite(
                model, data, suite_obj, n, seed, device, batch_size, tuple(threats or ())
            )
        except BastionError as exc:
            surface(exc)
        if report.passed is False:
            raise RobustnessFailure("\n".join(self._criteria_failure(report)))
        return report

    def assert_robust(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        data: DataLike = "digits",
        attack: str = "pgd",
        eps: float = 8 / 255,
        min_accuracy: float = 0.4,
        *,
        norm: str | None = None,
        params: Mapping[str, Any] | None = None,
        n: int | None = None,
        seed: int | None = None,
        device: str | None = None,
        batch_size: int = 128,
    ) -> CheckReport:
        """Fail the test unless `attack` (FGSM, PGD, BIM, CW; paper defaults, `params` to
        change them) at `eps` leaves robust accuracy of at least `min_accuracy` on `data`.
        Runs a one-check suite unless an identical check was done before."""
        __tracebackhide__ = True
        try:
            suite = one_check_suite(attack, eps, norm, params)
        except BastionError as exc:
            surface(exc)
        report = self.check(
            model, data, suite, n=n, seed=seed, device=device, batch_size=batch_size
        )
        report.require(min_accuracy, attack.lower(), float(eps))
        return report

    # ------------------------------------------------------------------ marker

    def run_marked(
        self,
        function: Callable[..., Any],
        kwargs: dict[str, Any],
        args: tuple[Any, ...],
        options: Mapping[str, Any],
    ) -> None:
        """Call a `robustness`-marked test and check the model it returns or yields (a
        yielded model is checked before the code after `yield` runs, like a fixture)."""
        __tracebackhide__ = True
        unknown = sorted(set(options) - set(MARKER_OPTIONS))
        if args or unknown:
            _fail(
                f"bastion: @pytest.mark.robustness takes keyword options only "
                f"({', '.join(MARKER_OPTIONS)}); got " + ", ".join([*map(repr, args), *unknown])
            )
        result = function(**kwargs)
        if not inspect.isgenerator(result):
            self._check_marked(result, options)
            return
        try:
            model = next(result)
        except StopIteration:
            _fail("bastion: the robustness test yielded nothing; yield the model")
        try:
            self._check_marked(model, options)
        finally:
            try:
                next(result)
            except StopIteration:
                pass
            else:
                _fail("bastion: a robustness test must yield exactly once")

    def _check_marked(self, result: Any, options: Mapping[str, Any]) -> None:
        """The marked test has returned, so no frame of it is left to show: fail with the
        explanation alone instead of a traceback through the plugin."""
        __tracebackhide__ = True
        try:
            self._check_model(result, options)
        except RobustnessFailure as exc:
            _fail(str(exc))
        except BastionError as exc:
            _fail(f"bastion: {exc}")

    def _check_model(self, result: Any, options: Mapping[str, Any]) -> None:
        __tracebackhide__ = True
        data = options.get("data", "digits")
        if (
            isinstance(result, tuple)
            and len(result) == 2
            and not isinstance(result[0], torch.Tensor)
        ):
            result, data = result
        if result is None:
            _fail(
                "bastion: a test marked robustness must return or yield the model to check "
                "(or a (model, data) pair); it returned None"
            )
        common = {k: options[k] for k in ("n", "seed") if options.get(k) is not None}
        min_accuracy = options.get("min_accuracy")
        eps = options.get("eps")
        threats = options.get("threats")
        if isinstance(threats, str):
            threats = [threats]
        if options.get("suite") is not None or threats:
            suite = options.get("suite") or "quick"
            report = self.check(result, data, suite, eps=eps, threats=threats, **common)
            if min_accuracy is not None and threats:
                for threat in threats:
                    report.require(min_accuracy, threat)
            elif min_accuracy is not None:
                at = float(eps) if isinstance(eps, (int, float)) else None
                report.require(min_accuracy, options.get("attack"), at)
            return
        attack = options.get("attack") or "pgd"
        eps = 8 / 255 if eps is None else eps
        suite = one_check_suite(attack, eps, options.get("norm"), options.get("params"))
        report = self.check(result, data, suite, **common)
        if min_accuracy is not None:
            report.require(min_accuracy, attack.lower(), float(eps))

    # ------------------------------------------------------------------ machinery

    def _suite(self, suite: str | Path | Suite) -> Suite:
        """A built-in suite, a Suite, or a TOML file relative to the working directory or,
        failing that, to the rootdir (where pytest.ini or pyproject.toml is)."""
        if isinstance(suite, Suite):
            return suite
        path = Path(suite).expanduser()
        if str(suite) not in BUILTIN and not path.is_absolute() and not path.is_file():
            beside_root = self._session.rootdir / path
            if beside_root.is_file():
                return load_suite(str(beside_root))
        return load_suite(str(suite))

    def _dataset(self, data: DataLike) -> Dataset:
        if isinstance(data, Dataset):
            return data
        if isinstance(data, str):
            loaded = self._session.datasets.get(data)
            if loaded is None:
                loaded = self._session.datasets[data] = load_data(data)
            return loaded
        if isinstance(data, tuple) and len(data) == 2:
            x, y = data
            classes = [str(i) for i in range(int(y.max()) + 1 if len(y) else 0)]
            return Dataset(x, y.long(), "tensors", "test", classes)
        raise ConfigError(
            f"cannot use {type(data).__name__} as data; pass a data spec such as 'digits', "
            "a bastion Dataset, or an (images, labels) pair of tensors"
        )

    def _device(self, model: object, device: str | None) -> torch.device:
        name = device or self._session.settings.device
        if name is None:  # where the model's weights are, as the runner would choose
            params = model.parameters() if isinstance(model, torch.nn.Module) else iter(())
            return next((p.device for p in params), torch.device("cpu"))
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for but CUDA is not available; use cpu")
        return dev

    def _share_cores(self) -> None:
        """Under pytest-xdist, give each worker its share of the cores: several workers each
        running torch's default one thread per core slow every one of them down badly.
        OMP_NUM_THREADS, when set, is left to decide."""
        session = self._session
        if session.threads_set or not session.is_worker or "OMP_NUM_THREADS" in os.environ:
            return
        session.threads_set = True
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(workers, 1)))

    def _cache(self) -> CheckCache:
        if self._session.cache is None:
            self._session.cache = CheckCache(self._session.settings.cache_dir)
        return self._session.cache

    def _run_suite(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        data: DataLike,
        suite: Suite,
        n: int | None,
        seed: int | None,
        device: str | None,
        batch_size: int,
        threats: tuple[str, ...] = (),
    ) -> CheckReport:
        settings = self._session.settings
        self._share_cores()
        dataset = self._dataset(data)
        if n is not None and n < 1:
            raise ConfigError(f"n must be >= 1, got {n}")
        count = fast_n(n, len(dataset)) if settings.fast else min(n or len(dataset), len(dataset))
        if settings.fast:
            suite = fast_suite(suite)
        if count < len(dataset):
            dataset = dataset.subset(count)
        seed = settings.seed if seed is None else int(seed)
        dev = self._device(model, device)
        fingerprint = model_fingerprint(model)
        key = check_key(
            kind="suite",
            model=model,
            fingerprint=fingerprint,
            data=dataset,
            config={
                "suite": suite.to_dict(),
                "seed": seed,
                "device": str(dev),
                "batch_size": batch_size,
                "threats": list(threats),
            },
        )
        digest = key_digest(key) if key is not None else None
        hit = self._cache().get(digest, key) if digest is not None and key is not None else None
        if hit is not None:
            report, source = hit
        else:
            info: JsonObject = {"source": model_source(model), "format": "in-memory"}
            if fingerprint is not None:
                info["sha256"] = fingerprint
            report = runner.run_suite(
                model, dataset, suite, seed=seed, device=dev, batch_size=batch_size,
                model_info=info, threats=threats or None, profile=settings.profile,
            )  # fmt: skip
            if digest is not None and key is not None:
                self._cache().put(digest, key, report)
        entry = self._session.record(
            Entry(
                nodeid=self._nodeid,
                index=self._session.next_index(self._nodeid),
                kind="suite",
                report=report.model,
                key=digest,
                cached=hit is not None,
                cache_source=hit[1] if hit is not None else None,
                worker=self._session.worker,
                gallery=report.gallery,
            )
        )
        result = CheckReport(report.model, gallery=report.gallery, entry=entry)
        result.locate = self._locator(result, entry)
        for flag in report.flags:
            warnings.warn(
                SanityFlagWarning(f"{self._nodeid}: [{flag.name}] {flag.message}"),
                stacklevel=3,  # the test that called check()
            )
        return result

    def _locator(self, report: CheckReport, entry: Entry) -> Callable[[], str | None]:
        written: list[str] = []

        def locate() -> str | None:
            directory = self._session.settings.report_dir
            if directory is not None:
                return (
                    f"{directory / 'report.html'}#{entry.anchor} (written when the session "
                    f"ends; the record is in {directory / 'report.json'})"
                )
            if not written:
                out = self._tmp.getbasetemp() / "bastion" / entry.anchor
                report.write(out)
                written.append(f"{out / 'report.html'} (and report.json beside it)")
            return written[0]

        return locate

    def _criteria_failure(self, report: CheckReport) -> list[str]:
        failed = [c for c in report.model.checks if c.passed is False]
        lines = [
            f"suite {report.model.suite_name!r}: pass criteria failed: "
            + "; ".join(f"check {c.id!r}: {c.criterion}" for c in failed),
            "",
            *robustness_table(report.model),
        ]
        location = report.location()
        if location:
            lines.append(f"report: {location}")
        return lines
