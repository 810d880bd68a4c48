"""Executors run the clients' work: a round's local updates (receive → train →
upload) and the evaluation of every client.

A local update that raises, or whose loss or upload is not finite, is a client
failure, reported to the loop, which drops the client from the round. The
client's state is put back as it was before the round, except after a finite
training loss that left every model of the client finite: then only the
upload is dropped and the local training is kept. (Restoring it would replay
the same update, with the same shuffles, into the same non-finite upload every
round; eval-mode BatchNorm statistics of a barely trained ResNet are the usual
cause, and they settle with more local training.)

Every local update starts from torch's global RNG seeded by (run seed, round,
client), so where it runs (this process, a worker process, a Ray actor on
another machine) does not change a number. Workers build the algorithm from
the run's config and receive each client's data and explicit state with its
task; they load no dataset.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from htfl_plugins.engine.base import clients_per_round, derive_seed
from htfl_plugins.engine.clients import ClientStore
from htfl_plugins.engine.perf import tune_allocator
from htfl_plugins.errors import HtflError

EVAL_BATCH = 512
log = logging.getLogger("htfl")


@dataclass
class Failure:
    reason: str


@dataclass
class Update:
    """A successful local update: mean loss, the upload, the client's upload spec, its
    number of training samples and any other named scalars its ``train()`` returned."""

    loss: float
    upload: dict
    spec: dict
    samples: int = 0
    metrics: dict = field(default_factory=dict)


def train_result(out, client) -> tuple[float, dict]:
    """(loss, other metrics) of what ``client.train()`` returned: the mean loss, or a
    mapping of named scalars that holds it under ``loss``."""
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise HtflError(f"{type(client).__name__}.train() returned a mapping without 'loss' "
                            f"(it has {sorted(out)}); return the mean loss, or a mapping with it "
                            "under 'loss'")
        metrics = scalar_metrics(out, f"{type(client).__name__}.train()")
        return metrics.pop("loss"), metrics
    return float(out), {}


def scalar_metrics(values, where: str) -> dict[str, float]:
    """``values`` (a mapping of names to numbers or one-element tensors) as floats."""
    if not isinstance(values, Mapping):
        raise HtflError(f"{where} returned a {type(values).__name__}, not a mapping of named numbers")
    out = {}
    for k, v in values.items():
        if not isinstance(k, str) or not k.isidentifier():
            raise HtflError(f"{where}: metric name {k!r} is not an identifier")
        try:
            out[k] = float(v)
        except (TypeError, ValueError, RuntimeError):
            raise HtflError(f"{where}: metric {k!r} is a {type(v).__name__}, not a number") from None
    return out


def local_update(client, payload, budget: int | None, round: int):
    """One client's round: an Update, or a Failure (state restored unless only
    the upload was non-finite and every model of the client stayed finite).
    ``payload`` (None: nothing) is received first, inside the same safety net."""
    snapshot = copy.deepcopy(client.state_dict())
    client.batch_budget = budget
    torch.manual_seed(derive_seed(client.cfg.seed, "local", round, client.cid))
    try:
        if payload is not None:
            client.receive(payload)
        loss, metrics = train_result(client.train(), client)
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss ({loss})")
        upload = client.upload()
    except HtflError:
        raise
    except Exception as exc:  # a client's fault, not the run's
        client.load_state_dict(snapshot)
        return Failure(f"{type(exc).__name__}: {exc}")
    finally:
        client.batch_budget = None
    bad = [name for name, t in (upload.items() if isinstance(upload, dict) else ()) if not _finite(t)]
    if bad:
        if not all(_finite(t) for m in vars(client).values() if isinstance(m, torch.nn.Module)
                   for t in m.state_dict().values()):
            client.load_state_dict(snapshot)
        return Failure(f"FloatingPointError: upload {bad[0]!r} holds NaN or Inf values")
    return Update(loss, upload, client.upload_spec(), client.data.n_train, metrics)


def receive(client, payload, round: int) -> Failure | None:
    """``client.receive(payload)`` of the server's broadcast for ``round``, under its
    own seed (so where it runs does not change a number) and the global RNG left as
    it was. A client whose ``receive`` raises is put back as it was: a Failure."""
    snapshot = copy.deepcopy(client.state_dict())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(client.cfg.seed, "receive", round, client.cid))
        try:
            client.receive(payload)
        except HtflError:
            raise
        except Exception as exc:
            client.load_state_dict(snapshot)
            return Failure(f"{type(exc).__name__}: {exc}")
    return None


def _finite(t) -> bool:
    """False for a floating-point tensor holding NaN or Inf; True for anything else
    (a non-tensor upload is refused later, by the loop's upload check)."""
    return not isinstance(t, torch.Tensor) or not t.is_floating_point() or bool(torch.isfinite(t).all())


def client_eval(cl) -> dict:
    """One client on its own test split (hits, AUC, per-way hits) and its
    training loss; the loop combines these over clients."""
    cl.model.eval()
    extra: dict[str, int] = {}
    with torch.inference_mode():
        probs, hits, bad_total = [], 0, 0
        for start in range(0, cl.data.n_test, EVAL_BATCH):
            x = cl.data.x_test[start:start + EVAL_BATCH].to(cl.device)
            y = cl.data.y_test[start:start + EVAL_BATCH].to(cl.device)
            s = cl.scores(x)
            bad = ~torch.isfinite(s).all(1)
            if bool(bad.any()):  # a diverged model: wrong, with uniform probabilities
                bad_total += int(bad.sum())
                s = s.masked_fill(bad[:, None], 0.0)
            hits += int(((s.argmax(1) == y) & ~bad).sum())
            for name, alt in cl.extra_scores(x).items():
                extra[name] = extra.get(name, 0) + int((alt.argmax(1) == y).sum())
            probs.append(F.softmax(s.double(), 1).cpu())
        if bad_total:
            log.warning(
                "client %d (%s) gave non-finite scores for %d test samples; they count as wrong",
                cl.cid, cl.arch, bad_total)
        probs = torch.cat(probs).numpy()
        onehot = np.eye(cl.ctx.num_classes)[cl.data.y_test.cpu().numpy()]
        auc = roc_auc_score(onehot, probs, average="micro")
        loss = 0.0
        for start in range(0, cl.data.n_train, EVAL_BATCH):
            x = cl.data.x_train[start:start + EVAL_BATCH].to(cl.device)
            y = cl.data.y_train[start:start + EVAL_BATCH].to(cl.device)
            loss += float(cl.eval_loss(x, y)) * len(y)
    return {"hits": hits, "n_test": cl.data.n_test, "auc": auc, "loss": loss,
            "n_train": cl.data.n_train, "extra": extra}


class SequentialExecutor:
    """Clients one after another in this process."""

    def train(self, clients, selected, downloads, budgets=None, round: int = 0) -> dict:
        store, budgets = ClientStore.of(clients), budgets or {}
        return {cid: local_update(store.get(cid, write=True), downloads.get(cid), budgets.get(cid), round)
                for cid in selected}

    def evaluate(self, clients, cids) -> dict:
        store = ClientStore.of(clients)
        return {cid: client_eval(store.get(cid)) for cid in cids}

    def close(self) -> None:
        pass


# ------------------------------------------------------------------ workers
def worker_meta(ctx) -> dict:
    """What a worker needs of the run's context besides its config (no data)."""
    return {"num_classes": ctx.num_classes, "input_shape": ctx.input_shape, "num_clients": ctx.num_clients,
            "archs": ctx.archs, "out_dir": ctx.out_dir, "run_name": ctx.run_name}


class Worker:
    """What a worker process or Ray actor holds: the algorithm and the run's
    context, rebuilt from its config, and a few recently used clients (never one
    per client). Client data comes with each task, so a worker loads no dataset."""

    CACHE = 2

    def __init__(self, cfg, meta: dict):
        from htfl_plugins import config as config_mod
        from htfl_plugins.engine.base import RunContext
        from htfl_plugins.plugins import get_plugins

        tune_allocator()
        torch.set_num_threads(1)
        plugins = get_plugins()
        self.algo = plugins.algorithm(cfg.algo)
        self.options = config_mod.build(self.algo.options, dict(cfg.options), f"option(s) for {cfg.algo}")
        self.ctx = RunContext(config=cfg, device=torch.device(cfg.device), plugins=plugins, **meta)
        self.clients: OrderedDict = OrderedDict()

    def client(self, cid: int, data, state: dict):
        client = self.clients.pop(cid, None)
        if client is None:
            if len(self.clients) >= self.CACHE:
                self.clients.popitem(last=False)
            client = self.algo.client(cid, self.ctx.client_arch(cid), data.to(self.ctx.device), self.options,
                                      self.ctx)
        self.clients[cid] = client
        client.load_state_dict(state)
        return client

    def train(self, cid, data, state, payload, budget, round):
        client = self.client(cid, data, state)
        result = local_update(client, payload, budget, round)
        return result, client.state_dict()

    def evaluate(self, cid, data, state):
        return client_eval(self.client(cid, data, state))


class _Tasks:
    """Shared by the executors that send tasks to workers: each task carries its
    client's state from the store and each returned state goes back to it. At
    most ``window`` tasks are in flight, so disk-kept clients are never all in
    memory at once."""

    window = 4

    def __init__(self, data: list):
        self.data = data  # every client's ClientData, sent with its tasks

    def map(self, method: str, tasks):
        pending: deque = deque()
        for task in tasks:
            pending.append(self.submit(method, task))
            if len(pending) >= self.window:
                yield self.result(pending.popleft())
        while pending:
            yield self.result(pending.popleft())

    def train(self, clients, selected, downloads, budgets=None, round: int = 0) -> dict:
        store, budgets = ClientStore.of(clients), budgets or {}
        tasks = ((cid, self.data[cid], store.state(cid), downloads.get(cid), budgets.get(cid), round)
                 for cid in selected)
        out = {}
        for cid, (result, state) in zip(selected, self.map("train", tasks)):
            store.set_state(cid, state)
            out[cid] = result
        return out

    def evaluate(self, clients, cids) -> dict:
        store = ClientStore.of(clients)
        cids = list(cids)
        tasks = ((cid, self.data[cid], store.state(cid)) for cid in cids)
        return dict(zip(cids, self.map("evaluate", tasks)))


_WORKER: dict = {}


def _start_worker(initializer, initargs) -> None:
    import threading
    from multiprocessing import parent_process
    from multiprocessing.connection import wait

    parent = parent_process()
    if parent is not None:
        def exit_with_parent():
            wait([parent.sentinel])  # readable once the parent is gone, however it died
            os._exit(1)

        threading.Thread(target=exit_with_parent, daemon=True, name="htfl-parent-watch").start()
    if initializer is not None:
        initializer(*initargs)


def spawn_pool(workers: int, initializer=None, initargs=()):
    """A pool of spawned worker processes that exit when this process dies,
    even by kill -9. (A spawned worker holds both ends of its task queue, so it
    would otherwise wait for work forever, or finish a cell that a re-run of
    the grid is redoing.)"""
    import concurrent.futures as cf
    import multiprocessing as mp

    return cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                  initializer=_start_worker, initargs=(initializer, initargs))


