"""Camera metadata and the stages of Brooks et al.'s unprocessing (CVPR 2019) and of the
classical ISP that inverts it, in torch (differentiable, any device). Spec §5.2.

Unprocess (RGB → camera RAW): inverse tone map (smoothstep) → inverse gamma (2.2) →
inverse colour correction (rgb2cam) → inverse white balance and brightening, with
highlight protection → clip → (mosaic, `bastion.defenses.bayer`) → optional shot/read noise.
Process (RAW → RGB): (demosaic) → white balance → clip → colour correction (cam2rgb) →
gamma → tone map (smoothstep) → clip. Noise-free and without mosaicing, process ∘ unprocess
is the identity up to float rounding wherever no clip or highlight protection acts.

The constants are those of `google-research/unprocessing` (`unprocess.py`). Unlike its
`process.py`, the ISP here also undoes the brightening gain and the tone map, so that the
round trip is consistent (spec §5.2 step 10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# XYZ → camera matrices of four cameras (Brooks et al.), mixed at random per image.
XYZ2CAMS = (
    ((1.0234, -0.2969, -0.2266), (-0.5625, 1.6328, -0.0469), (-0.0703, 0.2188, 0.6406)),
    ((0.4913, -0.0541, -0.0202), (-0.613, 1.3513, 0.2906), (-0.1564, 0.2151, 0.7183)),
    ((0.838, -0.263, -0.0639), (-0.2887, 1.0725, 0.2496), (-0.0627, 0.1427, 0.5438)),
    ((0.6596, -0.2079, -0.0562), (-0.4782, 1.3016, 0.1933), (-0.097, 0.1581, 0.5181)),
)
RGB2XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
GAMMA = 2.2
HIGHLIGHT_INFLECTION = 0.9
# means of the random gains, used by the deterministic metadata
RGB_GAIN_MEAN, RED_GAIN_RANGE, BLUE_GAIN_RANGE = 1 / 0.8, (1.9, 2.4), (1.5, 1.9)
SHOT_NOISE_RANGE = (1e-4, 0.012)
# the inverse tone map's slope is infinite at 0 and 1; its gradient is taken this far inside
_EDGE = 1e-6


@dataclass(frozen=True)
class IspMetadata:
    """Per-image camera parameters; each field has the batch as its first axis.

    `rgb2cam`/`cam2rgb` are N×3×3; the gains and noise levels are N. Noise levels are
    variances per unit signal (`shot_noise`) and constant (`read_noise`), as in Brooks et al.
    """

    rgb2cam: torch.Tensor
    cam2rgb: torch.Tensor
    rgb_gain: torch.Tensor
    red_gain: torch.Tensor
    blue_gain: torch.Tensor
    shot_noise: torch.Tensor
    read_noise: torch.Tensor

    def __len__(self) -> int:
        return int(self.rgb_gain.shape[0])

    def to(self, like: torch.Tensor) -> IspMetadata:
        """The same metadata with the dtype and device of `like`."""
        return IspMetadata(*(getattr(self, f).to(like) for f in self.__dataclass_fields__))


def _camera_matrices(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rgb2cam (rows summing to 1) and its inverse from N×4 mixing weights (float64)."""
    xyz2cam = torch.einsum("nk,kij->nij", weights, torch.tensor(XYZ2CAMS, dtype=torch.float64))
    xyz2cam = xyz2cam / weights.sum(1).reshape(-1, 1, 1)
    rgb2cam = xyz2cam @ torch.tensor(RGB2XYZ, dtype=torch.float64)
    rgb2cam = rgb2cam / rgb2cam.sum(-1, keepdim=True)
    return rgb2cam, torch.linalg.inv(rgb2cam)


def mean_metadata(n: int) -> IspMetadata:
    """Deterministic metadata for n images: equal camera weights, the gains' means and the
    log-mean noise levels (spec §5.3: for reproducible evaluation)."""
    rgb2cam, cam2rgb = _camera_matrices(torch.full((n, 4), 0.25, dtype=torch.float64))
    log_shot = torch.full((n,), sum(math.log(v) for v in SHOT_NOISE_RANGE) / 2)
    return IspMetadata(
        rgb2cam=rgb2cam,
        cam2rgb=cam2rgb,
        rgb_gain=torch.full((n,), RGB_GAIN_MEAN),
        red_gain=torch.full((n,), sum(RED_GAIN_RANGE) / 2),
        blue_gain=torch.full((n,), sum(BLUE_GAIN_RANGE) / 2),
        shot_noise=log_shot.exp(),
        read_noise=(2.18 * log_shot + 1.20).exp(),
    )


