"""The one round loop. Every algorithm runs through :func:`run`; an algorithm only
provides its Server and Client.

Row r of the results is the evaluation after r training rounds (row 0: the
untrained models, as in HtFLlib); the traffic and time in row r belong to
training round r.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from htfl_plugins import config as config_mod
from htfl_plugins.config import RunConfig
from htfl_plugins.data import load_scenario
from htfl_plugins.engine.base import Payload, RunContext, derive_seed
from htfl_plugins.engine.executors import make_executor
from htfl_plugins.errors import HtflError
from htfl_plugins.results.store import RunRecord

log = logging.getLogger("htfl")

EVAL_BATCH = 512


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

    def parties(self):
        """The run's clients (client i gets architecture ``archs[i % len]``) and server."""
        ctx = self.ctx
        clients = [self.algo.client(i, ctx.archs[i % len(ctx.archs)],
                                    self.scenario.clients[i].to(ctx.device), self.options, ctx)
                   for i in range(len(self.scenario.clients))]
        return clients, self.algo.server(self.options, ctx)


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
def evaluate(clients) -> dict:
    """Every client on its own test split; accuracy and AUC weighted by test size."""
    correct, n_test, auc_sum, loss_sum, n_train = 0, 0, 0.0, 0.0, 0
    per_client = []
    extra: dict[str, int] = {}
    for cl in clients:
        cl.model.eval()
        with torch.inference_mode():
            probs, hits = [], 0
            for start in range(0, cl.data.n_test, EVAL_BATCH):
                x = cl.data.x_test[start:start + EVAL_BATCH].to(cl.device)
                y = cl.data.y_test[start:start + EVAL_BATCH].to(cl.device)
                s = cl.scores(x)
                bad = ~torch.isfinite(s).all(1)
                if bool(bad.any()):  # a diverged model: wrong, with uniform probabilities
                    log.warning("client %d (%s) gave non-finite scores for %d test samples; they count "
                                "as wrong", cl.cid, cl.arch, int(bad.sum()))
                    s = s.masked_fill(bad[:, None], 0.0)
                hits += int(((s.argmax(1) == y) & ~bad).sum())
                for name, alt in cl.extra_scores(x).items():
                    extra[name] = extra.get(name, 0) + int((alt.argmax(1) == y).sum())
                probs.append(F.softmax(s.double(), 1).cpu())
            probs = torch.cat(probs).numpy()
            onehot = np.eye(cl.ctx.num_classes)[cl.data.y_test.numpy()]
            auc = roc_auc_score(onehot, probs, average="micro")
            loss = 0.0
            for start in range(0, cl.data.n_train, EVAL_BATCH):
                x = cl.data.x_train[start:start + EVAL_BATCH].to(cl.device)
                y = cl.data.y_train[start:start + EVAL_BATCH].to(cl.device)
                loss += float(cl.eval_loss(x, y)) * len(y)
        correct += hits
        n_test += cl.data.n_test
        auc_sum += auc * cl.data.n_test
        loss_sum += loss
        n_train += cl.data.n_train
        per_client.append(hits / max(cl.data.n_test, 1))
    return {"test_acc": correct / n_test, "test_auc": auc_sum / n_test,
            "train_loss": loss_sum / max(n_train, 1), "client_test_acc": per_client,
            "extra": {f"acc_{k}": v / n_test for k, v in extra.items()}}


# ------------------------------------------------------------------ communication
def payload_size(payload: Payload) -> tuple[int, int]:
    """(elements, bytes) of a payload."""
    elements = sum(int(t.numel()) for t in payload.values())
    nbytes = sum(int(t.numel()) * t.element_size() for t in payload.values())
    return elements, nbytes


