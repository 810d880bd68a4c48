"""FedKTL: clients with heterogeneous models train against a shared simplex ETF
with an ArcFace margin and upload only per-class prototypes; the server aligns
them with a frozen pretrained generator's latent space, generates one image per
class and sends the image–latent pairs back; clients learn to project their
features of those images onto the latents.

Specification: the authors' code (TsingZ0/FedKTL), see docs/fedktl.md for the
places where this implementation chooses between their code and their paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedktl_plugin.etf import arcface_loss, cosine_logits, simplex_etf
from htfl_plugins.config import opt
from htfl_plugins.engine import Client, Server, class_vectors_spec
from htfl_plugins.engine.base import derive_seed
from htfl_plugins.errors import HtflError
from htfl_plugins.models import mixes_samples

BANDWIDTHS = (10.0, 15.0, 20.0, 50.0)
CLIP = 100.0


@dataclass
class FedKTLOptions:
    mu: float = opt(50.0, "weight μ of the client's latent-matching loss L^M (0: ablate it)", min=0.0)
    lamda: float = opt(1.0, "weight λ of the server's MSE to class centroids (0: ablate it)", min=0.0)
    server_lr: float = opt(0.01, "Adam learning rate of the feature transformer and centroids", min=0.0)
    server_epochs: int = opt(100, "passes over the uploaded prototypes per round", min=0)
    server_batch_size: int = opt(100, "prototypes per server step", min=2)
    gen_batch_size: int = opt(4, "latents per generator call (memory only)", min=1, compared=False)
    generator: str = opt("dcgan-face", "pretrained generator (see `htfl list generators`)")
    generator_path: str = opt("", "weights file or folder for the generator (stylegan pickle, "
                              "diffusers folder; optional for packaged generators)")
    stylegan_utils: str = opt("", "folder holding NVIDIA's dnnlib/ and torch_utils/ (stylegan)")
    prompt: str = opt("a cat", "stable-diffusion: the fixed text prompt")
    guidance: float = opt(7.5, "stable-diffusion: classifier-free guidance scale", min=0.0)
    sd_steps: int = opt(50, "stable-diffusion: denoising steps", min=1)
    arcface_s: float = opt(64.0, "ArcFace scale s", min=0.0)
    arcface_m: float = opt(0.5, "ArcFace angular margin m (radians)", min=0.0)
    arcface_monotone: bool = opt(True, "past θ > π − m use cos θ − m·sin m as the true-class "
                                 "target, so samples far from their anchor are pulled back "
                                 "(false: cos(θ + m) everywhere, the authors' code)",
                                 legacy=False)  # runs from before the option had the authors' target
    proj: str = opt("keep", "projection head h': 'keep' (per client, trained across rounds, as "
                    "the paper's figure) or 'reset' (shared initialisation every round, as the "
                    "authors' code)", choices=["keep", "reset"])
    use_etf: bool = opt(True, "ETF classifier with ArcFace (false: plain linear head with CE)")
    use_mmd: bool = opt(True, "MMD to the generator's prior in the server loss (false: ablate)")
    use_centroids: bool = opt(True, "generate from class centroids (false: one image per uploaded "
                              "prototype, from its own transformed vector, no MSE term)")
    latents: str = opt("aligned", "'aligned' (FedKTL) or 'prior': random latents from the "
                       "generator's prior instead of aligned ones (ablation)",
                       choices=["aligned", "prior"])
    centroid_stats: str = opt("batch", "BatchNorm statistics of F when the centroids are set: 'batch' "
                              "(statistics of all uploaded prototypes, the ones MMD aligned) or 'eval' "
                              "(running statistics, the authors' code)", choices=["batch", "eval"],
                              legacy="eval")
    save_images: int = opt(1, "save the generated images as a PNG grid every N rounds (0: never)",
                           min=0, compared=False)


def make_generator(options: FedKTLOptions, ctx, load: bool = True):
    reg = ctx.plugins.registry("generators")
    cls = reg.get(options.generator).obj
    if not load:
        cls.check(options.generator_path)
        return cls
    return cls(options.generator_path, ctx.device, options)


def projection_head(ctx, latent_dim: int) -> nn.Linear:
    """h': feature_dim → latent size, initialised from the run's shared seed, so every
    client starts from the same h' without a transfer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(ctx.config.seed, "fedktl", "proj"))
        return nn.Linear(ctx.feature_dim, latent_dim).to(ctx.device)


