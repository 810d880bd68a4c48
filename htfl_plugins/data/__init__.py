"""Data: sources, partitioners and the on-disk scenario cache (PFLlib's format)."""

from htfl_plugins.data.scenario import load_scenario
from htfl_plugins.data.types import ClientData, RawData, Scenario, batches

__all__ = ["ClientData", "RawData", "Scenario", "batches", "load_scenario"]
