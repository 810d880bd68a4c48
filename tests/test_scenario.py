"""The scenario cache in PFLlib's layout, and PFLlib folders read through pfl:<dir>."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from htfl_plugins.data import load_scenario
from htfl_plugins.data import scenario as scenario_mod
from htfl_plugins.data.scenario import few_shot, read_scenario, scenario_dir, scenario_params
from htfl_plugins.data.types import ClientData
from htfl_plugins.errors import HtflError
from htfl_plugins.plugins import get_plugins

PFL_FIELDS = ["num_clients", "num_classes", "non_iid", "balance", "partition",
              "Size of samples for labels in clients", "alpha", "batch_size"]


def read_npz(path: Path) -> dict:
    """Read a client file as PFLlib's utils/data_utils.py does."""
    with open(path, "rb") as fh:
        return np.load(fh, allow_pickle=True)["data"].tolist()


def write_npz(path: Path, x, y) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez_compressed(fh, data={"x": x, "y": y})


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_ino)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def cached(digits_config, tmp_path):
    """A digits scenario built into a private cache folder: (cfg, scenario)."""
    cfg = digits_config(clients=4, partition="dir", alpha=0.5, cache_dir=str(tmp_path / "cache"))
    return cfg, load_scenario(cfg, get_plugins())


# ------------------------------------------------------------------ building and layout
def test_pfllib_layout(cached):
    cfg, sc = cached
    folder = Path(sc.path)
    assert folder.parent == Path(cfg.cache_dir)
    assert sorted(p.name for p in (folder / "train").iterdir()) == [f"{i}.npz" for i in range(4)]
    assert sorted(p.name for p in (folder / "test").iterdir()) == [f"{i}.npz" for i in range(4)]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".building-")]

    config = json.loads((folder / "config.json").read_text())
    for key in PFL_FIELDS:
        assert key in config, key
    assert config["num_clients"] == 4 and config["num_classes"] == 10
    assert config["non_iid"] is True and config["partition"] == "dir"
    assert config["alpha"] == 0.5 and config["batch_size"] == cfg.batch_size

    total = 0
    for i in range(4):
        tr, te = read_npz(folder / "train" / f"{i}.npz"), read_npz(folder / "test" / f"{i}.npz")
        assert set(tr) == {"x", "y"}
        assert tr["x"].dtype == np.float32 and tr["x"].shape[1:] == (1, 8, 8)
        assert tr["x"].min() >= -1.0 and tr["x"].max() <= 1.0
        assert tr["y"].dtype == np.int64 and len(tr["y"]) == len(tr["x"])
        # 75/25 split of each client, as sklearn's train_test_split does it
        n = len(tr["y"]) + len(te["y"])
        assert len(tr["y"]) == math.floor(0.75 * n)
        assert n >= 40  # min_samples(1797, 4, 10, 0.75)
        counts = np.bincount(np.concatenate([tr["y"], te["y"]]), minlength=10)
        stats = dict(config["Size of samples for labels in clients"][i])
        assert {c: int(v) for c, v in enumerate(counts) if v} == stats
        total += n
    assert total == 1797  # dir hands out every sample once

    assert sc.num_classes == 10 and sc.input_shape == (1, 8, 8) and len(sc.clients) == 4
    assert sc.histogram().sum() == 1797
    c0 = sc.clients[0]
    assert c0.x_train.dtype == torch.float32 and c0.y_train.dtype == torch.int64


def test_normalisation_matches_pfllib(cached):
    """Normalize(0.5, 0.5) after ToTensor: pixel p → (p / 255 - 0.5) / 0.5."""
    from htfl_plugins.data.sources import load_digits

    _, sc = cached
    raw = load_digits()
    values = (np.unique(raw.x) / 255.0 - 0.5) / 0.5
    got = torch.cat([c.x_train for c in sc.clients]).unique().numpy().astype(np.float64)
    nearest = values[np.abs(got[:, None] - values[None, :]).argmin(axis=1)]
    assert np.allclose(got, nearest, atol=1e-6)
    assert got.min() == -1.0 and got.max() == 1.0


