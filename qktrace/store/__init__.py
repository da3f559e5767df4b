"""The result format: labelled xarray Datasets in zarr, with provenance, integrity records and
the writers' locks.

`qktrace.save` and `qktrace.open` are the verbs; the names below are for code that writes
stores batch by batch (`BatchWriter`) or handles their errors.
"""

from qktrace.store.io import (
    BatchWriter,
    DifferentRunError,
    StoreDamagedError,
    StoreReplacedError,
    check_same_run,
    open,
    provenance,
    rewritten_by,
    save,
)

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