def to_client_images(images: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Generator output in [0, 1] → the clients' size, channels and normalisation
    ([−1, 1], as PFLlib normalises real data)."""
    c, h, w = shape
    x = images
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    if c == 1 and x.shape[1] == 3:
        x = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    elif c == 3 and x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif c != x.shape[1]:
        raise HtflError(f"cannot map {x.shape[1]}-channel generator images to {c}-channel clients")
    return ((x.clamp(0, 1) - 0.5) / 0.5).float()


def mmd2(q: torch.Tensor, w: torch.Tensor, bandwidths=BANDWIDTHS) -> torch.Tensor:
    """Biased MMD² with a sum of Gaussian kernels exp(−‖a−b‖²/(2σ))."""
    def kernel(a, b):
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * s)) for s in bandwidths)
    return kernel(q, q).mean() + kernel(w, w).mean() - 2 * kernel(q, w).mean()


class FeatureTransformer(nn.Module):
    """F: prototype (K) → latent (H): Linear(K→K), BatchNorm, ReLU, Linear(K→H)."""

    def __init__(self, k: int, h: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(k, k), nn.BatchNorm1d(k), nn.ReLU(), nn.Linear(k, h))

    def forward(self, x):
        return self.net(x)

    def forward_batch_stats(self, x):
        """F(x) normalised by the statistics of x itself, leaving the running ones alone."""
        lin, bn, act, out = self.net
        z = F.batch_norm(lin(x), None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        return out(act(z))


class FedKTLClient(Client):

    def __init__(self, cid, arch, data, options: FedKTLOptions, ctx):
        super().__init__(cid, arch, data, options, ctx)
        self.anchors = simplex_etf(ctx.num_classes, derive_seed(ctx.config.seed, "fedktl", "etf")).to(ctx.device)
        self.proj: nn.Linear | None = None
        self.pairs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pair_order = torch.zeros(0, dtype=torch.long)
        self._one_pass = not mixes_samples(self.model)

    # -------------------------------------------------------------- exchange
    def receive(self, payload):
        if "images" not in payload or self.options.mu == 0:
            return
        self.pairs = (payload["images"].to(self.device), payload["latents"].to(self.device))
        latent_dim = self.pairs[1].shape[1]
        if self.proj is None or self.options.proj == "reset" or self.proj.out_features != latent_dim:
            self.proj = projection_head(self.ctx, latent_dim)
        self.optimizer = self.make_optimizer(list(self.model.parameters()) + list(self.proj.parameters()))
        self._pair_order = torch.zeros(0, dtype=torch.long)

    def upload(self):
        """Per-class prototypes: the normalised mean of the normalised head outputs."""
        self.model.eval()
        with torch.no_grad():
            outs = torch.cat([F.normalize(self.model(x), dim=1) for x, _ in
                              self._ordered_batches()])
        y = self.data.y_train.to(self.device)
        labels = torch.unique(y)
        protos = torch.stack([F.normalize(outs[y == c].mean(0), dim=0) for c in labels])
        return {"protos": protos.float().cpu(), "labels": labels.long().cpu()}

    def upload_spec(self):
        return class_vectors_spec(self, "protos", "labels", self.ctx.num_classes)

    def _ordered_batches(self):
        b = 256
        for i in range(0, self.data.n_train, b):
            yield self.data.x_train[i:i + b].to(self.device), None

    # -------------------------------------------------------------- training
    def _next_pairs(self):
        """The next batch of image–latent pairs from a shuffled loader that cycles. A
        pass never ends on a batch of one (a BatchNorm model cannot train on it): a
        lone last pair joins the batch before it."""
        images, latents = self.pairs
        if len(self._pair_order) == 0:
            self._pair_order = torch.randperm(len(images), generator=self.rng)
        b = self.cfg.batch_size
        if len(self._pair_order) == b + 1:
            b += 1
        idx, self._pair_order = self._pair_order[:b], self._pair_order[b:]
        return images[idx.to(self.device)], latents[idx.to(self.device)]

    def classification_loss(self, out, y):
        """The loss of head outputs ``out`` for labels ``y``."""
        if self.options.use_etf:
            return arcface_loss(cosine_logits(out, self.anchors), y, self.options.arcface_s,
                                self.options.arcface_m, monotone=self.options.arcface_monotone)
        return F.cross_entropy(out, y)

    def _step_loss(self, x, y, transfer: bool):
        """L^A on (x, y), plus μ·L^M on the next image–latent pairs. A model whose
        layers treat each sample on its own sees the real and the generated images
        in one pass (the same loss and gradients up to summation order, less
        time per step: benchmarks/ktl_step.py); BatchNorm models see them in two,
        so neither batch's statistics mix."""
        if not transfer:
            return self.classification_loss(self.model(x), y)
        xg, vg = self._next_pairs()
        if self._one_pass:
            feats = self.model.base(torch.cat([x, xg]))
            out, feats_g = self.model.head(feats[:len(x)]), feats[len(x):]
        else:
            out, feats_g = self.model(x), self.model.base(xg)
        return self.classification_loss(out, y) + self.options.mu * F.mse_loss(self.proj(feats_g), vg)

    def train(self) -> float:
        self.model.train()
        transfer = self.pairs is not None and self.options.mu > 0
        total, count = 0.0, 0
        for _ in range(self.cfg.local_epochs):
            for x, y in self.batches():
                self.optimizer.zero_grad(set_to_none=True)
                loss = self._step_loss(x, y, transfer)
                loss.backward()
                nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
                if transfer:
                    nn.utils.clip_grad_norm_(self.proj.parameters(), CLIP)
                self.optimizer.step()
                total += loss.item() * len(y)
                count += len(y)
        return total / max(count, 1)

    # -------------------------------------------------------------- inference
    def scores(self, x):
        out = self.model(x)
        if self.options.use_etf:
            return cosine_logits(out, self.anchors) * self.options.arcface_s
        return out

    def eval_loss(self, x, y):
        return self.classification_loss(self.model(x), y)

    # -------------------------------------------------------------- state
    def state_dict(self):
        state = super().state_dict()
        state["proj"] = None if self.proj is None else self.proj.state_dict()
        state["pairs"] = self.pairs
        state["pair_order"] = self._pair_order
        return state

    def load_state_dict(self, state):
        self.pairs = state["pairs"]
        self._pair_order = state["pair_order"]
        params = list(self.model.parameters())
        if state["proj"] is None:  # (also a state from before this client first received pairs)
            self.proj = None
        else:
            self.proj = projection_head(self.ctx, state["proj"]["weight"].shape[0])
            self.proj.load_state_dict(state["proj"])
            params += list(self.proj.parameters())
        self.optimizer = self.make_optimizer(params)  # over exactly what the state's optimizer covered
        super().load_state_dict(state)


class FedKTLServer(Server):
    @classmethod
    def check(cls, options: FedKTLOptions, ctx):
        make_generator(options, ctx, load=False)
        if ctx.num_classes < 2:
            raise HtflError("fedktl needs at least two classes for its ETF classifier")

    def __init__(self, options: FedKTLOptions, ctx):
        super().__init__(options, ctx)
        self.gen = make_generator(options, ctx)
        k, h = ctx.num_classes, self.gen.latent_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(ctx.config.seed, "fedktl", "server"))
            self.transformer = FeatureTransformer(k, h).to(self.device)
            self.centroids = nn.Embedding(k, h).to(self.device)
        self.pairs: dict[str, torch.Tensor] | None = None
        self.last_loss = float("nan")

    # -------------------------------------------------------------- exchange
    def broadcast(self, round, selected):
        if self.pairs is None or self.options.mu == 0:  # μ = 0: clients would not use them
            return {}
        return self.to_all(selected, self.pairs)

    def update(self, round, uploads):
        if not uploads:
            return
        protos = torch.cat([u["protos"] for u in uploads.values()]).to(self.device)
        labels = torch.cat([u["labels"] for u in uploads.values()]).to(self.device)
        opts = self.options
        metrics: dict[str, float] = {}
        if opts.latents == "prior":
            latents = self.gen.sample_prior(self.ctx.num_classes, self.rng)
        else:
            self._set_centroids(protos, labels)
            metrics = self._align(protos, labels)
            self._set_centroids(protos, labels)
            present = torch.unique(labels)
            metrics["centroid_norm"] = float(self.centroids.weight.detach()[present].norm(dim=1).mean())
            if opts.use_centroids:
                latents = self.centroids.weight.detach().clone()
            else:
                latents = self._transform(protos)
        images = self._generate(latents)
        self.pairs = {"images": to_client_images(images, self.ctx.input_shape).cpu(),
                      "latents": latents.float().cpu()}
        if opts.save_images and round % opts.save_images == 0 and self.ctx.out_dir is not None:
            self._save_grid(images, round)
        return metrics

    # -------------------------------------------------------------- domain alignment
    @torch.no_grad()
    def _transform(self, protos):
        """F(P) of all uploaded prototypes, with F's BatchNorm on their own statistics
        (``centroid_stats`` batch) or its running ones (eval)."""
        self.transformer.eval()
        if self.options.centroid_stats == "batch" and len(protos) > 1:
            return self.transformer.forward_batch_stats(protos)
        return self.transformer(protos)

    @torch.no_grad()
    def _set_centroids(self, protos, labels):
        """Centroid of each uploaded class = the mean over clients of F(P)."""
        q = self._transform(protos)
        for c in torch.unique(labels):
            self.centroids.weight[c] = q[labels == c].mean(0)

    def _align(self, protos, labels) -> dict[str, float]:
        """Train F and the centroids (``server_epochs`` passes of Adam); returns the
        last pass's mean MMD², MSE to the centroids (unweighted; NaN where ablated)
        and total loss (MMD² + λ·MSE) over its steps."""
        opts = self.options
        opt_f = torch.optim.Adam(self.transformer.parameters(), lr=opts.server_lr)
        opt_c = torch.optim.Adam(self.centroids.parameters(), lr=opts.server_lr)
        n = len(labels)
        epoch: list[tuple[float, float, float]] = []  # (MMD², MSE, total) of each step
        self.transformer.train()
        for _ in range(opts.server_epochs):
            epoch = []
            order = torch.randperm(n, generator=self.rng).to(self.device)
            for start in range(0, n, opts.server_batch_size):
                idx = order[start:start + opts.server_batch_size]
                if len(idx) < 2:  # BatchNorm needs two samples
                    continue
                q = self.transformer(protos[idx])
                loss = torch.zeros((), device=self.device)
                mmd = mse = math.nan
                if opts.use_mmd:
                    term = mmd2(q, self.gen.sample_prior(len(idx), self.rng))
                    loss, mmd = loss + term, term.item()
                if opts.use_centroids and opts.lamda > 0:
                    term = F.mse_loss(q, self.centroids(labels[idx]))
                    loss, mse = loss + opts.lamda * term, term.item()
                if not loss.requires_grad:
                    continue
                opt_f.zero_grad(set_to_none=True)
                opt_c.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.transformer.parameters(), CLIP)
                nn.utils.clip_grad_norm_(self.centroids.parameters(), CLIP)
                opt_f.step()
                opt_c.step()
                epoch.append((mmd, mse, loss.item()))
                if not math.isfinite(epoch[-1][2]):
                    raise HtflError(f"fedktl: the server's alignment loss became {epoch[-1][2]}; "
                                    "lower --server-lr")
        if not epoch:
            return {}
        mmd, mse, total = (sum(col) / len(epoch) for col in zip(*epoch))
        self.last_loss = total
        return {"align_mmd": mmd, "align_mse": mse, "align_loss": total}

    def _generate(self, latents: torch.Tensor) -> torch.Tensor:
        chunks = [self.gen.synthesize(latents[i:i + self.options.gen_batch_size])
                  for i in range(0, len(latents), self.options.gen_batch_size)]
        return torch.cat(chunks).float().cpu()

    def _save_grid(self, images: torch.Tensor, round: int) -> Path:
        from torchvision.utils import save_image

        folder = Path(self.ctx.out_dir) / f"{self.ctx.run_name}_images"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"round_{round:04d}.png"
        save_image(images, path, nrow=min(10, len(images)), padding=2, pad_value=1.0)
        return path

    # -------------------------------------------------------------- state
    def state_dict(self):
        return {**super().state_dict(), "transformer": self.transformer.state_dict(),
                "centroids": self.centroids.state_dict(), "pairs": self.pairs}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.transformer.load_state_dict(state["transformer"])
        self.centroids.load_state_dict(state["centroids"])
        self.pairs = state["pairs"]