def test_second_load_reuses_cache(cached, monkeypatch):
    cfg, sc = cached
    folder = Path(sc.path)
    before = snapshot(folder)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached scenario was rebuilt")

    monkeypatch.setattr(scenario_mod, "build_scenario", no_rebuild)
    again = load_scenario(cfg, get_plugins())
    assert snapshot(folder) == before
    assert again.path == sc.path
    for a, b in zip(sc.clients, again.clients):
        assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)


def test_a_second_builder_keeps_the_finished_folder(cached):
    """Two processes building one scenario (parallel bench cells): the one that
    finishes second must not delete the folder the first one is already reading."""
    cfg, sc = cached
    folder = Path(sc.path)
    before = snapshot(folder)
    scenario_mod.build_scenario(cfg, get_plugins(), folder, scenario_params(cfg, 10))
    assert snapshot(folder) == before
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".building-")]


def test_rebuild_is_identical(cached, digits_config, tmp_path):
    _, sc = cached
    other = digits_config(clients=4, partition="dir", alpha=0.5, cache_dir=str(tmp_path / "c2"))
    sc2 = load_scenario(other, get_plugins())
    assert Path(sc2.path).name == Path(sc.path).name  # the key does not depend on the cache dir
    for a, b in zip(sc.clients, sc2.clients):
        assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
        assert torch.equal(a.x_test, b.x_test)


def test_different_parameters_different_folder(digits_config):
    plugins = get_plugins()
    base = {"clients": 4, "partition": "dir", "alpha": 0.5}

    def folder(**changes):
        cfg = digits_config(**{**base, **changes})
        return scenario_dir(cfg, scenario_params(cfg, 10))

    ref = folder()
    for change in ({"alpha": 0.3}, {"clients": 5}, {"data_seed": 2}, {"batch_size": 5},
                   {"train_ratio": 0.8}, {"partition": "iid"}, {"partition": "exdir"},
                   {"data_root": "/somewhere"}):
        assert folder(**change) != ref, change
    # settings a partition does not use do not split the cache
    assert folder(seed=7, rounds=9, few_shot=3, models="HtFE-cpu-4") == ref
    assert folder(partition="pat", alpha=0.1) == folder(partition="pat", alpha=0.9)
    assert folder(partition="pat", classes_per_client=0) == folder(partition="pat",
                                                                    classes_per_client=2)
    assert folder(partition="pat", classes_per_client=3) != folder(partition="pat",
                                                                    classes_per_client=2)
    assert plugins.registry("datasets").get("digits").meta["num_classes"] == 10


@pytest.mark.parametrize("partition,extra", [("iid", {}), ("pat", {"classes_per_client": 2}),
                                             ("exdir", {"classes_per_client": 3, "alpha": 0.3})])
def test_other_partitions_build(digits_config, tmp_path, partition, extra):
    cfg = digits_config(clients=5, partition=partition, cache_dir=str(tmp_path / "c"), **extra)
    sc = load_scenario(cfg, get_plugins())
    hist = sc.histogram()
    assert hist.shape == (5, 10) and (hist.sum(axis=1) >= 40).all()
    if "classes_per_client" in extra:
        assert ((hist > 0).sum(axis=1) <= extra["classes_per_client"]).all()
    config = json.loads((Path(sc.path) / "config.json").read_text())
    assert config["non_iid"] is (partition != "iid")


