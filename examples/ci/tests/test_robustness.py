"""Robustness gates for the digits model: each one fails the build when the model gets weaker.

Run `pytest` (fast profile, from pyproject.toml) on pull requests and
`pytest --bastion-full` nightly; `--bastion-report DIR` writes the session's report.
"""

import pytest
from digits_model import train_model


@pytest.fixture(scope="session")
def model():
    return train_model()


def test_fgsm_at_small_budget(bastion, model):
    # one attack at one budget; below 60 % the test fails and prints the robustness table
    bastion.assert_robust(model, "digits", attack="fgsm", eps=0.02, min_accuracy=0.6)


def test_release_gate(bastion, model):
    # a suite file with its own pass criterion (PGD at eps 0.05), plus an extra assertion
    report = bastion.check(model, "digits", suite="robustness.toml")
    assert report.robust_accuracy("fgsm", eps=0.02) >= 0.6


@pytest.mark.robustness(attack="pgd", eps=0.02, min_accuracy=0.6)
def test_marked_model(model):
    # the marker checks the model the test returns (or yields); fixtures work as usual
    return model
