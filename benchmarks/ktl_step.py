"""Milliseconds per FedKTL local step on one thread: the feature extractor run
once over the real and the generated batch stacked (what FedKTL does for models
without BatchNorm), against two passes (the authors' step), and a step without
image–latent pairs for scale. Random 28×28 grey images, K = 10, latent size 100.

    python benchmarks/ktl_step.py [--models FedAvgCNN,SmallCNN,MLP] [--batch-size 10] [--steps 300]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from htfl_plugins.models import build_model
from htfl_plugins.plugins import get_plugins


def ms_per_step(loss, opt, steps: int) -> float:
    def step():
        opt.zero_grad()
        loss().backward()
        opt.step()

    for _ in range(20):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps * 1e3


def time_model(arch: str, b: int, steps: int) -> list[float]:
    """ms per step with two passes, with one pass, and without pairs."""
    m = build_model(get_plugins(), arch, 1, 28, 10, 512)
    proj = torch.nn.Linear(512, 100)
    opt = torch.optim.SGD(list(m.parameters()) + list(proj.parameters()), lr=0.01)
    x, y = torch.randn(b, 1, 28, 28), torch.randint(0, 10, (b,))
    xg, vg = torch.randn(b, 1, 28, 28), torch.randn(b, 100)

    def two_pass():
        return F.cross_entropy(m(x), y) + F.mse_loss(proj(m.base(xg)), vg)

    def one_pass():
        f = m.base(torch.cat([x, xg]))
        return F.cross_entropy(m.head(f[:b]), y) + F.mse_loss(proj(f[b:]), vg)

    def no_pairs():
        return F.cross_entropy(m(x), y)

    return [ms_per_step(loss, opt, steps) for loss in (two_pass, one_pass, no_pairs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="FedAvgCNN,SmallCNN,MLP")
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for arch in args.models.split(","):
        row = time_model(arch, args.batch_size, args.steps)
        print(f"{arch:<10} two passes {row[0]:6.2f} ms   one pass {row[1]:6.2f} ms "
              f"({1 - row[1] / row[0]:.0%} less)   no pairs {row[2]:6.2f} ms")


if __name__ == "__main__":
    main()
