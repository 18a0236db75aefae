"""The `adaptive` check kind: an eps-bounded gradient attack against an attacker's view of
the defended model, judged by the defended model itself as deployed.

Views (`params.view`; the other parameters go to the attack):

* `temperature` — the logits divided by the distillation temperature
  (`TemperatureScaled`; `temperature` from the parameters, else the one the model
  carries), where a distilled model's softmax no longer saturates;
* `eot` — expectation over transformation of a randomised preprocessing
  (`ExpectationOverTransformation`, `samples` draws per step, default 20), exact
  gradients through it;
* `eot-bpda` — the same with BPDA, an identity backward pass through the preprocessing.

Every point the model classifies correctly is attacked (no cascade). A sample counts as
broken when the defended model — for a randomised defense, one fresh draw of it —
misclassifies the attack's image; the passes counted are the model's (`samples` per query
of an EOT view). As in every attack item, a randomised defense draws from a generator
seeded by the run's seed and the item (`raw_isp.item_draws`), so a resumed or distributed
run draws the same randomness for it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from bastion.errors import ConfigError
from bastion.suites.executor import Outcome, Progress, Work, WorkEnv
from bastion.suites.gallery import GalleryItem
from bastion.suites.json_codec import JsonObject
from bastion.suites.kind_attack import AttackKind, attack_outcome
from bastion.suites.kind_rows import execute_and_fold, fold, take
from bastion.suites.kinds import Table
from bastion.suites.report_model import CheckEntry
from bastion.suites.results_log import item_key
from bastion.suites.run_context import RunContext, batches
from bastion.suites.suite import ATTACKS, GRADIENT_ATTACKS, Check

VIEWS = {
    "temperature": "logits / T",
    "eot": "EOT",
    "eot-bpda": "EOT + BPDA",
}
VIEW_KEYS = ("view", "samples", "temperature")


def attack_params(check: Check) -> JsonObject:
    """The check's parameters that go to the attack (the view's removed)."""
    return {k: v for k, v in check.params.items() if k not in VIEW_KEYS}


def view_label(params: JsonObject) -> str:
    """`logits / T (T = 100)`, `EOT (20 draws)`, … for titles and the defense table."""
    view = str(params.get("view"))
    if view == "temperature" and params.get("temperature") is not None:
        return f"logits / T (T = {float(params['temperature']):g})"  # type: ignore[arg-type]
    if view.startswith("eot"):
        return f"{VIEWS[view]} ({int(params.get('samples', _samples()))} draws)"  # type: ignore[arg-type]
    return VIEWS.get(view, view)


def _samples() -> int:
    from bastion.defenses.eot import EOT_SAMPLES

    return EOT_SAMPLES


class AdaptiveKind(AttackKind):
    name = "adaptive"
    robustness = True
    metrics = AttackKind.metrics
    threat_twins = True
    sees_defense = True

    def validate(self, check: Check) -> None:
        view = check.params.get("view")
        if view not in VIEWS:
            raise ConfigError(
                f"check {check.id!r}: an adaptive check needs params.view, one of "
                f"{', '.join(VIEWS)}; got {view!r}"
            )
        if check.attack not in GRADIENT_ATTACKS or not ATTACKS[check.attack].bounded:
            raise ConfigError(
                f"check {check.id!r}: an adaptive check runs an eps-bounded gradient attack "
                f"(FGSM, PGD, BIM, APGD, APGDT, FAB), not {check.attack}"
            )
        if check.cascade:
            raise ConfigError(f"check {check.id!r}: an adaptive check attacks every point; "
                              "remove cascade")  # fmt: skip
        samples = check.params.get("samples", 1)
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise ConfigError(f"check {check.id!r}: samples must be a whole number >= 1")
        t = check.params.get("temperature")
        if t is not None and not (isinstance(t, int | float) and t >= 1):
            raise ConfigError(f"check {check.id!r}: temperature must be a number >= 1, got {t!r}")
        super().validate(replace(check, params=attack_params(check)))

    def run(self, ctx: RunContext, check: Check) -> None:
        """Attack the first n samples the model gets right at every eps, batch by batch."""
        n = min(check.n or len(ctx.data), len(ctx.data))
        parts = batches(n, ctx.batch_size)
        task = ctx.sink.task(f"{check.id} ({check.attack}, {view_label(check.params)})",
                             len(parts) * len(check.eps))  # fmt: skip
        broken = ctx.state.broken(check.norm)
        works: list[Work] = []
        done = 0
        for eps in sorted(check.eps):
            for b, idx in enumerate(parts):
                key = item_key("attack", check.id, eps, b)
                rec = ctx.log.get(key)
                if rec is not None:
                    fold(rec, broken, eps)
                    done += 1
                    continue
                todo = idx[ctx.state.correct[idx]]
                pred = ctx.state.pred[todo].tolist()
                works.append(AdaptiveWork(key, check, eps, todo, pred, ctx.seed, ctx.keep))
        execute_and_fold(ctx, works, task, done, broken)

    def gallery(self, ctx: RunContext, check: Check) -> list[GalleryItem]:
        """Successes kept during this run at the smallest eps with any (a resumed item's
        images are not recomputed: its attack needs the view)."""
        for eps in sorted(check.eps):
            picks = sorted(i for (c, e, i) in ctx.shots if c == check.id and e == eps)
            if picks:
                return ctx.gallery_items(check, eps, picks[: ctx.keep])
        return []

    def table(self, entry: CheckEntry) -> Table:
        table = super().table(entry)
        return replace(table, title=f"{table.title} on {view_label(entry.params)}")


def view_model(model: nn.Module, params: JsonObject) -> nn.Module:
    """The attacker's view of the defended `model` that `params.view` names."""
    from bastion.defenses.distillation import TemperatureScaled, temperature_of
    from bastion.defenses.eot import ExpectationOverTransformation

    view = params["view"]
    if view == "temperature":
        t = params.get("temperature")
        t = float(t) if t is not None else temperature_of(model)  # type: ignore[arg-type]
        if t is None:
            raise ConfigError(
                "the model carries no distillation temperature; give the adaptive check "
                "params.temperature"
            )
        return TemperatureScaled(model, t)
    target = _with_bpda(model) if view == "eot-bpda" else model
    return ExpectationOverTransformation(target, int(params.get("samples", _samples())))  # type: ignore[arg-type]


