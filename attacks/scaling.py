"""Image-scaling attacks: an image that looks like S but that a resizer turns into T.

`ScalingAttack` is Xiao et al.'s "strong" attack (USENIX Security 2019) in Quiring et al.'s
two-step form (USENIX Security 2020): with the scaler's coefficients (`scalers.coefficients`,
`scaler(X) = CL·X·CR`), first every column of the horizontally scaled source S·CR, then
every row of S, moves as little as possible (least squares) so that the scaled result lies
within ε grey levels of the target T while pixels stay in [0, 255]. Each step is a batch
of independent box-constrained QPs sharing one constraint matrix; they are solved all at
once (every column/row of every channel) by accelerated projected gradient on the dual
(FISTA with adaptive restart, sparse matrix products), not one solver call per column.

`PenaltyScalingAttack` is the differentiable variant of Chen, Xiao et al. (TDSC 2020):
Adam on a tanh-parametrised image, runs on any torch device.

Images: numpy H×W or H×W×C, uint8 or float in [0, 1] (see `scalers.as_pixels`); attack
images come back as uint8, because that is what gets stored and resized.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from bastion.attacks.scalers import Scaler, as_pixels, coefficients, get_scaler, psnr
from bastion.attacks.ssim import ssim
from bastion.errors import ConfigError, InvalidInputError

Progress = Callable[[int, int], None]


@dataclass
class ScalingAttackResult:
    """An attack image and how well it works.

    `attack` is uint8 (shape of the source). `scaled` is `scaler(attack)` through the
    library's own uint8 path, compared with the target T (`psnr_target`, `max_error_target`
    in grey levels); `psnr_source` and `ssim_source` compare the attack image with the source.
    With a model: `target_class` (the given label, else the model's class for T),
    `predicted_class` of `scaled`, and `success` = they are equal; all None without one.
    """

    attack: np.ndarray
    scaled: np.ndarray
    scaler: str
    psnr_target: float
    max_error_target: float
    psnr_source: float
    ssim_source: float
    iterations: int
    converged: bool
    seconds: float
    target_class: int | None = None
    predicted_class: int | None = None
    success: bool | None = None

    def metrics(self) -> dict[str, Any]:
        """Every field except the two images, JSON-ready."""
        d = asdict(self)
        del d["attack"], d["scaled"]
        return d


def solve_box_qp(
    c: sp.csr_matrix,
    start: np.ndarray,
    target: np.ndarray,
    eps: float,
    *,
    max_iterations: int = 3000,
    tol: float = 1e-2,
) -> tuple[np.ndarray, int, bool]:
    """Per column j: the x closest to start[:, j] with |c·x − target[:, j]| ≤ eps, x ∈ [0, 255].

    Accelerated proximal gradient on the dual of the linear constraints (the box stays in
    the primal: x(y) = clip(start − cᵀy, 0, 255)), FISTA with per-column adaptive restart.
    Variables no constraint touches keep their start value. Stops when the dual gradient
    mapping, which measures primal infeasibility and complementary slackness in grey
    levels, is below `tol` for every column. Returns (x, iterations, converged).
    """
    used = np.asarray(abs(c).sum(axis=0)).ravel() > 0
    cu = sp.csr_matrix(c[:, used])
    cut = sp.csr_matrix(cu.T)
    step = 1.0 / np.linalg.norm(cu.toarray(), 2) ** 2
    y_out = np.zeros_like(target)
    act = np.arange(target.shape[1])  # columns still being solved
    s, lo, hi = start[used], target - eps, target + eps
    y = np.zeros_like(target)
    w, theta = y.copy(), np.ones(act.size)
    it = 0
    while it < max_iterations:
        it += 1
        v = w + step * (cu @ np.clip(s - cut @ w, 0.0, 255.0))
        # prox of step·Σ max(y·hi, y·lo): a shifted soft threshold
        y_new = np.where(v > step * hi, v - step * hi, np.where(v < step * lo, v - step * lo, 0.0))
        done = np.abs(w - y_new).max(axis=0) <= tol * step
        if done.any():
            y_out[:, act[done]] = y_new[:, done]
            keep = ~done
            act, s, lo, hi = act[keep], s[:, keep], lo[:, keep], hi[:, keep]
            y, y_new, w, theta = y[:, keep], y_new[:, keep], w[:, keep], theta[keep]
            if act.size == 0:
                break
        restart = np.einsum("ij,ij->j", w - y_new, y_new - y) > 0
        theta_new = (1 + np.sqrt(1 + 4 * theta**2)) / 2
        beta = np.where(restart, 0.0, (theta - 1) / theta_new)
        w = y_new + beta * (y_new - y)
        y, theta = y_new, np.where(restart, 1.0, theta_new)
    y_out[:, act] = y
    x = start.copy()
    x[used] = np.clip(start[used] - cut @ y_out, 0.0, 255.0)
    converged = act.size == 0
    return x, it, converged


def _check_pair(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s, t = as_pixels(source, "source image"), as_pixels(target, "target image")
    if s.shape[2] != t.shape[2]:
        raise InvalidInputError(
            f"source has {s.shape[2]} channel(s) but target has {t.shape[2]}; "
            "convert both to grey or both to RGB"
        )
    if t.shape[0] > s.shape[0] or t.shape[1] > s.shape[1]:
        raise InvalidInputError(
            f"target {t.shape[0]}×{t.shape[1]} is larger than source {s.shape[0]}×{s.shape[1]}; "
            "a scaling attack hides a smaller target in a larger source"
        )
    return s, t


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _result(
    scaler: Scaler,
    source: np.ndarray,
    target: np.ndarray,
    attack: np.ndarray,
    *,
    grey: bool,
    iterations: int,
    converged: bool,
    seconds: float,
    model: Callable[[Any], Any] | None,
    target_label: int | None,
) -> ScalingAttackResult:
    img = attack[..., 0] if grey else attack
    scaled = scaler(img, target.shape[:2])
    scaled3 = scaled[..., None] if grey else scaled
    res = ScalingAttackResult(
        attack=img,
        scaled=scaled,
        scaler=scaler.name,
        psnr_target=psnr(scaled3, target),
        max_error_target=float(np.abs(scaled3.astype(np.float64) - target).max()),
        psnr_source=psnr(attack, source),
        ssim_source=ssim(attack, source),
        iterations=iterations,
        converged=converged,
        seconds=seconds,
    )
    if model is not None:
        target_cls, pred = classify(model, [target / 255, scaled3 / 255])
        res.target_class = target_label if target_label is not None else target_cls
        res.predicted_class = pred
        res.success = pred == res.target_class
    return res


def classify(model: Callable[[Any], Any], images: list[np.ndarray]) -> list[int]:
    """The model's classes for equally sized H×W×C float images in [0, 1] (one batch)."""
    import torch

    batch = torch.as_tensor(np.stack(images).transpose(0, 3, 1, 2), dtype=torch.float32)
    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    if first is not None:
        batch = batch.to(first.device)
    with torch.no_grad():
        return [int(v) for v in model(batch).argmax(1).tolist()]


@dataclass(frozen=True)
class ScalingAttack:
    """Xiao et al.'s strong scaling attack as the box-constrained two-step QP (Quiring §3.2).

    `eps` is the allowed error per scaled pixel in grey levels (Xiao/Quiring: 1);
    `max_iterations` and `tol` bound the dual solver of each step. Call as
    `attack(source, target, *, model=None, target_label=None)`.
    """

    scaler: str = "cv2.linear"
    eps: float = 1.0
    max_iterations: int = 3000
    tol: float = 1e-2

    def __post_init__(self) -> None:
        get_scaler(self.scaler)
        if not self.eps > 0 or self.max_iterations < 1 or not self.tol > 0:
            raise ConfigError("eps and tol must be positive and max_iterations at least 1")

    def __call__(
        self,
        source: np.ndarray,
        target: np.ndarray,
        *,
        model: Callable[[Any], Any] | None = None,
        target_label: int | None = None,
        progress: Progress | None = None,
    ) -> ScalingAttackResult:
        start = time.perf_counter()
        s, t = _check_pair(source, target)
        scaler = get_scaler(self.scaler)
        (m, n, ch), (mp, np_) = s.shape, t.shape[:2]
        cl, cr = coefficients(scaler, (m, n), (mp, np_))
        # Step 1: columns of the horizontally scaled source S·CR (m×n'), constraint CL.
        s_h = np.einsum("ijc,jk->ikc", s, cr, optimize=True)
        a_h, it1, ok1 = solve_box_qp(
            sp.csr_matrix(cl),
            s_h.reshape(m, -1),
            t.reshape(mp, -1),
            self.eps,
            max_iterations=self.max_iterations,
            tol=self.tol,
        )
        a_h = np.round(a_h).reshape(m, np_, ch)
        if progress is not None:
            progress(1, 2)
        # Step 2: rows of S, constraint CRᵀ, aiming at the rounded step-1 image.
        a_t, it2, ok2 = solve_box_qp(
            sp.csr_matrix(cr.T),
            s.transpose(1, 0, 2).reshape(n, -1),
            a_h.transpose(1, 0, 2).reshape(np_, -1),
            self.eps,
            max_iterations=self.max_iterations,
            tol=self.tol,
        )
        attack = _to_uint8(a_t.reshape(n, m, ch).transpose(1, 0, 2))
        if progress is not None:
            progress(2, 2)
        return _result(
            scaler,
            s,
            t,
            attack,
            grey=np.ndim(source) == 2,
            iterations=it1 + it2,
            converged=ok1 and ok2,
            seconds=time.perf_counter() - start,
            model=model,
            target_label=target_label,
        )


@dataclass(frozen=True)
class PenaltyScalingAttack:
    """Chen, Xiao et al.'s penalty form (TDSC 2020, `scaling_camouflage`), differentiable.

    A = ½(tanh(w) + 1) in [0, 1] minimises ‖A − S‖²/(m·n) + penalty·‖CL·A·CR − T‖²/(m'·n')
    (sums over channels) with Adam; defaults as the reference: lr 0.01, ≤ 3000 iterations,
    w₀ = 0 (`init="grey"`, A₀ = 0.5), stop at a 1000-iteration checkpoint whose objective is
    above 0.999 × the previous one. `init="source"` starts from S instead (our option).
    Runs on `device` (e.g. "cuda").
    """

    scaler: str = "cv2.linear"
    penalty: float = 1.0
    learning_rate: float = 0.01
    max_iterations: int = 3000
    init: Literal["grey", "source"] = "grey"
    device: str = "cpu"

    def __post_init__(self) -> None:
        get_scaler(self.scaler)
        if self.init not in ("grey", "source"):
            raise ConfigError(f"init must be 'grey' or 'source', got {self.init!r}")
        if not self.penalty > 0 or not self.learning_rate > 0 or self.max_iterations < 1:
            raise ConfigError("penalty and learning_rate must be positive, max_iterations >= 1")

    def __call__(
        self,
        source: np.ndarray,
        target: np.ndarray,
        *,
        model: Callable[[Any], Any] | None = None,
        target_label: int | None = None,
        progress: Progress | None = None,
    ) -> ScalingAttackResult:
        import torch

        start = time.perf_counter()
        s, t = _check_pair(source, target)
        scaler = get_scaler(self.scaler)
        (m, n, _), (mp, np_) = s.shape, t.shape[:2]
        cl, cr = coefficients(scaler, (m, n), (mp, np_))
        dev = torch.device(self.device)

        def tensor(a: np.ndarray) -> torch.Tensor:
            return torch.tensor(np.asarray(a), dtype=torch.float32, device=dev)

        cl_t, cr_t = tensor(cl), tensor(cr)
        s_t, t_t = tensor(s.transpose(2, 0, 1) / 255), tensor(t.transpose(2, 0, 1) / 255)
        w0 = torch.atanh(s_t.clamp(1e-3, 1 - 1e-3) * 2 - 1) if self.init == "source" else None
        w = (torch.zeros_like(s_t) if w0 is None else w0).requires_grad_(True)
        opt = torch.optim.Adam([w], lr=self.learning_rate)
        prev, it = float("inf"), 0
        for it in range(1, self.max_iterations + 1):
            a = (torch.tanh(w) + 1) / 2
            loss = ((a - s_t) ** 2).sum() / (m * n) + self.penalty * (
                (cl_t @ a @ cr_t - t_t) ** 2
            ).sum() / (mp * np_)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if it % 1000 == 0:
                if progress is not None:
                    progress(it, self.max_iterations)
                if loss.item() > 0.999 * prev:
                    break
                prev = loss.item()
        with torch.no_grad():
            a_np = ((torch.tanh(w) + 1) / 2 * 255).permute(1, 2, 0).cpu().numpy()
        return _result(
            scaler,
            s,
            t,
            _to_uint8(a_np),
            grey=np.ndim(source) == 2,
            iterations=it,
            converged=it < self.max_iterations,
            seconds=time.perf_counter() - start,
            model=model,
            target_label=target_label,
        )
