"""``fedproto`` (FedProto, Tan et al. AAAI 2022, as run in HtFLlib): clients share
class prototypes (per-class mean features), never model parameters.

Client loss: CE(head(f), y) + λ·MSE(f, P_y), f = base(x), P_y the global prototype
of the sample's class. As in HtFLlib the squared error is summed over the samples
whose class has a global prototype and divided by batch·D (samples of a class
without a prototype add nothing, but still count in the mean).

Local prototypes (``proto_source``):

- ``after`` (default): per-class mean features of the final local model, in eval
  mode, over the local training split, computed once after training. They describe
  the model that is evaluated and that the other clients are pulled toward, rather
  than a blend of every intermediate model of the epoch in train mode (dropout,
  batch-norm batch statistics). Cost: one no-grad forward pass of the base over the
  training split.
- ``during``: HtFLlib's choice, the mean of the features computed in the training
  forward passes of this round (all local epochs), at no extra cost.

Server: each class's prototype is the mean over the clients that uploaded that class
(classes nobody holds get none). ``weighting=uniform`` (default) is HtFLlib's plain
mean over holders, used for every published HtFL baseline number we compare with;
``weighting=samples`` is the FedProto paper's mean weighted by each holder's sample
count of the class (then clients also upload those counts).

Inference: the class of the nearest global prototype (squared L2), scores =
−‖f − P_k‖² (−inf for classes without a prototype); the head's accuracy is recorded
as ``acc_head``. Until a client has received prototypes it predicts with its head.
Under the default ``--eval-point after-broadcast`` row r uses the global prototypes
aggregated from round r's uploads (row 0: the head); under ``after-update`` those the
client trained against in round r (row 1: the head). ``train_loss`` is the local
objective, CE + λ·MSE.

Traffic per client and round (D = feature_dim, |C_i| classes held by client i,
K_g classes with a global prototype, ≤ K):

- upload ``protos`` (|C_i|×D float32) + ``proto_labels`` (|C_i| int64)
  [+ ``proto_counts`` (|C_i| int64) with weighting=samples]:
  |C_i|·D floats + |C_i| ints = 4·|C_i|·D + 8·|C_i| bytes (+ 8·|C_i|);
- download ``protos`` (K_g×D float32) + ``proto_labels`` (K_g int64):
  4·K_g·D + 8·K_g bytes; nothing in round 1.

λ (``lam``): 10 here, HtFLlib's tuned value (total.sh, Cifar100/HtFE8); HtFLlib's
parser default is 1.0, and the FedTGP paper reports 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from baselines._common import ClassVectorClient, ClassVectorServer
from htfl_plugins.config import opt


@dataclass
class FedProtoOptions:
    lam: float = opt(10.0, "weight λ of the MSE between features and global prototypes "
                     "(HtFLlib's tuned 10; its default 1)", min=0.0)
    weighting: str = opt("uniform", "server mean of a class's prototypes: uniform over holders "
                         "(HtFLlib) or weighted by sample counts (paper)",
                         choices=["uniform", "samples"])
    proto_source: str = opt("after", "local prototypes from the final model in eval mode (after) "
                            "or from the training forward passes (during, HtFLlib)",
                            choices=["after", "during"])


def proto_distance_scores(features: torch.Tensor, protos: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
    """−squared L2 distance to each class prototype; −inf where there is none."""
    d = torch.cdist(features.float(), protos.float()).pow(2)
    return (-d).masked_fill(~mask.unsqueeze(0), float("-inf"))


class FedProtoClient(ClassVectorClient):
    key, labels_key = "protos", "proto_labels"

    def upload_spec(self):
        spec = self.class_vectors_spec()
        if self.options.weighting == "samples":
            spec["proto_counts"] = ((self.held_classes(),), torch.int64)
        return spec

    def vector_dim(self) -> int:
        return self.ctx.feature_dim

    def local_outputs(self, x):
        return self.model.base(x)

    def source(self) -> str:
        return self.options.proto_source

    def upload(self):
        labels, means, counts = self._local
        out = {"protos": means, "proto_labels": labels}
        if self.options.weighting == "samples":
            out["proto_counts"] = counts
        return out

    # -------------------------------------------------------------- training
    def proto_term(self, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Σ over samples with a global prototype of ‖f − P_y‖², divided by batch·D."""
        if self.global_vectors is None:
            return features.new_zeros(())
        has = self.global_mask[y]
        if not bool(has.any()):
            return features.new_zeros(())
        diff = features[has] - self.global_vectors[y[has]]
        return diff.pow(2).sum() / features.numel()

    def objective(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model.head(f), y) + self.options.lam * self.proto_term(f, y)

    def training_loss(self, x, y):
        f = self.model.base(x)
        self.record(f, y)
        return self.objective(f, y)

    # -------------------------------------------------------------- inference
    def scores(self, x):
        f = self.model.base(x)
        if self.global_vectors is None:
            return self.model.head(f)
        return proto_distance_scores(f, self.global_vectors, self.global_mask)

    def extra_scores(self, x):
        return {"head": self.model(x)}

    def eval_loss(self, x, y):
        return self.objective(self.model.base(x), y)


class FedProtoServer(ClassVectorServer):
    key, labels_key = "protos", "proto_labels"

    def weights_key(self):
        return "proto_counts" if self.options.weighting == "samples" else None


ALGORITHM = dict(name="fedproto", server=FedProtoServer, client=FedProtoClient,
                 options=FedProtoOptions,
                 summary="clients share per-class mean features; CE + λ·MSE to global "
                         "prototypes, nearest-prototype inference (FedProto)")
