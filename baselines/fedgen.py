"""``fedgen`` (FedGen, Zhu et al. ICML 2021, in HtFLlib's data-free feature-space form):
a server-side generator of features regularises the clients' heads; heads are shared.

Generator G: [noise (``noise_dim``), one-hot label (K)] → Linear(→``hidden_dim``) →
BatchNorm → ReLU → Linear(→D). Its batch norm always normalises with the batch's own
statistics (no running statistics), so G is fully described by its parameters and
behaves the same on the server and on the clients.

Server, after each round's uploads:

1. global head = training-sample-weighted average of the uploaded heads;
2. ``server_epochs`` Adam steps (lr ``generator_lr``, state kept across rounds) on G:
   labels ŷ drawn from the pooled label distribution (sum of the uploaded label
   counts), features G(z, ŷ), loss CE(Σ_i w_i·head_i(G(z, ŷ)), ŷ) with w_i client i's
   share of the uploaders' training samples and head_i its uploaded head.

The trained G persists on the server and is what clients receive (HtFLlib saves its
generator only at start-up, so its clients always use the random initial one).

Client: before training it loads the global head and, from round 2, its copy of G and
the pooled label counts; loss = CE(model(x), y) + ``gen_weight``·CE(head(G(z, ŷ)), ŷ)
with ŷ from the pooled label distribution and G fixed (only the head learns from it).

Noise (``noise``): ``uniform`` in [0, 1) by default, which is what HtFLlib's code draws
(its comment says Gaussian), so its tuned values carry over; ``gaussian`` draws N(0, 1).
Batch of ŷ per server step and per client step: ``gen_batch_size`` (0: --batch-size,
as in HtFLlib; at least 2 for the batch norm).

Traffic per client and round (K classes, D = feature_dim, n = noise_dim,
h = hidden_dim; G_p = (n+K)·h + h + 2h + h·D + D generator parameters):

- upload ``head.weight``, ``head.bias`` (K·D + K float32) + ``label_counts`` (K int64):
  4·(K·D + K) + 8·K bytes;
- download round 1: the initial global head (client 0's), 4·(K·D + K) bytes; from
  round 2: head + ``generator.*`` (G_p float32) + ``label_counts`` (K int64):
  4·(K·D + K + G_p) + 8·K bytes.

Defaults: HtFLlib's tuned noise_dim 32 and generator_lr 0.1 (its parser defaults are
512 and 0.005), and its defaults hidden_dim 512 and server_epochs 100.

Metrics (``metrics/server_generator_loss`` of the result file): the generator's
loss at its last Adam step of the round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from baselines._common import ParamsServer, check_shared_head, head_payload, load_head
from htfl_plugins.config import opt
from htfl_plugins.engine import Client, derive_seed, module_spec


@dataclass
class FedGenOptions:
    noise_dim: int = opt(32, "generator noise width (HtFLlib's tuned 32; its default 512)", min=1)
    hidden_dim: int = opt(512, "generator hidden width (HtFLlib default 512)", min=1)
    server_epochs: int = opt(100, "generator Adam steps per round on the server "
                             "(HtFLlib default 100)", min=0)
    generator_lr: float = opt(0.1, "generator Adam learning rate (HtFLlib's tuned 0.1; its "
                              "default 0.005)", min=0.0)
    noise: str = opt("uniform", "generator noise: uniform in [0,1) (HtFLlib's code) or "
                     "gaussian N(0,1)", choices=["uniform", "gaussian"])
    gen_batch_size: int = opt(0, "labels per generator batch, server and client "
                              "(0: --batch-size, as in HtFLlib)", min=0)
    gen_weight: float = opt(1.0, "weight of the generator regulariser on the client head "
                            "(HtFLlib: 1)", min=0.0)


class FeatureGenerator(nn.Module):
    """[noise, one-hot label] → Linear → BatchNorm (batch statistics) → ReLU → Linear."""

    def __init__(self, noise_dim: int, num_classes: int, hidden_dim: int, feature_dim: int):
        super().__init__()
        self.noise_dim, self.num_classes = noise_dim, num_classes
        self.fc1 = nn.Linear(noise_dim + num_classes, hidden_dim)
        self.bn = nn.BatchNorm1d(hidden_dim, track_running_stats=False)
        self.fc2 = nn.Linear(hidden_dim, feature_dim)

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(labels, self.num_classes).to(noise.dtype)
        return self.fc2(F.relu(self.bn(self.fc1(torch.cat([noise, onehot], 1)))))

    def sample(self, label_counts: torch.Tensor, n: int, kind: str, gen: torch.Generator):
        """Draw n labels from ``label_counts`` and their features; returns (features, labels)."""
        dev = self.fc1.weight.device
        labels = torch.multinomial(label_counts.double().cpu(), n, replacement=True, generator=gen)
        if kind == "gaussian":
            noise = torch.randn(n, self.noise_dim, generator=gen)
        else:
            noise = torch.rand(n, self.noise_dim, generator=gen)
        labels = labels.to(dev)
        return self(noise.to(dev), labels), labels


def make_generator(options, ctx) -> FeatureGenerator:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(ctx.config.seed, "fedgen", "generator"))
        gen = FeatureGenerator(options.noise_dim, ctx.num_classes, options.hidden_dim,
                               ctx.feature_dim)
    return gen.to(ctx.device)


def gen_batch(options, cfg) -> int:
    return max(2, options.gen_batch_size or cfg.batch_size)


class FedGenClient(Client):
    def upload_spec(self):
        return {**module_spec(self.model.head, "head."),
                "label_counts": ((self.ctx.num_classes,), torch.int64)}

    def __init__(self, cid, arch, data, options, ctx):
        super().__init__(cid, arch, data, options, ctx)
        self.generator = make_generator(options, ctx)
        self.generator.requires_grad_(False)
        self.pooled_counts: torch.Tensor | None = None  # set once a trained G arrives

    def receive(self, payload) -> None:
        load_head(self.model, payload)
        if "label_counts" in payload:
            with torch.no_grad():
                for n, p in self.generator.named_parameters():
                    p.copy_(payload["generator." + n])
            self.pooled_counts = payload["label_counts"].cpu()

    def training_loss(self, x, y):
        loss = F.cross_entropy(self.model(x), y)
        if self.pooled_counts is not None and self.options.gen_weight > 0:
            with torch.no_grad():
                feats, labels = self.generator.sample(self.pooled_counts,
                                                      gen_batch(self.options, self.cfg),
                                                      self.options.noise, self.rng)
            loss = loss + self.options.gen_weight * F.cross_entropy(self.model.head(feats), labels)
        return loss

    def upload(self):
        counts = torch.bincount(self.data.y_train.cpu(), minlength=self.ctx.num_classes)
        return {**head_payload(self.model), "label_counts": counts.to(torch.int64)}

    def state_dict(self):
        return {**super().state_dict(), "generator": self.generator.state_dict(),
                "pooled_counts": self.pooled_counts}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
        self.pooled_counts = state["pooled_counts"]


class FedGenServer(ParamsServer):
    """The shared head is ``self.params``; the generator and its optimizer persist."""

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        template = ctx.build_model(ctx.archs[0])
        self.params = head_payload(template)  # client 0's initial head
        self.head_module = template.head    # for calling uploaded heads functionally
        self.generator = make_generator(options, ctx)
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=options.generator_lr)
        self.pooled_counts: torch.Tensor | None = None
        self.last_loss = float("nan")

    @classmethod
    def check(cls, options, ctx) -> None:
        check_shared_head("fedgen", ctx)

    def broadcast(self, round, selected):
        payload = dict(self.params)
        if self.pooled_counts is not None:
            payload.update({"generator." + n: p.detach().clone()
                            for n, p in self.generator.named_parameters()})
            payload["label_counts"] = self.pooled_counts.clone()
        return self.to_all(selected, payload)

    def update(self, round, uploads):
        if not uploads:
            return
        ups = list(uploads.values())
        weights = [float(u["label_counts"].sum()) for u in ups]
        self.params = self.weighted_mean(ups, weights)
        self.pooled_counts = sum(u["label_counts"].cpu() for u in ups).to(torch.int64)
        self.train_generator(ups, weights)
        return {"generator_loss": self.last_loss}

    def train_generator(self, ups, weights) -> None:
        total = sum(weights)
        heads = [({n[len("head."):]: u[n].to(self.device) for n in self.params}, w / total)
                 for u, w in zip(ups, weights)]
        self.generator.train()
        n = gen_batch(self.options, self.cfg)
        for _ in range(self.options.server_epochs):
            feats, labels = self.generator.sample(self.pooled_counts, n, self.options.noise,
                                                  self.rng)
            logits = sum(w * functional_call(self.head_module, params, (feats,))
                         for params, w in heads)
            loss = F.cross_entropy(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        if self.options.server_epochs:
            self.last_loss = float(loss.detach())

    def state_dict(self):
        return {**super().state_dict(), "generator": self.generator.state_dict(),
                "optimizer": self.optimizer.state_dict(), "pooled_counts": self.pooled_counts}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.pooled_counts = state["pooled_counts"]


ALGORITHM = dict(name="fedgen", server=FedGenServer, client=FedGenClient, options=FedGenOptions,
                 summary="shared heads regularised by a server-trained feature generator "
                         "(data-free FedGen, as in HtFLlib)")
