"""FedKTL (Zhang et al., CVPR 2024) as an htfl plugin.

It also adds an extension point of its own, ``register_generators``, so that a
third-party package can contribute a pretrained generator.
"""

from htfl_plugins import hookimpl
from fedktl_plugin import hookspecs as htfl_hookspecs  # noqa: F401  (read by the host)


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


@hookimpl
def register_commands(subparsers):
    p = subparsers.add_parser("generators", help="list FedKTL's pretrained generators")
    p.set_defaults(func=_list_generators)


def _list_generators(args):
    from htfl_plugins.plugins import get_plugins

    reg = get_plugins().collect("generators", "register_generators")
    for name in reg.names():
        item = reg.get(name)
        print(f"{name:<18}  {item.summary}  [{item.plugin}]")
    return 0
