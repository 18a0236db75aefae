"""DLV mode: Huang, Kwiatkowska, Wang, Wu, "Safety Verification of Deep Neural Networks"
(CAV 2017), as its code runs it (specs/verification.md §1.3–1.4).

One feature (`feature_dims` dims) at a time, for up to `features` features, every grid
point of the discretised region {a + Σ c_p·span·e_p : |c_p| ≤ numSpan} that the enumeration
mode names ("convex" corners, "line" all points, "point" one) is classified; the grid points
of a feature go through the network in batches. Two layers of analysis:

* **layer 0** (the default, as DLV's MNIST/CIFAR settings): the grid points are images
  (clipped to [0, 1]) and the float32 model classifies them directly;
* **a hidden layer k** (DLV's "specificLayer"): the layer-k region is synthesised from the
  input feature (`dlv_regions.synthesise`), its grid points are propagated from layer k to
  the output, and a point that changes the class is back-propagated to the input with z3,
  one layer at a time (`back_propagate`); the input found is classified by the model.

UNSAFE only when the float32 model itself classifies the reported input differently
(strictly: another logit above the label's). SAFE carries DLV's guarantee: complete for
the enumerated grid under the minimality assumption, which is not checked, and nothing for
the continuous region. With `continuous=True` the same features' continuous boxes are also
decided exactly by `verify` (mode (b) of spec §1.6) and reported next to the grid verdict.

Deviations from DLV's code: a z3 timeout is `unknown`, never unsat; the input constraint
x ≠ original is dropped; hidden grid points that keep the class at layer k are not
back-propagated; no seeding of the next feature from the previous round's least
confident image (the region stays one feature's box around x, so the verdict has a meaning).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from bastion.errors import ConfigError, InvalidInputError
from bastion.modes import eval_mode
from bastion.validation import check_images
from bastion.verify.dlv_regions import (
    Region,
    analysable,
    back_propagate,
    grid_size,
    grid_values,
    input_features,
    synthesise,
)
from bastion.verify.extract import extract
from bastion.verify.network import Network, apply_layer
from bastion.verify.verdict import SAFE, UNKNOWN, UNSAFE, Verdict

Forward = Callable[[torch.Tensor], torch.Tensor]
_WHICH = {
    "line": "every point of",
    "convex": "the 2^d corners (c_p = ±numSpan) of",
    "point": "the single point c_p = −numSpan of",
}


def guarantee(enumeration: str, layer: int) -> str:
    """What a SAFE from DLV mode proves, in words."""
    grid = (
        "{x + Σ c_p·span·e_p : |c_p| ≤ numSpan} ∩ [0,1] (other pixels fixed)"
        if layer == 0
        else f"of layer {layer}, {{α_{layer} + Σ c_p·s_p·e_p : |c_p| ≤ numSpan}} (other "
        "neurons fixed)"
    )
    text = (
        "DLV: complete for the discretised region under the minimality assumption: "
        f"{_WHICH[enumeration]} each examined feature's grid {grid} keeps the class; "
        "minimality (no class change between neighbouring grid points) is assumed, not "
        "checked; nothing is proved for the continuous region"
    )
    if layer > 0:
        text += (
            "; carrying it to the input needs DLV's covering/refinement assumption (not checked)"
        )
    return text


def verify_dlv(
    model: torch.nn.Module | Forward,
    x: torch.Tensor,
    *,
    label: int | None = None,
    features: int = 150,
    feature_dims: int = 5,
    span: float = 1.0,
    num_span: int = 1,
    enumeration: str = "convex",
    heuristic: str = "sift",
    layer: int = 0,
    timeout: float = 60.0,
    max_points: int = 1_000_000,
    batch_size: int = 1024,
    query_timeout: float = 10.0,
    continuous: bool = False,
    seed: int = 0,
    network: Network | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Verdict:
    """DLV's search of one image's feature regions: SAFE, UNSAFE or UNKNOWN.

    Defaults are DLV's MNIST settings (150 features of 5 dims, span 1.0 × 1, convex, input
    layer). `heuristic` picks the features ("sift", "derivative", "activation"); `layer` > 0
    analyses that hidden layer with z3 back-propagation. Budgets: `timeout` seconds for
    the whole search, `max_points` grid points, `query_timeout` per z3 query. UNKNOWN
    when a budget ends first. `continuous=True` adds `details["continuous"]`: the exact
    verdict of `verify` on each examined feature's continuous box (eps = span·numSpan).
    """
    _check_options(features, feature_dims, span, num_span, timeout, max_points, batch_size)
    start = time.perf_counter()
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3:
        raise InvalidInputError(
            f"verify_dlv takes one image C×H×W, got shape {tuple(x.shape)}; pass e.g. data.x[i]"
        )
    check_images(x[None])
    x = x.detach().cpu()
    if network is not None:
        net = network
    elif isinstance(model, torch.nn.Module):
        net = extract(model, tuple(x.shape))
    else:
        raise ConfigError("a plain callable model needs its extracted network: pass network=")
    if not analysable(net, layer):
        raise ConfigError(
            f"layer {layer} is not the input (0) or the output of a dense or convolutional "
            f"layer followed by more layers; choose one of {_layers(net)}"
        )
    forward = _forward(model)
    with eval_mode(model):
        with torch.no_grad():
            pred = int(forward(x[None]).argmax(1)[0])
        label = pred if label is None else int(label)
        feats = input_features(net, x, label, feature_dims=feature_dims, heuristic=heuristic)
        search = _Search(net, forward, x, label, enumeration, layer, batch_size, query_timeout)
        with torch.no_grad():
            verdict = search.run(
                feats[:features], span, num_span, feature_dims, start + timeout, max_points,
                progress,
            )  # fmt: skip
        verdict.seconds = time.perf_counter() - start
        verdict.details.update(
            label=label, prediction=pred, layer=layer, span=span, num_span=num_span,
            feature_dims=feature_dims, enumeration=enumeration, heuristic=heuristic,
            features_requested=features, features_available=len(feats),
        )  # fmt: skip
        if continuous:
            examined = feats[: verdict.details["features_examined"]]
            verdict.details["continuous"] = _continuous(
                net, forward, x, label, examined, span * num_span, timeout, seed
            )
    return verdict


def _check_options(
    features: int,
    feature_dims: int,
    span: float,
    num_span: int,
    timeout: float,
    max_points: int,
    batch_size: int,
) -> None:
    for name, value in (("features", features), ("featureDims", feature_dims),
                        ("numSpan", num_span), ("max_points", max_points),
                        ("batch_size", batch_size)):  # fmt: skip
        if int(value) != value or value < 1:
            raise ConfigError(f"{name} must be a positive whole number, got {value}")
    if not span > 0:
        raise ConfigError(f"span must be a positive number, got {span}")
    if not timeout > 0:
        raise ConfigError(f"timeout must be a positive number of seconds, got {timeout}")


def _layers(net: Network) -> list[int]:
    return [k for k in range(len(net.layers)) if analysable(net, k)]


def _forward(model: torch.nn.Module | Forward) -> Forward:
    params = getattr(model, "parameters", None)
    device = next(iter(params()), torch.empty(0)).device if callable(params) else None

    def forward(batch: torch.Tensor) -> torch.Tensor:
        return model(batch.to(device=device or "cpu", dtype=torch.float32)).cpu().flatten(1)

    return forward


def _best_other(y: torch.Tensor, label: int) -> torch.Tensor:
    """Per row: the best other logit minus the label's (> 0: the class changed)."""
    others = y.double().clone()
    others[:, label] = -torch.inf
    return others.max(1).values - y[:, label].double()


