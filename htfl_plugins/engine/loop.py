"""The one round loop. Every algorithm runs through :func:`run`; an algorithm only
provides its Server and Client.

Row r of the results is the evaluation after r training rounds (row 0: the
untrained models, as in HtFLlib). With ``eval_point`` after-broadcast (the
default, HtFLlib's protocol) a round is: the selected clients train on the
broadcast they already hold, the server updates, the server's next broadcast
goes to every client (:func:`deliver`), then every client is scored. With
after-update the selected clients receive the round's broadcast just before
training and every client is scored right after the server's update. A row's
traffic is what was sent in it and its time what was done in it.
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from htfl_plugins import config as config_mod
from htfl_plugins.config import RunConfig
from htfl_plugins.data import load_scenario
from htfl_plugins.engine.base import Payload, RunContext, clients_per_round, derive_seed
from htfl_plugins.engine.clients import ClientStore, atomic_save, state_bytes
from htfl_plugins.engine.executors import Failure, SequentialExecutor, make_executor, receive, scalar_metrics
from htfl_plugins.engine.perf import tune_allocator
from htfl_plugins.errors import Diverged, HtflError
from htfl_plugins.results.store import CHECKPOINT_SUFFIX, RunRecord

log = logging.getLogger("htfl")


@dataclass
class RunInfo:
    """What observers see of a run."""

    config: RunConfig
    options: Any
    path: Path
    num_clients: int
    archs: list[str]
    quiet: bool = False
    best_acc: float = float("nan")
    best_round: int = -1


# ------------------------------------------------------------------ set-up
def resolve_models(spec: str, plugins) -> list[str]:
    groups = plugins.registry("groups")
    if spec in groups:
        archs = list(groups.get(spec).obj)
    else:
        archs = [a.strip() for a in spec.split(",") if a.strip()]
    models = plugins.registry("models")
    for a in archs:
        if a not in models:
            raise HtflError(f"unknown model or group {a!r} (see `htfl list models` and `htfl list groups`)")
    if not archs:
        raise HtflError("--models is empty")
    return archs


def result_path(cfg: RunConfig) -> Path:
    if cfg.name:
        stem = cfg.name
    else:
        ds = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.dataset)
        stem = f"{ds}_{cfg.algo}_{cfg.partition}_{cfg.clients}c_s{cfg.seed}_{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.out).expanduser() / f"{stem}.h5"


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".htfl-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise HtflError(f"cannot write results to {folder}: {exc.strerror or exc}") from None


def seed_everything(seed: int) -> None:
    random.seed(derive_seed(seed, "python"))
    np.random.seed(derive_seed(seed, "numpy") % (2 ** 32))
    torch.manual_seed(derive_seed(seed, "torch"))


@dataclass
class Setup:
    cfg: RunConfig
    plugins: Any
    algo: Any
    options: Any
    scenario: Any
    ctx: RunContext
    path: Path

    def make_client(self, cid: int):
        return self.algo.client(cid, self.ctx.client_arch(cid), self.scenario.clients[cid].to(self.ctx.device),
                                self.options, self.ctx)

    def parties(self):
        """The run's clients, all live, and its server."""
        return [self.make_client(i) for i in range(len(self.scenario.clients))], self.make_server()

    def make_server(self):
        return self.algo.server(self.options, self.ctx)

    def client_store(self, folder: Path | None = None) -> ClientStore:
        """The run's clients, live (``folder`` None) or kept on disk in ``folder``."""
        return ClientStore(self.make_client, [self.ctx.client_arch(i) for i in range(self.ctx.num_clients)],
                           folder)