def test_few_shot_caps_training_samples(digits_config, tmp_path):
    cache = str(tmp_path / "cache")
    full = load_scenario(digits_config(cache_dir=cache), get_plugins())
    few = load_scenario(digits_config(cache_dir=cache, few_shot=3), get_plugins())
    assert few.path == full.path  # few-shot is applied on load, not cached
    for f, c in zip(few.clients, full.clients):
        counts = torch.bincount(f.y_train, minlength=10)
        full_counts = torch.bincount(c.y_train, minlength=10)
        assert torch.equal(counts, torch.clamp(full_counts, max=3))
        assert torch.equal(f.x_test, c.x_test) and torch.equal(f.y_test, c.y_test)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a, b = few_shot(full.clients[0], 2, g1), few_shot(full.clients[0], 2, g2)
    assert torch.equal(a.x_train, b.x_train)


def test_few_shot_of_empty_client():
    empty = ClientData(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64),
                       torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.int64))
    assert few_shot(empty, 3, torch.Generator()).n_train == 0


# ------------------------------------------------------------------ pfl:<dir>
def write_pfl(folder: Path, clients=3, k=5, shape=(8, 8), seed=0) -> Path:
    """A PFLlib scenario written by hand (x single-channel N×H×W, as some PFLlib scripts do)."""
    rng = np.random.default_rng(seed)
    stats = []
    for i in range(clients):
        n = 8 + 2 * i
        y = rng.integers(0, k, n).astype(np.int64)
        x = rng.uniform(-1, 1, (n, *shape)).astype(np.float32)
        cut = int(0.75 * n)
        write_npz(folder / "train" / f"{i}.npz", x[:cut], y[:cut])
        write_npz(folder / "test" / f"{i}.npz", x[cut:], y[cut:])
        stats.append([[int(c), int(v)] for c, v in enumerate(np.bincount(y, minlength=k)) if v])
    config = {"num_clients": clients, "num_classes": k, "non_iid": True, "balance": False,
              "partition": "dir", "Size of samples for labels in clients": stats, "alpha": 0.1,
              "batch_size": 10}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_pfl_folder(digits_config, tmp_path):
    folder = write_pfl(tmp_path / "pfl", clients=3, k=5)
    sc = load_scenario(digits_config(dataset=f"pfl:{folder}", clients=3), get_plugins())
    assert sc.num_classes == 5 and sc.input_shape == (1, 8, 8) and len(sc.clients) == 3
    assert [c.n_train for c in sc.clients] == [6, 7, 9]
    assert [c.n_test for c in sc.clients] == [2, 3, 3]
    x = read_npz(folder / "train" / "1.npz")["x"]
    assert torch.equal(sc.clients[1].x_train[:, 0], torch.from_numpy(x))
    assert sc.config["num_clients"] == 3


def test_pfl_three_channel_folder(digits_config, tmp_path):
    folder = write_pfl(tmp_path / "pfl", clients=2, k=4, shape=(3, 32, 32))
    sc = load_scenario(digits_config(dataset=f"pfl:{folder}", clients=2), get_plugins())
    assert sc.input_shape == (3, 32, 32)


def test_pfl_wrong_clients(digits_config, tmp_path):
    folder = write_pfl(tmp_path / "pfl", clients=3)
    with pytest.raises(HtflError) as e:
        load_scenario(digits_config(dataset=f"pfl:{folder}", clients=4), get_plugins())
    text = str(e.value)
    assert "3 clients" in text and "--clients 3" in text and "\n" not in text


