"""Partitioners: split a pool's sample indices over clients.

Every partitioner has the signature ``fn(labels, spec, rng) -> list[np.ndarray]``
and either meets the minimum size per client or raises a clear error after a
bounded number of attempts; none loops forever.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from htfl_plugins.errors import HtflError

MAX_TRIES = 1000


@dataclass
class PartitionSpec:
    clients: int
    num_classes: int
    alpha: float = 0.1
    classes_per_client: int = 2
    balance: bool = True
    min_samples: int = 1


def min_samples(n: int, clients: int, batch_size: int, train_ratio: float) -> int:
    """Smallest client allowed: PFLlib's rule min(B/(1-r), N/(2n)), but never fewer
    samples than one full training batch after the train/test split."""
    pfl = min(batch_size / (1.0 - train_ratio), n / clients / 2.0)
    one_batch = batch_size / train_ratio
    return int(math.ceil(max(pfl, one_batch)))


def _too_small(name: str, sizes, spec: PartitionSpec, hint: str) -> HtflError:
    return HtflError(
        f"{name} partition impossible: the smallest client gets {min(sizes)} samples, "
        f"at least {spec.min_samples} are needed ({spec.clients} clients); {hint}")


def iid(labels: np.ndarray, spec: PartitionSpec, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle and split into equal shares."""
    parts = np.array_split(rng.permutation(len(labels)), spec.clients)
    sizes = [len(p) for p in parts]
    if min(sizes) < spec.min_samples:
        raise _too_small("iid", sizes, spec, "use fewer clients")
    return [np.sort(p) for p in parts]


def pathological(labels, spec, rng) -> list[np.ndarray]:
    """Each client holds ``classes_per_client`` classes. Each class is shared by the
    next clients that still have free class slots, in equal shares (``balance``)
    or random ones."""
    n, k, cpc = spec.clients, spec.num_classes, spec.classes_per_client
    if not 1 <= cpc <= k:
        raise HtflError(f"pat partition: --classes-per-client must be between 1 and {k}, got {cpc}")
    slots = np.full(n, cpc)
    per_class = int(math.ceil(n * cpc / k))
    owned: list[list[np.ndarray]] = [[] for _ in range(n)]
    for c in range(k):
        idx = rng.permutation(np.flatnonzero(labels == c))
        holders = [i for i in range(n) if slots[i] > 0][:per_class]
        if not holders:
            break
        if spec.balance:
            cuts = np.linspace(0, len(idx), len(holders) + 1).astype(int)
        else:
            share = len(idx) / len(holders)
            low = max(1, int(share / 10))
            sizes = rng.integers(low, max(low + 1, int(share)), len(holders) - 1)
            cuts = np.concatenate([[0], np.cumsum(sizes), [len(idx)]]).clip(0, len(idx))
        for j, i in enumerate(holders):
            owned[i].append(idx[cuts[j]:cuts[j + 1]])
            slots[i] -= 1
    parts = [np.sort(np.concatenate(o)) if o else np.zeros(0, dtype=np.int64) for o in owned]
    sizes = [len(p) for p in parts]
    if min(sizes) < spec.min_samples:
        raise _too_small("pat", sizes, spec,
                         "use fewer clients or more classes per client")
    return parts


def dirichlet(labels, spec, rng) -> list[np.ndarray]:
    """Each class split by Dirichlet(α) proportions; clients already above N/n get no
    more; redrawn until every client has ``min_samples`` (PFLlib's rule), at most
    MAX_TRIES times."""
    n, k = spec.clients, spec.num_classes
    total = len(labels)
    by_class = [np.flatnonzero(labels == c) for c in range(k)]
    best = None
    for _ in range(MAX_TRIES):
        parts: list[list[int]] = [[] for _ in range(n)]
        for c in range(k):
            idx = rng.permutation(by_class[c])
            p = rng.dirichlet(np.full(n, spec.alpha))
            p = p * np.array([len(q) < total / n for q in parts])
            if p.sum() == 0:
                p = np.full(n, 1.0 / n)
            cuts = (np.cumsum(p / p.sum()) * len(idx)).astype(int)[:-1]
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].extend(chunk.tolist())
        sizes = [len(q) for q in parts]
        best = sizes if best is None or min(sizes) > min(best) else best
        if min(sizes) >= spec.min_samples:
            return [np.sort(np.asarray(q, dtype=np.int64)) for q in parts]
    raise HtflError(
        f"dir partition impossible after {MAX_TRIES} draws: the best draw left a client with "
        f"{min(best)} samples, at least {spec.min_samples} are needed ({n} clients, "
        f"alpha {spec.alpha}); use fewer clients or a larger --alpha")


def extended_dirichlet(labels, spec, rng) -> list[np.ndarray]:
    """Each client first draws ``classes_per_client`` classes (every class gets at
    least one holder); each class is then Dirichlet(α)-split among its holders,
    redrawn until every holder gets ``min_samples / classes_per_client`` of it."""
    n, k, cpc = spec.clients, spec.num_classes, spec.classes_per_client
    if not 1 <= cpc <= k:
        raise HtflError(f"exdir partition: --classes-per-client must be between 1 and {k}, got {cpc}")
    if n * cpc < k:
        raise HtflError(f"exdir partition impossible: {n} clients × {cpc} classes cannot cover "
                        f"{k} classes; use more clients or classes per client")
    # Class assignment: a shuffled round-robin covers every class, the rest at random.
    order = rng.permutation(k)
    held = [set() for _ in range(n)]
    for j, c in enumerate(order):
        held[j % n].add(int(c))
    for i in range(n):
        free = [c for c in range(k) if c not in held[i]]
        extra = cpc - len(held[i])
        if extra > 0:
            held[i].update(rng.choice(free, extra, replace=False).tolist())
    per_holder = max(1, int(math.ceil(spec.min_samples / cpc)))
    parts: list[list[int]] = [[] for _ in range(n)]
    for c in range(k):
        holders = [i for i in range(n) if c in held[i]]
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < per_holder * len(holders):
            raise HtflError(f"exdir partition impossible: class {c} has {len(idx)} samples for "
                            f"{len(holders)} holders needing {per_holder} each; use fewer clients")
        for _ in range(MAX_TRIES):
            p = rng.dirichlet(np.full(len(holders), spec.alpha))
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            chunks = np.split(idx, cuts)
            if min(len(ch) for ch in chunks) >= per_holder:
                break
        else:
            # Bounded: give every holder its minimum, split the rest by the last draw.
            base = idx[:per_holder * len(holders)].reshape(len(holders), per_holder)
            rest = idx[per_holder * len(holders):]
            cuts = (np.cumsum(p) * len(rest)).astype(int)[:-1]
            chunks = [np.concatenate([b, r]) for b, r in zip(base, np.split(rest, cuts))]
        for i, ch in zip(holders, chunks):
            parts[i].extend(ch.tolist())
    sizes = [len(q) for q in parts]
    if min(sizes) < spec.min_samples:
        raise _too_small("exdir", sizes, spec, "use fewer clients")
    return [np.sort(np.asarray(q, dtype=np.int64)) for q in parts]


PARTITIONERS = {
    "iid": (iid, "equal random shares"),
    "pat": (pathological, "pathological: classes_per_client classes per client (PFLlib 'pat')"),
    "dir": (dirichlet, "practical: per-class Dirichlet(alpha) proportions (PFLlib 'dir')"),
    "exdir": (extended_dirichlet, "extended Dirichlet: classes_per_client labels, then Dirichlet(alpha) per class"),
}
