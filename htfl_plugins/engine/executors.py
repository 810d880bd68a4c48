"""Executors run the selected clients' local work: receive → train → upload.

A local update that raises, or whose loss or upload is not finite, is a client
failure: the client's state is put back as it was before the round and the
failure is reported to the loop, which drops the client from the round.

Every local update starts from torch's global RNG seeded by (run seed, round,
client), so where it runs (this process or a worker) does not change a number.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from htfl_plugins.engine.base import derive_seed
from htfl_plugins.errors import HtflError


@dataclass
class Failure:
    reason: str


def local_update(client, payload, budget: int | None, round: int):
    """One client's round: returns (loss, upload) or a Failure (state restored)."""
    snapshot = copy.deepcopy(client.state_dict())
    client.batch_budget = budget
    torch.manual_seed(derive_seed(client.cfg.seed, "local", round, client.cid))
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
    """Clients one after another in this process."""

    def train(self, clients, selected, downloads, budgets=None, round: int = 0) -> dict:
        budgets = budgets or {}
        return {cid: local_update(clients[cid], downloads.get(cid), budgets.get(cid), round) for cid in selected}

    def close(self) -> None:
        pass


# ------------------------------------------------------------------ worker processes
_WORKER: dict = {}


def _init_worker(cfg) -> None:
    """Each worker rebuilds the run's set-up from its config (plugins by entry
    point, the scenario from its cache) and keeps one thread."""
    from htfl_plugins.engine.loop import prepare
    from htfl_plugins.plugins import get_plugins

    torch.set_num_threads(1)
    _WORKER["setup"] = prepare(cfg, get_plugins())
    _WORKER["clients"] = {}


def _work(task):
    cid, state, payload, budget, round = task
    s = _WORKER["setup"]
    clients = _WORKER["clients"]
    if cid not in clients:
        ctx = s.ctx
        clients[cid] = s.algo.client(cid, ctx.archs[cid % len(ctx.archs)],
                                     s.scenario.clients[cid].to(ctx.device), s.options, ctx)
    client = clients[cid]
    client.load_state_dict(state)
    result = local_update(client, payload, budget, round)
    return result, client.state_dict()


class ProcessExecutor:
    """Clients in a pool of worker processes on this machine (one torch thread
    each). Client state travels both ways as its explicit ``state_dict``."""

    def __init__(self, cfg, workers: int):
        import multiprocessing as mp

        self.pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(cfg,))

    def train(self, clients, selected, downloads, budgets=None, round: int = 0) -> dict:
        budgets = budgets or {}
        tasks = [(cid, clients[cid].state_dict(), downloads.get(cid), budgets.get(cid), round)
                 for cid in selected]
        out = {}
        for cid, (result, state) in zip(selected, self.pool.map(_work, tasks, chunksize=1)):
            clients[cid].load_state_dict(state)
            out[cid] = result
        return out

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


def make_executor(cfg):
    if cfg.executor == "sequential":
        return SequentialExecutor()
    if cfg.executor == "process":
        return ProcessExecutor(cfg, cfg.workers)
    raise HtflError(f"unknown executor {cfg.executor!r} (known: sequential, process)")
