"""The `transfer` check kind: DVERGE's black-box evaluation (Yang et al. 2020, spec §6.3).

Adversarial examples are crafted on a surrogate — an ensemble of `members` models trained
independently of the model under test (`defenses/surrogate.py`, seeds `surrogate_seed·1000
+ k`) — with the paper's transfer attacks (`bastion.attacks.transfer.paper_attacks`:
M-PGD with `restarts` random starts and M-DI²-FGSM, each with the CE and the CW loss, and
SGM when the surrogate has residual blocks), `steps` steps each, at every eps. A sample
the model gets right survives only if the model classifies every example of every attack
correctly (the paper's "all"). The same examples go to a second independently trained
baseline ensemble (`baseline_seed`): the undefended figure the defense is compared with.

Parameters: `members` (3), `epochs` of the surrogate's training (20), `steps` (100),
`restarts` (3), `surrogate_seed` (7), `baseline_seed` (8). L∞ only. The surrogate and the
baseline are trained on the training split of the run's data (digits, MNIST,
Fashion-MNIST, CIFAR-10) and cached.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from bastion.errors import ConfigError
from bastion.suites.executor import Outcome, Progress, Work, WorkEnv
from bastion.suites.formatting import cell
from bastion.suites.gallery import GalleryItem
from bastion.suites.json_codec import JsonObject
from bastion.suites.kind_rows import execute_and_fold, fold, take
from bastion.suites.kinds import Column, Table
from bastion.suites.report_builder import check_entry
from bastion.suites.report_model import AttackResult, CheckEntry, TransferRow
from bastion.suites.results_log import Item, item_key
from bastion.suites.run_context import RunContext, RunState, batches
from bastion.suites.suite import Check, check_eps, unknown_params

PARAMS = {
    "members": 3, "epochs": 20, "steps": 100, "restarts": 3, "surrogate_seed": 7,
    "baseline_seed": 8,
}  # fmt: skip
COLUMNS = (
    Column("eps", "eps", "g"),
    Column("robust acc", "robust_accuracy", ".3f"),
    Column("baseline", "baseline_robust_accuracy", ".3f"),
    Column("attacked", "attacked", "d"),
)


class TransferKind:
    name = "transfer"
    robustness = True
    metrics = ("robust_accuracy",)
    threat_twins = False  # L∞ at the eps the check names (the defense plan adds them)
    sees_defense = True

    def attack_name(self, raw: JsonObject, where: str) -> str:
        return "TransferAttacks"

    def default_norm(self, attack: str) -> str:
        return "linf"

    def bounded(self, check: Check) -> bool:
        return True

    def validate(self, check: Check) -> None:
        if check.norm != "linf":
            raise ConfigError(f'check {check.id!r}: transfer attacks are L∞; set norm = "linf"')
        if check.cascade or check.bpda:
            raise ConfigError(f"check {check.id!r}: a transfer check takes no cascade")
        check_eps(check)
        if any(e <= 0 for e in check.eps):
            raise ConfigError(f"check {check.id!r}: transfer eps must be > 0")
        unknown_params(check, tuple(PARAMS))
        for k, v in check.params.items():
            low = 0 if k.endswith("seed") else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ConfigError(f"check {check.id!r}: {k} must be a whole number >= {low}")

    def run(self, ctx: RunContext, check: Check) -> None:
        """Craft and judge the transfer examples batch by batch at every eps; the surrogate
        and the baseline are trained (or read from the cache) only when an item is missing."""
        n = min(check.n or len(ctx.data), len(ctx.data))
        parts = batches(n, ctx.batch_size)
        task = ctx.sink.task(f"{check.id} (transfer attacks)", len(parts) * len(check.eps))
        broken = ctx.state.broken(check.norm)
        works: list[Work] = []
        done = 0
        models: tuple[nn.Module, nn.Module] | None = None
        for eps in sorted(check.eps):
            for b, idx in enumerate(parts):
                key = item_key("transfer", check.id, eps, b)
                rec = ctx.log.get(key)
                if rec is not None:
                    fold(rec, broken, eps)
                    done += 1
                    continue
                models = models or _models(ctx, check)
                correct = ctx.state.correct[idx].tolist()
                works.append(TransferWork(key, check, eps, idx, correct, ctx.seed, *models))
        execute_and_fold(ctx, works, task, done, broken)

    def summarise(self, check: Check, state: RunState, items: list[Item], total: int) -> CheckEntry:
        n = min(check.n or total, total)
        mine = [r for r in items if r.get("kind") == "transfer" and r["check"] == check.id]
        correct = state.correct[:n]
        results, rows = [], []
        for eps in sorted(check.eps):
            recs = [r for r in mine if math.isclose(r["eps"], eps)]
            broken = torch.zeros(n, dtype=torch.bool)
            base_ok = torch.zeros(n, dtype=torch.bool)
            attacked = 0
            per: dict[str, torch.Tensor] = {}
            base_per: dict[str, torch.Tensor] = {}
            for rec in recs:
                r = rec["rows"]
                idx = torch.tensor(r["index"], dtype=torch.long)
                attacked += sum(r["correct"])
                broken[idx] = torch.tensor(r["success"], dtype=torch.bool)
                base_ok[idx] = torch.tensor(r["baseline_robust"], dtype=torch.bool)
                for name, ok in r["attacks"].items():
                    per.setdefault(name, torch.zeros(n, dtype=torch.bool))[idx] = torch.tensor(ok)
                for name, ok in r["baseline_attacks"].items():
                    at = base_per.setdefault(name, torch.zeros(n, dtype=torch.bool))
                    at[idx] = torch.tensor(ok)
            robust = correct & ~broken
            acc = float(robust.double().mean()) if n else 0.0
            results.append(
                AttackResult(
                    eps=eps, robust_accuracy=acc,
                    success_rate=float(broken.sum()) / attacked if attacked else None,
                    attacked=attacked, mean_l2=None, median_l2=None, mean_linf=None,
                    seconds=sum(r["seconds"] for r in recs),
                    forward=sum(r["forward"] for r in recs),
                    backward=sum(r["backward"] for r in recs),
                )
            )  # fmt: skip
            rows.append(
                TransferRow(
                    eps=eps,
                    robust_accuracy=acc,
                    baseline_robust_accuracy=float(base_ok.double().mean()) if recs else None,
                    attacks={k: float((correct & v).double().mean()) for k, v in per.items()},
                    baseline_attacks={k: float(v.double().mean()) for k, v in base_per.items()},
                )
            )
        return check_entry(
            check,
            n=n,
            results=results,
            transfer=rows,
            seconds=sum(r["seconds"] for r in mine),
            forward=sum(r["forward"] for r in mine),
            backward=sum(r["backward"] for r in mine),
        )

    def gallery(self, ctx: RunContext, check: Check) -> list[GalleryItem]:
        return []

    def table(self, entry: CheckEntry) -> Table:
        title = f"{entry.id}: transfer attacks from an independent surrogate (linf, n={entry.n})"
        rows = [
            {**_row(r), "baseline_robust_accuracy": t.baseline_robust_accuracy}
            for r, t in zip(entry.results, entry.transfer or [], strict=True)
        ]
        return Table(title, COLUMNS, rows)

    def notes(self, entry: CheckEntry) -> list[str]:
        out = []
        for t in entry.transfer or []:
            mine = " ".join(f"{k} {cell(v, '.3f')}" for k, v in t.attacks.items())
            base = " ".join(f"{k} {cell(v, '.3f')}" for k, v in t.baseline_attacks.items())
            out.append(f"{entry.id} eps={t.eps:g} per attack: {mine}")
            out.append(f"{entry.id} eps={t.eps:g} baseline per attack: {base}")
        return out

    def html(self, entry: CheckEntry, figures: object, names: list[str]) -> dict[str, object]:
        rows = [
            {
                "eps": t.eps,
                "robust": t.robust_accuracy,
                "baseline": t.baseline_robust_accuracy,
                "attacks": [(k, v, t.baseline_attacks.get(k)) for k, v in t.attacks.items()],
            }
            for t in entry.transfer or []
        ]
        return {"template": "kind_transfer.html", "transfer": rows}


def _row(result: object) -> JsonObject:
    from bastion.suites.json_codec import encode

    row = encode(result)
    assert isinstance(row, dict)
    return row


def _models(ctx: RunContext, check: Check) -> tuple[nn.Module, nn.Module]:
    """The surrogate and the baseline ensemble, trained on the run's training split."""
    from bastion.data import takes_split
    from bastion.defenses.surrogate import baseline_ensemble

    spec = ctx.data.spec
    if not takes_split(spec):
        raise ConfigError(
            f"the transfer check trains its surrogate on the training split of the data, and "
            f"{spec!r} has none; run it on digits, mnist:, fashion-mnist: or cifar10: data"
        )
    p = {**PARAMS, **check.params}
    task = ctx.sink.task("training the surrogate and baseline ensembles (cached)", 2)
    models = []
    for k, seed in enumerate((p["surrogate_seed"], p["baseline_seed"])):

        def step(done: int, total: int, k: int = k) -> None:
            task.update(k + done / total)

        models.append(
            baseline_ensemble(spec, p["members"], epochs=p["epochs"], seed=seed, progress=step)
        )
    task.close()
    return models[0], models[1]