def random_metadata(n: int, generator: torch.Generator) -> IspMetadata:
    """Metadata for n images drawn as in Brooks et al.'s `unprocess.random_*` functions."""

    def uniform(lo: float, hi: float, shape: tuple[int, ...] = (n,)) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=torch.float64)

    rgb2cam, cam2rgb = _camera_matrices(uniform(1e-8, 1e8, (n, 4)))
    rgb_gain = 1 / (0.8 + 0.1 * torch.randn(n, generator=generator, dtype=torch.float64))
    log_shot = uniform(math.log(SHOT_NOISE_RANGE[0]), math.log(SHOT_NOISE_RANGE[1]))
    log_read = 2.18 * log_shot + 1.20 + 0.26 * torch.randn(n, generator=generator)
    return IspMetadata(
        rgb2cam=rgb2cam,
        cam2rgb=cam2rgb,
        rgb_gain=rgb_gain,
        red_gain=uniform(*RED_GAIN_RANGE),
        blue_gain=uniform(*BLUE_GAIN_RANGE),
        shot_noise=log_shot.exp(),
        read_noise=log_read.exp(),
    )


def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1, 1)


def smoothstep(x: torch.Tensor) -> torch.Tensor:
    """The global tone map `3x² − 2x³`."""
    return 3 * x**2 - 2 * x**3


def _inverse_smoothstep_raw(x: torch.Tensor) -> torch.Tensor:
    return 0.5 - torch.sin(torch.asin(1 - 2 * x) / 3)


def inverse_smoothstep(x: torch.Tensor) -> torch.Tensor:
    """`0.5 − sin(asin(1 − 2x)/3)` on `clip(x, 0, 1)`; the gradient is taken 1e-6 inside
    [0, 1] where the exact slope is infinite (so it never turns into NaN)."""
    x = x.clamp(0, 1)
    inner = _inverse_smoothstep_raw(x.clamp(_EDGE, 1 - _EDGE))
    with torch.no_grad():
        exact = _inverse_smoothstep_raw(x)
    return inner + (exact - inner.detach())


def gamma_expand(x: torch.Tensor) -> torch.Tensor:
    """Inverse gamma: `max(x, 1e-8)^2.2`."""
    return x.clamp_min(1e-8) ** GAMMA


def gamma_compress(x: torch.Tensor) -> torch.Tensor:
    """Gamma: `max(clip(x, 0, 1), 1e-8)^(1/2.2)`."""
    return x.clamp(1e-8, 1) ** (1 / GAMMA)


def apply_ccm(x: torch.Tensor, ccm: torch.Tensor) -> torch.Tensor:
    """Per pixel `ccm @ rgb` for `N×3×H×W` images and `N×3×3` matrices."""
    return torch.einsum("nij,njhw->nihw", ccm.to(x), x)


def _gains(meta: IspMetadata, like: torch.Tensor) -> torch.Tensor:
    """N×3×1×1 white-balance and brightening gains `[red, 1, blue]·rgb_gain`."""
    ones = torch.ones_like(meta.red_gain)
    wb = torch.stack([meta.red_gain, ones, meta.blue_gain], 1) * meta.rgb_gain.reshape(-1, 1)
    return wb.to(like).reshape(-1, 3, 1, 1)


def invert_gains(x: torch.Tensor, meta: IspMetadata, protect_highlights: bool) -> torch.Tensor:
    """Inverse white balance and brightening of camera RGB; with highlight protection, gains
    fade to 1 as the pixel's mean brightness goes from 0.9 to 1 (Brooks et al.)."""
    g = 1 / _gains(meta, x)
    if not protect_highlights:
        return x * g
    gray = x.mean(1, keepdim=True)
    mask = ((gray - HIGHLIGHT_INFLECTION).clamp_min(0) / (1 - HIGHLIGHT_INFLECTION)) ** 2
    return x * torch.maximum(mask + (1 - mask) * g, g)


def white_balance(x: torch.Tensor, meta: IspMetadata) -> torch.Tensor:
    """Apply the white-balance and brightening gains to demosaiced camera RGB `N×3×H×W`."""
    return x * _gains(meta, x)


def add_noise(raw: torch.Tensor, meta: IspMetadata, generator: torch.Generator) -> torch.Tensor:
    """Heteroscedastic Gaussian noise of variance `raw·shot + read` (Brooks et al.)."""
    variance = raw.clamp_min(0) * _per_image(meta.shot_noise.to(raw)) + _per_image(
        meta.read_noise.to(raw)
    )
    z = torch.randn(raw.shape, generator=generator, device=generator.device, dtype=raw.dtype)
    return raw + variance.sqrt() * z.to(raw.device)


def unprocess(
    x: torch.Tensor, meta: IspMetadata, *, protect_highlights: bool = True
) -> torch.Tensor:
    """sRGB-like `N×3×H×W` in [0, 1] → linear camera RGB in [0, 1] (before mosaicing)."""
    x = gamma_expand(inverse_smoothstep(x))
    x = apply_ccm(x, meta.rgb2cam)
    return invert_gains(x, meta, protect_highlights).clamp(0, 1)


def develop(cam: torch.Tensor, meta: IspMetadata) -> torch.Tensor:
    """White-balanced, demosaiced camera RGB → display RGB: CCM, gamma, tone map, clip."""
    x = apply_ccm(cam.clamp(0, 1), meta.cam2rgb)
    return smoothstep(gamma_compress(x)).clamp(0, 1)
