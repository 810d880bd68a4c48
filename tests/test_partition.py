"""Partitioners: disjoint, big enough, label-skewed as promised, bounded in time."""

from __future__ import annotations

import time

import numpy as np
import pytest

from htfl_plugins.data import load_scenario
from htfl_plugins.data.partition import (
    PARTITIONERS,
    PartitionSpec,
    dirichlet,
    extended_dirichlet,
    iid,
    min_samples,
    pathological,
)
from htfl_plugins.errors import HtflError
from htfl_plugins.plugins import get_plugins


@pytest.fixture(scope="module")
def labels():
    """2,000 labels over 10 classes, unevenly sized (class c has weight c + 1)."""
    rng = np.random.default_rng(123)
    w = np.arange(1, 11, dtype=float)
    return rng.choice(10, size=2000, p=w / w.sum()).astype(np.int64)


@pytest.fixture(scope="module")
def digit_labels():
    from htfl_plugins.data.sources import load_digits

    return load_digits().y


def check_parts(parts, labels, spec):
    assert len(parts) == spec.clients
    allidx = np.concatenate(parts)
    assert allidx.dtype.kind == "i"
    assert len(np.unique(allidx)) == len(allidx), "a sample went to two clients"
    assert allidx.min() >= 0 and allidx.max() < len(labels)
    assert min(len(p) for p in parts) >= spec.min_samples
    for p in parts:
        assert np.all(np.diff(p) > 0)  # sorted, no repeats


def classes_of(parts, labels):
    return [set(labels[p].tolist()) for p in parts]


CASES = {
    "iid": PartitionSpec(clients=7, num_classes=10, min_samples=50),
    "pat": PartitionSpec(clients=20, num_classes=10, classes_per_client=2, min_samples=15),
    "dir": PartitionSpec(clients=10, num_classes=10, alpha=0.1, min_samples=40),
    "exdir": PartitionSpec(clients=12, num_classes=10, alpha=0.3, classes_per_client=3,
                           min_samples=12),
}


def test_registry_holds_the_four_partitioners():
    reg = get_plugins().registry("partitioners")
    for name in ("iid", "pat", "dir", "exdir"):
        assert reg.get(name).obj is PARTITIONERS[name][0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_disjoint_big_enough_and_deterministic(name, labels):
    fn, spec = PARTITIONERS[name][0], CASES[name]
    parts = fn(labels, spec, np.random.default_rng(5))
    check_parts(parts, labels, spec)
    again = fn(labels, spec, np.random.default_rng(5))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = fn(labels, spec, np.random.default_rng(6))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_equal_shares_cover_everything(labels):
    spec = PartitionSpec(clients=7, num_classes=10, min_samples=1)
    parts = iid(labels, spec, np.random.default_rng(0))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(labels)
    with pytest.raises(HtflError, match="iid"):
        iid(labels, PartitionSpec(clients=7, num_classes=10, min_samples=300),
            np.random.default_rng(0))


@pytest.mark.parametrize("balance", [True, False])
@pytest.mark.parametrize("clients,cpc", [(20, 2), (7, 2), (5, 3), (30, 1), (3, 2)])
def test_pat_classes_per_client(labels, balance, clients, cpc):
    spec = PartitionSpec(clients=clients, num_classes=10, classes_per_client=cpc,
                         balance=balance, min_samples=5)
    parts = pathological(labels, spec, np.random.default_rng(1))
    check_parts(parts, labels, spec)
    held = classes_of(parts, labels)
    assert all(1 <= len(h) <= cpc for h in held)
    if balance:  # each class is shared in equal shares among its holders
        for c in range(10):
            shares = [int((labels[p] == c).sum()) for p in parts if c in set(labels[p].tolist())]
            if shares:
                assert max(shares) - min(shares) <= 1


def test_pat_rejects_bad_classes_per_client(labels):
    for cpc in (0, 11):
        with pytest.raises(HtflError, match="classes-per-client"):
            pathological(labels, PartitionSpec(clients=4, num_classes=10, classes_per_client=cpc),
                         np.random.default_rng(0))


def test_pat_too_many_clients(labels):
    spec = PartitionSpec(clients=200, num_classes=10, classes_per_client=2, min_samples=14)
    with pytest.raises(HtflError, match="pat partition impossible"):
        pathological(labels, spec, np.random.default_rng(0))


def test_pat_200_clients_on_digits_is_impossible(digits_config, tmp_path):
    """The spec's impossible case, through the scenario loader; nothing is left behind."""
    cfg = digits_config(clients=200, partition="pat", classes_per_client=2,
                        cache_dir=str(tmp_path / "cache"))
    t0 = time.perf_counter()
    with pytest.raises(HtflError) as e:
        load_scenario(cfg, get_plugins())
    assert time.perf_counter() - t0 < 5
    assert "pat" in str(e.value) and "200 clients" in str(e.value)
    assert "\n" not in str(e.value)
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.iterdir())


