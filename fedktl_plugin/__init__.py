"""FedKTL (Zhang et al., CVPR 2024) as an htfl plugin.

It also adds an extension point of its own, ``register_generators``, so that a
third-party package can contribute a pretrained generator.
"""

from fedktl_plugin import hookspecs as htfl_hookspecs  # noqa: F401  (read by the host)
from htfl_plugins import hookimpl


@hookimpl
def register_algorithms(register):
    from fedktl_plugin.fedktl import FedKTLClient, FedKTLOptions, FedKTLServer

    register("fedktl", server=FedKTLServer, client=FedKTLClient, options=FedKTLOptions,
             summary="ETF/ArcFace clients upload prototypes; the server aligns them with a "
                     "pretrained generator and sends back image–latent pairs")


@hookimpl
def register_generators(register):
    from fedktl_plugin.generators import BUILTIN

    for cls, summary in BUILTIN:
        register(cls.name, cls, summary=summary)
