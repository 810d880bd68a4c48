"""The round loop and the Client/Server bases algorithms build on."""

from htfl_plugins.engine.base import (
    Client,
    Payload,
    RunContext,
    Server,
    average_by_class,
    class_means,
    class_vectors_spec,
    derive_seed,
    module_spec,
    weighted_average,
)
from htfl_plugins.engine.loop import RunInfo, evaluate, payload_size, run

__all__ = ["Client", "Server", "Payload", "RunContext", "RunInfo", "run", "evaluate", "payload_size",
           "derive_seed", "weighted_average", "class_means", "average_by_class", "module_spec",
           "class_vectors_spec"]
