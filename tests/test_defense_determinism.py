"""Same seed, same report, wherever the items run: a suite against the randomised RAW-ISP
(`defense="raw_isp:random"`: fresh camera metadata and noise per image and call) gives the
same numbers in one process as on 2 Ray workers, which run the items in another order and
each after a different set of others. Every item — the suite's own attacks as well as their
EOT twins — draws the defense's randomness from (seed, item), not from whatever ran before.

A local Ray with 2 CPUs is started for the module and shut down after it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from bastion.data import Dataset, load_data
from bastion.defenses.raw_isp import RawISP, item_draws
from bastion.suites.runner import run_suite
from bastion.suites.suite import Check, Suite
from bastion.zoo import demo_model

ray = pytest.importorskip("ray")

# 4 batches of 6: 4 items per check and eps; the defense adds pgd-eot and pgd-eot-bpda
SUITE = Suite(
    "isp-random",
    (
        Check("fgsm", "FGSM", (0.1, 0.2)),
        Check("pgd", "PGD", (0.1,), params={"steps": 3}),
    ),
)
RUN: dict[str, Any] = {
    "n": 24,
    "batch_size": 6,
    "seed": 5,
    "gallery": 0,
    "threats": ["linf:0.1"],
    "defense": "raw_isp:random",
}


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers take the driver's count
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    torch.set_num_threads(threads)


def _numbers(report: Any) -> dict[str, Any]:
    """Every number of the report that the randomness can move."""
    doc = json.loads(report.to_json())
    return {
        "clean": doc["clean_accuracy"],
        "threats": [(t["threat"], t["robust_accuracy"]) for t in doc["threat_models"]],
        "checks": {
            c["id"]: [(r["eps"], r["robust_accuracy"], r.get("success_rate")) for r in c["results"]]
            for c in doc["checks"]
        },
        "defense": doc["defense"]["rows"],
    }


def test_in_process_and_two_ray_workers_give_the_same_report(local_ray: None) -> None:
    from bastion.suites.ray_executor import RayExecutor

    data: Dataset = load_data("digits")
    here = run_suite(demo_model(), data, SUITE, **RUN)
    with RayExecutor(workers=2) as executor:
        there = run_suite(demo_model(), data, SUITE, executor=executor, **RUN)
    ids = [c.id for c in here.model.checks]
    assert ids == ["fgsm", "pgd", "fgsm-eot", "fgsm-eot-bpda", "pgd-eot", "pgd-eot-bpda"]
    assert _numbers(there) == _numbers(here)
    # the randomness is there: a single draw's PGD breaks a different set than its EOT twin
    checks = _numbers(here)["checks"]
    assert checks["pgd"] != checks["pgd-eot"]


def test_an_items_draws_do_not_depend_on_what_ran_before() -> None:
    model = RawISP(randomize=True, seed=0).wrap(torch.nn.Identity())
    x = torch.rand(4, 3, 8, 8)
    with item_draws(model, 5, "attack/pgd/0.1/0"):
        first = model(x)
    model(x)  # another item, or a call outside any item, in between
    model(x)
    with item_draws(model, 5, "attack/pgd/0.1/0"):
        again = model(x)
        fresh = model(x)  # a second call inside the item: a fresh draw
    with item_draws(model, 5, "attack/pgd/0.1/1"):
        other = model(x)
    assert torch.equal(first, again)
    assert not torch.allclose(first, fresh) and not torch.allclose(first, other)
    # the generator is back where it was: calls outside items go on as without them
    plain = RawISP(randomize=True, seed=0).wrap(torch.nn.Identity())
    plain(x), plain(x)
    assert torch.equal(model(x), plain(x))
