"""Plain containers for data; everything stays as tensors in memory."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class RawData:
    """A whole data source: images as uint8 N×C×H×W (or float in [0, 1]) and int labels.

    PFLlib merges a source's official train and test sets into one pool and
    re-splits per client; sources here return that pool.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str
    classes: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.x.ndim != 4:
            raise ValueError(f"{self.name}: images must be N×C×H×W, got shape {self.x.shape}")
        if len(self.x) != len(self.y):
            raise ValueError(f"{self.name}: {len(self.x)} images but {len(self.y)} labels")


def normalise(x: np.ndarray) -> np.ndarray:
    """[0, 255] uint8 (or [0, 1] float) → float32 in [-1, 1] (PFLlib: Normalize(0.5, 0.5))."""
    x = x.astype(np.float32)
    if x.max(initial=0) > 1.0:
        x = x / 255.0
    return (x - 0.5) / 0.5


@dataclass
class ClientData:
    """One client's private train and test split, as tensors."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_test(self) -> int:
        return len(self.y_test)

    def labels(self) -> list[int]:
        """The classes present in this client's training data, sorted."""
        return sorted(torch.unique(self.y_train).tolist())

    def to(self, device) -> ClientData:
        return ClientData(*(t.to(device) for t in
                            (self.x_train, self.y_train, self.x_test, self.y_test)))


@dataclass
class Scenario:
    """A partitioned dataset: what a run trains and evaluates on."""

    dataset: str
    num_classes: int
    input_shape: tuple[int, int, int]
    clients: list[ClientData]
    config: dict
    path: str = ""

    def histogram(self) -> np.ndarray:
        """clients × classes counts of training + test samples."""
        out = np.zeros((len(self.clients), self.num_classes), dtype=np.int64)
        for i, c in enumerate(self.clients):
            y = torch.cat([c.y_train, c.y_test]).numpy()
            out[i] = np.bincount(y, minlength=self.num_classes)
        return out


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator | None = None,
            shuffle: bool = True):
    """Mini-batches over (x, y). Shuffled with ``generator``; a last batch of one
    sample is dropped (BatchNorm cannot train on it) unless it is the only one."""
    n = len(y)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if len(idx) == 1 and n > 1:
            break
        yield x[idx], y[idx]