def prepare(cfg: RunConfig, plugins) -> Setup:
    """Validate everything and load the data; nothing is written but the scenario cache."""
    config_mod.check_ranges(cfg)
    algo = plugins.algorithm(cfg.algo)
    options = config_mod.build(algo.options, dict(cfg.options), f"option(s) for {cfg.algo}")
    if not cfg.dataset.startswith("pfl:"):
        plugins.registry("datasets").get(cfg.dataset)
    plugins.registry("partitioners").get(cfg.partition)
    archs = resolve_models(cfg.models, plugins)
    try:
        device = torch.device(cfg.device)
    except RuntimeError as exc:
        raise HtflError(f"--device {cfg.device!r} is not a torch device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HtflError(f"--device {cfg.device} asked for, but torch sees no CUDA device")
    path = result_path(cfg)
    check_writable(path.parent)
    scenario = load_scenario(cfg, plugins)
    c, h, w = scenario.input_shape
    ctx = RunContext(config=cfg, num_classes=scenario.num_classes, input_shape=(c, h, w),
                     device=device, num_clients=len(scenario.clients), archs=archs,
                     plugins=plugins, out_dir=path.parent, run_name=path.stem)
    check = getattr(algo.server, "check", None)
    if callable(check):  # an algorithm's own pre-flight checks (weights present, ...)
        check(options, ctx)
    return Setup(cfg, plugins, algo, options, scenario, ctx, path)


# ------------------------------------------------------------------ evaluation
def combine(stats: list[dict]) -> dict:
    """Accuracy and AUC weighted by test size, training loss by training size,
    from each client's :func:`~htfl_plugins.engine.executors.client_eval`."""
    n_test = sum(st["n_test"] for st in stats)
    n_train = sum(st["n_train"] for st in stats)
    extra: dict[str, int] = {}
    for st in stats:
        for k, v in st["extra"].items():
            extra[k] = extra.get(k, 0) + v
    return {"test_acc": sum(st["hits"] for st in stats) / n_test,
            "test_auc": sum(st["auc"] * st["n_test"] for st in stats) / n_test,
            "train_loss": sum(st["loss"] for st in stats) / max(n_train, 1),
            "client_test_acc": [st["hits"] / max(st["n_test"], 1) for st in stats],
            "extra": {f"acc_{k}": v / n_test for k, v in extra.items()}}


def evaluate(clients, executor=None) -> dict:
    """Every client on its own test split (through ``executor``, by default in this process)."""
    store = ClientStore.of(clients)
    per_client = (executor or SequentialExecutor()).evaluate(store, range(len(store)))
    return combine([per_client[cid] for cid in range(len(store))])


# ------------------------------------------------------------------ communication
def payload_size(payload: Payload) -> tuple[int, int]:
    """(elements, bytes) of a payload."""
    elements = sum(int(t.numel()) for t in payload.values())
    nbytes = sum(int(t.numel()) * t.element_size() for t in payload.values())
    return elements, nbytes


def check_upload(algo_name: str, cid: int, spec: dict, payload) -> None:
    """Refuse anything the client's ``upload_spec()`` (``spec``) does not declare: an
    unknown name, or a declared name with another shape or dtype (non-finite values
    are the executor's business: they make a client failure)."""
    where = f"algorithm {algo_name!r}: client {cid}"
    if not isinstance(payload, dict):
        raise HtflError(f"{where} uploaded a {type(payload).__name__}, not a mapping of named tensors")
    for name, t in payload.items():
        if not isinstance(t, torch.Tensor):
            raise HtflError(f"{where}: upload {name!r} is a {type(t).__name__}, not a tensor")
        declared = spec.get(name) or next((v for pat, v in spec.items() if fnmatch.fnmatchcase(name, pat)), None)
        if declared is None:
            raise HtflError(f"{where} tried to upload undeclared tensor {name!r}; it declares {sorted(spec)}")
        shape, dtype = declared
        if t.dtype != dtype or (shape is not None and tuple(t.shape) != tuple(shape)):
            want = f"{str(dtype).replace('torch.', '')} {tuple(shape) if shape is not None else '(any shape)'}"
            raise HtflError(f"{where} tried to upload {name!r} as {str(t.dtype).replace('torch.', '')} "
                            f"{tuple(t.shape)}; it declares {want}")


# ------------------------------------------------------------------ selection
def select_clients(rng: np.random.Generator, n: int, cfg: RunConfig) -> list[int]:
    k = clients_per_round(n, cfg.join_ratio)
    if cfg.random_join and k < n:
        k = int(rng.integers(k, n + 1))
    return sorted(rng.choice(n, size=k, replace=False).tolist())


def drop_clients(rng: np.random.Generator, selected: list[int], rate: float) -> tuple[list[int], int]:
    n_drop = int(len(selected) * rate)
    if n_drop == 0:
        return selected, 0
    dropped = set(rng.choice(selected, size=n_drop, replace=False).tolist())
    return [c for c in selected if c not in dropped], n_drop


@dataclass
class RoundStats:
    """What one row records besides its evaluation: the bytes per client and element
    totals of the payloads sent in it, who failed, each trained client's local loss
    and the metrics the server and the clients reported."""

    up_bytes: np.ndarray
    down_bytes: np.ndarray
    up_elements: int = 0
    down_elements: int = 0
    failed: list = field(default_factory=list)
    updates: dict = field(default_factory=dict)  # cid -> the executor's Update
    server_metrics: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, n: int) -> RoundStats:
        return cls(np.zeros(n), np.zeros(n))

    def count_downloads(self, downloads: dict) -> None:
        for cid, payload in downloads.items():
            e, b = payload_size(payload)
            self.down_elements += e
            self.down_bytes[cid] += b

    def client_losses(self, n: int) -> list[float]:
        """Each client's mean loss of its local update this round (NaN: it did not train)."""
        return [self.updates[c].loss if c in self.updates else math.nan for c in range(n)]

    def metrics(self) -> dict[str, float]:
        """``local_loss`` and each ``client_<name>`` the clients reported: means over the
        clients that trained, weighted by their training samples; ``server_<name>``."""
        out = {}
        ups = list(self.updates.values())
        total = sum(u.samples for u in ups)
        if ups and total:
            out["local_loss"] = sum(u.loss * u.samples for u in ups) / total
            for name in dict.fromkeys(k for u in ups for k in u.metrics):
                has = [u for u in ups if name in u.metrics]
                out[f"client_{name}"] = (sum(u.metrics[name] * u.samples for u in has)
                                         / max(sum(u.samples for u in has), 1))
        out.update({f"server_{k}": v for k, v in self.server_metrics.items()})
        return out