def _with_bpda(model: nn.Module) -> nn.Module:
    """The defended model with an identity backward pass through its preprocessing (the
    same draws: the copy shares the preprocessing's generator)."""
    from bastion.defenses.raw_isp import RawISPDefended

    if not isinstance(model, RawISPDefended):
        raise ConfigError("BPDA needs a preprocessing defense; run with --defense raw_isp:random")
    pre = copy.copy(model.preprocess)
    pre.bpda = True
    return RawISPDefended(pre, model.model)


@dataclass(frozen=True)
class AdaptiveWork:
    """One adaptive item: `check` at `eps` on the dataset indices `todo`."""

    key: str
    check: Check
    eps: float
    todo: torch.Tensor
    pred_clean: list[int]
    seed: int
    keep: int

    @property
    def indices(self) -> list[int]:
        return [int(i) for i in self.todo.tolist()]

    def __call__(self, env: WorkEnv, progress: Progress | None) -> Outcome:
        check, todo = self.check, self.todo
        start = time.perf_counter()
        rows: dict[str, list[object]] = {
            "index": todo.tolist(),
            "label": take(env, todo)[1].tolist(),
            "pred_clean": list(self.pred_clean),
            **{f: [] for f in ("pred_adv", "success", "l0", "l2", "linf", "queries", "gradients")},
        }
        forward = backward = 0
        shots: dict[tuple[str, float | None, int], torch.Tensor] = {}
        if len(todo):
            from bastion.defenses.raw_isp import item_draws

            model = env.model
            assert isinstance(model, nn.Module)
            view = view_model(model, check.params)
            draws = int(getattr(view, "samples", 1))
            attack = check.spec.build(
                eps=self.eps, norm=check.norm, params=attack_params(check), seed=self.seed
            )
            x, y = (t.to(env.dev) for t in take(env, todo))
            with item_draws(model, self.seed, self.key):
                result = attack(view, x, y, indices=todo.to(env.dev), progress=progress)
                with torch.no_grad():  # the defense as deployed judges (a fresh draw)
                    pred = model(result.x_adv).argmax(1)
            success = pred != y
            values = {
                "pred_adv": pred,
                "success": success,
                "queries": result.queries * draws + 1,
                "gradients": result.gradients * draws,
                **{k: result.distances[k] for k in ("l0", "l2", "linf")},
            }
            rows.update({k: v.cpu().tolist() for k, v in values.items()})
            forward, backward = int(values["queries"].sum()), int(values["gradients"].sum())
            for j in success.nonzero().flatten()[: self.keep].tolist():
                shots[(check.id, self.eps, int(todo[j]))] = result.x_adv[j].cpu()
        # the rows of an attack item: every reader of attack items works
        return attack_outcome(check, self.eps, self.seed, rows, start, (forward, backward), shots)


KIND = AdaptiveKind()
