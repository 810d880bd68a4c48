"""How large FedGen's generated features grow beside the clients' real ones.

Runs FedGen on a pathological partition (2 classes per client, 20 clients,
HtFE-cpu-3) and, after each round, prints the mean L2 norm of features the
server's generator makes, of the features the clients' extractors give their own
training images (eval mode), and of the uploaded heads' weight matrices:

    python benchmarks/fedgen_feature_norms.py [--dataset digits] [--rounds 10]
        [--generator-lr 0.1]

The generator is trained with cross-entropy alone, which keeps falling as its
features grow, and clients train their heads on those features (``--gen-weight``).
"""

from __future__ import annotations

import argparse

import torch

from htfl_plugins.config import RunConfig, build
from htfl_plugins.engine.executors import SequentialExecutor
from htfl_plugins.engine.loop import prepare, train_round
from htfl_plugins.plugins import get_plugins


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--generator-lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    cfg = build(RunConfig, dict(algo="fedgen", dataset=args.dataset, partition="pat", classes_per_client=2,
                                clients=20, models="HtFE-cpu-3", rounds=args.rounds, seed=args.seed,
                                out="/tmp/htfl-fedgen-norms", options={"generator_lr": args.generator_lr}),
                "settings")
    s = prepare(cfg, get_plugins())
    clients, server = s.parties()
    everyone = list(range(len(clients)))
    probe = torch.Generator().manual_seed(0)
    print(f"FedGen, {args.dataset} pat 2 classes/client, generator lr {args.generator_lr}")
    for r in range(1, args.rounds + 1):
        _, uploads, _ = train_round("fedgen", server, clients, SequentialExecutor(), r, everyone)
        with torch.no_grad():
            fake, _ = server.generator.sample(server.pooled_counts, 256, server.options.noise, probe)
            real = []
            for c in clients:
                c.model.eval()
                real.append(c.model.base(c.data.x_train[:256].to(c.device)).norm(dim=1).mean())
            heads = torch.stack([u["head.weight"].norm() for u in uploads.values()])
        print(f"round {r:>2}: generated features {fake.norm(dim=1).mean():9.1f}   "
              f"real features {torch.stack(real).mean():6.1f}   "
              f"head weight norm mean {heads.mean():6.2f} max {heads.max():6.2f}   "
              f"generator loss {server.last_loss:.3g}", flush=True)


if __name__ == "__main__":
    main()
