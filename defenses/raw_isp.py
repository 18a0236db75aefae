"""RAW camera-ISP preprocessing: "All You Need is RAW" (Zhang, Dong, Heide, ECCV 2022),
in its shippable non-learned form (spec §5.2–5.4).

The defended model sees `ISP(unprocess(x))`: the input is mapped to a Bayer RAW image by
Brooks et al.'s unprocessing (CVPR 2019) and back to RGB by a classical ISP (white balance,
Malvar demosaicing, colour correction, gamma, tone map). Mosaic sub-sampling and
re-interpolation remove part of an adversarial perturbation (about 28–29 dB round trip on
photos); everything else in the pipeline inverts exactly.

The paper's operators F (RGB → RAW) and G (RAW → RGB) are networks trained on real RAW/RGB
pairs; neither the data nor the pretrained weights are available offline, so they are not
shipped. `RawISP(inverse_isp=F, isp=G)` takes them (any callable or `nn.Module` of the
form `(x, metadata) -> tensor`) when they are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from bastion.defenses import isp_ops
from bastion.defenses.bayer import Demosaic, get_demosaic, mosaic
from bastion.defenses.isp_ops import IspMetadata
from bastion.errors import InvalidInputError

Operator = Callable[[torch.Tensor, IspMetadata], torch.Tensor]
"""A pluggable ISP stage `(images, metadata) -> images`, e.g. a learned F or G network."""


class RawISP(nn.Module):
    """The preprocessing RGB → RAW (RGGB Bayer) → RGB; `RawISP().wrap(model)` defends a model.

    Defaults (spec §5.3): deterministic metadata (the means of Brooks et al.'s
    distributions), highlight protection, Malvar demosaicing, no noise. `randomize=True`
    draws fresh camera metadata and shot/read noise per image at every call from a
    generator seeded with `seed` (a randomised defense: attack it with EOT). `demosaic` is
    "malvar", "bilinear", "opencv" or "opencv-ea" (OpenCV: faster on CPU,
    non-differentiable, with a torch surrogate gradient) or a function. `mosaic=False`
    skips the Bayer sampling (then the round trip is exact; for analysis). `bpda=True` makes
    the backward pass the identity (BPDA, Athalye et al. 2018) for adaptive attacks.

    Inputs are `N×3×H×W` RGB in [0, 1]. Grey `N×1×H×W` images are replicated to RGB and
    the output averaged back to one channel. Odd sizes are reflection-padded to even and
    cropped back. Runs on the device of its input.
    """

    def __init__(
        self,
        *,
        demosaic: str | Demosaic = "malvar",
        randomize: bool = False,
        noise: bool | None = None,
        seed: int = 0,
        protect_highlights: bool = True,
        mosaic: bool = True,
        bpda: bool = False,
        inverse_isp: Operator | None = None,
        isp: Operator | None = None,
    ) -> None:
        super().__init__()
        self.demosaic = get_demosaic(demosaic)
        self.randomize = randomize
        self.noise = randomize if noise is None else noise
        self.protect_highlights = protect_highlights
        self.mosaic = mosaic
        self.bpda = bpda
        self.inverse_isp = inverse_isp
        self.isp = isp
        self.generator = torch.Generator().manual_seed(seed)

    def metadata(self, n: int) -> IspMetadata:
        """Camera metadata for n images: drawn (randomize) or the deterministic means."""
        if self.randomize:
            return isp_ops.random_metadata(n, self.generator)
        return isp_ops.mean_metadata(n)

    def to_raw(self, x: torch.Tensor, meta: IspMetadata) -> torch.Tensor:
        """RGB `N×3×H×W` → Bayer `N×1×H×W` (camera RGB `N×3×H×W` without mosaicing)."""
        if self.inverse_isp is not None:
            raw = self.inverse_isp(x, meta)
        else:
            cam = isp_ops.unprocess(x, meta, protect_highlights=self.protect_highlights)
            raw = mosaic(cam) if self.mosaic else cam
        if self.noise:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            noise_gen = torch.Generator(device=raw.device).manual_seed(seed)
            raw = isp_ops.add_noise(raw, meta, noise_gen)
        return raw

    def to_rgb(self, raw: torch.Tensor, meta: IspMetadata) -> torch.Tensor:
        """RAW → RGB by the classical ISP (or the plugged-in `isp`): demosaic, then white
        balance (spec §5.2 steps 9–10; Brooks' `process.py` balances the Bayer plane first,
        which with Malvar gives a sharper 32 dB round trip instead of 28.8 dB)."""
        if self.isp is not None:
            return self.isp(raw, meta)
        cam = self.demosaic(raw) if raw.shape[1] == 1 else raw
        return isp_ops.develop(isp_ops.white_balance(cam, meta), meta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The preprocessed images, same shape as `x`."""
        if x.dim() != 4 or x.shape[1] not in (1, 3) or min(x.shape[2:]) < 2:
            raise InvalidInputError(
                f"RawISP takes N×3×H×W RGB or N×1×H×W grey images of at least 2×2 pixels, "
                f"got {tuple(x.shape)}"
            )
        h, w = x.shape[2], x.shape[3]
        rgb = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        rgb = F.pad(rgb, (0, w % 2, 0, h % 2), mode="reflect") if h % 2 or w % 2 else rgb
        meta = self.metadata(x.shape[0]).to(x)
        out = self.to_rgb(self.to_raw(rgb, meta), meta)[:, :, :h, :w]
        if x.shape[1] == 1:
            out = out.mean(1, keepdim=True)
        return x + (out - x).detach() if self.bpda else out

    def wrap(self, model: nn.Module | Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
        """`model` behind this preprocessing: `wrapped(x) = model(self(x))`."""
        return RawISPDefended(self, model)


class RawISPDefended(nn.Module):
    """A classifier whose inputs first go through a `RawISP`."""

    def __init__(
        self, preprocess: RawISP, model: nn.Module | Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(x))


@contextmanager
def item_draws(model: object, seed: int, key: str) -> Iterator[None]:
    """Inside the block, every randomised `RawISP` in `model` draws from a generator seeded
    by (`seed`, `key`); after it, each generator is back where it was.

    A run's work items (`key`: the item's results.jsonl key) use it so that a randomised
    defense draws the same for an item wherever and in whichever order it runs: in this
    process after other items, on a Ray worker after others, or alone when resumed. A model
    without a randomised preprocessing is left alone."""
    generators: dict[int, torch.Generator] = {}
    if isinstance(model, nn.Module):
        for m in model.modules():
            if isinstance(m, RawISP) and m.randomize:
                generators[id(m.generator)] = m.generator
    saved = [(g, g.get_state()) for g in generators.values()]
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    for g in generators.values():
        g.manual_seed(int.from_bytes(digest[:8], "little") >> 2)
    try:
        yield
    finally:
        for g, state in saved:
            g.set_state(state)