def _init_worker(cfg, meta) -> None:
    _WORKER["w"] = Worker(cfg, meta)


def _call(task):
    method, args = task
    return getattr(_WORKER["w"], method)(*args)


class ProcessExecutor(_Tasks):
    """Clients in a pool of worker processes on this machine (one torch thread
    each). Client state travels both ways as its explicit ``state_dict``."""

    def __init__(self, cfg, workers: int, meta: dict, data: list):
        super().__init__(data)
        self.window = 2 * workers
        self.pool = spawn_pool(workers, _init_worker, (cfg, meta))

    def submit(self, method: str, task):
        from concurrent.futures.process import BrokenProcessPool

        try:
            return self.pool.submit(_call, (method, task))
        except BrokenProcessPool as exc:
            raise self._died(exc) from None

    def result(self, future):
        from concurrent.futures.process import BrokenProcessPool

        try:
            return future.result()
        except BrokenProcessPool as exc:
            raise self._died(exc) from None

    @staticmethod
    def _died(exc) -> HtflError:
        return HtflError(f"a worker process died ({exc}); out of memory or killed? (A script that "
                         "starts runs needs `if __name__ == \"__main__\":` around them, or "
                         "--executor sequential.) The last checkpoint can be resumed with `htfl resume`")

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, when a ``host:port`` Ray address does not answer
    (Ray itself retries for minutes). ``auto`` and empty addresses are Ray's business."""
    import socket

    hostport = address.removeprefix("ray://")
    if not hostport or hostport == "auto" or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise HtflError(f"no Ray cluster answers at --ray-address {address}: {exc}; start one with "
                        "`ray start --head` or give the head's address") from None


