"""The typed run configuration and the dataclass → command-line flag mapping.

Every setting has one name, used alike as a dataclass field, a TOML key and a
flag (``join_ratio`` ↔ ``--join-ratio``). Algorithm options are dataclasses of
the same kind; their fields become flags of ``htfl run --algo NAME``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from htfl_plugins.errors import HtflError

_NONE = object()


def opt(default, help: str, *, choices=None, alias: str | None = None, min=None, max=None,
        compared: bool = True, legacy=_NONE):
    """A dataclass field with a help text, optional choices and a numeric range.

    ``compared=False`` marks a setting that does not change what a run computes
    (where it runs, how fast, where files go): tables do not tell runs apart by
    it. ``legacy`` is what a result file written before the setting existed ran
    with, where that is not ``default`` (a setting added with a new behaviour as
    its default, or whose default changed since)."""
    meta = {"help": help, "choices": choices, "alias": alias, "min": min, "max": max, "compared": compared}
    if legacy is not _NONE:
        meta["legacy"] = legacy
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


MAX_SEED = 2 ** 63 - 1  # seeds are stored as int64
EVAL_POINTS = ("after-broadcast", "after-update")


@dataclass
class RunConfig:
    """Settings shared by every algorithm."""

    algo: str = opt("fedktl", "algorithm to run (see `htfl list algorithms`)")
    dataset: str = opt("fmnist", "data source: digits, fmnist, mnist, cifar10, cifar100, "
                       "tinyimagenet, flowers102 or pfl:<dir>")
    data_root: str = opt("", "folder holding the dataset files (torchvision layout)", compared=False)
    partition: str = opt("dir", "how samples are split over clients (see `htfl list "
                         "partitioners`)")
    alpha: float = opt(0.1, "Dirichlet concentration for dir/exdir", min=1e-6)
    classes_per_client: int = opt(0, "classes per client for pat/exdir (0: the dataset's "
                                  "PFLlib default)", min=0)
    balance: bool = opt(True, "pat: equal shares of each class among its clients")
    clients: int = opt(20, "number of clients", min=1, alias="-nc")
    join_ratio: float = opt(1.0, "share of clients selected each round", min=1e-9, max=1.0,
                            alias="-jr")
    random_join: bool = opt(False, "select a random number of clients between "
                            "join_ratio·N and N each round")
    drop_rate: float = opt(0.0, "share of the selected clients that drop out of a round",
                           min=0.0, max=1.0)
    models: str = opt("HtFE-cpu-3", "model group name or comma-separated architectures",
                      alias="-m")
    feature_dim: int = opt(512, "width of the feature layer between base and head", min=1)
    rounds: int = opt(20, "training rounds (evaluation runs at rounds 0..R)", min=0,
                      alias="-gr")
    local_epochs: int = opt(1, "local epochs per round", min=1, alias="-ls")
    batch_size: int = opt(10, "local batch size", min=1, alias="-lbs")
    lr: float = opt(0.01, "local learning rate (SGD)", min=0.0)
    eval_gap: int = opt(1, "evaluate every N rounds (the last round always)", min=1)
    eval_point: str = opt("after-broadcast", "when round r is scored: after-broadcast (HtFLlib's protocol: "
                          "every client has received what the server sends after round r's update, "
                          "as it would for inference) or after-update (right after the server's "
                          "update, before any client receives it)", choices=list(EVAL_POINTS), legacy="after-update")
    checkpoint_every: int = opt(10, "write the whole run state every N rounds (and at round 0) next "
                                "to the result file, for `htfl resume` (0: never)", min=0, compared=False)
    failure_tolerance: float = opt(0.5, "a client whose local update raises or turns non-finite "
                                   "is dropped from the round; the run stops when more than this "
                                   "share of a round's clients fail (status 'diverged')", min=0.0, max=1.0)
    straggler_rate: float = opt(0.0, "share of the selected clients that are stragglers and finish "
                                "only a random 10–100% of their local batches", min=0.0, max=1.0)
    top_cnt: int = opt(0, "stop after this many evaluations without a new best "
                       "accuracy (0: never)", min=0)
    train_ratio: float = opt(0.75, "share of each client's samples used for training",
                             min=0.01, max=0.99)
    few_shot: int = opt(0, "cap on training samples per class and client (0: no cap)", min=0)
    data_seed: int = opt(1, "seed of the partition and train/test split (fixed across "
                         "run seeds, as in PFLlib)", min=0, max=MAX_SEED)
    seed: int = opt(0, "seed of everything else: models, client order, sampling", min=0, max=MAX_SEED, compared=False)
    device: str = opt("cpu", "torch device (cpu, cuda, cuda:1, ...)", compared=False)
    threads: int = opt(0, "torch threads (0: leave torch's default)", min=0, compared=False)
    executor: str = opt("auto", "who runs the clients' training and evaluation: sequential (this "
                        "process), process (a pool of --workers processes, one torch thread each), ray "
                        "(--workers Ray actors, one CPU each; needs htfl[ray]) or auto (process on a CPU "
                        "with two or more cores when two or more clients train per round, else sequential)",
                        choices=["auto", "sequential", "process", "ray"], compared=False)
    workers: int = opt(0, "worker processes or Ray actors of --executor process/ray/auto (0: one per "
                       "usable CPU core of this machine, at most one per client)", min=0, compared=False)
    ray_address: str = opt("", "Ray cluster to join with --executor ray (e.g. ray://head:10001 or "
                           "auto; empty: start a local Ray instance)", compared=False)
    client_state: str = opt("memory", "where clients live between rounds: memory (all live) or disk "
                            "(state files beside the result; only the clients at work are live)",
                            choices=["memory", "disk"], compared=False)
    out: str = opt("results", "folder for the HDF5 result file", compared=False)
    name: str = opt("", "result file name without .h5 (default: derived from the settings)", compared=False)
    tag: str = opt("", "free-form label stored with the results (tables group by it)")
    cache_dir: str = opt("", "scenario cache folder (default: $HTFL_HOME or ~/.cache/htfl)", compared=False)
    options: dict = opt({}, "algorithm options (TOML table [options]; flags on the CLI)")


def _base_type(tp):
    """The flag type of a resolved field annotation (``int``, ``float``, ``str``, ``bool``)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return tp


