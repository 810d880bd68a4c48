"""``lg_fedavg`` (LG-FedAvg, Liang et al. 2020, as run in HtFLlib): private feature
extractors, one shared head.

Each client trains its whole model with cross-entropy. The server keeps a global
head, the training-sample-weighted average of the heads uploaded last round, and
every selected client overwrites its own head with it before training. Round 1
sends client 0's initial head (as HtFLlib's server starts from a copy of it), so
all clients start from the same head.

Traffic per client and round (K classes, D = feature_dim, float32 = 4 bytes):

- download ``head.weight`` (K×D) + ``head.bias`` (K): K·D + K floats = 4·(K·D + K) bytes;
- upload the same head tensors plus ``num_samples`` (one int64):
  K·D + K floats + 1 int64 = 4·(K·D + K) + 8 bytes.

Every client's head must have the same shapes: a group mixing ViTs (Linear → Tanh →
Linear head) with CNNs is refused before training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from baselines._common import ParamsServer, check_shared_head, head_payload, load_head
from htfl_plugins.engine import Client, module_spec


@dataclass
class LGFedAvgOptions:
    """LG-FedAvg (as in HtFLlib) has no hyperparameters of its own."""


class LGFedAvgClient(Client):
    def upload_spec(self):
        return {**module_spec(self.model.head, "head."), "num_samples": ((), torch.int64)}

    def receive(self, payload) -> None:
        load_head(self.model, payload)

    def upload(self):
        return {**head_payload(self.model),
                "num_samples": torch.tensor(self.data.n_train, dtype=torch.int64)}


class LGFedAvgServer(ParamsServer):
    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        # client 0's initial head: same seed key (its architecture) as client 0's model
        self.params = head_payload(ctx.build_model(ctx.archs[0]))

    @classmethod
    def check(cls, options, ctx) -> None:
        check_shared_head("lg_fedavg", ctx)

    def update(self, round, uploads):
        if not uploads:
            return
        ups = list(uploads.values())
        self.params = self.weighted_mean(ups, [float(u["num_samples"]) for u in ups])


ALGORITHM = dict(name="lg_fedavg", server=LGFedAvgServer, client=LGFedAvgClient,
                 options=LGFedAvgOptions,
                 summary="private feature extractors; heads averaged by sample count (LG-FedAvg)")
