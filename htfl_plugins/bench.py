"""Benchmark suites: a TOML grid of runs × scenarios × seeds, one HDF5 file per cell.

```toml
name = "my-suite"            # results go to <out>/<name>/ (default: the file's stem)
seeds = [0, 1, 2]
[settings]                   # shared by every cell (RunConfig keys)
dataset = "fmnist"
rounds = 20
[[scenarios]]                # optional; each overrides settings (default: one scenario)
partition = "dir"
alpha = 0.1
[[runs]]                     # what is compared; `tag` labels it in tables
tag = "FedKTL"
algo = "fedktl"
options = { mu = 50.0 }
seeds = [0]                  # optional: this run's own seeds
[[exclude]]                  # optional: skip cells whose settings match all these keys
algo = "lg_fedavg"
models = "HtM-img-10"
```

A re-run skips cells whose file is finished, continues a cut-off cell from its
last checkpoint (``checkpoint_every``, every 10 rounds by default) when the suite
still gives it the same settings, and redoes any other; a cell that fails is
reported and the others still run. A finished cell whose stored run differs
from what the suite now gives it in any setting tables compare (one it spells
out, or a default that changed since) stops the re-run before anything runs,
so no result is overwritten or silently kept under settings it did not run with.
"""

from __future__ import annotations

import concurrent.futures as cf
import re
import time
from dataclasses import dataclass
from pathlib import Path

from htfl_plugins import config as config_mod
from htfl_plugins.config import RunConfig
from htfl_plugins.errors import Diverged, HtflError
from htfl_plugins.results.load import DONE


@dataclass
class Cell:
    name: str
    config: RunConfig

    @property
    def path(self) -> Path:
        return Path(self.config.out) / f"{self.name}.h5"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", str(text)).strip("_")


def load_suite(path: str, out: str | None = None, plugins=None) -> tuple[str, list[Cell]]:
    data = config_mod.load_toml(path)
    unknown = set(data) - {"name", "seeds", "settings", "scenarios", "runs", "description", "exclude"}
    if unknown:
        raise HtflError(f"{path}: unknown suite key(s) {', '.join(sorted(unknown))}")
    name = data.get("name") or Path(path).stem
    seeds = data.get("seeds", [0])
    settings = data.get("settings", {})
    scenarios = data.get("scenarios") or [{}]
    runs = data.get("runs")
    if not runs:
        raise HtflError(f"{path}: a suite needs at least one [[runs]] entry")
    excludes = data.get("exclude", [])
    folder = Path(out or "results") / name
    cells = []
    for sc in scenarios:
        for rn in runs:
            for seed in rn.get("seeds", seeds):
                values = {**settings, **sc, **{k: v for k, v in rn.items() if k != "seeds"},
                          "seed": seed, "out": str(folder)}
                values["options"] = {**settings.get("options", {}), **sc.get("options", {}),
                                     **rn.get("options", {})}
                values.setdefault("tag", rn.get("algo", ""))
                values.setdefault("threads", 1)  # the same numbers whatever --jobs is
                values.setdefault("executor", "sequential")  # cells share the cores through --jobs
                if any(all(values.get(k) == v for k, v in ex.items()) for ex in excludes):
                    continue
                sc_label = "_".join(f"{k}={v}" for k, v in sc.items() if k != "options") or "default"
                cell_name = _slug(f"{values['tag']}__{sc_label}__s{seed}")
                values["name"] = cell_name
                cfg = config_mod.build(RunConfig, values, f"setting(s) in {path}")
                cells.append(Cell(cell_name, cfg))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise HtflError(f"{path}: two cells share a name; give each [[runs]] a distinct tag")
    if plugins is not None:  # check algorithms and options before any cell runs
        for c in cells:
            algo = plugins.algorithm(c.config.algo)
            config_mod.build(algo.options, dict(c.config.options), f"option(s) for {c.config.algo}")
    return name, cells


def estimated_steps(cfg: RunConfig, plugins) -> int | None:
    """Local SGD steps of a whole cell (all clients, all rounds): a cost estimate
    from the source's size, the split, the join ratio and the batch size."""
    if cfg.dataset.startswith("pfl:"):
        return None
    n = plugins.registry("datasets").get(cfg.dataset).meta.get("num_samples")
    if not n:
        return None
    per_round = n * cfg.train_ratio * cfg.join_ratio * cfg.local_epochs / cfg.batch_size
    return int(per_round * cfg.rounds)


