"""Results: one HDF5 file per run (h5py), read back into pandas by :func:`load`."""

from htfl_plugins.results.load import compare_table, load, summarize
from htfl_plugins.results.store import RunRecord, read_run

__all__ = ["RunRecord", "read_run", "load", "summarize", "compare_table"]
