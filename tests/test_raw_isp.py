"""RAW camera-ISP preprocessing: the round trip, the Bayer pattern, gradients, randomness."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import skimage.data
import torch

from bastion.defenses import RawISP, isp_ops
from bastion.defenses.bayer import DEMOSAIC, bilinear, malvar, mosaic, opencv_edge_aware
from bastion.errors import ConfigError, InvalidInputError


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    return torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1)[None].float() / 255


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def test_round_trip_is_exact_without_mosaic_and_highlight_protection(
    astronaut: torch.Tensor,
) -> None:
    isp = RawISP(mosaic=False, protect_highlights=False)
    x = astronaut.double()
    assert (isp(x) - x).abs().max() <= 1e-6
    smooth = torch.rand(
        2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    assert (isp(smooth) - smooth).abs().max() <= 1e-6


def test_highlight_protection_changes_only_bright_pixels_a_little(astronaut: torch.Tensor) -> None:
    out = RawISP(mosaic=False)(astronaut)
    err = (out - astronaut).abs()
    assert err.max() <= 0.02
    assert err.max() > 1e-3  # protection does act on the bright pixels
    assert (err > 1e-5).float().mean() < 0.01


# spec §5.2 [OURS]: astronaut round trip 28.8 dB (Malvar), 27.6 (bilinear and OpenCV), 27.4 (EA)
@pytest.mark.parametrize(
    ("demosaic", "expected"),
    [("malvar", 28.84), ("bilinear", 27.63), ("opencv", 27.62), ("opencv-ea", 27.40)],
)
def test_mosaic_round_trip_psnr_matches_the_spec(
    astronaut: torch.Tensor, demosaic: str, expected: float
) -> None:
    assert _psnr(RawISP(demosaic=demosaic)(astronaut), astronaut) == pytest.approx(
        expected, abs=0.1
    )


def test_mosaic_samples_rggb() -> None:
    colour = torch.tensor([0.8, 0.5, 0.2]).reshape(1, 3, 1, 1).expand(1, 3, 4, 6)
    raw = mosaic(colour)[0, 0]
    assert raw[0::2, 0::2].eq(0.8).all() and raw[1::2, 1::2].eq(0.2).all()
    assert raw[0::2, 1::2].eq(0.5).all() and raw[1::2, 0::2].eq(0.5).all()


@pytest.mark.parametrize("demosaic", list(DEMOSAIC))
def test_every_demosaic_returns_the_colour_of_a_flat_image(demosaic: str) -> None:
    colour = torch.tensor([0.8, 0.5, 0.2]).reshape(1, 3, 1, 1)
    out = DEMOSAIC[demosaic](mosaic(colour.expand(2, 3, 8, 10).contiguous()))
    assert torch.allclose(out, colour.expand_as(out), atol=1 / 65535)


def test_opencv_names_rggb_data_bayer_bg() -> None:
    """The pitfall of spec §5.4: BayerBG is RGGB data; BayerRG would swap red and blue."""
    colour = torch.tensor([0.8, 0.5, 0.2]).reshape(1, 3, 1, 1).expand(1, 3, 8, 8)
    raw = (mosaic(colour.contiguous())[0, 0] * 65535).round().numpy().astype(np.uint16)
    right = cv2.demosaicing(raw, cv2.COLOR_BayerBG2RGB)[4, 4] / 65535
    wrong = cv2.demosaicing(raw, cv2.COLOR_BayerRG2RGB)[4, 4] / 65535
    assert np.allclose(right, [0.8, 0.5, 0.2], atol=1e-4)
    assert np.allclose(wrong, [0.2, 0.5, 0.8], atol=1e-4)


def test_malvar_and_bilinear_are_exact_on_linear_ramps_inside_the_image() -> None:
    rows, cols = torch.meshgrid(torch.arange(12.0), torch.arange(14.0), indexing="ij")
    ramps = torch.stack([0.1 + 0.02 * rows, 0.3 + 0.01 * cols, 0.2 + 0.01 * (rows + cols)])
    ramps = ramps[None].double()
    for demosaic in (malvar, bilinear):
        out = demosaic(mosaic(ramps))
        assert torch.allclose(out[..., 2:-2, 2:-2], ramps[..., 2:-2, 2:-2], atol=1e-12)


def test_malvar_matches_a_per_pixel_reference() -> None:
    """Each site against the spec's kernels applied one pixel at a time (no padding)."""
    raw = torch.rand(1, 1, 10, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = malvar(raw)[0].numpy()
    r = raw[0, 0].numpy()
    g_rb = np.array(
        [[0, 0, -1, 0, 0], [0, 0, 2, 0, 0], [-1, 2, 4, 2, -1], [0, 0, 2, 0, 0], [0, 0, -1, 0, 0]]
    )
    row = np.array(
        [
            [0, 0, 0.5, 0, 0],
            [0, -1, 0, -1, 0],
            [-1, 4, 5, 4, -1],
            [0, -1, 0, -1, 0],
            [0, 0, 0.5, 0, 0],
        ]
    )
    diag = np.array(
        [
            [0, 0, -1.5, 0, 0],
            [0, 2, 0, 2, 0],
            [-1.5, 0, 6, 0, -1.5],
            [0, 2, 0, 2, 0],
            [0, 0, -1.5, 0, 0],
        ]
    )

    def at(kernel: np.ndarray, i: int, j: int) -> float:
        return float((kernel * r[i - 2 : i + 3, j - 2 : j + 3]).sum() / 8)

    for i in range(2, 8):
        for j in range(2, 8):
            site = (i % 2, j % 2)
            expected = {
                (0, 0): (r[i, j], at(g_rb, i, j), at(diag, i, j)),
                (0, 1): (at(row, i, j), r[i, j], at(row.T, i, j)),
                (1, 0): (at(row.T, i, j), r[i, j], at(row, i, j)),
                (1, 1): (at(diag, i, j), at(g_rb, i, j), r[i, j]),
            }[site]
            assert np.allclose(out[:, i, j], expected, atol=1e-12), (i, j)


def test_gradients_are_finite_at_black_and_white_pixels() -> None:
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x[:, :, :2] = 0.0
    x[:, :, -2:] = 1.0
    x.requires_grad_(True)
    RawISP()(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad[:, :, 3:5].abs().sum() > 0


def test_bpda_passes_the_gradient_through_unchanged() -> None:
    x = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    up = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    out = RawISP(bpda=True)(x)
    (out * up).sum().backward()
    assert torch.equal(x.grad, up)
    assert torch.allclose(out.detach(), RawISP()(x.detach()), atol=1e-6)  # forward unchanged


def test_opencv_demosaic_back_propagates_through_its_torch_surrogate() -> None:
    raw = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    up = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    grads = []
    for demosaic in (opencv_edge_aware, malvar):
        rg = raw.clone().requires_grad_(True)
        (demosaic(rg) * up).sum().backward()
        grads.append(rg.grad)
    assert torch.allclose(grads[0], grads[1])
    assert not torch.allclose(opencv_edge_aware(raw), malvar(raw), atol=1e-3)


def test_deterministic_by_default_and_seeded_when_randomized() -> None:
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    isp = RawISP()
    assert torch.equal(isp(x), isp(x))
    a, b, c = (
        RawISP(randomize=True, seed=1),
        RawISP(randomize=True, seed=1),
        RawISP(randomize=True, seed=2),
    )
    first, second = a(x), a(x)
    assert not torch.equal(first, second)  # fresh metadata and noise per call
    assert torch.equal(first, b(x)) and torch.equal(second, b(x))  # same seed, same sequence
    assert not torch.equal(first, c(x))


def test_random_metadata_follows_brooks_distributions() -> None:
    meta = isp_ops.random_metadata(500, torch.Generator().manual_seed(0))
    assert meta.red_gain.min() >= 1.9 and meta.red_gain.max() <= 2.4
    assert meta.blue_gain.min() >= 1.5 and meta.blue_gain.max() <= 1.9
    assert float(1 / meta.rgb_gain.mean()) == pytest.approx(0.8, abs=0.02)
    assert torch.allclose(meta.rgb2cam.sum(-1), torch.ones(500, 3, dtype=torch.float64))
    eye = torch.eye(3, dtype=torch.float64).expand(500, 3, 3)
    assert torch.allclose(meta.cam2rgb @ meta.rgb2cam, eye, atol=1e-9)
    assert meta.shot_noise.min() >= 1e-4 and meta.shot_noise.max() <= 0.012


def test_noise_variance_is_shot_times_signal_plus_read() -> None:
    meta = isp_ops.mean_metadata(2)
    raw = torch.tensor([0.1, 0.6]).reshape(2, 1, 1, 1).expand(2, 1, 200, 200).contiguous()
    noisy = isp_ops.add_noise(raw, meta, torch.Generator().manual_seed(0))
    variance = (noisy - raw).flatten(1).var(1)
    expected = raw[:, 0, 0, 0] * meta.shot_noise.float() + meta.read_noise.float()
    assert torch.allclose(variance, expected, rtol=0.05)


def test_grey_images_are_replicated_and_averaged_back() -> None:
    grey = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    isp = RawISP()
    out = isp(grey)
    assert out.shape == grey.shape
    assert torch.allclose(out, isp(grey.expand(2, 3, 8, 8)).mean(1, keepdim=True))


def test_odd_sizes_are_padded_and_cropped_back(astronaut: torch.Tensor) -> None:
    x = astronaut[..., 100:163, 200:265]
    out = RawISP()(x)
    assert out.shape == x.shape
    assert _psnr(out, x) > 25


@pytest.mark.parametrize("shape", [(1, 2, 8, 8), (1, 3, 1, 8), (3, 8, 8)])
def test_unsupported_images_are_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidInputError, match="RawISP takes"):
        RawISP()(torch.rand(shape))


def test_unknown_demosaic_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown demosaic"):
        RawISP(demosaic="vng")


def test_wrap_feeds_the_model_the_preprocessed_images() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5)
    )
    isp = RawISP()
    defended = isp.wrap(model)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(defended(x), model(isp(x)))
    assert dict(defended.named_children()) == {"preprocess": isp, "model": model}


def test_learned_operators_plug_in() -> None:
    calls: list[str] = []

    def inverse_isp(x: torch.Tensor, meta: isp_ops.IspMetadata) -> torch.Tensor:
        calls.append("F")
        return mosaic(x)

    def isp(raw: torch.Tensor, meta: isp_ops.IspMetadata) -> torch.Tensor:
        calls.append("G")
        return bilinear(raw)

    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = RawISP(inverse_isp=inverse_isp, isp=isp)(x)
    assert calls == ["F", "G"] and torch.equal(out, bilinear(mosaic(x)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_gpu_like_on_the_cpu(astronaut: torch.Tensor) -> None:
    out = RawISP()(astronaut.cuda())
    assert out.device.type == "cuda"
    assert torch.allclose(out.cpu(), RawISP()(astronaut), atol=1e-4)
    assert math.isfinite(_psnr(out.cpu(), astronaut))
