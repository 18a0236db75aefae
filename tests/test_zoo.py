"""The embedded demo model: accurate, deterministic, cached by recipe, and self-healing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn

from bastion import zoo
from bastion.data import load_data


def cached_files(root: Path) -> list[Path]:
    return sorted(root.glob("demo-*.safetensors"))


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_demo_model_is_accurate_on_the_digits_test_split(demo: nn.Module) -> None:
    test = load_data("digits")
    assert len(test) == 450
    with torch.no_grad():
        accuracy = float((demo(test.x).argmax(1) == test.y).double().mean())
    assert accuracy >= 0.95
    assert not demo.training


def test_training_is_deterministic_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo: nn.Module
) -> None:
    # `demo` was trained in the session's own empty cache; train again in another empty one
    monkeypatch.setenv("BASTION_CACHE", str(tmp_path))
    assert cached_files(tmp_path) == []
    start = time.perf_counter()
    trained = zoo.demo_model()
    train_seconds = time.perf_counter() - start
    assert same_weights(trained, demo)
    (path,) = cached_files(tmp_path)
    assert zoo.recipe_hash() in path.name
    stamp = path.stat().st_mtime_ns

    start = time.perf_counter()
    loaded = zoo.demo_model()
    load_seconds = time.perf_counter() - start
    assert same_weights(loaded, trained)
    assert path.stat().st_mtime_ns == stamp  # read, not rewritten
    assert load_seconds < train_seconds / 10


def test_corrupt_cache_file_is_retrained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo: nn.Module
) -> None:
    monkeypatch.setenv("BASTION_CACHE", str(tmp_path))
    name = f"demo-{zoo.RECIPE['name']}-{zoo.recipe_hash()}.safetensors"
    (tmp_path / name).write_bytes(b"\x00garbage, not a safetensors file" * 10)
    model = zoo.demo_model()
    assert same_weights(model, demo)
    # the cache entry was replaced with good weights
    (path,) = cached_files(tmp_path)
    assert path.name == name
    assert same_weights(zoo.demo_model(), demo)


def test_cache_file_from_another_architecture_is_retrained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo: nn.Module
) -> None:
    from safetensors.torch import save_file

    monkeypatch.setenv("BASTION_CACHE", str(tmp_path))
    name = f"demo-{zoo.RECIPE['name']}-{zoo.recipe_hash()}.safetensors"
    save_file({"weight": torch.zeros(3)}, str(tmp_path / name))  # valid file, wrong weights
    assert same_weights(zoo.demo_model(), demo)


def test_recipe_hash_changes_with_the_recipe() -> None:
    changed = {**zoo.RECIPE, "epochs": zoo.RECIPE["epochs"] + 1}
    assert zoo.recipe_hash(changed) != zoo.recipe_hash(zoo.RECIPE)
    assert zoo.recipe_hash(dict(zoo.RECIPE)) == zoo.recipe_hash(zoo.RECIPE)
    assert zoo.recipe_hash() == zoo.recipe_hash(zoo.RECIPE)


def test_changed_recipe_uses_a_new_cache_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo: nn.Module
) -> None:
    monkeypatch.setenv("BASTION_CACHE", str(tmp_path))
    monkeypatch.setattr(zoo, "RECIPE", {**zoo.RECIPE, "epochs": 1})  # a quick, different recipe
    model = zoo.demo_model()
    (path,) = cached_files(tmp_path)
    assert zoo.recipe_hash() in path.name
    monkeypatch.undo()
    assert zoo.recipe_hash() not in path.name
    assert not same_weights(model, demo)  # one epoch, not the standard recipe
