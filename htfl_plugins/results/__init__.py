"""Results: one HDF5 file per run (h5py), read back into pandas by :func:`load`."""

from htfl_plugins.results.store import RunRecord, read_run
from htfl_plugins.results.load import load, summarize, compare_table

__all__ = ["RunRecord", "read_run", "load", "summarize", "compare_table"]
