"""Executors run the selected clients' local work: receive → train → upload."""

from __future__ import annotations

from htfl_plugins.errors import HtflError


class SequentialExecutor:
    """Clients one after another in this process (deterministic)."""

    def train(self, clients, selected, downloads) -> dict:
        out = {}
        for cid in selected:
            cl = clients[cid]
            if cid in downloads:
                cl.receive(downloads[cid])
            loss = cl.train()
            out[cid] = (float(loss), cl.upload())
        return out

    def close(self) -> None:
        pass


EXECUTORS = {"sequential": SequentialExecutor}


def make_executor(cfg):
    name = getattr(cfg, "executor", "sequential")
    if name not in EXECUTORS:
        raise HtflError(f"unknown executor {name!r} (known: {', '.join(EXECUTORS)})")
    return EXECUTORS[name]()
