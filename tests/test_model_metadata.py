"""Metadata beside the weights: `save_model` writes it in every save format, `read_metadata`
and `load_model` read it back, and a file without it reads as {}."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bastion.model_io import METADATA_ATTR, load_model, read_metadata, save_model


def _net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


@pytest.mark.parametrize(
    ("fmt", "ext"), [("export", "pt2"), ("torchscript", "pt"), ("safetensors", "st")]
)
def test_metadata_round_trips_in_every_save_format(tmp_path: Path, fmt: str, ext: str) -> None:
    model = _net()
    setattr(model, METADATA_ATTR, {"defense": "distillation", "temperature": "100.0"})
    path = tmp_path / f"m.{ext}"
    save_model(model, path, torch.rand(2, 1, 8, 8), format=fmt)
    assert read_metadata(path) == {"defense": "distillation", "temperature": "100.0"}
    explicit = tmp_path / f"e.{ext}"
    save_model(_net(), explicit, torch.rand(2, 1, 8, 8), format=fmt, metadata={"k": "v"})
    assert read_metadata(explicit) == {"k": "v"}


def test_a_loaded_program_carries_its_metadata_and_plain_files_have_none(tmp_path: Path) -> None:
    model = _net()
    setattr(model, METADATA_ATTR, {"temperature": "20.0"})
    save_model(model, tmp_path / "m.pt2", torch.rand(2, 1, 8, 8))
    loaded = load_model(tmp_path / "m.pt2")
    assert getattr(loaded, METADATA_ATTR) == {"temperature": "20.0"}
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
    save_model(_net(), tmp_path / "plain.pt2", torch.rand(2, 1, 8, 8))
    assert read_metadata(tmp_path / "plain.pt2") == {}
    assert getattr(load_model(tmp_path / "plain.pt2"), METADATA_ATTR, None) is None
