"""Plugin manager: built-ins and third-party packages load through the ``htfl``
entry-point group in the same way; registries are looked up by name."""

from __future__ import annotations

import dataclasses
import importlib.metadata
from dataclasses import dataclass, field
from typing import Any

import pluggy

from htfl_plugins import hookspecs
from htfl_plugins.errors import HtflError, PluginError

ENTRY_POINT_GROUP = "htfl"

KINDS = {
    "algorithms": "register_algorithms",
    "models": "register_models",
    "groups": "register_model_groups",
    "datasets": "register_datasets",
    "partitioners": "register_partitioners",
}


@dataclass
class Item:
    name: str
    obj: Any
    summary: str
    plugin: str
    meta: dict = field(default_factory=dict)


class Registry:
    """Named items of one kind, each remembering the plugin that registered it."""

    def __init__(self, kind: str):
        self.kind = kind
        self.items: dict[str, Item] = {}

    def add(self, plugin: str, name: str, obj: Any = None, *, summary: str = "", **meta) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered a {self.kind[:-1]} without a name")
        if name in self.items:
            other = self.items[name].plugin
            raise PluginError(
                f"{self.kind[:-1]} {name!r} is registered twice: by plugin {other!r} and by plugin {plugin!r}"
            )
        self.items[name] = Item(name, obj, summary, plugin, meta)

    def get(self, name: str) -> Item:
        try:
            return self.items[name]
        except KeyError:
            known = ", ".join(sorted(self.items)) or "none"
            raise HtflError(f"unknown {self.kind[:-1]} {name!r} (known: {known})") from None

    def __contains__(self, name: str) -> bool:
        return name in self.items

    def names(self) -> list[str]:
        return sorted(self.items)


@dataclass
class AlgorithmSpec:
    """What an algorithm plugin registers."""

    name: str
    server: type
    client: type
    options: type
    summary: str
    plugin: str


@dataclass(frozen=True)
class _NoOptions:
    pass


class Plugins:
    """The loaded plugin manager and the registries built from it."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self._registries: dict[str, Registry] = {}

    @property
    def hook(self):
        return self.pm.hook

    def registry(self, kind: str) -> Registry:
        """The registry of a host kind (KINDS) or of a plugin-added ``register_<kind>`` hook."""
        if kind not in self._registries:
            hookname = KINDS.get(kind, f"register_{kind}")
            if not hasattr(self.pm.hook, hookname):
                raise HtflError(f"nothing registers {kind!r} (known: {', '.join(self.kinds())})")
            self._registries[kind] = self._collect(kind, hookname)
        return self._registries[kind]

    def kinds(self) -> list[str]:
        """Every listable kind: the host's and those added by plugins' hookspecs."""
        extra = [name[len("register_"):] for name in vars(self.pm.hook)
                 if name.startswith("register_") and name not in KINDS.values()
                 and name != "register_commands"]
        return list(KINDS) + sorted(extra)

    def _collect(self, kind: str, hookname: str) -> Registry:
        reg = Registry(kind)
        caller = getattr(self.pm.hook, hookname)
        # Call each implementation alone so that every item is tied to its plugin.
        for impl in reversed(caller.get_hookimpls()):
            name = impl.plugin_name

            def register(*args, _plugin=name, **kwargs):
                reg.add(_plugin, *args, **kwargs)

            try:
                impl.function(register=register)
            except HtflError:
                raise
            except Exception as exc:  # a broken plugin, named
                raise PluginError(f"plugin {name!r} failed in {hookname}: {exc}") from exc
        return reg

    def algorithm(self, name: str) -> AlgorithmSpec:
        item = self.registry("algorithms").get(name)
        meta = item.meta
        for key in ("server", "client"):
            if key not in meta:
                raise PluginError(f"plugin {item.plugin!r} registered algorithm {name!r} without {key}=")
        options = meta.get("options") or _NoOptions
        if not dataclasses.is_dataclass(options):
            raise PluginError(f"plugin {item.plugin!r}: options of algorithm {name!r} must be a dataclass")
        return AlgorithmSpec(name, meta["server"], meta["client"], options, item.summary, item.plugin)


_CACHE: Plugins | None = None


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    seen = set()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if (ep.name, ep.value) in seen:
            continue
        seen.add((ep.name, ep.value))
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}") from exc
        if pm.is_registered(plugin) or pm.get_plugin(ep.name) is not None:
            continue
        specs = getattr(plugin, "htfl_hookspecs", None)
        if specs is not None:
            pm.add_hookspecs(specs)
        pm.register(plugin, name=ep.name)


def load(extra: list | tuple = ()) -> Plugins:
    """Build a plugin manager: host built-ins, entry points, then ``extra`` objects."""
    from htfl_plugins import builtins as host_builtins

    pm = pluggy.PluginManager("htfl")
    pm.add_hookspecs(hookspecs)
    pm.register(host_builtins, name="htfl_plugins")
    _load_entry_points(pm)
    for obj in extra:
        specs = getattr(obj, "htfl_hookspecs", None)
        if specs is not None:
            pm.add_hookspecs(specs)
        pm.register(obj)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {exc.plugin!r} implements an unknown hook: {exc}") from exc
    return Plugins(pm)


def get_plugins() -> Plugins:
    """The process-wide plugin set (loaded once)."""
    global _CACHE
    if _CACHE is None:
        _CACHE = load()
    return _CACHE


def reset() -> None:
    """Forget the cached plugin set (tests, or after installing a plugin at run time)."""
    global _CACHE
    _CACHE = None
