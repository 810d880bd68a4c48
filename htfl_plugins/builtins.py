"""What the host itself registers: data sources, partitioners, models, groups,
and the progress display (an observer like any other)."""

from __future__ import annotations

import logging
import math
import sys

from htfl_plugins import hookimpl
from htfl_plugins.data.partition import PARTITIONERS
from htfl_plugins.data.sources import SOURCES
from htfl_plugins.models.zoo import GROUPS, MODELS

NUM_CLASSES = {"digits": 10, "fmnist": 10, "mnist": 10, "cifar10": 10, "cifar100": 100,
               "tinyimagenet": 200, "flowers102": 102}
NUM_SAMPLES = {"digits": 1797, "fmnist": 70000, "mnist": 70000, "cifar10": 60000, "cifar100": 60000,
               "tinyimagenet": 110000, "flowers102": 8189}


@hookimpl
def register_datasets(register):
    for name, (loader, summary) in SOURCES.items():
        register(name, loader, summary=summary, num_classes=NUM_CLASSES[name], num_samples=NUM_SAMPLES[name])


@hookimpl
def register_partitioners(register):
    for name, (fn, summary) in PARTITIONERS.items():
        register(name, fn, summary=summary)


@hookimpl
def register_models(register):
    for name, (builder, summary) in MODELS.items():
        register(name, builder, summary=summary)


@hookimpl
def register_model_groups(register):
    for name, (archs, summary) in GROUPS.items():
        register(name, archs, summary=f"{summary}: {', '.join(archs)}")


# ------------------------------------------------------------------ progress
_bars: dict[int, object] = {}


@hookimpl
def on_run_start(run):
    if run.quiet:
        return
    from tqdm import tqdm

    _bars[id(run)] = tqdm(total=run.config.rounds + 1, desc=f"{run.config.algo}", unit="round",
                          file=sys.stderr, leave=True, dynamic_ncols=True)


@hookimpl
def on_round_end(run, round, metrics):
    bar = _bars.get(id(run))
    if bar is None:
        return
    acc = metrics.get("test_acc", math.nan)
    bar.set_postfix_str(f"acc {acc:.4f} best {run.best_acc:.4f}@{run.best_round}", refresh=False)
    bar.update(1)


@hookimpl
def on_run_end(run, path, status):
    bar = _bars.pop(id(run), None)
    if bar is not None:
        bar.close()
    logging.getLogger("htfl").info("%s: best accuracy %.4f at round %d; results in %s",
                                   status, run.best_acc, run.best_round, path)
