"""Where the shipped organism is (``data/organism``) and its default heads.

Its own module so that `qktrace.organism.evaluation` can find the checkpoint without importing
the package that re-exports it (`qktrace.organism`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["path", "heads"]


def path() -> Path:
    """The shipped checkpoint directory, ``data/organism`` (pass it to `qktrace.load`)."""
    from qktrace.core.prompts import data_path

    directory = data_path("organism")
    if not (directory / "config.json").exists():
        raise FileNotFoundError(
            f"No organism checkpoint in {directory}; build it with "
            "`python -m qktrace.organism.train --out data/organism`."
        )
    return directory


def heads(study: str | None = None) -> Any:
    """The organism's default heads: ``{"filter_heads": "L.H,...", "binding": "L.H,..."}``.

    With `study` ("filter_heads", "binding", "order_id" or "lexical"), that study's head spec.
    Read from ``data/organism/heads.json`` (written by the head search of the training run).
    """
    table = json.loads((path() / "heads.json").read_text())["heads"]
    if study is None:
        return table
    key = "binding" if study in ("order_id", "lexical", "order-id") else study.replace("-", "_")
    if key not in table:
        raise ValueError(f"No organism heads for study {study!r}; known: {sorted(table)}.")
    return table[key]
