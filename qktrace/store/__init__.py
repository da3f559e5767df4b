"""The result format: labelled xarray Datasets in zarr, with provenance, integrity records and
the writers' locks.

`qktrace.save` and `qktrace.open` are the verbs; the names below are for code that writes
stores batch by batch (`BatchWriter`) or handles their errors. They are imported on first use,
so that `qktrace.store.locks` (which the command line's help reads) does not import xarray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qktrace.core.lazy import lazy_names

if TYPE_CHECKING:
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

lazy_names(__name__, dict.fromkeys(__all__, "qktrace.store.io"))
