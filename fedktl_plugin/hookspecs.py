"""FedKTL's own extension point: pretrained generators."""

import pluggy

hookspec = pluggy.HookspecMarker("htfl")


@hookspec
def register_generators(register):
    """Register generators: ``register(name, adapter_class, *, summary)``.

    ``adapter_class`` subclasses :class:`fedktl_plugin.generators.Generator`:
    ``adapter_class.check(path)`` raises HtflError if its weights or packages
    are missing; ``adapter_class(path, device, options)`` loads it.
    """
