"""``local``: every client trains its own model with cross-entropy; nothing is exchanged."""

from dataclasses import dataclass

from htfl_plugins.engine import Client, Server


@dataclass
class LocalOptions:
    pass


class LocalClient(Client):
    pass


class LocalServer(Server):
    pass


ALGORITHM = dict(name="local", server=LocalServer, client=LocalClient, options=LocalOptions,
                 summary="each client trains alone on its own data (the reference)")