def test_dir_label_skew_and_practical_shape(digit_labels):
    spec = PartitionSpec(clients=10, num_classes=10, alpha=0.1, min_samples=20)
    parts = dirichlet(digit_labels, spec, np.random.default_rng(0))
    check_parts(parts, digit_labels, spec)
    # PFLlib's dir hands out every sample
    assert sum(len(p) for p in parts) == len(digit_labels)
    # α = 0.1 is skewed: most clients miss some classes or are dominated by one
    dominant = [np.bincount(digit_labels[p], minlength=10).max() / len(p) for p in parts]
    assert np.mean(dominant) > 0.3


@pytest.mark.parametrize("clients,alpha,min_n", [(50, 1e-3, 30), (150, 0.01, 10),
                                                   (400, 1e-4, 4)])
def test_dir_hopeless_fails_fast(labels, clients, alpha, min_n):
    spec = PartitionSpec(clients=clients, num_classes=10, alpha=alpha, min_samples=min_n)
    assert clients * min_n <= len(labels)  # not rejected by simple arithmetic
    t0 = time.perf_counter()
    with pytest.raises(HtflError, match="dir partition impossible") as e:
        dirichlet(labels, spec, np.random.default_rng(0))
    assert time.perf_counter() - t0 < 2.0
    assert "alpha" in str(e.value) and "\n" not in str(e.value)


def test_dir_too_few_samples_fails_at_once(labels):
    spec = PartitionSpec(clients=100, num_classes=10, alpha=1.0, min_samples=21)
    t0 = time.perf_counter()
    with pytest.raises(HtflError, match="impossible"):
        dirichlet(labels, spec, np.random.default_rng(0))
    assert time.perf_counter() - t0 < 0.5


def test_dir_many_classes_and_clients_stays_bounded():
    labels = np.random.default_rng(0).integers(0, 200, 20000)
    spec = PartitionSpec(clients=100, num_classes=200, alpha=1e-3, min_samples=150)
    t0 = time.perf_counter()
    with pytest.raises(HtflError, match="dir partition impossible"):
        dirichlet(labels, spec, np.random.default_rng(0))
    assert time.perf_counter() - t0 < 5.0


@pytest.mark.parametrize("clients,cpc,alpha", [(12, 3, 0.3), (4, 3, 0.1), (20, 2, 1e-4),
                                                (10, 10, 1.0), (3, 4, 0.5)])
def test_exdir_classes_per_client(labels, clients, cpc, alpha):
    spec = PartitionSpec(clients=clients, num_classes=10, alpha=alpha, classes_per_client=cpc,
                         min_samples=20)
    t0 = time.perf_counter()
    parts = extended_dirichlet(labels, spec, np.random.default_rng(2))
    assert time.perf_counter() - t0 < 2.0  # tiny α ends in the bounded fallback
    check_parts(parts, labels, spec)
    held = classes_of(parts, labels)
    assert all(len(h) <= cpc for h in held)
    assert set().union(*held) == set(range(10))  # every class has a holder
    assert sum(len(p) for p in parts) == len(labels)


def test_exdir_impossible_cases(labels):
    with pytest.raises(HtflError, match="cannot cover"):
        extended_dirichlet(labels, PartitionSpec(clients=3, num_classes=10, classes_per_client=2),
                           np.random.default_rng(0))
    with pytest.raises(HtflError, match="classes-per-client"):
        extended_dirichlet(labels, PartitionSpec(clients=3, num_classes=10, classes_per_client=0),
                           np.random.default_rng(0))
    with pytest.raises(HtflError, match="impossible"):
        extended_dirichlet(labels, PartitionSpec(clients=100, num_classes=10, classes_per_client=2,
                                                 min_samples=19),
                           np.random.default_rng(0))


def test_min_samples_rule():
    # PFLlib: min(B / (1 - r), N / (2n)), but never less than one training batch
    assert min_samples(1797, 4, 10, 0.75) == 40
    assert min_samples(1797, 200, 10, 0.75) == 14
    assert min_samples(70000, 20, 10, 0.75) == 40
    assert min_samples(100, 20, 1, 0.75) == 3
