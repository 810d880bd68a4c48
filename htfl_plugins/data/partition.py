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
MIN_TRIES = 100
MAX_DRAWS = 10_000_000  # Dirichlet components drawn by dir at most (bounds its time)


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
    return math.ceil(max(pfl, one_batch))


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
    or random ones (each at least ``min_samples / classes_per_client`` where the
    class is big enough)."""
    n, k, cpc = spec.clients, spec.num_classes, spec.classes_per_client
    if not 1 <= cpc <= k:
        raise HtflError(f"pat partition: --classes-per-client must be between 1 and {k}, got {cpc}")
    _check_total("pat", len(labels), spec)
    slots = np.full(n, cpc)
    per_class = math.ceil(n * cpc / k)
    owned: list[list[np.ndarray]] = [[] for _ in range(n)]
    for c in range(k):
        idx = rng.permutation(np.flatnonzero(labels == c))
        holders = [i for i in range(n) if slots[i] > 0][:per_class]
        if not holders:
            break
        share = len(idx) / len(holders)
        # Random shares: between a tenth of an equal share (PFLlib) and an equal share,
        # but at least a holder's part of min_samples; the last holder takes the rest.
        low = max(1, int(share / 10), math.ceil(spec.min_samples / cpc))
        if spec.balance or low >= int(share):
            cuts = np.linspace(0, len(idx), len(holders) + 1).astype(int)
        else:
            sizes = rng.integers(low, int(share), len(holders) - 1)
            cuts = np.concatenate([[0], np.cumsum(sizes), [len(idx)]]).astype(int)
        for j, i in enumerate(holders):
            owned[i].append(idx[cuts[j]:cuts[j + 1]])
            slots[i] -= 1
    parts = [np.sort(np.concatenate(o)) if o else np.zeros(0, dtype=np.int64) for o in owned]
    sizes = [len(p) for p in parts]
    if min(sizes) < spec.min_samples:
        raise _too_small("pat", sizes, spec,
                         "use fewer clients or more classes per client")
    return parts


def _check_total(name: str, total: int, spec: PartitionSpec) -> None:
    """Fail at once where no split can work: fewer samples than clients × minimum."""
    if spec.clients * spec.min_samples > total:
        raise HtflError(
            f"{name} partition impossible: {spec.clients} clients × {spec.min_samples} samples "
            f"each need {spec.clients * spec.min_samples}, the data set has {total}; "
            "use fewer clients")


def _split_counts(p: np.ndarray, n_items: int) -> np.ndarray:
    """Rows of proportions (summing to 1) → rows of integer chunk sizes summing to
    ``n_items``, cut as ``np.split(idx, (cumsum(p) * n).astype(int)[:-1])`` does."""
    cuts = np.minimum((np.cumsum(p, axis=-1) * n_items).astype(np.int64), n_items)
    cuts[..., -1] = n_items
    return np.diff(cuts, axis=-1, prepend=0)


def _chunk_rows(width: int, layers: int = 1) -> int:
    """How many draws to make at once (bounds the memory of batched draws)."""
    return int(max(1, min(64, 2_000_000 // max(1, width * layers))))


def dirichlet(labels, spec, rng) -> list[np.ndarray]:
    """Each class split by Dirichlet(α) proportions; clients already above N/n get no
    more; redrawn until every client has ``min_samples`` (PFLlib's rule), at most
    MAX_TRIES times (fewer where clients × classes is large, so that at most
    MAX_DRAWS Dirichlet components are drawn). Draws are made on sample counts, in
    batches, and only the accepted draw is turned into indices, so a hopeless
    setting fails within a second or so."""
    n, k = spec.clients, spec.num_classes
    total = len(labels)
    _check_total("dir", total, spec)
    by_class = [np.flatnonzero(labels == c) for c in range(k)]
    class_sizes = [len(b) for b in by_class]
    alpha = np.full(n, spec.alpha)
    max_tries = max(MIN_TRIES, min(MAX_TRIES, MAX_DRAWS // (n * k)))
    best = -1
    tries = 0
    while tries < max_tries:
        t = min(_chunk_rows(n, k), max_tries - tries)
        tries += t
        sizes = np.zeros((t, n), dtype=np.int64)
        counts = np.zeros((k, t, n), dtype=np.int64)
        for c in range(k):
            p = rng.dirichlet(alpha, size=t) * (sizes < total / n)
            s = p.sum(axis=1, keepdims=True)
            stuck = ~(s[:, 0] > 0)  # every client full (or a degenerate draw): share evenly
            p[stuck], s[stuck] = 1.0 / n, 1.0
            counts[c] = _split_counts(p / s, class_sizes[c])
            sizes += counts[c]
        smallest = sizes.min(axis=1)
        best = max(best, int(smallest.max()))
        good = np.flatnonzero(smallest >= spec.min_samples)
        if good.size:
            chosen = counts[:, good[0]]
            parts: list[list[np.ndarray]] = [[] for _ in range(n)]
            for c in range(k):
                idx = rng.permutation(by_class[c])
                for i, chunk in enumerate(np.split(idx, np.cumsum(chosen[c])[:-1])):
                    parts[i].append(chunk)
            return [np.sort(np.concatenate(q)).astype(np.int64) for q in parts]
    raise HtflError(
        f"dir partition impossible after {max_tries} draws: the best draw left a client with "
        f"{best} samples, at least {spec.min_samples} are needed ({n} clients, "
        f"alpha {spec.alpha}); use fewer clients or a larger --alpha")


def extended_dirichlet(labels, spec, rng) -> list[np.ndarray]:
    """Each client first draws ``classes_per_client`` classes (every class gets at
    least one holder); each class is then Dirichlet(α)-split among its holders,
    redrawn until every holder gets ``min_samples / classes_per_client`` of it
    (at most MAX_TRIES draws; then each holder gets that minimum and the rest is
    split by the last draw)."""
    n, k, cpc = spec.clients, spec.num_classes, spec.classes_per_client
    if not 1 <= cpc <= k:
        raise HtflError(f"exdir partition: --classes-per-client must be between 1 and {k}, got {cpc}")
    if n * cpc < k:
        raise HtflError(f"exdir partition impossible: {n} clients × {cpc} classes cannot cover "
                        f"{k} classes; use more clients or classes per client")
    _check_total("exdir", len(labels), spec)
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
    per_holder = max(1, math.ceil(spec.min_samples / cpc))
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for c in range(k):
        holders = [i for i in range(n) if c in held[i]]
        h = len(holders)
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < per_holder * h:
            raise HtflError(f"exdir partition impossible: class {c} has {len(idx)} samples for "
                            f"{h} holders needing {per_holder} each; use fewer clients")
        alpha = np.full(h, spec.alpha)
        sizes = None
        tries = 0
        while tries < MAX_TRIES:
            t = min(_chunk_rows(h), MAX_TRIES - tries)
            tries += t
            p = rng.dirichlet(alpha, size=t)
            p[~(p.sum(axis=1) > 0)] = 1.0 / h  # degenerate draws
            counts = _split_counts(p / p.sum(axis=1, keepdims=True), len(idx))
            good = np.flatnonzero(counts.min(axis=1) >= per_holder)
            if good.size:
                sizes = counts[good[0]]
                break
        if sizes is None:
            # Bounded: give every holder its minimum, split the rest by the last draw.
            last = p[-1] / p[-1].sum()
            sizes = per_holder + _split_counts(last, len(idx) - per_holder * h)
        for i, chunk in zip(holders, np.split(idx, np.cumsum(sizes)[:-1])):
            parts[i].append(chunk)
    out = [np.sort(np.concatenate(q)).astype(np.int64) if q else np.zeros(0, dtype=np.int64)
           for q in parts]
    sizes = [len(q) for q in out]
    if min(sizes) < spec.min_samples:
        raise _too_small("exdir", sizes, spec, "use fewer clients")
    return out


PARTITIONERS = {
    "iid": (iid, "equal random shares"),
    "pat": (pathological, "pathological: classes_per_client classes per client (PFLlib 'pat')"),
    "dir": (dirichlet, "practical: per-class Dirichlet(alpha) proportions (PFLlib 'dir')"),
    "exdir": (extended_dirichlet, "extended Dirichlet: classes_per_client labels, then Dirichlet(alpha) per class"),
}