def fields_of(cls) -> list[dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        f.type = hints.get(f.name, f.type)
        out.append(f)
    return out


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """Add one typed flag per dataclass field; unset flags stay absent (SUPPRESS)."""
    for f in fields_of(cls):
        if f.name in skip:
            continue
        tp = _base_type(f.type)
        if tp not in (int, float, str, bool):
            continue
        meta = f.metadata or {}
        default = f.default if f.default is not dataclasses.MISSING else None
        names = [flag(f.name)]
        if meta.get("alias"):
            names.append(meta["alias"])
        help_text = f"{meta.get('help', '')} (default: {default})".replace("%", "%%")  # argparse formats help
        if tp is bool:
            parser.add_argument(*names, dest=f.name, type=_bool, nargs="?", const=True,
                                metavar="BOOL", help=help_text, default=argparse.SUPPRESS)
        else:
            parser.add_argument(*names, dest=f.name, type=tp, choices=meta.get("choices"),
                                metavar=None if meta.get("choices") else tp.__name__.upper(),
                                help=help_text, default=argparse.SUPPRESS)


def check_ranges(obj) -> None:
    """Check types, choices and numeric ranges declared on a dataclass's fields."""
    for f in fields_of(type(obj)):
        value = getattr(obj, f.name)
        tp = _base_type(f.type)
        meta = f.metadata or {}
        where = flag(f.name)
        if tp in (int, float, str, bool):
            if tp is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(obj, f.name, value)
            if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
                raise HtflError(f"{where} must be {tp.__name__}, got {value!r}")
            if tp is float and not math.isfinite(value):
                raise HtflError(f"{where} must be a finite number, got {value!r}")
        if meta.get("choices") and value not in meta["choices"]:
            raise HtflError(f"{where} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
        if meta.get("min") is not None and value < meta["min"]:
            raise HtflError(f"{where} must be at least {meta['min']}, got {value!r}")
        if meta.get("max") is not None and value > meta["max"]:
            raise HtflError(f"{where} must be at most {meta['max']}, got {value!r}")


def build(cls, values: dict[str, Any], what: str):
    """Instantiate a dataclass from a mapping, refusing unknown keys, and check it."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise HtflError(f"unknown {what} {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    obj = cls(**values)
    check_ranges(obj)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


# ------------------------------------------------------------------ what makes two runs comparable
def field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def ran_with(f: dataclasses.Field):
    """What a stored run that lacks setting ``f`` (written before it existed) ran with."""
    return (f.metadata or {}).get("legacy", field_default(f))


def compared(f: dataclasses.Field) -> bool:
    return (f.metadata or {}).get("compared", True)


def with_legacy(stored: dict) -> dict:
    """A stored run config with the settings it lacks set to what it ran with
    (their ``legacy`` value), so that resuming it keeps its protocol."""
    missing = {f.name: f.metadata["legacy"] for f in fields_of(RunConfig)
               if f.name not in stored and "legacy" in (f.metadata or {})}
    return {**missing, **stored}


#: Run settings left out when runs are grouped (``htfl compare``) or checked against
#: a suite (``htfl bench``): the seed, and those marked ``compared=False``. Thread
#: counts and executors change floating-point reduction order only; two runs that
#: differ just there have the same seed, and a table refuses to average them.
NOT_COMPARED = tuple(f.name for f in fields_of(RunConfig) if not compared(f))


def compared_settings(stored: dict, options_cls=None) -> dict:
    """The settings of a stored run config (``to_dict`` form) that make it the run it
    is: every run setting but :data:`NOT_COMPARED`, a setting the file lacks taken
    as what that file ran with (:func:`ran_with`), and each algorithm option as
    ``options.<name>``. With the algorithm's options dataclass, options marked
    ``compared=False`` are left out and missing ones filled likewise; without it
    (the algorithm is not installed) the stored options are taken as they are."""
    out = {}
    for f in fields_of(RunConfig):
        if compared(f) and f.name != "options":
            out[f.name] = stored[f.name] if f.name in stored else ran_with(f)
    options = dict(stored.get("options") or {})
    if options_cls is not None:
        for f in fields_of(options_cls):
            if not compared(f):
                options.pop(f.name, None)
            elif f.name not in options:
                options[f.name] = ran_with(f)
    for k, v in sorted(options.items()):
        out[f"options.{k}"] = v
    return out


def load_toml(path: str) -> dict:
    import tomllib

    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise HtflError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise HtflError(f"config file {path} is not valid TOML: {exc}") from None


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)
