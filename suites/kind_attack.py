"""The `attack` check kind: an attack from `ATTACKS` over an eps sweep (or once, for a
minimum-norm attack read off at its L2 radii), batch by batch, seeded per sample.

`cascade` attacks only points no earlier check of the same norm broke at that eps
(AutoAttack's scheme); points it skips count as broken.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from bastion.errors import ConfigError
from bastion.results import NORMS
from bastion.suites.executor import Outcome, Progress, Work, WorkEnv
from bastion.suites.formatting import cell
from bastion.suites.gallery import GalleryItem
from bastion.suites.json_codec import JsonObject, encode
from bastion.suites.kinds import Column, Table
from bastion.suites.report import mean, median
from bastion.suites.report_builder import check_entry
from bastion.suites.report_model import AttackResult, CheckEntry, MinimumNorm
from bastion.suites.results_log import Item, item_key
from bastion.suites.run_context import RunContext, RunState, batches
from bastion.suites.suite import ATTACKS, Check, attack_name, check_criterion, check_eps

COLUMNS = (
    Column("eps", "eps", "g"),
    Column("robust acc", "robust_accuracy", ".3f"),
    Column("success", "success_rate", ".3f"),
    Column("attacked", "attacked", "d"),
    Column("mean L2", "mean_l2", ".3f"),
    Column("mean L∞", "mean_linf", ".3f"),
    Column("seconds", "seconds", ".2f"),
)


class AttackKind:
    name = "attack"
    robustness = True
    metrics = ("robust_accuracy", "success_rate", "mean_l2", "median_l2")
    threat_twins = True  # runs at the run's threat models (`threats = true`)
    sees_defense = True  # attacks the defended model

    def attack_name(self, raw: JsonObject, where: str) -> str:
        if "attack" not in raw:
            raise ConfigError(f"{where}: every attack check needs an 'attack'")
        return attack_name(str(raw["attack"]))

    def default_norm(self, attack: str) -> str:
        return ATTACKS[attack].norms[0] if attack in ATTACKS else "linf"

    def bounded(self, check: Check) -> bool:
        return ATTACKS[check.attack].bounded

    def validate(self, check: Check) -> None:
        norms = check.spec.norms
        if check.norm not in NORMS or check.norm not in norms:
            raise ConfigError(
                f"check {check.id!r}: {check.attack} does not support norm "
                f"{check.norm!r}; use one of {', '.join(norms)}"
            )
        check_eps(check)
        # build once so bad parameters fail before any work is done
        check.spec.build(eps=(check.eps or (0.0,))[0], norm=check.norm, params=check.params, seed=0)

    def run(self, ctx: RunContext, check: Check) -> None:
        """Attack the check's first n samples at every eps; fold successes into the state.

        The items go to the run's executor in waves of independent items: the whole check
        at once, or for a cascaded check one eps at a time (it attacks only what the earlier
        checks and its own smaller eps left standing)."""
        n = min(check.n or len(ctx.data), len(ctx.data))
        parts = batches(n, ctx.batch_size)
        eps_list: list[float | None] = [*sorted(check.eps)] if check.spec.bounded else [None]
        task = ctx.sink.task(f"{check.id} ({check.attack})", len(parts) * len(eps_list))
        broken = ctx.state.broken(check.norm)
        done = 0

        def advance(k: int, m: int) -> None:
            task.update(done + k / m)

        waves = [[e] for e in eps_list] if check.cascade else [eps_list]
        for wave in waves:
            works: list[Work] = []
            for eps in wave:
                for b, idx in enumerate(parts):
                    key = item_key("attack", check.id, eps, b)
                    rec = ctx.log.get(key)
                    if rec is not None:  # finished before (resume)
                        _apply(rec, broken, eps)
                        done += 1
                        continue
                    todo = idx[ctx.state.correct[idx]]
                    if check.cascade and eps is not None:
                        todo = todo[~(broken[todo] <= eps)]
                    pred = ctx.state.pred[todo].tolist()
                    works.append(AttackWork(key, check, eps, todo, pred, ctx.seed, ctx.keep))
            task.update(done)
            for work, rec in ctx.execute(works, advance):
                assert isinstance(work, AttackWork)
                _apply(rec, broken, work.eps)
                done += 1
                task.update(done)
        task.close()

    def summarise(self, check: Check, state: RunState, items: list[Item], total: int) -> CheckEntry:
        n = min(check.n or total, total)
        mine = _mine(check, items)
        results = _results(check, state, mine, n)
        entry = check_entry(
            check,
            n=n,
            results=results,
            seconds=sum(r["seconds"] for r in mine),
            forward=sum(r["forward"] for r in mine),
            backward=sum(r["backward"] for r in mine),
            passed=check_criterion(check, [encode(r) for r in results]),
        )
        if not check.bounded:
            rows = [
                (s, l2)
                for r in mine
                for s, l2 in zip(r["rows"]["success"], r["rows"]["l2"], strict=True)
            ]
            l2s = [l2 for s, l2 in rows if s]
            entry.minimum_norm = MinimumNorm(
                attacked=len(rows),
                success_rate=len(l2s) / len(rows) if rows else None,
                mean_l2=mean(l2s),
                median_l2=median(l2s),
            )
        return entry

    def gallery(self, ctx: RunContext, check: Check) -> list[GalleryItem]:
        """Successes at the smallest eps with any. Images kept during this run are shown as
        they are; for items loaded on resume the attack is re-run on the chosen samples
        alone (attacks are per-sample deterministic: the same images)."""
        recs = sorted(_mine(check, ctx.log.ordered()),
                      key=lambda r: (r["eps"] is None, r["eps"] or 0.0))  # fmt: skip
        for rec in recs:
            rows = rec["rows"]
            picks = [i for i, s in zip(rows["index"], rows["success"], strict=True) if s]
            if picks:
                picks = picks[: ctx.keep]
                _replay(ctx, check, rec["eps"], picks)
                return ctx.gallery_items(check, rec["eps"], picks)
        return []

    def table(self, entry: CheckEntry) -> Table:
        cascade = ", cascade" if entry.cascade else ""
        title = f"{entry.id}: {entry.attack} ({entry.norm}{cascade}, n={entry.n})"
        return Table(title, COLUMNS, [_row(r) for r in entry.results])

    def notes(self, entry: CheckEntry) -> list[str]:
        mn = entry.minimum_norm
        if mn is None:
            return []
        return [
            f"{entry.id} {entry.attack}: success_rate {cell(mn.success_rate, '.3f')} mean_l2 "
            f"{cell(mn.mean_l2, '.3f')} median_l2 {cell(mn.median_l2, '.3f')} attacked "
            f"{mn.attacked} seconds {entry.seconds:.1f}"
        ]

    def html(self, entry: CheckEntry, figures: object, names: list[str]) -> dict[str, object]:
        return {"template": "kind_attack.html"}


def _row(result: object) -> JsonObject:
    row = encode(result)
    assert isinstance(row, dict)
    return row


def _mine(check: Check, items: list[Item]) -> list[Item]:
    return [r for r in items if r.get("kind") == "attack" and r["check"] == check.id]


@dataclass(frozen=True)
class AttackWork:
    """One attack item: `check` at `eps` on the dataset indices `todo` (one batch's points
    still standing), computed wherever the executor runs it."""

    key: str
    check: Check
    eps: float | None
    todo: torch.Tensor
    pred_clean: list[int]
    seed: int
    keep: int  # successes kept as gallery images

    @property
    def indices(self) -> list[int]:
        return self.todo.tolist()

    def __call__(self, env: WorkEnv, progress: Progress | None) -> Outcome:
        check, eps, todo = self.check, self.eps, self.todo
        start = time.perf_counter()
        x, y = env.samples.take(todo)
        fields = ("pred_adv", "success", "l0", "l2", "linf", "queries", "gradients")
        rows: dict[str, list[object]] = {
            "index": todo.tolist(),
            "label": y.tolist(),
            "pred_clean": list(self.pred_clean),
            **{f: [] for f in fields},
        }
        forward = backward = 0
        shots = {}
        if len(todo):
            from bastion.defenses.raw_isp import item_draws  # a randomised defense's draws

            attack = check.spec.build(eps=eps, norm=check.norm, params=check.params, seed=self.seed)
            model = env.attacked(check.bpda)
            with item_draws(model, self.seed, self.key):  # per item, wherever it runs
                result = attack(
                    model, x.to(env.dev), y.to(env.dev), indices=todo.to(env.dev), progress=progress
                )
            values = {
                "pred_adv": result.pred_adv,
                "success": result.success,
                "queries": result.queries,
                "gradients": result.gradients,
                **{k: result.distances[k] for k in ("l0", "l2", "linf")},
            }
            rows.update({k: v.cpu().tolist() for k, v in values.items()})
            forward, backward = int(result.queries.sum()), int(result.gradients.sum())
            for j in result.success.nonzero().flatten()[: self.keep].tolist():
                shots[(check.id, eps, int(todo[j]))] = result.x_adv[j].cpu()
        return attack_outcome(check, eps, self.seed, rows, start, (forward, backward), shots)


def attack_outcome(
    check: Check,
    eps: float | None,
    seed: int,
    rows: dict[str, list[object]],
    start: float,
    passes: tuple[int, int],
    shots: dict[tuple[str, float | None, int], torch.Tensor],
) -> Outcome:
    """An attack item's record (every reader of attack items reads this shape): its rows,
    seconds since `start` and (forward, backward) passes, with the kept shots."""
    record = {
        "kind": "attack",
        "check": check.id,
        "attack": check.attack,
        "eps": eps,
        "seed": seed,
        "rows": rows,
        "seconds": time.perf_counter() - start,
        "forward": passes[0],
        "backward": passes[1],
    }
    return Outcome(record, shots)


def _replay(ctx: RunContext, check: Check, eps: float | None, picks: list[int]) -> None:
    """Re-run the attack on the picks whose images this run did not keep (resumed items)."""
    missing = [i for i in picks if (check.id, eps, i) not in ctx.shots]
    if not missing:
        return
    idx = torch.tensor(missing)
    attack = check.spec.build(eps=eps, norm=check.norm, params=check.params, seed=ctx.seed)
    result = attack(
        ctx.attacked_model(check),
        ctx.data.x[idx].to(ctx.dev),
        ctx.data.y[idx].to(ctx.dev),
        indices=idx.to(ctx.dev),
    )
    for j in result.success.nonzero().flatten().tolist():
        ctx.shots[(check.id, eps, missing[j])] = result.x_adv[j].cpu()


def _apply(rec: Item, broken: torch.Tensor, eps: float | None) -> None:
    """Fold an item's successes into the per-sample smallest breaking eps."""
    rows = rec["rows"]
    if not rows["index"]:
        return
    idx = torch.tensor(rows["index"])
    success = torch.tensor(rows["success"], dtype=torch.bool)
    at = (
        torch.full((len(idx),), float(eps), dtype=torch.float64)
        if eps is not None
        else torch.tensor(rows["l2"], dtype=torch.float64)
    )
    at = torch.where(success, at, torch.full_like(at, math.inf))
    broken[idx] = torch.minimum(broken[idx], at)


