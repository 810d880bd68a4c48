"""Executors and client state: the same curves wherever clients run and live,
and memory that does not hold every client at once."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest

from htfl_plugins.engine import run
from htfl_plugins.engine.executors import SequentialExecutor
from htfl_plugins.engine.loop import (
    checkpoint_path,
    client_folder,
    client_snapshots,
    evaluate,
    prepare,
    train_round,
)
from htfl_plugins.plugins import get_plugins, load
from htfl_plugins.results import read_run
from tests.test_resume import FAST, StopAt, assert_same_curves


@pytest.mark.parametrize("algo", sorted(get_plugins().registry("algorithms").names()))
def test_disk_client_state_gives_the_memory_curves(digits_config, algo):
    settings = dict(algo=algo, rounds=3, join_ratio=0.75, threads=1, options=FAST.get(algo, {}))
    memory = read_run(run(digits_config(name="memory", **settings), quiet=True))
    cfg = digits_config(name="disk", client_state="disk", **settings)
    path = run(cfg, quiet=True)
    assert_same_curves(memory, read_run(path))
    assert not client_folder(path).exists()  # the working folder goes with the run


def test_disk_client_state_keeps_two_clients_live(digits_config, tmp_path):
    s = prepare(digits_config(clients=8), get_plugins())
    alive = weakref.WeakSet()

    def make(cid, _make=s.make_client):
        client = _make(cid)
        alive.add(client)
        return client

    s.make_client = make
    store = s.client_store(tmp_path / "clients")
    server = s.make_server()
    assert sorted(p.name for p in (tmp_path / "clients").iterdir()) == sorted(f"{i}.pt" for i in range(8))
    before = (tmp_path / "clients" / "3.pt").stat().st_mtime_ns
    for r in (1, 2):
        train_round("local", server, store, SequentialExecutor(), r, [1, 3, 4, 6])
        m = evaluate(store)
        gc.collect()
        assert store.live_clients() <= 2 and len(alive) <= 2
    assert 0 < m["test_acc"] <= 1
    store.flush()
    assert (tmp_path / "clients" / "3.pt").stat().st_mtime_ns > before  # trained state written back
    store.close()
    assert not (tmp_path / "clients").exists()


@pytest.mark.parametrize("algo", ["local", "fedktl"])
def test_disk_client_state_resumes(digits_config, algo):
    settings = dict(algo=algo, rounds=4, join_ratio=0.75, checkpoint_every=1, client_state="disk",
                    options=FAST.get(algo, {}))
    straight = read_run(run(digits_config(name="straight", **settings), quiet=True))
    cfg = digits_config(name="cut", **settings)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, plugins=load(extra=[StopAt(2)]), quiet=True)
    path = Path(cfg.out) / "cut.h5"
    assert [f.name for f in client_snapshots(checkpoint_path(path))] == ["cut.ckpt.r2.clients"]
    resumed = read_run(run(cfg, quiet=True, resume=True))
    assert list(resumed["round"]) == [0, 1, 2, 3, 4]
    assert_same_curves(straight, resumed)
    assert not client_snapshots(checkpoint_path(path)) and not checkpoint_path(path).exists()


def test_process_executor_with_disk_state_gives_the_sequential_curves(digits_config):
    settings = dict(algo="fedproto", rounds=3, join_ratio=0.75, threads=1)
    seq = read_run(run(digits_config(name="seq", **settings), quiet=True))
    par = read_run(run(digits_config(name="par", executor="process", workers=2, client_state="disk",
                                     **settings), quiet=True))
    assert_same_curves(seq, par)


@pytest.mark.parametrize("settings, cores, expected", [
    (dict(), 2, ("process", 2)),                                   # 4 clients, 2 cores
    (dict(), 16, ("process", 4)),                                  # never more workers than clients
    (dict(), 1, ("sequential", 1)),                                # one core: nothing to share
    (dict(workers=1), 8, ("sequential", 1)),
    (dict(join_ratio=0.25), 8, ("sequential", 4)),                 # one client trains per round
    (dict(device="meta"), 8, ("sequential", 4)),                   # an accelerator runs in this process
    (dict(executor="sequential"), 8, ("sequential", 4)),
    (dict(executor="process", workers=3), 1, ("process", 3)),      # asked for: obeyed
])
def test_auto_executor_shares_the_cores_only_when_it_pays(digits_config, monkeypatch, settings, cores, expected):
    from htfl_plugins.engine import executors

    monkeypatch.setattr(executors, "usable_cores", lambda: cores)
    cfg = digits_config(**{"executor": "auto", **settings})
    assert executors.resolve_executor(cfg) == expected


@pytest.mark.parametrize("algo", ["local", "fedktl"])
def test_ray_executor_gives_the_sequential_curves(digits_config, algo, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    settings = dict(algo=algo, rounds=3, join_ratio=0.75, threads=1, options=FAST.get(algo, {}))
    seq = read_run(run(digits_config(name="seq", **settings), quiet=True))
    ray_run = read_run(run(digits_config(name="ray", executor="ray", workers=2, **settings), quiet=True))
    assert_same_curves(seq, ray_run)
    import ray

    assert not ray.is_initialized()  # the local instance the run started ended with it


def test_a_ray_address_other_than_the_connected_cluster_is_refused(monkeypatch):
    ray = pytest.importorskip("ray")
    from htfl_plugins.engine.executors import RayExecutor, same_host_port
    from htfl_plugins.errors import HtflError

    assert same_host_port("localhost:6379", "127.0.0.1:6379")
    assert same_host_port("127.0.0.1:6379", "192.0.2.7:6379", own=("192.0.2.7",))
    assert not same_host_port("127.0.0.1:6379", "192.0.2.7:6379")
    assert not same_host_port("127.0.0.1:6379", "127.0.0.1:6380")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        connected = ray.get_runtime_context().gcs_address
        with pytest.raises(HtflError, match=f"already connected to the Ray cluster at {connected}, "
                                            "not --ray-address 127.0.0.1:1;"):
            RayExecutor(None, 1, {}, [], address="127.0.0.1:1")
    finally:
        ray.shutdown()



@pytest.mark.parametrize("env, applied", [("1", "True"), ("0", "False")])
def test_allocator_tuning_applies_unless_switched_off(env, applied):
    import os
    import subprocess
    import sys

    code = "from htfl_plugins.engine.perf import tune_allocator; print(tune_allocator())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HTFL_MALLOC_TUNING": env}).stdout.strip()
    assert out == applied


def test_a_dead_worker_process_is_one_clear_error(digits_config):
    import os
    import signal

    from htfl_plugins.engine.executors import ProcessExecutor, worker_meta
    from htfl_plugins.errors import HtflError

    cfg = digits_config(executor="process", workers=2)
    s = prepare(cfg, get_plugins())
    store = s.client_store()
    executor = ProcessExecutor(cfg, 2, worker_meta(s.ctx), s.scenario.clients)
    try:
        assert set(executor.evaluate(store, [0, 1])) == {0, 1}  # the workers are up
        for pid in list(executor.pool._processes):
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(HtflError, match="a worker process died"):
            executor.train(store, [0, 1, 2], {}, None, 1)
    finally:
        executor.close()
