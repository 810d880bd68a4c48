"""Traffic per round of every algorithm in the FedKTL paper's Table 5 setting, counted
by the library itself.

Setting: a Cifar-100-shaped scenario (100 classes, 3×32×32, 600 samples per class,
20 clients, Dirichlet α = 0.1 with PFLlib's minimum-size rule and a 75/25 split),
join ratio 1. Traffic depends on the label sets and the models, not on pixel
values, so the pixels are random and each client keeps one training sample per
class it holds (its label set is unchanged).

Which models: traffic depends on the head (Linear(512, K) in every CNN group)
and on the group's first architecture (FML's meme and FedKD's mentee), which is
FedAvgCNN in both HtFE-img-8 and HtFE-cpu-3. The default is HtFE-cpu-3: with
HtFE-img-8, the untrained ResNet-101/152 clients in eval mode overflow on random
pixels after one sample per class, so prototype methods lose those clients'
uploads (the `failed` column counts them).

    python benchmarks/comm_table.py [--out FILE.md] [--algos a,b,...]

Prints a markdown table: elements (floats, plus int labels/counts) uploaded and
downloaded per round by all 20 clients, in millions, from round 2 (the first round
in which every algorithm's server has something to send), beside the paper's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from htfl_plugins.config import RunConfig, build
from htfl_plugins.data.partition import PartitionSpec, dirichlet, min_samples
from htfl_plugins.engine import run
from htfl_plugins.results import read_run

PAPER = {  # Table 5: millions of floats per round (upload, download)
    "lg_fedavg": (1.03, 1.03), "fedgen": (1.03, 7.66), "fedgh": (0.46, 1.03),
    "fml": (18.50, 18.50), "fedkd": (16.52, 16.52), "feddistill": (0.09, 0.20),
    "fedproto": (0.46, 1.02), "fedktl": (0.09, 7.17),
}
# Cheap server settings: traffic does not depend on them (FedGen's noise_dim does,
# and is set to HtFLlib's tuned 32 as in the paper's runs).
OPTIONS = {
    "fedgen": {"noise_dim": 32, "server_epochs": 1},
    "fedgh": {"server_epochs": 1},
    "fedtgp": {"server_epochs": 1},
    "fedktl": {"server_epochs": 2, "save_images": 0},
}
K, CLIENTS, PER_CLASS, SHAPE = 100, 20, 600, (3, 32, 32)


def write_scenario(folder: Path, seed: int = 1) -> list[int]:
    """PFLlib-format folder; returns each client's number of training classes."""
    labels = np.repeat(np.arange(K), PER_CLASS)
    spec = PartitionSpec(clients=CLIENTS, num_classes=K, alpha=0.1,
                         min_samples=min_samples(len(labels), CLIENTS, 10, 0.75))
    rng = np.random.default_rng(seed)
    parts = dirichlet(labels, spec, rng)
    (folder / "train").mkdir(parents=True)
    (folder / "test").mkdir()
    held = []
    for i, idx in enumerate(parts):
        tr, te = train_test_split(idx, train_size=0.75, shuffle=True, random_state=seed * 100003 + i)
        classes = np.unique(labels[tr])
        held.append(len(classes))
        for split, y in (("train", classes), ("test", labels[te][:2])):
            x = rng.standard_normal((len(y), *SHAPE)).astype(np.float32)
            with open(folder / split / f"{i}.npz", "wb") as fh:
                np.savez_compressed(fh, data={"x": x, "y": y.astype(np.int64)})
    (folder / "config.json").write_text(json.dumps({"num_clients": CLIENTS, "num_classes": K}))
    return held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the table to this markdown file")
    ap.add_argument("--algos", default=",".join([*PAPER, "fedtgp"]))
    ap.add_argument("--models", default="HtFE-cpu-3")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="htfl-comm-"))
    held = write_scenario(tmp / "cifar100-shape")
    rows = []
    for algo in args.algos.split(","):
        t = time.perf_counter()
        cfg = build(RunConfig, dict(algo=algo, dataset=f"pfl:{tmp / 'cifar100-shape'}", clients=CLIENTS,
                                    models=args.models, rounds=2, eval_gap=2, out=str(tmp / "runs"),
                                    name=algo, options=OPTIONS.get(algo, {})), "settings")
        r = read_run(run(cfg, quiet=True))
        up, down = r["upload_elements"][2] / 1e6, r["download_elements"][2] / 1e6
        rows.append((algo, up, down, int(r["failed_clients"][2]), *PAPER.get(algo, (float("nan"), float("nan")))))
        print(f"{algo}: {up:.3f}M up, {down:.3f}M down ({time.perf_counter() - t:.0f} s)", flush=True)
    ktl_up = next((u for a, u, *_ in rows if a == "fedktl"), float("nan"))
    lines = [f"Label sets: Σ|C_i| = {sum(held)} over {CLIENTS} clients (K = {K}, D = 512); "
             f"models {args.models}.", "",
             "| algorithm | upload (M) | download (M) | upload / FedKTL's | failed | paper upload | paper download |",
             "|---|---|---|---|---|---|---|"]
    for algo, up, down, failed, pu, pd in rows:
        lines.append(f"| {algo} | {up:.3f} | {down:.3f} | {up / ktl_up:.2f} | {failed} | {pu:.2f} | {pd:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
