"""The result format: labelled xarray Datasets in zarr, with provenance, integrity records and
the writers' locks.

`qktrace.save` and `qktrace.open` are the verbs; the names below are for code that writes
stores batch by batch (`BatchWriter`) or handles their errors. `qktrace.store.io` describes the
format and lists the modules that implement it. The names are imported on first use, so that
`qktrace.store.locks` (which the command line's help reads) does not import xarray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qktrace.core.lazy import lazy_names

if TYPE_CHECKING:
    from qktrace.store.identity import DifferentRunError, check_same_run, provenance
    from qktrace.store.integrity import StoreDamagedError, rewritten_by
    from qktrace.store.io import open, save
    from qktrace.store.reading import StoreReplacedError
    from qktrace.store.writer import BatchWriter

# public name -> the module that defines it
_DEFINED_IN = {
    "provenance": "identity",
    "save": "io",
    "open": "io",
    "BatchWriter": "writer",
    "StoreDamagedError": "integrity",
    "rewritten_by": "integrity",
    "check_same_run": "identity",
    "DifferentRunError": "identity",
    "StoreReplacedError": "reading",
}

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

lazy_names(__name__, {name: f"qktrace.store.{module}" for name, module in _DEFINED_IN.items()})