@dataclass(frozen=True)
class TransferWork:
    """One transfer item: `check` at `eps` on the dataset indices `idx` (a batch; `correct`
    says which the model under test gets right), with the surrogate and baseline models."""

    key: str
    check: Check
    eps: float
    idx: torch.Tensor
    correct: list[bool]
    seed: int
    surrogate: nn.Module
    baseline: nn.Module

    @property
    def indices(self) -> list[int]:
        return [int(i) for i in self.idx.tolist()]

    def __call__(self, env: WorkEnv, progress: Progress | None) -> Outcome:
        from bastion.attacks.transfer import paper_attacks, residual_branch_ends

        start = time.perf_counter()
        p = {**PARAMS, **self.check.params}
        x, y = take(env, self.idx)
        x, y = x.to(env.dev), y.to(env.dev)
        model = env.model
        assert model is not None
        surrogate, baseline = self.surrogate.to(env.dev), self.baseline.to(env.dev)
        attacks = paper_attacks(
            self.eps,
            steps=p["steps"],
            restarts=p["restarts"],
            sgm=bool(residual_branch_ends(surrogate)),
            seed=self.seed,
        )
        ok = torch.tensor(self.correct, dtype=torch.bool, device=env.dev)
        base_ok = _predict(baseline, x) == y
        survive, base_survive = ok.clone(), base_ok.clone()
        per: dict[str, list[bool]] = {}
        base_per: dict[str, list[bool]] = {}
        forward = 0
        for k, attack in enumerate(attacks):
            mine, base = ok.clone(), base_ok.clone()
            for x_adv in attack(surrogate, x, y):
                mine &= _predict(model, x_adv) == y
                base &= _predict(baseline, x_adv) == y
                forward += len(x)
            name = _unique(attack.name, per)
            per[name], base_per[name] = mine.cpu().tolist(), base.cpu().tolist()
            survive &= mine
            base_survive &= base
            if progress is not None:
                progress(k + 1, len(attacks))
        rows = {
            "index": self.indices,
            "correct": list(self.correct),
            "success": (ok & ~survive).cpu().tolist(),
            "baseline_robust": base_survive.cpu().tolist(),
            "attacks": per,
            "baseline_attacks": base_per,
        }
        record = {
            "kind": "transfer",
            "check": self.check.id,
            "attack": self.check.attack,
            "eps": self.eps,
            "seed": self.seed,
            "surrogate": [a.name for a in attacks],
            "rows": rows,
            "seconds": time.perf_counter() - start,
            "forward": forward,  # the model under test's; the surrogate's are not counted
            "backward": 0,
        }
        return Outcome(record)


def _predict(model: object, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)  # type: ignore[operator,no-any-return]


def _unique(name: str, seen: dict[str, list[bool]]) -> str:
    out, k = name, 2
    while out in seen:
        out, k = f"{name} #{k}", k + 1
    return out


KIND = TransferKind()
