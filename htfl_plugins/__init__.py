"""htfl: heterogeneous federated learning in which every algorithm is a plugin.

Plugins implement the hooks in :mod:`htfl_plugins.hookspecs`, marked with
:data:`hookimpl`, and are found through the ``htfl`` entry-point group.
"""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("htfl")

__all__ = ["__version__", "hookimpl"]
