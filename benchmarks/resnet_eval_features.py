"""Why ResNet-18 clients break prototype and head uploads on 8×8 digits.

Trains one ResNet-18 of the model zoo alone, with plain SGD (lr 0.01, batch 10,
no federation), on one client's training data of the cpu-models scenario
(digits, Dirichlet 0.1, 10 clients) and after each epoch prints its last
training loss and the largest eval-mode feature over that data:

    python benchmarks/resnet_eval_features.py [--clients 1 7] [--epochs 3]

Training mode normalises each batch by its own statistics; eval mode uses the
BatchNorm running statistics, which after a few steps are still far from them.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from htfl_plugins.config import RunConfig, build
from htfl_plugins.data.scenario import load_scenario
from htfl_plugins.data.types import batches
from htfl_plugins.models import build_model
from htfl_plugins.plugins import get_plugins


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 7])
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    plugins = get_plugins()
    cfg = build(RunConfig, dict(dataset="digits", partition="dir", alpha=0.1, clients=10), "settings")
    scenario = load_scenario(cfg, plugins)
    c, h, _ = scenario.input_shape
    for cid in args.clients:
        data = scenario.clients[cid]
        torch.manual_seed(0)
        model = build_model(plugins, "ResNet18", c, h, scenario.num_classes, cfg.feature_dim)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        order = torch.Generator().manual_seed(0)
        steps = 0
        for epoch in range(1, args.epochs + 1):
            model.train()
            for x, y in batches(data.x_train, data.y_train, 10, order):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
            model.eval()
            with torch.no_grad():
                features = model.base(data.x_train)
            print(f"client {cid} ({data.n_train} samples), epoch {epoch} ({steps} steps): last training loss "
                  f"{loss.item():.3g}; eval-mode features: max |f| {features.abs().max().item():.3g}, "
                  f"finite {bool(torch.isfinite(features).all())}")


if __name__ == "__main__":
    main()
