"""The contract a plugin may implement (pluggy project ``htfl``).

Registration hooks receive a ``register`` callback, so one hook can register
many items. The host keeps the registries and knows which plugin registered
what, so duplicate names are reported with both plugins named.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("htfl")


@hookspec
def register_algorithms(register):
    """Register algorithms.

    ``register(name, *, server, client, options, summary)``: ``server`` and
    ``client`` are subclasses of :class:`htfl_plugins.engine.Server` and
    :class:`htfl_plugins.engine.Client`; ``options`` is a dataclass whose
    fields become typed ``htfl run`` flags; ``summary`` is one line.
    """


@hookspec
def register_models(register):
    """Register architectures: ``register(name, builder, *, summary)``.

    ``builder(in_channels, image_size, num_classes, feature_dim)`` returns a
    :class:`htfl_plugins.models.BaseHeadSplit`.
    """


@hookspec
def register_model_groups(register):
    """Register model groups: ``register(name, [arch, ...], *, summary)``."""


@hookspec
def register_datasets(register):
    """Register data sources: ``register(name, loader, *, summary)``.

    ``loader(root: str | None) -> htfl_plugins.data.RawData``.
    """


@hookspec
def register_partitioners(register):
    """Register partitioners: ``register(name, fn, *, summary)``.

    ``fn(labels, spec, rng) -> list[np.ndarray]`` of sample indices per client.
    """


@hookspec
def register_commands(subparsers):
    """Add ``htfl`` subcommands. Each parser sets ``func=callable(args) -> int``."""


@hookspec
def on_run_start(run):
    """Called once a run is set up, before round 0. ``run`` is a RunInfo."""


@hookspec
def on_round_end(run, round, metrics):
    """Called after each round is recorded; ``metrics`` is a dict of scalars: the
    evaluation (``test_acc``, ...), traffic and time, and the round's ``local_loss``,
    ``server_*`` and ``client_*`` metrics."""


@hookspec
def on_run_end(run, path, status):
    """Called when a run ends; ``path`` is its HDF5 file, ``status`` its final status."""
