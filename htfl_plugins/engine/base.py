"""What an algorithm implements: a Client and a Server. The loop does the rest.

Payloads are flat mappings ``{name: tensor}``. Everything a client sends or
receives goes through the loop, which counts it; a client may upload only what
its ``upload_spec()`` declares (name, shape and dtype), and nothing else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from htfl_plugins.data.types import ClientData, batches

Payload = dict[str, torch.Tensor]


def clients_per_round(n: int, join_ratio: float) -> int:
    """How many of ``n`` clients a round selects (at least; ``--random-join`` may
    take more): ``join_ratio``·n rounded down, never fewer than one."""
    return max(1, int(n * join_ratio))


def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any parts (run seed, role, client id, ...)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class RunContext:
    """What every client and the server may know about the run (no private data)."""

    config: Any
    num_classes: int
    input_shape: tuple[int, int, int]
    device: torch.device
    num_clients: int
    archs: list[str]
    plugins: Any = field(repr=False, default=None)
    out_dir: Any = None
    run_name: str = ""

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def client_arch(self, cid: int) -> str:
        """Client i's architecture: ``archs[i % len(archs)]``, as in HtFLlib."""
        return self.archs[cid % len(self.archs)]

    def archs_in_use(self) -> list[str]:
        """The distinct architectures of the run's clients, in group order."""
        return list(dict.fromkeys(self.client_arch(i) for i in range(self.num_clients)))

    def build_model(self, arch: str, num_outputs: int | None = None, seed_key: Any = None) -> nn.Module:
        """A zoo model for this run's inputs, initialised from the run seed and
        ``seed_key`` (by default the architecture: same architecture, same start,
        as in HtFLlib)."""
        from htfl_plugins.models import build_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.config.seed, "model", seed_key or arch))
            c, h, _ = self.input_shape
            model = build_model(self.plugins, arch, c, h, num_outputs or self.num_classes,
                                self.feature_dim)
        return model.to(self.device)

    def generator(self, *key: Any) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.config.seed, *key))