def check_upload(algo_name: str, client, payload) -> None:
    """Refuse anything the client's ``upload_spec()`` does not declare: an unknown
    name, or a declared name with another shape or dtype (non-finite values are the
    executor's business: they make a client failure)."""
    where = f"algorithm {algo_name!r}: client {client.cid}"
    if not isinstance(payload, dict):
        raise HtflError(f"{where} uploaded a {type(payload).__name__}, not a mapping of named tensors")
    spec = client.upload_spec()
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
    k = max(1, int(n * cfg.join_ratio))
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
class Traffic:
    """Bytes per client and element totals of one training round, and who failed."""

    up_bytes: np.ndarray
    down_bytes: np.ndarray
    up_elements: int = 0
    down_elements: int = 0
    failed: list = field(default_factory=list)


def train_round(algo_name: str, server, clients, executor, r: int, selected: list[int],
                budgets: dict | None = None, failure_tolerance: float = 1.0):
    """One training round: broadcast → local work → checked uploads → server update.
    Clients whose local update fails are left out of the update; more than
    ``failure_tolerance`` of them stops the run. Returns (downloads, uploads, traffic)."""
    from htfl_plugins.engine.executors import Failure

    n = len(clients)
    traffic = Traffic(np.zeros(n), np.zeros(n))
    downloads = server.broadcast(r, selected) or {}
    for cid, payload in downloads.items():
        e, b = payload_size(payload)
        traffic.down_elements += e
        traffic.down_bytes[cid] += b
    uploads = {}
    for cid, result in executor.train(clients, selected, downloads, budgets, r).items():
        if isinstance(result, Failure):
            log.warning("round %d: client %d (%s) failed and is left out of this round: %s",
                        r, cid, clients[cid].arch, result.reason)
            traffic.failed.append((cid, result.reason))
            continue
        _, payload = result
        check_upload(algo_name, clients[cid], payload)
        e, b = payload_size(payload)
        traffic.up_elements += e
        traffic.up_bytes[cid] += b
        uploads[cid] = payload
    if traffic.failed and len(traffic.failed) > failure_tolerance * len(selected):
        cid, reason = traffic.failed[0]
        raise HtflError(f"round {r}: {len(traffic.failed)} of {len(selected)} clients failed, more than "
                        f"--failure-tolerance {failure_tolerance} allows (client {cid} "
                        f"({clients[cid].arch}): {reason}); lower --lr or check the {algo_name} options")
    server.update(r, uploads)
    return downloads, uploads, traffic


def straggler_budgets(rng: np.random.Generator, clients, selected: list[int], rate: float) -> dict:
    """Batch budgets of this round's stragglers: a random 10–100% of a full update."""
    k = int(len(selected) * rate)
    if k == 0:
        return {}
    chosen = sorted(rng.choice(selected, size=k, replace=False).tolist())
    return {cid: max(1, int(rng.uniform(0.1, 1.0) * clients[cid].batches_per_round())) for cid in chosen}


# ------------------------------------------------------------------ checkpoints
def checkpoint_path(result: Path) -> Path:
    return result.with_suffix(".ckpt")


