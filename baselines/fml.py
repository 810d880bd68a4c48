"""``fml``: Federated Mutual Learning (Shen et al., 2020).

Every client keeps its private heterogeneous model and a copy of one shared,
homogeneous "meme" model (architecture ``meme_model``; by default the first
architecture of the run's model group, as HtFLlib uses client 0's). On each
batch both models learn from the labels and from each other (deep mutual
learning, temperature 1):

* private: ``kl_alpha·CE(p, y) + (1 − kl_alpha)·KL(q̂ ‖ p)``
* meme:    ``kl_beta·CE(q, y) + (1 − kl_beta)·KL(p̂ ‖ q)``

where p and q are the private and meme softmax outputs and p̂, q̂ the other
model's output taken as a fixed target (detached). KL is the batch mean of the
per-sample divergence. Each model's gradient norm is clipped at ``grad_clip``
(10, as in HtFLlib); both use SGD with ``--lr``. The server averages the meme
models uniformly and broadcasts the average from round 1 on (round 1 sends the
server's initial meme model, so every client starts from the same one).
Inference uses the private model; the meme model's accuracy is recorded as
``acc_meme``.

Traffic per client and round (float32; |θ_meme| = parameters of the meme model):

* upload:   ``meme.<name>`` for every meme parameter → 4·|θ_meme| bytes;
* download: the same names and sizes → 4·|θ_meme| bytes.

BatchNorm running statistics are not shared (as in HtFLlib, which shares
``parameters()`` only); the meme model is only ever run in training mode.

Deviations from HtFLlib: its defaults α = β = 1 switch the KL terms off, so the
defaults here are its tuned 0.5/0.5; its KL uses ``nn.KLDivLoss()``'s element
mean (the true KL divided by K) and does not detach the other model's output,
so each loss also pushes gradients into the other model; here KL is the true
per-sample KL against a detached target, as in deep mutual learning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from baselines._common import ParamsServer, check_model_name, load_params, params_payload
from htfl_plugins.config import opt
from htfl_plugins.engine import Client, module_spec

PREFIX = "meme."


@dataclass
class FMLOptions:
    meme_model: str = opt("", "architecture of the shared meme model (default: the first "
                          "architecture of --models)")
    kl_alpha: float = opt(0.5, "private model: weight of CE; 1 − kl_alpha weighs KL to the "
                          "meme model (HtFLlib default 1, tuned 0.5)", min=0.0, max=1.0)
    kl_beta: float = opt(0.5, "meme model: weight of CE; 1 − kl_beta weighs KL to the "
                         "private model (HtFLlib default 1, tuned 0.5)", min=0.0, max=1.0)
    grad_clip: float = opt(10.0, "gradient-norm clipping of each model (0: none)", min=0.0)


def meme_arch(options, ctx) -> str:
    return options.meme_model or ctx.archs[0]


def build_meme(options, ctx):
    arch = meme_arch(options, ctx)
    return ctx.build_model(arch, seed_key=("fml-meme", arch))


def kl_to(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) ‖ softmax(logits)), batch mean, target detached."""
    return F.kl_div(F.log_softmax(logits, 1), F.log_softmax(target_logits.detach(), 1),
                    reduction="batchmean", log_target=True)


class FMLClient(Client):
    def upload_spec(self):
        return module_spec(self.meme, PREFIX)

    def __init__(self, cid, arch, data, options, ctx):
        super().__init__(cid, arch, data, options, ctx)
        self.meme = build_meme(options, ctx)
        self.meme_optimizer = self.make_optimizer(self.meme.parameters())

    def receive(self, payload):
        if payload:
            load_params(self.meme, payload, PREFIX)

    def losses(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """(private loss, meme loss) on one batch."""
        out, out_m = self.model(x), self.meme(x)
        a, b = self.options.kl_alpha, self.options.kl_beta
        loss = a * F.cross_entropy(out, y) + (1 - a) * kl_to(out, out_m)
        loss_m = b * F.cross_entropy(out_m, y) + (1 - b) * kl_to(out_m, out)
        return loss, loss_m

    def train(self) -> float:
        self.model.train()
        self.meme.train()
        clip = self.options.grad_clip
        total, count = 0.0, 0
        for _ in range(self.cfg.local_epochs):
            for x, y in self.batches():
                self.optimizer.zero_grad(set_to_none=True)
                self.meme_optimizer.zero_grad(set_to_none=True)
                loss, loss_m = self.losses(x, y)
                (loss + loss_m).backward()  # targets are detached: disjoint gradients
                if clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
                    torch.nn.utils.clip_grad_norm_(self.meme.parameters(), clip)
                self.optimizer.step()
                self.meme_optimizer.step()
                total += loss.item() * len(y)
                count += len(y)
        return total / max(count, 1)

    def upload(self):
        return params_payload(self.meme, PREFIX)

    def extra_scores(self, x):
        self.meme.eval()
        return {"meme": self.meme(x)}

    def state_dict(self):
        return {**super().state_dict(), "meme": self.meme.state_dict(),
                "meme_optimizer": self.meme_optimizer.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.meme.load_state_dict(state["meme"])
        self.meme_optimizer.load_state_dict(state["meme_optimizer"])


class FMLServer(ParamsServer):
    @classmethod
    def check(cls, options, ctx):
        check_model_name("fml", "meme_model", meme_arch(options, ctx), ctx)

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        self.params = params_payload(build_meme(options, ctx), PREFIX)

    def update(self, round, uploads):
        if not uploads:
            return
        ups = list(uploads.values())
        self.params = {k: torch.stack([up[k].float() for up in ups]).mean(0) for k in self.params}


ALGORITHM = dict(name="fml", server=FMLServer, client=FMLClient, options=FMLOptions,
                 summary="private and shared meme models learn mutually (CE + KL); meme "
                         "models averaged uniformly (FML)")