def train_round(algo_name: str, server, clients, executor, r: int, selected: list[int],
                budgets: dict | None = None, failure_tolerance: float = 1.0,
                downloads: dict | None = None, stats: RoundStats | None = None):
    """One training round: [broadcast →] local work → checked uploads → server update.

    With ``downloads`` None the server broadcasts to the selected clients here and
    each receives its download just before training (``--eval-point after-update``).
    Otherwise every client already holds the round's broadcast (:func:`deliver`)
    and ``downloads`` holds only what a client has to receive again because its
    earlier ``receive`` failed. Clients whose local update fails are left out of
    the update; more than ``failure_tolerance`` of them stops the run. Returns
    (downloads, uploads, stats)."""
    store = ClientStore.of(clients)
    stats = stats or RoundStats.empty(len(store))
    if downloads is None:
        downloads = server.broadcast(r, selected) or {}
        stats.count_downloads(downloads)
    uploads = {}
    for cid, result in executor.train(store, selected, downloads, budgets, r).items():
        if isinstance(result, Failure):
            log.warning("round %d: client %d (%s) failed and is left out of this round: %s",
                        r, cid, store.arch(cid), result.reason)
            stats.failed.append((cid, result.reason))
            continue
        payload = result.upload
        check_upload(algo_name, cid, result.spec, payload)
        e, b = payload_size(payload)
        stats.up_elements += e
        stats.up_bytes[cid] += b
        uploads[cid] = payload
        stats.updates[cid] = result
    if stats.failed and len(stats.failed) > failure_tolerance * len(selected):
        cid, reason = stats.failed[0]
        raise Diverged(f"round {r}: {len(stats.failed)} of {len(selected)} clients failed, more than "
                        f"--failure-tolerance {failure_tolerance} allows (client {cid} "
                        f"({store.arch(cid)}): {reason}); lower --lr or check the {algo_name} options")
    metrics = server.update(r, uploads)
    if metrics is not None:
        stats.server_metrics = scalar_metrics(metrics, f"algorithm {algo_name!r}: {type(server).__name__}.update()")
    return downloads, uploads, stats


def deliver(server, clients, r: int, stats: RoundStats) -> dict:
    """``--eval-point after-broadcast``: the server's broadcast for round r (made
    after round r−1's update) goes to every client, selected or not, as HtFLlib
    sends its global model or prototypes to all clients; each receives it now, so
    that the evaluation that follows scores what every client would use for
    inference, and round r trains on it. Returns the downloads of clients whose
    ``receive`` failed (they are put back and receive it again before training)."""
    store = ClientStore.of(clients)
    downloads = server.broadcast(r, list(range(len(store)))) or {}
    stats.count_downloads(downloads)
    again = {}
    for cid, payload in downloads.items():
        failure = receive(store.get(cid, write=True), payload, r)
        if failure is not None:
            log.warning("client %d (%s) could not receive the broadcast for round %d: %s",
                        cid, store.arch(cid), r, failure.reason)
            again[cid] = payload
    return again


