"""Seconds per round and peak memory as the number of clients grows.

Each cell is one ``htfl run`` in its own process (FMNIST, Dirichlet 0.3, join
ratio 0.5 by default; PFLlib's rule of at least 40 samples per client makes
Dirichlet 0.1 over 200 FMNIST clients impossible); the peak resident memory of the whole process tree (the
run and its worker processes) is sampled from /proc every 0.1 s. Seconds per
round are the mean ``round_seconds`` (training and evaluation of every client)
of the training rounds, read from the HDF5 file. Beside them: the bytes that
all clients' states would take if every client were a live model.

    python benchmarks/scale.py [--clients 20,50,100,200] [--rounds 2]
        [--modes sequential/memory,sequential/disk,process/disk] [--models HtFE-cpu-3] [--alpha 0.3]
        [--out FILE.md] [-- RUN FLAGS...]

Prints (and writes with --out) a markdown table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from htfl_plugins.results import read_run


def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def run_cell(flags: list[str]) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak tree RSS) of one ``htfl run``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "htfl_plugins.cli", "run", "-q", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.1)
    err = proc.stderr.read()
    if proc.returncode:
        print(err, file=sys.stderr)
    return proc.returncode, time.perf_counter() - t0, peak


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="20,50,100,200")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--modes", default="sequential/memory,sequential/disk,process/disk",
                   help="executor/client-state pairs")
    p.add_argument("--models", default="HtFE-cpu-3")
    p.add_argument("--alpha", default="0.3")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", help="write the markdown table here too")
    a = p.parse_args(argv)
    rows = ["| clients | executor | client state | s / round | peak RSS (MB) | all client states (MB) |",
            "|---:|---|---|---:|---:|---:|"]
    print("\n".join(rows), flush=True)
    with tempfile.TemporaryDirectory() as out:
        for n in [int(c) for c in a.clients.split(",")]:
            for mode in a.modes.split(","):
                executor, state = mode.split("/")
                name = f"scale_{n}_{executor}_{state}"
                flags = ["--algo", "local", "--dataset", "fmnist", "--partition", "dir", "--alpha", a.alpha,
                         "--clients", str(n), "--join-ratio", "0.5", "--models", a.models,
                         "--rounds", str(a.rounds), "--checkpoint-every", "0", "--executor", executor,
                         "--workers", str(a.workers), "--client-state", state, "--out", out,
                         "--name", name, *extra]
                code, _, peak = run_cell(flags)
                if code:
                    rows.append(f"| {n} | {executor} | {state} | failed ({code}) | | |")
                else:
                    rec = read_run(Path(out) / f"{name}.h5")
                    sec = float(np.mean(rec["round_seconds"][1:]))
                    states = model_bytes(a.models, n)
                    rows.append(f"| {n} | {executor} | {state} | {sec:.1f} | {peak / 1e6:.0f} | "
                                f"{states / 1e6:.0f} |")
                print(rows[-1], flush=True)
    if a.out:
        Path(a.out).write_text("\n".join(rows) + "\n")
    return 0


def model_bytes(models: str, n: int) -> int:
    """Bytes of n clients' model parameters and buffers (architectures assigned in turn)."""
    from htfl_plugins.engine.loop import resolve_models
    from htfl_plugins.models import build_model
    from htfl_plugins.plugins import get_plugins

    plugins = get_plugins()
    archs = resolve_models(models, plugins)
    sizes = {}
    for arch in archs:
        m = build_model(plugins, arch, 1, 28, 10, 512)
        sizes[arch] = sum(t.numel() * t.element_size() for t in m.state_dict().values())
    return sum(sizes[archs[i % len(archs)]] for i in range(n))


if __name__ == "__main__":
    raise SystemExit(main())