def _results(check: Check, state: RunState, mine: list[Item], n: int) -> list[AttackResult]:
    """Per-eps figures of one check over its first n samples."""
    correct = state.correct[:n]
    out = []
    for eps in sorted(check.eps):
        recs = [r for r in mine if r["eps"] is None or math.isclose(r["eps"], eps)]
        broken = torch.zeros(n, dtype=torch.bool)
        attacked = torch.zeros(n, dtype=torch.bool)
        l2s: list[float] = []
        linfs: list[float] = []
        for rec in recs:
            rows = rec["rows"]
            for i, s, l2, linf in zip(
                rows["index"], rows["success"], rows["l2"], rows["linf"], strict=True
            ):
                attacked[i] = True
                if s and (rec["eps"] is not None or l2 <= eps):
                    broken[i] = True
                    l2s.append(l2)
                    linfs.append(linf)
        robust = correct & ~broken & (attacked | ~torch.tensor(check.cascade).expand(n))
        bounded = bool(recs) and recs[0]["eps"] is not None
        out.append(
            AttackResult(
                eps=eps,
                robust_accuracy=float(robust.double().mean()) if n else 0.0,
                success_rate=float(broken.sum() / attacked.sum()) if attacked.any() else None,
                attacked=int(attacked.sum()),
                mean_l2=mean(l2s),
                median_l2=median(l2s),
                mean_linf=mean(linfs),
                seconds=sum(r["seconds"] for r in recs) if bounded else None,
                forward=sum(r["forward"] for r in recs) if bounded else None,
                backward=sum(r["backward"] for r in recs) if bounded else None,
            )
        )
    return out


def breaks(items: list[Item], check_id: str, eps: float, n: int) -> torch.Tensor:
    """Which of the first n samples check `check_id` itself broke at radius eps."""
    out = torch.zeros(n, dtype=torch.bool)
    for rec in items:
        if rec.get("kind") != "attack" or rec.get("check") != check_id:
            continue
        at = rec["eps"]
        if at is not None and not math.isclose(at, eps, rel_tol=1e-6):
            continue
        rows = rec["rows"]
        for i, s, l2 in zip(rows["index"], rows["success"], rows["l2"], strict=True):
            if s and i < n and (at is not None or l2 <= eps):
                out[i] = True
    return out


KIND = AttackKind()