@dataclass
class _Stats:
    """What the search did: grid points classified, features searched in full (up to the
    adversarial one), layer-k points that changed the class, z3 queries, back-propagation
    outcomes by status."""

    points: int = 0
    features_examined: int = 0
    hidden_flips: int = 0
    z3_queries: int = 0
    backprop: dict[str, int] = field(default_factory=dict)


class _Search:
    """The per-feature loop of DLV over one image."""

    def __init__(
        self,
        net: Network,
        forward: Forward,
        x: torch.Tensor,
        label: int,
        enumeration: str,
        layer: int,
        batch_size: int,
        query_timeout: float,
    ) -> None:
        self.net, self.forward, self.x, self.label = net, forward, x, label
        self.enumeration, self.layer = enumeration, layer
        self.batch_size, self.query_timeout = batch_size, query_timeout
        self.acts = [a[0].flatten().numpy() for a in net.activations(x.double()[None])]
        self.stats = _Stats()

    def run(
        self,
        feats: list[np.ndarray],
        span: float,
        num_span: int,
        feature_dims: int,
        deadline: float,
        max_points: int,
        progress: Callable[[int, int], None] | None,
    ) -> Verdict:
        for f, dims in enumerate(feats):
            first = Region(0, dims, np.full(len(dims), float(span)), int(num_span))
            regions = [first]
            if self.layer > 0:
                regions = synthesise(self.net, first, self.layer, feature_dims)
            clip = (0.0, 1.0) if self.layer == 0 else None
            base = self.acts[self.layer]
            size = grid_size(regions[-1], base, self.enumeration, clip)
            if self.stats.points + size > max_points:
                return self._verdict(UNKNOWN, reason=f"grid-point budget ({max_points}) spent "
                                     f"after {f} of {len(feats)} features")  # fmt: skip
            values, coeffs = grid_values(regions[-1], base, self.enumeration, clip)
            for lo in range(0, len(values), self.batch_size):
                if time.perf_counter() >= deadline:
                    return self._verdict(UNKNOWN, reason=f"deadline reached in feature {f}")
                batch = slice(lo, lo + self.batch_size)
                found = self._batch(regions, values[batch], coeffs[batch], f, deadline)
                if found is not None:
                    return found
            self.stats.features_examined = f + 1
            if progress is not None:
                progress(f + 1, len(feats))
        if self.stats.hidden_flips:
            return self._verdict(
                UNKNOWN,
                reason=f"{self.stats.hidden_flips} layer-{self.layer} grid points change the "
                "class but no input realising them does",
            )
        return self._verdict(SAFE, guarantee=guarantee(self.enumeration, self.layer))

    def _verdict(self, status: str, **kw: Any) -> Verdict:
        return Verdict(status, "dlv", 0.0, details=asdict(self.stats), **kw)

    def _batch(
        self,
        regions: list[Region],
        values: np.ndarray,
        coeffs: np.ndarray,
        feature: int,
        deadline: float,
    ) -> Verdict | None:
        region = regions[-1]
        self.stats.points += len(values)
        points = np.repeat(self.acts[self.layer][None], len(values), axis=0)
        points[:, region.dims] = values
        if self.layer == 0:
            images = torch.from_numpy(points).to(torch.float32).view(-1, *self.x.shape)
            gap = _best_other(self.forward(images), self.label)
            hits = torch.nonzero(gap > 0).flatten()
            if len(hits) == 0:
                return None
            return self._unsafe(images[int(hits[0])], feature, coeffs[int(hits[0])], region)
        acts = torch.from_numpy(points).view(-1, *self.net.shapes[self.layer])
        for lay in self.net.layers[self.layer :]:
            acts = apply_layer(lay, acts)
        gap = _best_other(acts.flatten(1), self.label)
        for i in torch.nonzero(gap > 0).flatten().tolist():
            self.stats.hidden_flips += 1
            back = back_propagate(self.net, self.x, regions, values[i], deadline=deadline,
                                  query_timeout=self.query_timeout)  # fmt: skip
            self.stats.z3_queries += back.queries
            self.stats.backprop[back.status] = self.stats.backprop.get(back.status, 0) + 1
            if back.input is None:
                continue
            image = torch.from_numpy(back.input).to(torch.float32).view(self.x.shape)
            if float(_best_other(self.forward(image[None]), self.label)[0]) > 0:
                verdict = self._unsafe(image, feature, coeffs[i], region)
                verdict.details["backprop_status"] = back.status
                return verdict
        return None

    def _unsafe(
        self, image: torch.Tensor, feature: int, coeffs: np.ndarray, region: Region
    ) -> Verdict:
        y = self.forward(image[None])
        margin = float(_best_other(y, self.label)[0])
        self.stats.features_examined = feature + 1
        verdict = self._verdict(UNSAFE, counterexample=image, output=y[0], margin=margin)
        verdict.details.update(
            feature=feature, dims=region.dims.tolist(), coefficients=coeffs.tolist(),
            manipulations=int(np.abs(coeffs).sum()), adversarial_class=int(y[0].argmax()),
        )  # fmt: skip
        return verdict


