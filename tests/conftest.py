"""Shared fixtures: a per-session model cache, the demo model and its digits test split."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


_THREADS = torch.get_num_threads()


def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Tests that run the CLI in-process (`--threads`) or pin one thread change torch's
    process-wide thread count; every test starts from the session's."""
    torch.set_num_threads(_THREADS)


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Keep the demo model's cache inside the test session, not in the user's home."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("bastion-cache")
    mp.setenv("BASTION_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def demo() -> torch.nn.Module:
    from bastion.zoo import demo_model

    return demo_model()


@pytest.fixture(scope="session")
def digits():  # type: ignore[no-untyped-def]
    from bastion.data import load_data

    return load_data("digits")
