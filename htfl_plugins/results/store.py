"""The HDF5 result file. Written whole to a temporary name and renamed after every
recorded round, so a crash or kill never leaves a half-written file.

Datasets (one row per evaluation point r = 0..R; row r is the state after r
training rounds, scored at the run's ``eval_point``, and its traffic and time
columns describe what was sent and done in it: training round r's uploads, and
the downloads sent in row r — with ``eval_point`` after-broadcast the broadcast
made after round r's update, that row r scores and round r+1 trains on; with
after-update round r's own broadcast):

    round, test_acc, test_auc, train_loss, client_test_acc (rows × clients),
    upload_bytes, download_bytes, upload_elements, download_elements,
    client_upload_bytes, client_download_bytes, client_local_loss (rows × clients),
    round_seconds, train_seconds, eval_seconds, selected_clients, dropped_clients,
    failed_clients, straggler_clients, extra/acc_*, metrics/* (local_loss,
    server_*, client_*; NaN where a row has none)

plus HtFLlib's keys ``rs_test_acc``, ``rs_test_auc``, ``rs_train_loss`` as soft
links, and attributes ``config`` (JSON), ``algorithm``, ``dataset``, ``seed``,
``version``, ``environment`` (JSON: the Python, torch, numpy, ... versions of the
process that last wrote the file), ``status``, ``created`` and ``updated``.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import h5py
import numpy as np

from htfl_plugins import __version__
from htfl_plugins.errors import HtflError

CHECKPOINT_SUFFIX = ".ckpt"  # a run in progress keeps its checkpoint beside its .h5 file, under this suffix

SCALARS = ["round", "test_acc", "test_auc", "train_loss", "upload_bytes", "download_bytes",
           "upload_elements", "download_elements", "round_seconds", "train_seconds",
           "eval_seconds", "selected_clients", "dropped_clients", "failed_clients", "straggler_clients"]
MATRICES = ["client_test_acc", "client_upload_bytes", "client_download_bytes", "client_local_loss"]
HTFLLIB_KEYS = {"rs_test_acc": "test_acc", "rs_test_auc": "test_auc", "rs_train_loss": "train_loss"}
FORMAT = "htfl-run-1"
ENVIRONMENT_PACKAGES = ("torch", "torchvision", "numpy", "scikit-learn", "h5py")


@functools.cache
def environment() -> dict:
    """Versions outside the library that can change a run's numbers; a result file
    keeps them so that a re-run which differs can be traced to its cause."""
    env = {"python": platform.python_version(), "machine": platform.machine()}
    for dist in ENVIRONMENT_PACKAGES:
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return env


@dataclass
class RunRecord:
    path: Path
    config: dict
    num_clients: int
    extra_attrs: dict = field(default_factory=dict)
    rows: dict = field(default_factory=lambda: {k: [] for k in SCALARS + MATRICES})
    status: str = "running"
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))

    def add(self, extra: dict | None = None, metrics: dict | None = None, **values) -> None:
        """Append one row. ``extra`` holds algorithm-specific accuracies (``acc_head``, ...),
        stored under the group ``extra/``, and ``metrics`` the round's named scalars from
        the server and the clients (``local_loss``, ``server_*``, ``client_*``), under
        ``metrics/``; a row that lacks one gets NaN."""
        missing = set(SCALARS + MATRICES) - set(values)
        if missing:
            raise ValueError(f"row lacks {sorted(missing)}")
        rows = len(self)
        for k in SCALARS + MATRICES:  # a column the rows so far lack (an older checkpoint's) is NaN there
            blank = [float("nan")] * self.num_clients if k in MATRICES else float("nan")
            self.rows.setdefault(k, [blank] * rows).append(values[k])
        for group, row in (("extra", extra), ("metrics", metrics)):
            cols = self.rows.setdefault(group, {})
            for k in row or {}:
                cols.setdefault(k, [float("nan")] * rows)
            for k, col in cols.items():
                col.append(float((row or {}).get(k, float("nan"))))

    def __len__(self) -> int:
        return len(self.rows["round"])

    def write(self, status: str | None = None) -> Path:
        if status:
            self.status = status
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}-", suffix=".h5.tmp",
                                   dir=self.path.parent)
        os.close(fd)
        try:
            with h5py.File(tmp, "w") as f:
                for k in SCALARS:
                    dtype = np.int64 if k in ("round", "selected_clients", "dropped_clients",
                                              "failed_clients", "straggler_clients",
                                              "upload_bytes", "download_bytes",
                                              "upload_elements", "download_elements") else np.float64
                    f.create_dataset(k, data=np.asarray(self.rows[k], dtype=dtype))
                for k in MATRICES:
                    data = np.asarray(self.rows[k], dtype=np.float64).reshape(len(self), self.num_clients)
                    f.create_dataset(k, data=data)
                for group in ("extra", "metrics"):
                    for k, col in self.rows.get(group, {}).items():
                        f.create_dataset(f"{group}/{k}", data=np.asarray(col, dtype=np.float64))
                for alias, target in HTFLLIB_KEYS.items():
                    f[alias] = h5py.SoftLink("/" + target)
                f.attrs["format"] = FORMAT
                f.attrs["config"] = json.dumps(self.config, sort_keys=True)
                f.attrs["algorithm"] = self.config.get("algo", "")
                f.attrs["dataset"] = self.config.get("dataset", "")
                f.attrs["seed"] = int(self.config.get("seed", 0))
                f.attrs["version"] = __version__
                f.attrs["environment"] = json.dumps(environment(), sort_keys=True)
                f.attrs["status"] = self.status
                f.attrs["created"] = self.created
                f.attrs["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
                for k, v in self.extra_attrs.items():
                    f.attrs[k] = v if isinstance(v, (int, float, str)) else json.dumps(v)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return self.path


def read_run(path) -> dict:
    """One result file as ``{'attrs': {...}, 'config': {...}, <dataset>: ndarray}``."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise HtflError(f"{path} is not an htfl result file (no format={FORMAT!r} attribute)")
            out = {k: f[k][()] for k in SCALARS + MATRICES if k in f}
            for group in ("extra", "metrics"):
                out[group] = {k: v[()] for k, v in f[group].items()} if group in f else {}
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    except HtflError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise HtflError(f"{path} is not a readable HDF5 result file: {exc}") from None
    out["attrs"] = attrs
    try:
        out["config"] = json.loads(attrs.get("config", "{}"))
    except json.JSONDecodeError as exc:
        raise HtflError(f"{path}: its config attribute is not JSON: {exc}") from None
    return out