def test_pfl_missing_and_corrupt(digits_config, tmp_path):
    plugins = get_plugins()
    with pytest.raises(HtflError, match="config.json"):
        load_scenario(digits_config(dataset=f"pfl:{tmp_path / 'nothing'}", clients=3), plugins)

    folder = write_pfl(tmp_path / "pfl", clients=3)
    cfg = digits_config(dataset=f"pfl:{folder}", clients=3)
    bad = folder / "train" / "1.npz"
    good = bad.read_bytes()

    for blob in (b"not a zip file at all", good[: len(good) // 2]):
        bad.write_bytes(blob)
        with pytest.raises(HtflError) as e:
            load_scenario(cfg, plugins)
        assert str(bad) in str(e.value) and "\n" not in str(e.value)

    # a zip whose member is damaged
    damaged = bytearray(good)
    mid = len(damaged) // 2
    damaged[mid:mid + 16] = b"\xff" * 16
    bad.write_bytes(bytes(damaged))
    with pytest.raises(HtflError) as e:
        load_scenario(cfg, plugins)
    assert str(bad) in str(e.value)

    # right container, wrong content
    with open(bad, "wb") as fh:
        np.savez_compressed(fh, x=np.zeros((3, 8, 8)), y=np.zeros(3))
    with pytest.raises(HtflError, match="PFLlib"):
        load_scenario(cfg, plugins)
    with open(bad, "wb") as fh:
        np.savez_compressed(fh, data=np.zeros(3))
    with pytest.raises(HtflError, match="1.npz"):
        load_scenario(cfg, plugins)
    write_npz(bad, np.zeros((3, 8, 8), np.float32), np.zeros(4, np.int64))
    with pytest.raises(HtflError, match="1.npz"):
        load_scenario(cfg, plugins)

    bad.unlink()
    with pytest.raises(HtflError, match="1.npz"):
        load_scenario(cfg, plugins)

    (folder / "config.json").write_text("{not json")
    with pytest.raises(HtflError, match="config.json"):
        load_scenario(cfg, plugins)


def test_pfl_labels_beyond_num_classes(digits_config, tmp_path):
    folder = write_pfl(tmp_path / "pfl", clients=2, k=5)
    write_npz(folder / "test" / "1.npz", np.zeros((2, 8, 8), np.float32),
              np.array([1, 5], np.int64))
    with pytest.raises(HtflError, match="num_classes"):
        read_scenario(folder, "pfl")


def test_pfl_mixed_image_shapes(tmp_path):
    folder = write_pfl(tmp_path / "pfl", clients=2, k=5)
    write_npz(folder / "test" / "1.npz", np.zeros((2, 3, 8, 8), np.float32),
              np.array([1, 2], np.int64))
    with pytest.raises(HtflError, match="shape"):
        read_scenario(folder, "pfl")


def test_corrupt_cache_file_is_reported(cached):
    cfg, sc = cached
    bad = Path(sc.path) / "test" / "2.npz"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(HtflError) as e:
        load_scenario(cfg, get_plugins())
    assert str(bad) in str(e.value)


# ------------------------------------------------------------------ other sources
def test_changed_parameters_build_a_second_folder(cached, digits_config):
    cfg, sc = cached
    other = load_scenario(digits_config(clients=4, partition="dir", alpha=0.3,
                                        cache_dir=cfg.cache_dir), get_plugins())
    assert other.path != sc.path
    assert (Path(sc.path) / "config.json").is_file() and (Path(other.path) / "config.json").is_file()


def test_cifar10_files_to_scenario(digits_config, tmp_path):
    """A source read from disk goes through the same cache (3×32×32 images)."""
    import pickle

    d = tmp_path / "data" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as fh:
            pickle.dump({"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, 10).tolist()}, fh)
    cfg = digits_config(dataset="cifar10", data_root=str(tmp_path / "data"), clients=2,
                        partition="iid", batch_size=4, cache_dir=str(tmp_path / "cache"))
    sc = load_scenario(cfg, get_plugins())
    assert sc.input_shape == (3, 32, 32) and sc.num_classes == 10
    assert sum(c.n_train + c.n_test for c in sc.clients) == 60
    assert [c.n_train for c in sc.clients] == [22, 22]


def test_missing_source_leaves_no_cache(digits_config, tmp_path):
    cfg = digits_config(dataset="cifar10", data_root=str(tmp_path / "nothing"),
                        cache_dir=str(tmp_path / "cache"))
    with pytest.raises(HtflError, match="cifar10 not found"):
        load_scenario(cfg, get_plugins())
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.iterdir())
