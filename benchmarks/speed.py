"""Seconds per round of the library against the bare compute floor.

The floor is a plain eager PyTorch loop with no federation around it: every
client's model (same architecture, same initial weights, same optimiser) does
the same local epochs over the same training data in the same batch order, with
torch's default thread count and everything in memory. The library side is one
round of ``htfl run --algo local`` on the same scenario, with whatever run flags
are given after ``--`` (executor, threads, ...), read back from its HDF5 file.
For ``local`` both sides do identical arithmetic, so their accuracies after the
round differ only by floating-point reordering.

    python benchmarks/speed.py [--models HtFE-img-2] [--dataset fmnist] [--clients 20]
        [--batch-size 10] [--skip-floor] [--json FILE] [-- RUN FLAGS...]

Prints the floor's training seconds, the library's round seconds (training and
evaluation), the ratio floor / library, both accuracies, and the achieved
GFLOP/s of the floor (FLOPs counted by torch's FlopCounterMode) beside the
machine's measured single-precision GEMM rate and memory copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from htfl_plugins.config import RunConfig, build
from htfl_plugins.data.types import batches
from htfl_plugins.engine import run
from htfl_plugins.engine.loop import prepare
from htfl_plugins.plugins import get_plugins
from htfl_plugins.results import read_run


def step_flops(model, x, y) -> int:
    """FLOPs of one training step (forward and backward) at this batch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def gemm_rate(n: int = 2048, repeats: int = 10) -> float:
    """Measured single-precision GEMM GFLOP/s with torch's current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e9


def copy_rate(n: int = 100_000_000, repeats: int = 5) -> float:
    """Measured memory copy GB/s (read + write) with torch's current thread count."""
    a = torch.randn(n)
    b = torch.empty_like(a)
    b.copy_(a)
    t0 = time.perf_counter()
    for _ in range(repeats):
        b.copy_(a)
    return 2 * a.numel() * a.element_size() * repeats / (time.perf_counter() - t0) / 1e9


def floor(cfg: RunConfig) -> dict:
    """One local epoch per client in a plain loop; returns seconds, FLOPs and accuracy."""
    s = prepare(cfg, get_plugins())
    ctx = s.ctx
    seconds, flops, correct, n_test, steps = 0.0, 0, 0, 0, 0
    flops_per_step: dict[tuple, int] = {}
    for cid, data in enumerate(s.scenario.clients):
        arch = ctx.client_arch(cid)
        model = ctx.build_model(arch)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        gen = ctx.generator("client", cid)  # the library client's batch order
        model.train()
        t0 = time.perf_counter()
        for _ in range(cfg.local_epochs):
            for x, y in batches(data.x_train, data.y_train, cfg.batch_size, gen):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
                steps += 1
                key = (arch, len(y))
                if key not in flops_per_step:
                    t_pause = time.perf_counter()
                    flops_per_step[key] = step_flops(ctx.build_model(arch).train(), x, y)
                    t0 += time.perf_counter() - t_pause
                flops += flops_per_step[key]
        seconds += time.perf_counter() - t0
        model.eval()
        with torch.inference_mode():
            correct += int((model(data.x_test).argmax(1) == data.y_test).sum())
        n_test += data.n_test
    return {"seconds": seconds, "steps": steps, "gflop": flops / 1e9, "acc": correct / n_test}


def library(cfg: RunConfig) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cfg = build(RunConfig, {**vars(cfg), "out": out, "name": "speed"}, "speed run")
        path = run(cfg, quiet=True)
        rec = read_run(path)
    return {"seconds": float(rec["round_seconds"][-1]), "train_seconds": float(rec["train_seconds"][-1]),
            "eval_seconds": float(rec["eval_seconds"][-1]), "acc": float(rec["test_acc"][-1])}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="HtFE-img-2")
    p.add_argument("--dataset", default="fmnist")
    p.add_argument("--partition", default="dir")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--skip-floor", action="store_true", help="measure the library only")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    a = p.parse_args(argv)

    from htfl_plugins.cli import run_config_from_args

    base = ["--algo", "local", "--dataset", a.dataset, "--partition", a.partition, "--clients",
            str(a.clients), "--models", a.models, "--batch-size", str(a.batch_size), "--rounds", "1",
            "--checkpoint-every", "0"]
    cfg, _ = run_config_from_args(base + run_flags, "benchmarks/speed.py --")
    result = {"scenario": f"{a.dataset} {a.partition} {a.clients} clients {a.models} batch {a.batch_size}",
              "run_flags": " ".join(run_flags), "torch": torch.__version__,
              "default_threads": torch.get_num_threads()}
    if not a.skip_floor:
        result["gemm_gflops"] = gemm_rate()
        result["copy_gbps"] = copy_rate()
        result["floor"] = floor(build(RunConfig, {**vars(cfg), "threads": 0}, "floor"))
        fl = result["floor"]
        fl["gflops_per_s"] = fl["gflop"] / fl["seconds"]
        print(f"floor:   {fl['seconds']:.1f} s for {fl['steps']} steps, accuracy {fl['acc']:.4f}, "
              f"{fl['gflops_per_s']:.0f} GFLOP/s (machine: GEMM {result['gemm_gflops']:.0f} GFLOP/s, "
              f"copy {result['copy_gbps']:.0f} GB/s)")
    lib = result["library"] = library(cfg)
    print(f"library: {lib['seconds']:.1f} s per round (train {lib['train_seconds']:.1f} s, "
          f"eval {lib['eval_seconds']:.1f} s), accuracy {lib['acc']:.4f}  [{result['run_flags'] or 'defaults'}]")
    if "floor" in result:
        result["ratio"] = result["floor"]["seconds"] / lib["seconds"]
        result["ratio_train"] = result["floor"]["seconds"] / lib["train_seconds"]
        print(f"floor / library: {result['ratio']:.2f} per round, {result['ratio_train']:.2f} training only")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
