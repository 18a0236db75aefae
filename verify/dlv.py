"""DLV mode: Huang, Kwiatkowska, Wang, Wu, "Safety Verification of Deep Neural Networks"
(CAV 2017), as the paper defines it and its code runs it (specs/verification.md §1.2–1.4).

One feature (`feature_dims` dims) at a time, for up to `features` features, every grid
point of the discretised region {a + Σ c_p·span_p·e_p : |c_p| ≤ numSpan} that the
enumeration mode names ("convex" corners, "line" all points, "point" one) is classified;
grid points go through the network in batches. Layers 0…K are analysed in turn, every
feature at one layer before the next (DLV's "stepwise" mode):

* **layer 0** (the input): the grid points are images (clipped to [0, 1]) and the float32
  model classifies them directly;
* **a hidden layer k** (the output of a dense or convolutional layer): sound bounds give the
  image of the region analysed below it (`dlv_containment.image_delta`, down to the
  feature's input box at layer 0); the layer-k region covers the neurons that move most
  (`covering_region`) and `contains` checks that it holds the whole image (DLV's refinement
  condition, which DLV's code only assumes). Its grid points are propagated from layer k to
  the output; every point that changes the class, and in a region that contains the image
  every grid point (DLV maps each one back), is mapped back to the input with z3, one
  layer at a time (`back_propagate`); the input found is classified by the float32 model.

An UNSAFE found at any layer is the answer: the float32 model itself, run on the reported
input alone, puts another logit strictly above the label's. A SAFE is DLV's discretised
guarantee, printed as `SAFE (DLV, discretised region)`: complete for the enumerated grid of
the deepest layer that carries it, under the minimality assumption (no class change between
neighbouring grid points), which is not checked. A hidden layer carries it only when, for
every feature, its region contains the image of the region below, no grid point changes the
class and its grid points were mapped back with z3; otherwise the input grid carries it. A
point that changes the class at a hidden layer and cannot be mapped to an input (z3
unknown, or the input found keeps the class) makes the answer UNKNOWN. With
`continuous=True` the same features' continuous boxes are also decided exactly by `verify`
(mode (b) of spec §1.6) and reported next to the grid verdict.

Deviations from DLV's code: a z3 timeout is `unknown`, never unsat; the input constraint
x ≠ original is dropped; hidden regions are synthesised from sound bounds of the image (not
from Σ|W|·span alone) and their containment is checked; no seeding of the next feature from
the previous round's least confident image (the region stays one feature's box around x, so
the verdict has a meaning). Residual networks (an `Add` join) are analysed on the input
grid only (`layer=0`): the hidden-layer analysis carries regions along a single chain of
layers and refuses them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bastion.errors import ConfigError, InvalidInputError
from bastion.modes import eval_mode
from bastion.validation import check_images
from bastion.verify.dlv_containment import extend_chain
from bastion.verify.dlv_continuous import continuous_boxes
from bastion.verify.dlv_regions import (
    Region,
    analysable,
    back_propagate,
    grid_size,
    grid_values,
    input_features,
)
from bastion.verify.dlv_verdict import DlvVerdict, LayerStats, guarantee
from bastion.verify.extract import extract
from bastion.verify.network import Add, Conv2d, Network, apply_layer
from bastion.verify.outcome import Status
from bastion.verify.verdict import SAFE, UNKNOWN, UNSAFE

Forward = Callable[[torch.Tensor], torch.Tensor]


def analysed_layers(net: Network, layer: int | None) -> list[int]:
    """Layers 0…K that DLV analyses: the input and the outputs of dense and convolutional
    layers. K defaults to the first hidden one (DLV's ImageNet setting "up to layer 1")."""
    hidden = [k for k in range(1, len(net.layers)) if analysable(net, k)]
    if layer is None:
        return [0, *hidden[:1]]
    if not analysable(net, layer):
        raise ConfigError(
            f"layer {layer} is not the input (0) or the output of a dense or convolutional "
            f"layer followed by more layers; choose one of {[0, *hidden]}"
        )
    return [0, *[k for k in hidden if k <= layer]]


def _refuse_residual(net: Network, analysed: list[int]) -> None:
    """DLV's hidden layers are carried along a single chain of layers: no residual joins."""
    joins = [k for k, lay in enumerate(net.layers) if isinstance(lay, Add)]
    if joins and len(analysed) > 1:
        raise ConfigError(
            f"DLV's hidden-layer analysis reads a single chain of layers, but this network "
            f"joins branches (a residual Add at layer {joins[0]}); pass --dlv-layer 0 "
            f"(layer=0) for the input grid only, or verify the L∞ ball with --region linf "
            f"(the default engine reads residual networks)"
        )


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
    layer: int | None = None,
    timeout: float = 60.0,
    max_points: int = 1_000_000,
    batch_size: int = 1024,
    query_timeout: float = 10.0,
    continuous: bool = False,
    seed: int = 0,
    network: Network | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DlvVerdict:
    """DLV's search of one image's feature regions: SAFE (discretised), UNSAFE or UNKNOWN.

    Defaults are DLV's MNIST settings (150 features of 5 dims, span 1.0 × 1, convex).
    `heuristic` picks the features ("sift", "derivative", "activation"); layers 0…`layer`
    are analysed in turn (default: the input and the first hidden dense/convolutional
    layer; 0: the input only). Budgets: `timeout` seconds for the whole search,
    `max_points` grid points over all layers, `query_timeout` per z3 query. UNKNOWN when a
    budget ends first. `verdict.layers` holds one statistics dict per analysed layer.
    `continuous=True` adds `details["continuous"]`: the exact verdict of `verify` on each
    examined feature's continuous box (eps = span·numSpan).
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
    analysed = analysed_layers(net, layer)
    _refuse_residual(net, analysed)
    forward = _forward(model)
    with eval_mode(model):
        with torch.no_grad():
            pred = int(forward(x[None]).argmax(1)[0])
        label = pred if label is None else int(label)
        feats = input_features(net, x, label, feature_dims=feature_dims, heuristic=heuristic)
        search = _Search(net, forward, x, label, enumeration, analysed, batch_size, query_timeout)
        with torch.no_grad():
            verdict = search.run(
                feats[:features], span, num_span, feature_dims, start + timeout, max_points,
                progress,
            )  # fmt: skip
        verdict.seconds = time.perf_counter() - start
        verdict.details.update(
            label=label, prediction=pred, layer=analysed[-1], analysed_layers=analysed,
            span=span, num_span=num_span,
            feature_dims=feature_dims, enumeration=enumeration, heuristic=heuristic,
            features_requested=features, features_available=len(feats),
        )  # fmt: skip
        if continuous:
            examined = feats[: verdict.details["features_examined"]]
            verdict.details["continuous"] = continuous_boxes(
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


class _Search:
    """The per-layer, per-feature loop of DLV over one image."""

    def __init__(
        self,
        net: Network,
        forward: Forward,
        x: torch.Tensor,
        label: int,
        enumeration: str,
        analysed: list[int],
        batch_size: int,
        query_timeout: float,
    ) -> None:
        self.net, self.forward, self.x, self.label = net, forward, x, label
        self.enumeration, self.analysed = enumeration, analysed
        self.batch_size, self.query_timeout = batch_size, query_timeout
        self.acts = [a[0].flatten().numpy() for a in net.activations(x.double()[None])]
        self.layers: list[LayerStats] = []
        self.points = 0
        self.examined = 0
        self.contained_now = False  # whether the current feature's region holds its image

    def run(
        self,
        feats: list[np.ndarray],
        span: float,
        num_span: int,
        feature_dims: int,
        deadline: float,
        max_points: int,
        progress: Callable[[int, int], None] | None,
    ) -> DlvVerdict:
        # per feature, the regions of every activation up to the last analysed layer
        chains = [[Region(0, d, np.full(len(d), float(span)), int(num_span))] for d in feats]
        for k in self.analysed:
            stats = LayerStats(k, self._kind(k), int(np.prod(self.net.shapes[k])))
            self.layers.append(stats)
            started = time.perf_counter()
            for f, chain in enumerate(chains):
                if k > 0:
                    self._extend(chain, k, stats, feature_dims)
                region = chain[-1]
                clip = (0.0, 1.0) if k == 0 else None
                size = grid_size(region, self.acts[k], self.enumeration, clip)
                if self.points + size > max_points:
                    return self._verdict(UNKNOWN, reason=f"grid-point budget ({max_points}) "
                                         f"spent in layer {k} after {f} of {len(feats)} "
                                         "features")  # fmt: skip
                values, coeffs = grid_values(region, self.acts[k], self.enumeration, clip)
                for lo in range(0, len(values), self.batch_size):
                    if time.perf_counter() >= deadline:
                        return self._verdict(UNKNOWN, reason=f"deadline reached in layer {k}, "
                                             f"feature {f}")  # fmt: skip
                    batch = slice(lo, lo + self.batch_size)
                    found = self._batch(chain, values[batch], coeffs[batch], f, stats, deadline)
                    if found is not None:
                        return found
                stats.features = f + 1
                stats.seconds = time.perf_counter() - started
                self.examined = max(self.examined, f + 1)
                if progress is not None:
                    progress(f + 1, len(feats))
        return self._decide(len(feats))

    def _kind(self, k: int) -> str:
        if k == 0:
            return "input"
        return "conv" if isinstance(self.net.layers[k - 1], Conv2d) else "dense"

    def _extend(self, chain: list[Region], k: int, stats: LayerStats, feature_dims: int) -> None:
        """The chain's regions up to layer k (`extend_chain`), counted in `stats`."""
        moving, self.contained_now = extend_chain(self.net, self.acts, chain, k, feature_dims)
        stats.moving = max(stats.moving, moving)
        stats.contained += self.contained_now

    def _decide(self, n_features: int) -> DlvVerdict:
        unresolved = sum(s.unresolved for s in self.layers)
        if unresolved:
            where = [s.index for s in self.layers if s.unresolved]
            return self._verdict(
                UNKNOWN,
                reason=f"{unresolved} grid points of layers {where} change the class but no "
                "input realising them was found (z3 unknown, or the input keeps the class)",
            )
        carrier = 0
        for s in self.layers[1:]:
            if not s.carries(n_features):
                break
            carrier = s.index
        text = guarantee(self.enumeration, carrier, self.analysed)
        verdict = self._verdict(SAFE, guarantee=text)
        verdict.details["carried_by_layer"] = carrier
        return verdict

    def _verdict(self, status: Status, **kw: Any) -> DlvVerdict:
        details = {
            "points": self.points,
            "features_examined": self.examined,
            "z3_queries": sum(s.z3_queries for s in self.layers),
        }
        layers = [s.as_dict() for s in self.layers]
        return DlvVerdict(status, "dlv", 0.0, layers=layers, details=details, **kw)

    def _batch(
        self,
        chain: list[Region],
        values: np.ndarray,
        coeffs: np.ndarray,
        feature: int,
        stats: LayerStats,
        deadline: float,
    ) -> DlvVerdict | None:
        region, k = chain[-1], chain[-1].layer
        self.points += len(values)
        stats.points += len(values)
        points = np.repeat(self.acts[k][None], len(values), axis=0)
        points[:, region.dims] = values
        if k == 0:
            images = torch.from_numpy(points).to(torch.float32).view(-1, *self.x.shape)
            gap = _best_other(self.forward(images), self.label)
            hits = torch.nonzero(gap > 0).flatten()
            stats.flips += len(hits)
            if len(hits) == 0:
                return None
            return self._unsafe(images[int(hits[0])], feature, coeffs[int(hits[0])], region)
        acts = torch.from_numpy(points).view(-1, *self.net.shapes[k])
        for lay in self.net.layers[k:]:
            acts = apply_layer(lay, acts)
        flips = (_best_other(acts.flatten(1), self.label) > 0).numpy()
        stats.flips += int(flips.sum())
        # DLV maps every grid point back; points that keep the class only matter where the
        # region contains the image (elsewhere they cannot carry a guarantee)
        mapped = np.flatnonzero(flips)
        if self.contained_now:
            mapped = np.concatenate([mapped, np.flatnonzero(~flips)])
        for i in mapped.tolist():
            back = back_propagate(self.net, self.x, chain, values[i], deadline=deadline,
                                  query_timeout=self.query_timeout)  # fmt: skip
            stats.z3_queries += back.queries
            stats.backprop[back.status] = stats.backprop.get(back.status, 0) + 1
            if back.input is not None:
                image = torch.from_numpy(back.input).to(torch.float32).view(self.x.shape)
                if float(_best_other(self.forward(image[None]), self.label)[0]) > 0:
                    verdict = self._unsafe(image, feature, coeffs[i], region)
                    verdict.details["backprop_status"] = back.status
                    return verdict
            if flips[i] and back.status == "unsat":
                stats.spurious += 1
            elif flips[i]:
                stats.unresolved += 1
        return None

    def _unsafe(
        self, image: torch.Tensor, feature: int, coeffs: np.ndarray, region: Region
    ) -> DlvVerdict:
        y = self.forward(image[None])
        margin = float(_best_other(y, self.label)[0])
        self.examined = max(self.examined, feature + 1)
        verdict = self._verdict(UNSAFE, counterexample=image, output=y[0], margin=margin)
        verdict.details.update(
            layer_found=region.layer, feature=feature, dims=region.dims.tolist(),
            coefficients=coeffs.tolist(), manipulations=int(np.abs(coeffs).sum()),
            adversarial_class=int(y[0].argmax()),
        )  # fmt: skip
        return verdict