def straggler_budgets(rng: np.random.Generator, store: ClientStore, selected: list[int], rate: float) -> dict:
    """Batch budgets of this round's stragglers: a random 10–100% of a full update."""
    k = int(len(selected) * rate)
    if k == 0:
        return {}
    chosen = sorted(rng.choice(selected, size=k, replace=False).tolist())
    return {cid: max(1, int(rng.uniform(0.1, 1.0) * store.get(cid).batches_per_round())) for cid in chosen}


# ------------------------------------------------------------------ checkpoints
def checkpoint_path(result: Path) -> Path:
    return result.with_suffix(CHECKPOINT_SUFFIX)


def client_snapshots(ckpt: Path) -> list[Path]:
    """The folders of disk-kept client states beside a checkpoint (``<ckpt>.r<round>.clients``)."""
    return sorted(ckpt.parent.glob(glob.escape(ckpt.name) + ".r*.clients"))


def remove_checkpoint(ckpt: Path) -> None:
    """Delete a checkpoint and its disk-kept client snapshots."""
    ckpt.unlink(missing_ok=True)
    for folder in client_snapshots(ckpt):
        shutil.rmtree(folder, ignore_errors=True)


def client_folder(result: Path) -> Path:
    """The working folder of ``--client-state disk``."""
    return result.with_name(result.stem + ".clients")


def save_checkpoint(path: Path, r: int, store: ClientStore, server, rng, record, best,
                    retry: dict | None = None) -> None:
    """The whole run state after round r (``retry``: downloads that clients failed
    to receive, to be received again before they train), written atomically. Disk-kept clients
    go to a folder of this round beside it (linked, not loaded), which the
    checkpoint names; older folders go once the checkpoint is written."""
    if store.on_disk:
        folder = path.with_name(f"{path.name}.r{r}.clients")
        store.snapshot(folder)
        clients = folder.name
    else:
        clients = [store.state(cid) for cid in range(len(store))]
    state = {"round": r, "clients": clients, "server": server.state_dict(),
             "loop_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
             "numpy_rng": np.random.get_state(), "python_rng": random.getstate(),
             "rows": record.rows, "best": best, "retry": retry or {}}
    atomic_save(state, path)
    if store.on_disk:
        for old in client_snapshots(path):
            if old.name != clients:
                shutil.rmtree(old, ignore_errors=True)


def check_disk(folder: Path, store: ClientStore, server, checkpoints: bool) -> None:
    """Refuse to start when the result folder cannot hold a checkpoint (twice: the
    new one is written before the old one is replaced)."""
    need = 2 * (store.state_bytes() + state_bytes(server.state_dict())) if checkpoints else 0
    need += 16 << 20  # the result file and slack
    free = shutil.disk_usage(folder).free
    if free < need:
        raise HtflError(f"not enough disk space in {folder}: {free / 1e6:.0f} MB free, about "
                        f"{need / 1e6:.0f} MB needed for checkpoints and results; free some space, "
                        "choose another --out, or pass --checkpoint-every 0")


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise HtflError(f"no checkpoint {path}: the run finished or ran with --checkpoint-every 0") from None
    except Exception as exc:
        raise HtflError(f"checkpoint {path} is unreadable: {exc}") from None


