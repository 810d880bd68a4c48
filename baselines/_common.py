"""Pieces shared by several baselines."""

from __future__ import annotations

import torch
import torch.nn as nn

from htfl_plugins.engine import Client, Server, average_by_class, class_vectors_spec, weighted_average
from htfl_plugins.errors import HtflError


# ------------------------------------------------------------------ heads (LG-FedAvg, FedGen)
def head_payload(model: nn.Module, prefix: str = "head.") -> dict[str, torch.Tensor]:
    """The parameters of ``model.head`` as ``{prefix + name: detached copy}``."""
    return {prefix + n: p.detach().clone() for n, p in model.head.named_parameters()}


def load_head(model: nn.Module, payload, prefix: str = "head.") -> None:
    """Overwrite ``model.head``'s parameters with ``payload[prefix + name]``."""
    with torch.no_grad():
        for n, p in model.head.named_parameters():
            p.copy_(payload[prefix + n].to(p.device, p.dtype))


def head_shapes(ctx, arch: str) -> dict[str, tuple]:
    """Parameter shapes of ``arch``'s head for this run, built on the meta device
    (no memory, no weights), so that pre-flight checks stay cheap."""
    from htfl_plugins.models import build_model

    c, h, _ = ctx.input_shape
    with torch.device("meta"):
        model = build_model(ctx.plugins, arch, c, h, ctx.num_classes, ctx.feature_dim)
    return {n: tuple(p.shape) for n, p in model.head.named_parameters()}


def check_shared_head(algo: str, ctx) -> None:
    """Raise HtflError unless every client's head has the same parameter shapes
    (a head-sharing method cannot average a ViT head with a Linear head)."""
    used = ctx.archs_in_use()
    shapes = {a: head_shapes(ctx, a) for a in used}
    first = used[0]
    for a in used[1:]:
        if shapes[a] != shapes[first]:
            raise HtflError(f"{algo} averages the clients' heads, but {a} has head "
                            f"{_fmt_shapes(shapes[a])} while {first} has {_fmt_shapes(shapes[first])}; "
                            "use models whose heads match (e.g. no ViTs beside CNNs)")


def _fmt_shapes(shapes: dict) -> str:
    return "{" + ", ".join(f"{n}: {'x'.join(map(str, s))}" for n, s in shapes.items()) + "}"


