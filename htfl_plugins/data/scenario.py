"""Scenarios: a partitioned dataset, cached on disk in PFLlib's format.

Layout (readable by PFLlib/HtFLlib, and theirs by us through ``pfl:<dir>``)::

    <dir>/config.json
    <dir>/train/<i>.npz     np.savez_compressed(data={'x': float32 N×C×H×W, 'y': int64})
    <dir>/test/<i>.npz
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from htfl_plugins.data.partition import PartitionSpec, min_samples
from htfl_plugins.data.sources import cache_home, default_classes_per_client
from htfl_plugins.data.types import ClientData, Scenario
from htfl_plugins.errors import HtflError

log = logging.getLogger("htfl.data")

FORMAT_VERSION = 1


def scenario_params(cfg, num_classes: int) -> dict:
    """The settings that decide a scenario; its cache key is their hash."""
    cpc = cfg.classes_per_client or default_classes_per_client(cfg.dataset, num_classes)
    return {
        "dataset": cfg.dataset,
        "data_root": str(Path(cfg.data_root).expanduser().resolve()) if cfg.data_root else "",
        "partition": cfg.partition,
        "alpha": cfg.alpha if cfg.partition in ("dir", "exdir") else None,
        "classes_per_client": cpc if cfg.partition in ("pat", "exdir") else None,
        "balance": cfg.balance if cfg.partition == "pat" else None,
        "clients": cfg.clients,
        "train_ratio": cfg.train_ratio,
        "batch_size": cfg.batch_size,
        "data_seed": cfg.data_seed,
        "format": FORMAT_VERSION,
    }


def scenario_dir(cfg, params: dict) -> Path:
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    base = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_home() / "scenarios"
    return base / f"{cfg.dataset}-{cfg.partition}-{cfg.clients}c-{key}"


def _save_npz(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.savez_compressed(fh, data={"x": x, "y": y})


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise HtflError(f"scenario file {path} is missing")
    if not zipfile.is_zipfile(path):  # np.load would otherwise try it as a bare pickle
        raise HtflError(f"scenario file {path} is corrupt or not in PFLlib's format: "
                        "not an .npz (zip) archive")
    try:
        with np.load(path, allow_pickle=True) as f:
            d = f["data"].tolist()
        x, y = np.asarray(d["x"], dtype=np.float32), np.asarray(d["y"], dtype=np.int64)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, AttributeError,
            TypeError, IndexError, zlib.error, pickle.UnpicklingError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise HtflError(f"scenario file {path} is corrupt or not in PFLlib's format: {text}") from None
    if x.ndim == 3:  # PFLlib stores single-channel images as N×H×W in some scripts
        x = x[:, None]
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
        raise HtflError(f"scenario file {path} holds x of shape {x.shape} and y of shape "
                        f"{y.shape}; expected N×C×H×W images and N labels")
    return x, y


def _normaliser(x: np.ndarray):
    """PFLlib's Normalize(0.5, 0.5) after ToTensor, applied to slices of the pool so that
    only one client's images are ever held as float32; the scale is decided once for
    the whole pool (uint8 or values above 1 → divide by 255)."""
    scale = 255.0 if x.dtype == np.uint8 or x.max(initial=0) > 1.0 else 1.0

    def apply(idx: np.ndarray) -> np.ndarray:
        return (x[idx].astype(np.float32) / np.float32(scale) - 0.5) / 0.5

    return apply


def split_seed(data_seed: int, client: int) -> int:
    """Client ``client``'s train/test split seed: ``data_seed·100003 + client``, taken
    modulo 2³² so that any ``--data-seed`` works (scikit-learn takes 32-bit seeds;
    below the wrap every split is what it always was)."""
    return (data_seed * 100003 + client) % 2 ** 32


def build_scenario(cfg, plugins, target: Path, params: dict) -> None:
    """Partition a source, split each client 75/25, and write the PFLlib layout atomically."""
    raw = plugins.registry("datasets").get(cfg.dataset).obj(cfg.data_root or None)
    partitioner = plugins.registry("partitioners").get(cfg.partition).obj
    spec = PartitionSpec(
        clients=cfg.clients, num_classes=raw.num_classes, alpha=cfg.alpha,
        classes_per_client=params["classes_per_client"] or 0, balance=cfg.balance,
        min_samples=min_samples(len(raw.y), cfg.clients, cfg.batch_size, cfg.train_ratio))
    rng = np.random.default_rng(cfg.data_seed)
    parts = partitioner(raw.y, spec, rng)
    if len(parts) != cfg.clients:
        raise HtflError(f"partitioner {cfg.partition!r} returned {len(parts)} parts for {cfg.clients} clients")
    for i, idx in enumerate(parts):
        if len(idx) < 2:
            raise HtflError(f"partitioner {cfg.partition!r} gave client {i} {len(idx)} samples; "
                            "at least 2 are needed for a train/test split")
    norm = _normaliser(raw.x)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        (tmp / "train").mkdir()
        (tmp / "test").mkdir()
        stats = []
        for i, idx in enumerate(parts):
            tr, te = train_test_split(idx, train_size=cfg.train_ratio, shuffle=True,
                                      random_state=split_seed(cfg.data_seed, i))
            _save_npz(tmp / "train" / f"{i}.npz", norm(tr), raw.y[tr])
            _save_npz(tmp / "test" / f"{i}.npz", norm(te), raw.y[te])
            counts = np.bincount(raw.y[idx], minlength=raw.num_classes)
            stats.append([[int(c), int(v)] for c, v in enumerate(counts) if v])
        config = {
            "num_clients": cfg.clients,
            "num_classes": raw.num_classes,
            "non_iid": cfg.partition != "iid",
            "balance": bool(cfg.balance),
            "partition": cfg.partition,
            "Size of samples for labels in clients": stats,
            "alpha": cfg.alpha,
            "batch_size": cfg.batch_size,
            "htfl": {**params, "input_shape": list(raw.x.shape[1:]),
                     "classes": [str(c) for c in raw.classes]},
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        # Another process (a parallel bench cell) may have finished the same
        # scenario meanwhile and be reading it: keep theirs, never replace it.
        if not (target / "config.json").is_file():
            if target.exists():  # an incomplete folder from before atomic builds
                shutil.rmtree(target, ignore_errors=True)
            try:
                os.replace(tmp, target)
            except OSError:
                if not (target / "config.json").is_file():
                    raise
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_scenario(folder: Path, dataset: str, train_ratio_hint=None) -> Scenario:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise HtflError(f"{folder} is not a PFLlib scenario folder (no config.json)")
    try:
        config = json.loads(cfg_path.read_text())
        n = int(config["num_clients"])
        k = int(config["num_classes"])
    except (ValueError, KeyError, TypeError) as exc:
        raise HtflError(f"{cfg_path} is corrupt: {exc}") from None
    if n < 1 or k < 1:
        raise HtflError(f"{cfg_path} gives {n} clients and {k} classes; both must be positive")
    clients = []
    shape = None
    for i in range(n):
        for split in ("train", "test"):
            path = folder / split / f"{i}.npz"
            x, y = _load_npz(path)
            if y.size and (y.min() < 0 or y.max() >= k):
                raise HtflError(f"scenario file {path} holds labels {y.min()}..{y.max()}, but "
                                f"{cfg_path} gives num_classes {k}")
            if shape is None:
                shape = tuple(x.shape[1:])
            elif tuple(x.shape[1:]) != shape:
                raise HtflError(f"scenario file {path} holds images of shape {tuple(x.shape[1:])}, "
                                f"other files {shape}")
            if split == "train":
                xtr, ytr = x, y
            else:
                xte, yte = x, y
        clients.append(ClientData(torch.from_numpy(xtr), torch.from_numpy(ytr),
                                  torch.from_numpy(xte), torch.from_numpy(yte)))
    return Scenario(dataset, k, shape, clients, config, str(folder))


def few_shot(data: ClientData, cap: int, generator: torch.Generator) -> ClientData:
    """Keep at most ``cap`` training samples of each class (test split unchanged)."""
    if data.n_train == 0:
        return data
    keep = []
    for c in torch.unique(data.y_train).tolist():
        idx = torch.nonzero(data.y_train == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)[:cap]]
        keep.append(idx)
    keep = torch.sort(torch.cat(keep)).values
    return ClientData(data.x_train[keep], data.y_train[keep], data.x_test, data.y_test)


def load_scenario(cfg, plugins) -> Scenario:
    """The scenario a run config describes, built on first use and cached after."""
    if cfg.dataset.startswith("pfl:"):
        folder = Path(cfg.dataset[4:]).expanduser()
        scenario = read_scenario(folder, cfg.dataset)
        if len(scenario.clients) != cfg.clients:
            raise HtflError(f"{folder} holds {len(scenario.clients)} clients but --clients is "
                            f"{cfg.clients}; pass --clients {len(scenario.clients)}")
    else:
        item = plugins.registry("datasets").get(cfg.dataset)
        num_classes = item.meta.get("num_classes") or 0
        params = scenario_params(cfg, num_classes)
        folder = scenario_dir(cfg, params)
        if not (folder / "config.json").is_file():
            log.info("building scenario %s", folder.name)
            build_scenario(cfg, plugins, folder, params)
        scenario = read_scenario(folder, cfg.dataset)
    if cfg.few_shot:
        g = torch.Generator().manual_seed(cfg.data_seed)
        scenario.clients = [few_shot(c, cfg.few_shot, g) for c in scenario.clients]
    return scenario