def save_checkpoint(path: Path, r: int, clients, server, rng, record, best) -> None:
    """The whole run state after round r, written atomically."""
    state = {"round": r, "clients": [c.state_dict() for c in clients], "server": server.state_dict(),
             "loop_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
             "numpy_rng": np.random.get_state(), "python_rng": random.getstate(),
             "rows": record.rows, "best": best}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".ckpt.tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def state_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) state."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def check_disk(folder: Path, clients, server, checkpoints: bool) -> None:
    """Refuse to start when the result folder cannot hold a checkpoint (twice: the
    new one is written before the old one is replaced)."""
    import shutil

    need = 2 * (sum(state_bytes(c.state_dict()) for c in clients) + state_bytes(server.state_dict())) \
        if checkpoints else 0
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
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    s = prepare(cfg, plugins)
    ctx, n = s.ctx, len(s.scenario.clients)
    seed_everything(cfg.seed)
    clients, server = s.parties()
    check_disk(s.path.parent, clients, server, bool(cfg.checkpoint_every))
    executor = make_executor(cfg)
    rng = np.random.default_rng(derive_seed(cfg.seed, "loop"))
    record = RunRecord(s.path, {**config_mod.to_dict(cfg), "options": config_mod.to_dict(s.options)},
                       n, extra_attrs={"archs": ctx.archs, "num_classes": ctx.num_classes,
                                       "scenario": s.scenario.path})
    info = RunInfo(cfg, s.options, s.path, n, ctx.archs, quiet=quiet)
    since_best, start = 0, 0
    ckpt = checkpoint_path(s.path)
    if resume:
        state = load_checkpoint(ckpt)
        for c, cs in zip(clients, state["clients"]):
            c.load_state_dict(cs)
        server.load_state_dict(state["server"])
        rng.bit_generator.state = state["loop_rng"]
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        record.rows = state["rows"]
        info.best_acc, info.best_round, since_best = state["best"]
        start = state["round"] + 1
        log.info("resuming %s after round %d", s.path.name, state["round"])
    hook = plugins.hook
    hook.on_run_start(run=info)
    status = "failed"
    try:
        for r in range(start, cfg.rounds + 1):
            t0 = time.perf_counter()
            traffic = Traffic(np.zeros(n), np.zeros(n))
            selected, dropped, budgets = [], 0, {}
            if r > 0:
                selected, dropped = drop_clients(rng, select_clients(rng, n, cfg), cfg.drop_rate)
                budgets = straggler_budgets(rng, clients, selected, cfg.straggler_rate)
                _, _, traffic = train_round(cfg.algo, server, clients, executor, r, selected, budgets,
                                            cfg.failure_tolerance)
            t1 = time.perf_counter()
            if r % cfg.eval_gap == 0 or r == cfg.rounds:
                m = evaluate(clients)
            else:
                m = {"test_acc": math.nan, "test_auc": math.nan, "train_loss": math.nan,
                     "client_test_acc": [math.nan] * n, "extra": {}}
            t2 = time.perf_counter()
            up_b, down_b = traffic.up_bytes, traffic.down_bytes
            record.add(round=r, **m, upload_bytes=int(up_b.sum()), download_bytes=int(down_b.sum()),
                       upload_elements=traffic.up_elements, download_elements=traffic.down_elements,
                       client_upload_bytes=up_b.tolist(), client_download_bytes=down_b.tolist(),
                       round_seconds=t2 - t0, train_seconds=t1 - t0, eval_seconds=t2 - t1,
                       selected_clients=len(selected), dropped_clients=dropped,
                       failed_clients=len(traffic.failed), straggler_clients=len(budgets))
            record.write()
            if not math.isnan(m["test_acc"]):
                if not m["test_acc"] <= info.best_acc:  # also true while best is NaN
                    info.best_acc, info.best_round, since_best = m["test_acc"], r, 0
                else:
                    since_best += 1
            if cfg.checkpoint_every and r % cfg.checkpoint_every == 0 and r < cfg.rounds:
                save_checkpoint(ckpt, r, clients, server, rng, record,
                                (info.best_acc, info.best_round, since_best))
            metrics = {k: v for k, v in m.items() if k not in ("client_test_acc", "extra")}
            metrics.update(m["extra"])
            metrics.update(upload_bytes=int(up_b.sum()), download_bytes=int(down_b.sum()),
                           round_seconds=t2 - t0)
            log.debug("round %d: %s", r, metrics)
            hook.on_round_end(run=info, round=r, metrics=metrics)
            if cfg.top_cnt and since_best >= cfg.top_cnt:
                log.info("no new best accuracy for %d evaluations: stopping at round %d", since_best, r)
                status = "stopped_early"
                break
        else:
            status = "finished"
        ckpt.unlink(missing_ok=True)  # a finished run has nothing to resume
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        executor.close()
        if len(record):
            record.extra_attrs.update(best_acc=info.best_acc, best_round=info.best_round)
            record.write(status)
        hook.on_run_end(run=info, path=s.path, status=status)
    return s.path