def last_pass_mean(losses: list[float], n: int, batch_size: int) -> float:
    """Mean of the last pass's batch losses, of ``losses`` recorded pass after pass
    over ``n`` samples in batches of ``batch_size`` (NaN when nothing was trained)."""
    per_pass = -(-n // batch_size)
    last = losses[-per_pass:] if per_pass else []
    return sum(last) / len(last) if last else float("nan")


# ------------------------------------------------------------------ per-class statistics
class ClassAccumulator:
    """Running per-class sums of vectors, for means collected during training."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.sums: torch.Tensor | None = None
        self.counts = torch.zeros(num_classes, dtype=torch.int64)

    def add(self, values: torch.Tensor, labels: torch.Tensor) -> None:
        values = values.detach().double()
        if self.sums is None:
            self.sums = torch.zeros(self.num_classes, values.shape[1], dtype=torch.float64,
                                    device=values.device)
        self.sums.index_add_(0, labels, values)
        self.counts += torch.bincount(labels.cpu(), minlength=self.num_classes)

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(labels present int64, their mean vectors float32, their counts int64)."""
        present = torch.nonzero(self.counts > 0).flatten()
        if self.sums is None:
            return present, torch.zeros(0, 0), self.counts[present]
        dev = self.sums.device
        means = self.sums[present.to(dev)] / self.counts[present].to(dev, torch.float64).unsqueeze(1)
        return present, means.float(), self.counts[present]


@torch.no_grad()
def class_mean_outputs(module: nn.Module, fn, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                       batch_size: int = 512):
    """Per-class means of ``fn(x_batch)`` over a whole split, with ``module`` in eval
    mode (restored afterwards): (labels present int64, means float32, counts int64)."""
    was_training = module.training
    module.eval()
    acc = ClassAccumulator(num_classes)
    try:
        for start in range(0, len(y), batch_size):
            acc.add(fn(x[start:start + batch_size]), y[start:start + batch_size])
    finally:
        module.train(was_training)
    return acc.result()


# ------------------------------------------- whole-model payloads, seeded modules (FML, FedKD, FedGH, FedTGP)
def params_payload(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Every parameter of ``module`` as ``{prefix + name: detached CPU copy}`` (buffers
    such as BatchNorm running statistics are not included)."""
    return {prefix + n: p.detach().cpu().clone() for n, p in module.named_parameters()}


def load_params(module: nn.Module, payload, prefix: str) -> None:
    """Overwrite every parameter of ``module`` with ``payload[prefix + name]``."""
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_(payload[prefix + n].to(p.device, p.dtype))


def seeded_module(ctx, key, make) -> nn.Module:
    """``make()`` run under a private RNG seeded from the run seed and ``key`` (the
    global torch RNG is left untouched), moved to the run's device."""
    from htfl_plugins.engine.base import derive_seed

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(ctx.config.seed, "module", key))
        module = make()
    return module.to(ctx.device)


def check_model_name(algo: str, option: str, arch: str, ctx) -> None:
    """Raise HtflError unless ``arch`` is a registered model architecture."""
    if arch not in ctx.plugins.registry("models"):
        known = ", ".join(ctx.plugins.registry("models").names())
        raise HtflError(f"{algo}: --{option.replace('_', '-')} {arch!r} is not a known model "
                        f"(known: {known})")


# ------------------------------------------- one vector per class, both ways (FedProto, FedDistill)
class ClassVectorClient(Client):
    """Uploads the per-class mean of one of its outputs after training and keeps the
    server's per-class vectors as a K×d matrix with a mask of the classes present.

    A subclass sets ``key``/``labels_key`` (payload names), implements
    ``vector_dim()`` and ``local_outputs(x)`` (what is averaged), and reads the
    ``source`` option: "after" (the trained model in eval mode) or "during" (the
    training forward passes; call ``self.record(outputs, y)`` there)."""

    key = "vectors"
    labels_key = "labels"

    def __init__(self, cid, arch, data, options, ctx):
        super().__init__(cid, arch, data, options, ctx)
        self.global_vectors: torch.Tensor | None = None  # K×d, rows valid where global_mask
        self.global_mask = torch.zeros(ctx.num_classes, dtype=torch.bool, device=self.device)
        self._acc: ClassAccumulator | None = None
        self._local = None  # (labels, means, counts) of the last local update

    def vector_dim(self) -> int:
        raise NotImplementedError

    def local_outputs(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def source(self) -> str:
        raise NotImplementedError

    def receive(self, payload) -> None:
        if self.key not in payload:
            return
        k = self.ctx.num_classes
        labels = payload[self.labels_key].to(self.device)
        vectors = torch.zeros(k, self.vector_dim(), device=self.device)
        vectors[labels] = payload[self.key].to(self.device, torch.float32)
        mask = torch.zeros(k, dtype=torch.bool, device=self.device)
        mask[labels] = True
        self.global_vectors, self.global_mask = vectors, mask

    def record(self, outputs: torch.Tensor, y: torch.Tensor) -> None:
        if self._acc is not None:
            self._acc.add(outputs, y)

    def train(self) -> float:
        k = self.ctx.num_classes
        self._acc = ClassAccumulator(k) if self.source() == "during" else None
        loss = super().train()
        if self._acc is not None:
            labels, means, _ = self._acc.result()
            self._acc = None
            if means.numel() == 0:  # no batch recorded (a straggler's empty budget)
                means = torch.zeros(0, self.vector_dim())
        else:
            labels, means, _ = class_mean_outputs(self.model, self.local_outputs, self.data.x_train,
                                                  self.data.y_train, k)
        # a class's weight is its number of training samples (not multiplied by epochs)
        counts = torch.bincount(self.data.y_train.cpu(), minlength=k)[labels]
        self._local = (labels, means, counts)
        return loss

    def held_classes(self) -> int:
        """How many classes the upload holds: those of the last local update, which
        with ``source`` "during" are only the classes its batches saw (a straggler,
        or a class whose only samples fell in a dropped last batch)."""
        return self.num_local_classes() if self._local is None else len(self._local[0])

    def class_vectors_spec(self) -> dict[str, tuple]:
        """One ``vector_dim()`` vector and one int64 label per held class."""
        return class_vectors_spec(self, self.key, self.labels_key, self.vector_dim(), self.held_classes())

    def state_dict(self):
        return {**super().state_dict(), "global_vectors": self.global_vectors,
                "global_mask": self.global_mask.clone(), "local": self._local}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.global_vectors = state["global_vectors"]
        self.global_mask = state["global_mask"].clone()
        self._local = state["local"]


class ClassVectorServer(Server):
    """Averages each class's uploaded vectors over the clients that hold it
    (weighted by ``weights_key`` counts when that is set) and sends every known
    class's vector to the selected clients."""

    key = "vectors"
    labels_key = "labels"

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        self.vectors: dict[int, torch.Tensor] = {}

    def weights_key(self) -> str | None:
        return None

    def broadcast(self, round, selected):
        if not self.vectors:
            return {}
        labels = sorted(self.vectors)
        return self.to_all(selected, {self.key: torch.stack([self.vectors[c] for c in labels]),
                                      self.labels_key: torch.tensor(labels, dtype=torch.int64)})

    def update(self, round, uploads):
        if uploads:  # nobody uploaded (all dropped): keep the previous vectors
            self.vectors = average_by_class(uploads, self.key, self.labels_key, self.ctx.num_classes,
                                            weights_key=self.weights_key())

    def state_dict(self):
        return {**super().state_dict(), "vectors": dict(self.vectors)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.vectors = dict(state["vectors"])


# ------------------------------------------- one shared model's parameters (LG-FedAvg, FML, FedKD)
class ParamsServer(Server):
    """Keeps the shared parameters as ``self.params`` (payload name → tensor), sends
    them to the selected clients and checkpoints them; a subclass sets them in
    ``__init__`` and says in ``update`` how the uploads are averaged."""

    params: dict[str, torch.Tensor]

    def broadcast(self, round, selected):
        return self.to_all(selected, self.params)

    def weighted_mean(self, uploads: list, weights: list[float]) -> dict[str, torch.Tensor]:
        """Each shared tensor averaged over the uploads with these weights."""
        return {k: weighted_average([u[k].to(self.device) for u in uploads], weights) for k in self.params}

    def state_dict(self):
        return {**super().state_dict(), "params": {k: v.clone() for k, v in self.params.items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.params = {k: v.clone() for k, v in state["params"].items()}
