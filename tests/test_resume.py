"""Checkpoint and resume: an interrupted run ends with exactly the curves of one
that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from htfl_plugins import hookimpl
from htfl_plugins.cli import main
from htfl_plugins.engine import run
from htfl_plugins.engine.loop import checkpoint_path
from htfl_plugins.plugins import get_plugins, load
from htfl_plugins.results import read_run

CURVES = ["test_acc", "test_auc", "train_loss", "client_test_acc", "upload_bytes", "download_bytes",
          "selected_clients", "failed_clients"]
FAST = {"fedktl": {"server_epochs": 3, "save_images": 0}, "fedgen": {"server_epochs": 3},
        "fedgh": {"server_epochs": 3}, "fedtgp": {"server_epochs": 3}}


class StopAt:
    """Presses Ctrl-C at the end of one round."""

    def __init__(self, r):
        self.r = r

    @hookimpl
    def on_round_end(self, run, round, metrics):
        if round == self.r:
            raise KeyboardInterrupt


def assert_same_curves(a, b):
    for key in CURVES:
        assert np.array_equal(a[key], b[key]), key


@pytest.mark.parametrize("algo", sorted(get_plugins().registry("algorithms").names()))
def test_interrupted_and_resumed_equals_uninterrupted(digits_config, algo):
    settings = dict(algo=algo, rounds=4, join_ratio=0.75, checkpoint_every=1, options=FAST.get(algo, {}))
    straight = read_run(run(digits_config(name="straight", **settings), quiet=True))
    cfg = digits_config(name="cut", **settings)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, plugins=load(extra=[StopAt(2)]), quiet=True)
    path = Path(cfg.out) / "cut.h5"
    cut = read_run(path)
    assert cut["attrs"]["status"] == "interrupted" and list(cut["round"]) == [0, 1, 2]
    assert checkpoint_path(path).is_file()
    resumed = read_run(run(cfg, quiet=True, resume=True))
    assert resumed["attrs"]["status"] == "finished" and list(resumed["round"]) == [0, 1, 2, 3, 4]
    assert_same_curves(straight, resumed)
    assert not checkpoint_path(path).exists()  # finished: nothing left to resume


def _children(pid: int) -> set[int]:
    return {int(c) for f in Path(f"/proc/{pid}/task").glob("*/children") for c in f.read_text().split()}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads child processes from /proc")
def test_kill_9_mid_round_then_htfl_resume(tmp_path):
    """A real kill -9 at an arbitrary point, then `htfl resume`: bit-identical curves.
    The killed run's worker processes exit with it."""
    common = ["run", "--algo", "fedktl", "--dataset", "digits", "--clients", "4", "--rounds", "6",
              "--server-epochs", "20", "--save-images", "0", "--threads", "1", "--checkpoint-every", "1",
              "--executor", "process", "--workers", "2", "-q", "--out", str(tmp_path)]
    env = dict(os.environ)
    assert main([*common, "--name", "straight"]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "htfl_plugins.cli", *common, "--name", "killed"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    h5 = tmp_path / "killed.h5"
    deadline = time.time() + 240
    while time.time() < deadline:
        if h5.exists() and len(read_run(h5)["round"]) >= 3:
            break
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside the next round
    workers = _children(proc.pid)
    assert workers  # the pool's processes (and multiprocessing's resource tracker)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers), "worker processes outlived their killed run"
    killed = read_run(h5)
    assert killed["attrs"]["status"] == "running" and len(killed["round"]) < 7
    assert main(["resume", str(h5), "-q"]) == 0
    assert_same_curves(read_run(tmp_path / "straight.h5"), read_run(h5))


def test_resume_without_checkpoint_is_one_clear_line(digits_config, capsys):
    path = run(digits_config(), quiet=True)
    assert main(["resume", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint" in err


def test_full_disk_is_reported_before_training(digits_config, monkeypatch, tmp_path):
    import shutil
    from collections import namedtuple

    from htfl_plugins.errors import HtflError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(HtflError, match="not enough disk space .* 1 MB free"):
        run(digits_config(name="full"), quiet=True)
    assert not (tmp_path / "results" / "full.h5").exists()