def changed_settings(cell: Cell, stored: dict) -> list[str]:
    """The settings that make a run what it is (``config.compared_settings``: all but
    the seed, names, folders and where clients run, and every option of the
    algorithm but those marked ``compared=False``) on which ``cell``'s stored run
    differs from what the suite gives it now, as ``key then → now``. A setting the
    stored run lacks counts as what it ran with (its ``legacy`` value, else
    today's default), and so does one the suite leaves out."""
    from htfl_plugins.results.load import options_class

    now_cfg = config_mod.to_dict(cell.config)
    cls = options_class(cell.config.algo)
    if cls is not None:  # the options the cell will run with, defaults included
        now_cfg["options"] = config_mod.to_dict(config_mod.build(cls, dict(cell.config.options), "options"))
    then, now = config_mod.compared_settings(stored, cls), config_mod.compared_settings(now_cfg, cls)
    then["seed"], now["seed"] = stored.get("seed"), now_cfg["seed"]
    return [f"{key} {then.get(key)!r} → {value!r}" for key, value in now.items()
            if key in then and then[key] != value]


def cell_status(cell: Cell) -> str:
    """missing, unreadable, stale (finished with other settings than the suite
    gives now), or the stored run's status (finished, running, ...)."""
    from htfl_plugins.results.store import read_run

    if not cell.path.is_file():
        return "missing"
    try:
        saved = read_run(cell.path)
    except HtflError:
        return "unreadable"
    status = saved["attrs"].get("status", "unknown")
    return "stale" if status in DONE and changed_settings(cell, saved["config"]) else status


def resumable(cfg: RunConfig) -> bool:
    """Whether a half-finished cell can continue from its checkpoint: its run was
    cut off (not failed), and it was started with the settings the suite gives now."""
    from htfl_plugins.engine.loop import checkpoint_path
    from htfl_plugins.results.store import read_run

    path = Cell(cfg.name, cfg).path
    if not checkpoint_path(path).is_file():
        return False
    try:
        saved = read_run(path)
    except HtflError:
        return False
    if saved["attrs"].get("status") not in ("running", "interrupted"):
        return False
    stored, now = dict(saved["config"]), config_mod.to_dict(cfg)
    stored_options, options = stored.pop("options", {}), now.pop("options", {})
    return stored == now and all(stored_options.get(k) == v for k, v in options.items())


def _run_cell(cfg: RunConfig) -> tuple[str, str] | None:
    """Run one cell, continuing a cut-off one from its checkpoint (resumed runs
    give exactly the curves of uninterrupted ones). A user-level error comes back
    as ("failed", text), a diverged run as ("diverged", text): not raised."""
    from htfl_plugins.engine import run

    try:
        run(cfg, quiet=True, resume=resumable(cfg))
    except Diverged as exc:
        return "diverged", str(exc)
    except HtflError as exc:
        return "failed", str(exc)
    return None


def run_suite(cells: list[Cell], jobs: int = 1, log=print) -> list[Cell]:
    """Run every cell not yet finished; ``jobs`` > 1 runs cells in parallel
    processes. Returns the cells that were run."""
    status = {c.name: cell_status(c) for c in cells}
    stale = [c for c in cells if status[c.name] == "stale"]
    if stale:
        from htfl_plugins.results.store import read_run

        first = changed_settings(stale[0], read_run(stale[0].path)["config"])
        raise HtflError(f"{len(stale)} finished cell(s) in {stale[0].path.parent} ran with other settings "
                        f"than the suite gives now ({stale[0].name}: {', '.join(first)}); move their files "
                        "away, or give another --out, to run them with the suite's settings")
    todo = [c for c in cells if status[c.name] not in DONE]
    log(f"{len(cells) - len(todo)} of {len(cells)} cells already finished; running {len(todo)}")
    if not todo:
        return []
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="cell")
    start = time.perf_counter()
    failed = []

    def done(cell, outcome):
        bar.set_description(cell.name)
        bar.update(1)
        if outcome:
            kind, text = outcome
            if kind == "failed":
                failed.append(cell)
            bar.write(f"cell {cell.name} {kind}: {text}" + (" (kept as its result)" if kind == "diverged" else ""))

    if jobs <= 1:
        for c in todo:
            done(c, _run_cell(c.config))
    else:
        from htfl_plugins.engine.executors import spawn_pool

        with spawn_pool(jobs) as pool:
            futures = {pool.submit(_run_cell, c.config): c for c in todo}
            for fut in cf.as_completed(futures):
                done(futures[fut], fut.result())
    bar.close()
    log(f"ran {len(todo)} cells in {time.perf_counter() - start:.0f} s"
        + (f"; {len(failed)} failed: {', '.join(c.name for c in failed)}" if failed else ""))
    if failed:
        raise HtflError(f"{len(failed)} of {len(todo)} cells failed (listed above); fix them and run "
                        "the suite again: finished cells are kept")
    return todo
