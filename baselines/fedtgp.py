"""``fedtgp``: FedTGP (Zhang et al., AAAI 2024), trainable global prototypes with
an adaptive-margin contrastive loss.

Clients train with FedProto's loss, CE + λ·MSE(base(x), P_y), where P_y is the
global prototype of class y (MSE is the mean over the batch × D elements; rows
of classes without a prototype contribute zero). After local training each
client uploads the per-class means of its base features over its training split
(eval mode) with their labels. Inference is the nearest global prototype by
mean squared distance (scores = −distance; before any prototype arrives the
head's logits are used); the head's own accuracy is recorded as ``acc_head``.

The server keeps a per-class embedding (K × D) followed by Linear(D, H)–ReLU–
Linear(H, D) (H = ``server_hidden_dim``, default D). Each round it computes the
margin δ = min(max_c min_{c'≠c} ‖P̄_c − P̄_{c'}‖₂, ``margin_threshold``) from the
per-class uniform averages P̄ of the uploaded prototypes, then trains the module
for ``server_epochs`` passes of SGD (``server_lr``) over the uploaded (prototype,
label) pairs in shuffled batches of ``--batch-size``, minimising
CE(−(d + δ·onehot(y)), y) with d the Euclidean distances from each client
prototype to the K generated prototypes. The generated prototypes of all K
classes are broadcast (from round 2 on; round 1 has none yet).

Traffic per client and round (float32 4 bytes, int64 8 bytes):

* upload:   ``protos`` |C_i|×D floats + ``labels`` |C_i| int64 → 4·D·|C_i| + 8·|C_i| bytes;
* download: ``global_protos`` K×D floats → 4·K·D bytes (0 in round 1).

Defaults follow HtFLlib's tuned values: λ = 10 (parser default 1),
``server_epochs`` 100, ``margin_threshold`` 100; ``server_lr`` 0.01 (HtFLlib
uses the local learning rate, 0.01 by default). As in HtFLlib, the server
trains on every client's prototypes, not on the averages, and the module
persists across rounds. Distances are computed with a clamp at 1e-12 under the
square root (HtFLlib's expanded form can take the root of a tiny negative).

Metrics (``metrics/server_*`` of the result file): ``loss``, the mean server loss
over the last pass's batches (the FedTGP authors' advice: it should fall below
about 1e-3 once training works), and ``margin``, the round's δ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines._common import class_mean_outputs, last_pass_mean, seeded_module
from htfl_plugins.config import opt
from htfl_plugins.engine import Client, Server, average_by_class, class_vectors_spec


@dataclass
class FedTGPOptions:
    lam: float = opt(10.0, "weight λ of the MSE to the global prototypes (HtFLlib default 1, "
                     "tuned 10)", min=0.0)
    server_epochs: int = opt(100, "passes over the uploaded prototypes per round", min=0)
    server_lr: float = opt(0.01, "SGD learning rate of the server's prototype generator",
                           min=0.0)
    margin_threshold: float = opt(100.0, "upper bound of the adaptive margin", min=0.0)
    server_hidden_dim: int = opt(0, "hidden width of the prototype generator (0: feature_dim)",
                                 min=0)


class PrototypeGenerator(nn.Module):
    """Class id → embedding → Linear–ReLU–Linear → global prototype."""

    def __init__(self, num_classes: int, feature_dim: int, hidden_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_classes, feature_dim)
        self.net = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, feature_dim))

    def forward(self) -> torch.Tensor:
        return self.net(self.embedding.weight)


def adaptive_margin(class_protos: dict[int, torch.Tensor], threshold: float) -> float:
    """min(max over classes of the distance to the nearest other class, threshold);
    ``threshold`` when fewer than two classes are present."""
    if len(class_protos) < 2:
        return float(threshold)
    p = torch.stack([class_protos[c] for c in sorted(class_protos)]).double()
    d = torch.cdist(p, p)
    d.fill_diagonal_(float("inf"))
    return float(min(d.min(1).values.max().item(), threshold))


def euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances, safe to differentiate at 0."""
    sq = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1).unsqueeze(0)
    return sq.clamp_min(1e-12).sqrt()


