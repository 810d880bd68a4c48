"""Where a run's clients live between rounds.

``--client-state memory`` (the default) keeps every client as a live object.
``--client-state disk`` keeps each client's explicit ``state_dict`` in a file
and at most ``live`` clients as objects at a time, so memory does not grow with
the number of clients: a client is rebuilt (same constructor, then
``load_state_dict``) when it is trained or evaluated and written back when it
is evicted after training. Both give the same numbers: a client is fully
described by its state, which is what checkpoints and worker processes rely on.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

from htfl_plugins.errors import HtflError


def state_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) state."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def atomic_save(obj, path: Path) -> None:
    """torch.save to ``path`` through a temporary file: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class ClientStore:
    """The run's clients by id: ``get(cid)`` gives a live client, ``state(cid)`` /
    ``set_state(cid, state)`` move its state without necessarily building it."""

    def __init__(self, make, archs: list[str], folder: Path | None = None, live: int = 2):
        self._make = make
        self.archs = archs
        self.folder = folder
        self.live = max(1, live)
        self._clients: OrderedDict = OrderedDict()
        self._dirty: set[int] = set()
        if folder is None:
            for cid in range(len(archs)):
                self._clients[cid] = make(cid)
            return
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for cid in range(len(archs)):
                atomic_save(make(cid).state_dict(), self._file(cid))
        except OSError as exc:
            self.close()
            raise HtflError(f"cannot keep client state in {folder}: {exc.strerror or exc}") from None

    @classmethod
    def of(cls, clients) -> ClientStore:
        """A store around already-built clients (or the store itself)."""
        if isinstance(clients, ClientStore):
            return clients
        clients = list(clients)
        return cls(lambda cid: clients[cid], [c.arch for c in clients])

    @property
    def on_disk(self) -> bool:
        return self.folder is not None

    def __len__(self) -> int:
        return len(self.archs)

    def arch(self, cid: int) -> str:
        return self.archs[cid]

    def _file(self, cid: int) -> Path:
        return self.folder / f"{cid}.pt"

    def _load(self, cid: int) -> dict:
        return torch.load(self._file(cid), map_location="cpu", weights_only=False)

    # -------------------------------------------------------------- access
    def get(self, cid: int, write: bool = False):
        """The live client ``cid``; with ``write``, its changed state is kept when it is evicted."""
        if cid in self._clients:
            self._clients.move_to_end(cid)
            client = self._clients[cid]
        else:
            while len(self._clients) >= self.live:
                self._evict(next(iter(self._clients)))
            with torch.random.fork_rng(devices=[]):  # rebuilding must not move the run's RNG
                client = self._make(cid)
            client.load_state_dict(self._load(cid))
            self._clients[cid] = client
        if write and self.on_disk:
            self._dirty.add(cid)
        return client

    def _evict(self, cid: int) -> None:
        client = self._clients.pop(cid)
        if cid in self._dirty:
            atomic_save(client.state_dict(), self._file(cid))
            self._dirty.discard(cid)

    def state(self, cid: int) -> dict:
        if cid in self._clients:
            return self._clients[cid].state_dict()
        return self._load(cid)

    def set_state(self, cid: int, state: dict) -> None:
        if cid in self._clients:
            self._clients[cid].load_state_dict(state)
            if self.on_disk:
                self._dirty.add(cid)
        else:
            atomic_save(state, self._file(cid))

    def flush(self) -> None:
        """Write every changed live client back (disk mode) and let it go."""
        if self.on_disk:
            for cid in list(self._clients):
                self._evict(cid)

    def live_clients(self) -> int:
        return len(self._clients)

    def state_bytes(self) -> int:
        """Bytes of all clients' state (tensor payload; file sizes on disk)."""
        if self.on_disk:
            self.flush()
            return sum(self._file(cid).stat().st_size for cid in range(len(self)))
        return sum(state_bytes(c.state_dict()) for c in self._clients.values())

    # -------------------------------------------------------------- checkpoints
    def snapshot(self, dest: Path) -> None:
        """Disk mode: a consistent copy of every client's state file in ``dest``
        (hard links where possible: files are replaced, never rewritten in place)."""
        self.flush()
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        try:
            for cid in range(len(self)):
                src, dst = self._file(cid), tmp / f"{cid}.pt"
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
            old = dest.with_name(dest.name + ".old")
            if dest.exists():
                dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def restore(self, src: Path) -> None:
        """Disk mode: take every client's state from a snapshot folder."""
        self._clients.clear()
        self._dirty.clear()
        for cid in range(len(self)):
            f = src / f"{cid}.pt"
            if not f.exists():
                raise HtflError(f"checkpoint folder {src} lacks client {cid}'s state")
            shutil.copy2(f, self._file(cid))

    def close(self) -> None:
        """Drop the live clients; disk mode removes its working folder."""
        self._clients.clear()
        self._dirty.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
