"""A small language model trained here to solve the studies' tasks: the model organism.

No pretrained language model can be downloaded on the machines qktrace is developed on, and
random-weight models only test mechanics. The organism is a 3-layer Llama (grouped-query
attention, RoPE) with a word-level tokenizer, trained on CPU in minutes on the studies' own
prompts (`qktrace.organism.data`): the boxes binding task and list filtering. It ships in
``data/organism/`` and opens like any Hugging Face checkpoint::

    import qktrace
    from qktrace import organism
    model = qktrace.load(organism.path())            # or qktrace.load("data/organism")
    organism.evaluate()                               # held-out accuracy per task and size

Commands::

    python -m qktrace.organism.train --out data/organism   # retrain (seeded, ~10 min, 2 cores)
    qktrace organism eval                                  # held-out accuracy of the shipped one
    python -m qktrace.organism eval                        # the same

It is the default model of ``qktrace study ...`` (no ``--model``), with these heads.

``HEADS`` holds the heads whose last-token attention goes to the answer (found with
`qktrace.find_heads`, see ``data/organism/CARD.md``), the organism's defaults for the studies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["path", "evaluate", "heads", "HEADS"]


def path() -> Path:
    """The shipped checkpoint directory, ``data/organism`` (pass it to `qktrace.load`)."""
    from qktrace.prompts import data_path

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


def __getattr__(name: str) -> Any:
    if name == "HEADS":
        return heads()
    raise AttributeError(f"module 'qktrace.organism' has no attribute {name!r}")


def evaluate(*args: Any, **kwargs: Any) -> Any:
    """Held-out accuracy per task and size; see `qktrace.organism.evaluation.evaluate`."""
    from .evaluation import evaluate as _evaluate

    return _evaluate(*args, **kwargs)