class FedTGPClient(Client):
    def upload_spec(self):
        return class_vectors_spec(self, "protos", "labels", self.ctx.feature_dim)

    def __init__(self, cid, arch, data, options, ctx):
        super().__init__(cid, arch, data, options, ctx)
        self.global_protos: torch.Tensor | None = None

    def receive(self, payload):
        if "global_protos" in payload:
            self.global_protos = payload["global_protos"].to(self.device).float().clone()

    def proto_mse(self, rep, y):
        if self.global_protos is None:
            return rep.new_zeros(())
        return F.mse_loss(rep, self.global_protos[y])

    def training_loss(self, x, y):
        rep = self.model.base(x)
        return F.cross_entropy(self.model.head(rep), y) + self.options.lam * self.proto_mse(rep, y)

    def upload(self):
        labels, means, _ = class_mean_outputs(self.model, self.model.base, self.data.x_train,
                                              self.data.y_train, self.ctx.num_classes)
        return {"protos": means.detach().cpu(), "labels": labels.cpu().to(torch.int64)}

    def scores(self, x):
        rep = self.model.base(x)
        if self.global_protos is None:
            return self.model.head(rep)
        return -((rep.unsqueeze(1) - self.global_protos.unsqueeze(0)) ** 2).mean(2)

    def extra_scores(self, x):
        return {"head": self.model(x)}

    def eval_loss(self, x, y):
        rep = self.model.base(x)
        return F.cross_entropy(self.model.head(rep), y) + self.options.lam * self.proto_mse(rep, y)

    def state_dict(self):
        return {**super().state_dict(), "global_protos": self.global_protos}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        g = state.get("global_protos")
        self.global_protos = None if g is None else g.to(self.device)


class FedTGPServer(Server):
    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        k, d = ctx.num_classes, ctx.feature_dim
        h = options.server_hidden_dim or d
        self.generator = seeded_module(ctx, "fedtgp-prototypes", lambda: PrototypeGenerator(k, d, h))
        self.optimizer = torch.optim.SGD(self.generator.parameters(), lr=options.server_lr)
        self.global_protos: torch.Tensor | None = None
        self.margin = float("nan")
        self.last_losses: list[float] = []

    def broadcast(self, round, selected):
        if self.global_protos is None:
            return {}
        return self.to_all(selected, {"global_protos": self.global_protos})

    def update(self, round, uploads):
        if not uploads:
            return
        avg = average_by_class(uploads, "protos", "labels", self.ctx.num_classes)
        self.margin = adaptive_margin(avg, self.options.margin_threshold)
        protos = torch.cat([up["protos"] for up in uploads.values()]).float().to(self.device)
        labels = torch.cat([up["labels"] for up in uploads.values()]).long().to(self.device)
        self.last_losses = self.train_generator(protos, labels, self.margin)
        self.generator.eval()
        with torch.no_grad():
            self.global_protos = self.generator().detach().cpu().clone()
        return {"loss": last_pass_mean(self.last_losses, len(labels), self.cfg.batch_size),
                "margin": self.margin}

    def train_generator(self, protos, labels, margin: float) -> list[float]:
        self.generator.train()
        losses = []
        bs = self.cfg.batch_size
        k = self.ctx.num_classes
        for _ in range(self.options.server_epochs):
            order = torch.randperm(len(labels), generator=self.rng).to(self.device)
            for start in range(0, len(labels), bs):
                idx = order[start:start + bs]
                p, y = protos[idx], labels[idx]
                dist = euclidean(p, self.generator()) + margin * F.one_hot(y, k)
                loss = F.cross_entropy(-dist, y)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                losses.append(loss.item())
        return losses

    def state_dict(self):
        return {**super().state_dict(), "generator": self.generator.state_dict(),
                "optimizer": self.optimizer.state_dict(), "global_protos": self.global_protos,
                "margin": self.margin}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.global_protos = state["global_protos"]
        self.margin = float(state["margin"])


ALGORITHM = dict(name="fedtgp", server=FedTGPServer, client=FedTGPClient, options=FedTGPOptions,
                 summary="FedProto-style clients; the server trains global prototypes with "
                         "an adaptive-margin contrastive loss (FedTGP)")