def _continuous(
    net: Network,
    forward: Forward,
    x: torch.Tensor,
    label: int,
    feats: list[np.ndarray],
    eps: float,
    timeout: float,
    seed: int,
) -> dict[str, Any]:
    """Mode (b): the exact verdict on each examined feature's continuous box."""
    from bastion.verify.spec import robustness_property
    from bastion.verify.verdict import EXACTNESS
    from bastion.verify.verifier import verify

    start = time.perf_counter()
    per_feature: list[str] = []
    status, reason = SAFE, ""
    for f, dims in enumerate(feats):
        left = timeout - (time.perf_counter() - start)
        if left <= 0:
            status, reason = UNKNOWN, f"deadline reached after {f} of {len(feats)} features"
            break
        mask = torch.zeros(x.numel(), dtype=torch.bool)
        mask[torch.from_numpy(dims)] = True
        prop = robustness_property(x, label, net.num_outputs, eps=eps, mask=mask.view(x.shape))
        v = verify(net, prop, model=forward, timeout=left, seed=seed)
        per_feature.append(v.status)
        if v.status == UNSAFE:
            status, reason = UNSAFE, f"feature {f}: a point of its box changes the class"
            break
        if v.status == UNKNOWN:
            status, reason = UNKNOWN, f"feature {f}: {v.reason}"
    if not feats:
        status, reason = UNKNOWN, "no feature was examined"
    return {
        "status": status,
        "seconds": round(time.perf_counter() - start, 4),
        "eps": eps,
        "features": per_feature,
        "reason": reason,
        "guarantee": (
            f"every point of each examined feature's continuous box (L∞ {eps:g}, other "
            f"pixels fixed) keeps the class; {EXACTNESS}"
        )
        if status == SAFE
        else "",
    }
