"""The result format: labelled xarray Datasets in zarr, with provenance, integrity records and
the writers' locks.

`qktrace.save` and `qktrace.open` are the verbs; the names below are for code that writes
stores batch by batch (`BatchWriter`) or handles their errors. `qktrace.store.io` describes the
format and lists the modules that implement it.
"""

from qktrace.store.identity import DifferentRunError, check_same_run, provenance
from qktrace.store.integrity import StoreDamagedError, rewritten_by
from qktrace.store.io import open, save
from qktrace.store.reading import StoreReplacedError
from qktrace.store.writer import BatchWriter

__all__ = [
    "provenance",
    "save",
    "open",
    "BatchWriter",
    "StoreDamagedError",
    "rewritten_by",
    "check_same_run",
    "DifferentRunError",
    "StoreReplacedError",
]
