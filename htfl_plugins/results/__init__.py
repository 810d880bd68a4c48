"""Results: one HDF5 file per run (h5py), read back into pandas by :func:`load`."""

from htfl_plugins.results.load import load, summarize
from htfl_plugins.results.store import RunRecord, read_run
from htfl_plugins.results.tables import compare_table, pivot_table, rounds_table, time_table, traffic_table

__all__ = ["RunRecord", "compare_table", "load", "pivot_table", "read_run", "rounds_table", "summarize", "time_table",
           "traffic_table"]