def same_host_port(a: str, b: str, own: tuple[str, ...] = ()) -> bool:
    """Whether two ``host:port`` addresses name the same endpoint (names resolved;
    loopback, this machine's name and the addresses in ``own`` count as one host)."""
    import socket

    def parse(address):
        host, _, port = address.rpartition(":")
        try:
            ip = socket.gethostbyname(host)
        except OSError:
            ip = host
        return ip, port

    (ip_a, port_a), (ip_b, port_b) = parse(a), parse(b)
    if port_a != port_b:
        return False
    try:
        mine = set(socket.gethostbyname_ex(socket.gethostname())[2]) | set(own)
    except OSError:
        mine = set(own)
    local = {ip for ip in (ip_a, ip_b) if ip.startswith("127.") or ip in mine}
    return ip_a == ip_b or len(local) == 2


class RayExecutor(_Tasks):
    """Clients on Ray actors (one CPU each) of a local Ray instance or of the
    cluster at ``--ray-address``. Downloads shared by several clients are put in
    the object store once per round."""

    def __init__(self, cfg, workers: int, meta: dict, data: list, address: str = ""):
        try:
            import ray
        except ImportError:
            raise HtflError("--executor ray needs Ray: pip install 'htfl[ray]'") from None
        self.ray = ray
        self.owns_ray = not ray.is_initialized()  # an instance this executor starts, it also stops
        if not self.owns_ray and address not in ("", "auto") and not address.startswith("ray://"):
            connected = ray.get_runtime_context().gcs_address
            if not same_host_port(address, connected, own=(ray.util.get_node_ip_address(),)):
                raise HtflError(f"this process is already connected to the Ray cluster at {connected}, "
                                f"not --ray-address {address}; call ray.shutdown() first, or leave "
                                "--ray-address out to use the connected cluster")
        if self.owns_ray:
            check_reachable(address)
            try:
                ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except Exception as exc:  # a wrong address, a cluster that does not answer
                raise HtflError(f"cannot start or reach Ray{f' at {address}' if address else ''}: "
                                f"{exc}") from None
        super().__init__([ray.put(d) for d in data])  # each client's data enters the object store once
        remote = ray.remote(num_cpus=1)(Worker)
        self.actors = [remote.remote(cfg, meta) for _ in range(workers)]
        self.busy = [0] * workers
        self.window = 2 * workers
        self.shared: dict[int, tuple] = {}

    def submit(self, method: str, task):
        if method == "train" and task[3] is not None:  # one object-store copy per distinct payload
            payload = task[3]
            if id(payload) not in self.shared:
                self.shared[id(payload)] = (self.ray.put(payload), payload)
            task = (*task[:3], self.shared[id(payload)][0], *task[4:])
        i = min(range(len(self.actors)), key=self.busy.__getitem__)
        self.busy[i] += 1
        return i, getattr(self.actors[i], method).remote(*task)

    def result(self, future):
        i, ref = future
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:  # an actor or node lost, not a client's fault
            raise HtflError(f"a Ray worker failed: {str(exc).splitlines()[0]}; the last checkpoint can be "
                            "resumed with `htfl resume`") from None
        finally:
            self.busy[i] -= 1

    def train(self, *args, **kwargs) -> dict:
        try:
            return super().train(*args, **kwargs)
        finally:
            self.shared.clear()  # this round's downloads leave the object store

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self.owns_ray:
            self.ray.shutdown()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_executor(cfg) -> tuple[str, int]:
    """(executor, workers) that ``cfg`` asks for, with ``auto`` and ``--workers 0``
    decided for this machine. Worker processes run one torch thread each and
    every client's update is seeded, so the number of workers never changes a
    run's numbers."""
    workers = min(cfg.workers or usable_cores(), cfg.clients)
    kind = cfg.executor
    if kind == "auto":
        per_round = clients_per_round(cfg.clients, cfg.join_ratio)
        parallel = cfg.device == "cpu" and workers >= 2 and per_round >= 2
        kind = "process" if parallel else "sequential"
    return kind, workers


def make_executor(cfg, setup):
    """The executor ``cfg.executor`` names, for the run ``setup`` describes."""
    kind, workers = resolve_executor(cfg)
    if kind == "sequential":
        return SequentialExecutor()
    meta, data = worker_meta(setup.ctx), setup.scenario.clients
    if kind == "process":
        return ProcessExecutor(cfg, workers, meta, data)
    if kind == "ray":
        return RayExecutor(cfg, workers, meta, data, cfg.ray_address)
    raise HtflError(f"unknown executor {kind!r} (known: auto, sequential, process, ray)")