# ------------------------------------------------------------------ the loop
def run(cfg: RunConfig, plugins=None, quiet: bool = False, resume: bool = False) -> Path:
    """Run one federated experiment and return the path of its HDF5 result file.
    With ``resume``, continue from the checkpoint next to the result file that
    ``cfg.out``/``cfg.name`` name."""
    from htfl_plugins.plugins import get_plugins

    plugins = plugins or get_plugins()
    tune_allocator()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    s = prepare(cfg, plugins)
    ctx, n = s.ctx, len(s.scenario.clients)
    seed_everything(cfg.seed)
    clients = s.client_store(client_folder(s.path) if cfg.client_state == "disk" else None)
    server = s.make_server()
    try:
        check_disk(s.path.parent, clients, server, bool(cfg.checkpoint_every))
        executor = make_executor(cfg, s)
    except BaseException:
        clients.close()
        raise
    rng = np.random.default_rng(derive_seed(cfg.seed, "loop"))
    record = RunRecord(s.path, {**config_mod.to_dict(cfg), "options": config_mod.to_dict(s.options)},
                       n, extra_attrs={"archs": ctx.archs, "num_classes": ctx.num_classes,
                                       "scenario": s.scenario.path})
    info = RunInfo(cfg, s.options, s.path, n, ctx.archs, quiet=quiet)
    since_best, start, retry = 0, 0, {}
    ckpt = checkpoint_path(s.path)
    if resume:
        state = load_checkpoint(ckpt)
        if isinstance(state["clients"], str):
            clients.restore(ckpt.with_name(state["clients"]))
        else:
            for cid, cs in enumerate(state["clients"]):
                clients.set_state(cid, cs)
        server.load_state_dict(state["server"])
        rng.bit_generator.state = state["loop_rng"]
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        record.rows = state["rows"]
        info.best_acc, info.best_round, since_best = state["best"]
        retry = state.get("retry", {})
        start = state["round"] + 1
        log.info("resuming %s after round %d", s.path.name, state["round"])
    hook = plugins.hook
    hook.on_run_start(run=info)
    status = "failed"
    after_broadcast = cfg.eval_point == "after-broadcast"
    try:
        for r in range(start, cfg.rounds + 1):
            t0 = time.perf_counter()
            stats = RoundStats.empty(n)
            selected, dropped, budgets = [], 0, {}
            if r > 0:
                selected, dropped = drop_clients(rng, select_clients(rng, n, cfg), cfg.drop_rate)
                budgets = straggler_budgets(rng, clients, selected, cfg.straggler_rate)
                again = {c: p for c, p in retry.items() if c in selected} if after_broadcast else None
                train_round(cfg.algo, server, clients, executor, r, selected, budgets,
                            cfg.failure_tolerance, downloads=again, stats=stats)
                if after_broadcast:
                    retry = deliver(server, clients, r + 1, stats)
            t1 = time.perf_counter()
            if r % cfg.eval_gap == 0 or r == cfg.rounds:
                m = evaluate(clients, executor)
            else:
                m = {"test_acc": math.nan, "test_auc": math.nan, "train_loss": math.nan,
                     "client_test_acc": [math.nan] * n, "extra": {}}
            t2 = time.perf_counter()
            if after_broadcast and r == 0:  # row 0 scores the untrained models, before any broadcast
                retry = deliver(server, clients, 1, stats)
            t3 = time.perf_counter()
            up_b, down_b = stats.up_bytes, stats.down_bytes
            row_metrics = stats.metrics()
            record.add(round=r, **m, upload_bytes=int(up_b.sum()), download_bytes=int(down_b.sum()),
                       upload_elements=stats.up_elements, download_elements=stats.down_elements,
                       client_upload_bytes=up_b.tolist(), client_download_bytes=down_b.tolist(),
                       client_local_loss=stats.client_losses(n), metrics=row_metrics,
                       round_seconds=t3 - t0, train_seconds=(t1 - t0) + (t3 - t2), eval_seconds=t2 - t1,
                       selected_clients=len(selected), dropped_clients=dropped,
                       failed_clients=len(stats.failed), straggler_clients=len(budgets))
            record.write()
            if not math.isnan(m["test_acc"]):
                if not m["test_acc"] <= info.best_acc:  # also true while best is NaN
                    info.best_acc, info.best_round, since_best = m["test_acc"], r, 0
                else:
                    since_best += 1
            if cfg.checkpoint_every and r % cfg.checkpoint_every == 0 and r < cfg.rounds:
                save_checkpoint(ckpt, r, clients, server, rng, record,
                                (info.best_acc, info.best_round, since_best), retry)
            metrics = {k: v for k, v in m.items() if k not in ("client_test_acc", "extra")}
            metrics.update(m["extra"])
            metrics.update(row_metrics)
            metrics.update(upload_bytes=int(up_b.sum()), download_bytes=int(down_b.sum()),
                           round_seconds=t3 - t0)
            log.debug("round %d: %s", r, metrics)
            hook.on_round_end(run=info, round=r, metrics=metrics)
            if cfg.top_cnt and since_best >= cfg.top_cnt:
                log.info("no new best accuracy for %d evaluations: stopping at round %d", since_best, r)
                status = "stopped_early"
                break
        else:
            status = "finished"
        remove_checkpoint(ckpt)  # a finished run has nothing to resume
    except Diverged as exc:
        status = "diverged"  # a result: resuming would diverge again
        record.extra_attrs["error"] = str(exc)
        remove_checkpoint(ckpt)
        raise
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except Exception as exc:
        record.extra_attrs["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        executor.close()
        clients.close()
        if len(record):
            record.extra_attrs.update(best_acc=info.best_acc, best_round=info.best_round)
            record.write(status)
        hook.on_run_end(run=info, path=s.path, status=status)
    return s.path
