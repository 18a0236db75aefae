"""The package root: lazy re-exports (no torch at import) and the public names."""

from __future__ import annotations

import subprocess
import sys

import pytest

import bastion


def test_importing_bastion_does_not_import_torch() -> None:
    code = (
        "import sys, bastion; assert 'torch' not in sys.modules, 'torch imported'; "
        "bastion.BastionError; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names_resolve() -> None:
    for name in bastion.__all__:
        assert getattr(bastion, name) is not None
    assert set(dir(bastion)) == set(bastion.__all__)
    from bastion.attacks import FGSM

    assert bastion.attacks.FGSM is FGSM
    with pytest.raises(AttributeError):
        bastion.nonexistent  # noqa: B018
