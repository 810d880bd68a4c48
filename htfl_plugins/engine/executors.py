"""Executors run the selected clients' local work: receive → train → upload.

A local update that raises, or whose loss or upload is not finite, is a client
failure: the client's state is put back as it was before the round and the
failure is reported to the loop, which drops the client from the round.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from htfl_plugins.errors import HtflError


@dataclass
class Failure:
    reason: str


def local_update(client, payload, budget: int | None):
    """One client's round: returns (loss, upload) or a Failure (state restored)."""
    snapshot = copy.deepcopy(client.state_dict())
    client.batch_budget = budget
    try:
        if payload is not None:
            client.receive(payload)
        loss = float(client.train())
        upload = client.upload()
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss ({loss})")
        if isinstance(upload, dict):
            for name, t in upload.items():
                if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise FloatingPointError(f"upload {name!r} holds NaN or Inf values")
        return loss, upload
    except HtflError:
        raise
    except Exception as exc:  # a client's fault, not the run's
        client.load_state_dict(snapshot)
        return Failure(f"{type(exc).__name__}: {exc}")
    finally:
        client.batch_budget = None


class SequentialExecutor:
    """Clients one after another in this process (deterministic)."""

    def train(self, clients, selected, downloads, budgets=None) -> dict:
        budgets = budgets or {}
        return {cid: local_update(clients[cid], downloads.get(cid), budgets.get(cid)) for cid in selected}

    def close(self) -> None:
        pass


EXECUTORS = {"sequential": SequentialExecutor}


def make_executor(cfg):
    name = getattr(cfg, "executor", "sequential")
    if name not in EXECUTORS:
        raise HtflError(f"unknown executor {name!r} (known: {', '.join(EXECUTORS)})")
    return EXECUTORS[name]()