class Client:
    """A client with a private model and data. The default trains with cross-entropy.

    Override ``training_loss`` to add a term, ``train`` to change the whole
    local update, ``receive``/``upload`` to exchange payloads, and ``scores`` to
    change inference (the class with the highest score is predicted; softmax of
    the scores gives the probabilities for AUC).
    """

    def __init__(self, cid: int, arch: str, data: ClientData, options, ctx: RunContext):
        self.cid = cid
        self.arch = arch
        self.data = data
        self.options = options
        self.ctx = ctx
        self.cfg = ctx.config
        self.device = ctx.device
        self.model = ctx.build_model(arch)
        self.rng = ctx.generator("client", cid)
        self.optimizer = self.make_optimizer(self.model.parameters())
        #: batches this round's local update may still take (None: no limit; stragglers)
        self.batch_budget: int | None = None

    # -------------------------------------------------------------- training
    def make_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.cfg.lr)

    def batches(self, x=None, y=None, batch_size=None):
        """Shuffled training batches on the client's device; a straggler's
        ``batch_budget`` ends its local work early."""
        x = self.data.x_train if x is None else x
        y = self.data.y_train if y is None else y
        for xb, yb in batches(x, y, batch_size or self.cfg.batch_size, self.rng):
            if self.batch_budget is not None:
                if self.batch_budget <= 0:
                    return
                self.batch_budget -= 1
            yield xb.to(self.device), yb.to(self.device)

    def batches_per_round(self) -> int:
        """Local batches of a full local update (``local_epochs`` passes)."""
        n, b = self.data.n_train, self.cfg.batch_size
        per_epoch = n // b + (1 if n % b > 1 or n < b else 0)
        return self.cfg.local_epochs * max(per_epoch, 1)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(x), y)

    def train(self) -> float:
        """Run the local epochs; return the mean training loss."""
        self.model.train()
        total, count = 0.0, 0
        for _ in range(self.cfg.local_epochs):
            for x, y in self.batches():
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.training_loss(x, y)
                loss.backward()
                self.optimizer.step()
                total += loss.item() * len(y)
                count += len(y)
        return total / max(count, 1)

    # -------------------------------------------------------------- exchange
    def receive(self, payload: Payload) -> None:
        """Take the server's download for this round (called before ``train``)."""

    def upload(self) -> Payload:
        """What this client sends after training."""
        return {}

    def upload_spec(self) -> dict[str, tuple]:
        """Everything this client may upload: ``{name: (shape, dtype)}`` as functions of
        its own data and model. A name may be a shell-style pattern and a shape may be
        None (any shape). The loop refuses any other name, shape or dtype."""
        return {}

    def num_local_classes(self) -> int:
        """|C_i|: the classes present in this client's training data."""
        return len(self.data.labels())

    # -------------------------------------------------------------- inference
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def extra_scores(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Other ways to predict, each recorded as accuracy ``acc_<name>`` (e.g.
        FedProto's head-based accuracy beside its prototype-based one)."""
        return {}

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss reported as ``train_loss`` (evaluated on the training split)."""
        return F.cross_entropy(self.scores(x), y)

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": self.rng.get_state()}

    def load_state_dict(self, state: Mapping) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.set_state(state["rng"])


class Server:
    """The server. The default sends nothing and aggregates nothing (``local``).

    An optional classmethod ``check(options, ctx)`` runs before anything is
    trained or written, for pre-flight checks (weights present, sizes, ...);
    it raises :class:`htfl_plugins.errors.HtflError` with one clear line.
    """

    def __init__(self, options, ctx: RunContext):
        self.options = options
        self.ctx = ctx
        self.cfg = ctx.config
        self.device = ctx.device
        self.rng = ctx.generator("server")

    def broadcast(self, round: int, selected: list[int]) -> dict[int, Payload]:
        """Downloads for the selected clients: ``{cid: payload}``."""
        return {}

    def update(self, round: int, uploads: dict[int, Payload]) -> None:
        """Aggregate the uploads of the clients that trained this round."""

    def to_all(self, selected: list[int], payload: Payload) -> dict[int, Payload]:
        return {cid: payload for cid in selected}

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state: Mapping) -> None:
        self.rng.set_state(state["rng"])


# ------------------------------------------------------------------ shared helpers
def module_spec(module: nn.Module, prefix: str) -> dict[str, tuple]:
    """Upload spec of every parameter of ``module`` sent as ``prefix + name``."""
    return {prefix + n: (tuple(p.shape), p.dtype) for n, p in module.named_parameters()}


def class_vectors_spec(client, key: str, labels_key: str, width: int, classes: int | None = None) -> dict[str, tuple]:
    """Upload spec of one ``width``-vector per class plus the int64 labels: per local
    class, or per each of ``classes`` classes where the upload holds fewer."""
    c = client.num_local_classes() if classes is None else classes
    return {key: ((c, width), torch.float32), labels_key: ((c,), torch.int64)}


def weighted_average(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float64)
    w = (w / w.sum()).to(tensors[0].dtype)
    return sum(wi * t for wi, t in zip(w, tensors))


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """Per-class means of ``features``: (classes present, their means)."""
    present = torch.unique(labels)
    means = torch.stack([features[labels == c].mean(0) for c in present])
    return present, means


def average_by_class(uploads: dict[int, Payload], key: str, labels_key: str, num_classes: int,
                     weights_key: str | None = None) -> dict[int, torch.Tensor]:
    """Mean of each class's vector over the clients that uploaded that class
    (optionally weighted by a per-class count uploaded under ``weights_key``)."""
    sums: dict[int, torch.Tensor] = {}
    totals: dict[int, float] = {}
    for up in uploads.values():
        vecs, labels = up[key], up[labels_key]
        ws = up[weights_key] if weights_key else torch.ones(len(labels))
        for v, c, w in zip(vecs, labels.tolist(), ws.tolist()):
            sums[c] = sums.get(c, 0) + w * v.double()
            totals[c] = totals.get(c, 0.0) + w
    return {c: (sums[c] / totals[c]).float() for c in sorted(sums)}
