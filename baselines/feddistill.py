"""``feddistill`` (FD / FedDistill, Jeong et al. 2018, as run in HtFLlib): clients
share per-class mean logits and distil toward the global per-class logits.

Client loss: CE(out, y) + λ·distil(out, G_y), with G_y the global mean logits of the
sample's class; samples of a class without global logits add nothing (but count in
the batch mean). ``target`` chooses the distillation term:

- ``kl`` (default): T²·KL(softmax(G_y/T) ‖ softmax(out/T)), temperature ``temperature``.
  At T = 1 its gradient equals that of CE(out, softmax(G_y)), the soft target HtFLlib
  used until 2025-11. It is bounded below (≥ 0), so λ cannot drive the loss to −∞.
- ``raw``: HtFLlib's current code, CE with the raw global logits as the soft target,
  −Σ_k G_y,k·log softmax(out)_k. Targets with negative entries make this unbounded
  below (it rewards pushing those classes' probabilities to 0 without limit), which
  is why it is not the default.

Local logits (``logit_source``): ``after`` (default) = per-class mean outputs of the
final local model in eval mode over the training split, computed after training (one
extra no-grad forward pass; they describe the model actually shared, not a blend of
the epoch's intermediate models in train mode); ``during`` = HtFLlib's mean of the
training forward passes' outputs.

Server: each class's global logits are the uniform mean over the clients that
uploaded that class (HtFLlib).

Traffic per client and round (K classes, |C_i| classes held by client i, K_g classes
with global logits, ≤ K):

- upload ``logits`` (|C_i|×K float32) + ``logit_labels`` (|C_i| int64):
  4·|C_i|·K + 8·|C_i| bytes;
- download ``logits`` (K_g×K float32) + ``logit_labels`` (K_g int64):
  4·K_g·K + 8·K_g bytes; nothing in round 1.

λ (``lam``): HtFLlib default 1 (no tuned value in total.sh).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from baselines._common import ClassVectorClient, ClassVectorServer
from htfl_plugins.config import opt


@dataclass
class FedDistillOptions:
    lam: float = opt(1.0, "weight λ of the distillation toward the global class logits "
                     "(HtFLlib default 1)", min=0.0)
    target: str = opt("kl", "distillation term: kl (softmax KL with temperature) or raw "
                      "(HtFLlib's CE with raw logits as soft target)", choices=["kl", "raw"])
    temperature: float = opt(1.0, "softmax temperature T of target=kl (loss scaled by T²)",
                             min=1e-3)
    logit_source: str = opt("after", "local class logits from the final model in eval mode "
                            "(after) or from the training forward passes (during, HtFLlib)",
                            choices=["after", "during"])


def distill_term(out: torch.Tensor, targets: torch.Tensor, has: torch.Tensor, target: str,
                 temperature: float) -> torch.Tensor:
    """Sum of the per-sample distillation losses of the rows where ``has``, divided by
    the batch size. ``targets`` holds the global logits of each row's class."""
    if not bool(has.any()):
        return out.new_zeros(())
    o, t = out[has], targets[has].to(out.dtype)
    if target == "kl":
        T = temperature
        log_p = F.log_softmax(o / T, dim=1)
        log_q = F.log_softmax(t / T, dim=1)
        per = (log_q.exp() * (log_q - log_p)).sum(1) * (T * T)
    else:  # raw logits as soft target (HtFLlib)
        per = -(t * F.log_softmax(o, dim=1)).sum(1)
    return per.sum() / len(out)


class FedDistillClient(ClassVectorClient):
    key, labels_key = "logits", "logit_labels"

    def upload_spec(self):
        return self.class_vectors_spec()

    def vector_dim(self) -> int:
        return self.ctx.num_classes

    def local_outputs(self, x):
        return self.model(x)

    def source(self) -> str:
        return self.options.logit_source

    def upload(self):
        labels, means, _ = self._local
        return {"logits": means, "logit_labels": labels}

    def objective(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(out, y)
        if self.global_vectors is not None:
            o = self.options
            loss = loss + o.lam * distill_term(out, self.global_vectors[y], self.global_mask[y],
                                               o.target, o.temperature)
        return loss

    def training_loss(self, x, y):
        out = self.model(x)
        self.record(out, y)
        return self.objective(out, y)

    def eval_loss(self, x, y):
        return self.objective(self.model(x), y)


class FedDistillServer(ClassVectorServer):
    key, labels_key = "logits", "logit_labels"


ALGORITHM = dict(name="feddistill", server=FedDistillServer, client=FedDistillClient,
                 options=FedDistillOptions,
                 summary="clients share per-class mean logits and distil toward their "
                         "global averages (FD / FedDistill)")
