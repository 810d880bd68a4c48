"""The HtFL baselines, registered through the ``htfl`` entry point like any plugin.

Each module of this package that defines ``ALGORITHM`` (the keyword arguments
of ``register``) is one algorithm.
"""

import importlib
import pkgutil

from htfl_plugins import hookimpl


def _modules():
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"{__name__}.{info.name}")


@hookimpl
def register_algorithms(register):
    for module in _modules():
        spec = getattr(module, "ALGORITHM", None)
        if spec is not None:
            register(**spec)
