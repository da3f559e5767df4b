"""A small language model trained here to solve the studies' tasks: the model organism.

No pretrained language model can be downloaded on the machines qktrace is developed on, and
random-weight models only test mechanics. The organism is a 3-layer Llama (grouped-query
attention, RoPE) with a word-level tokenizer, trained on CPU in minutes on the studies' own
prompts (`qktrace.organism.data`): the boxes binding task and list filtering. It ships in
``data/organism/`` and opens like any Hugging Face checkpoint::

    import qktrace
    from qktrace import organism
    model = qktrace.load(organism.path())            # or qktrace.load("data/organism")
    organism.held_out_accuracy()                      # held-out accuracy per task and size

Commands::

    python -m qktrace.organism.train --out data/organism   # retrain (seeded, ~10 min, 2 cores)
    qktrace organism eval                                  # held-out accuracy of the shipped one
    python -m qktrace.organism eval                        # the same

It is the default model of ``qktrace study ...`` (no ``--model``), with these heads.

``HEADS`` holds the heads whose last-token attention goes to the answer (found with
`qktrace.find_heads`, see ``data/organism/CARD.md``), the organism's defaults for the studies.
"""

from __future__ import annotations

from typing import Any

from qktrace.core.deprecation import renamed_attributes
from qktrace.model.organism import heads, path

__all__ = ["path", "held_out_accuracy", "heads", "HEADS"]


def __getattr__(name: str) -> Any:
    if name == "HEADS":
        return heads()
    if name == "evaluate":  # its name before 0.2 (`qktrace eval` is the verb), for one release
        return renamed_attributes(__name__, {"evaluate": "held_out_accuracy"})(name)
    raise AttributeError(f"module 'qktrace.organism' has no attribute {name!r}")


def held_out_accuracy(*args: Any, **kwargs: Any) -> Any:
    """Held-out accuracy per task and size; see
    `qktrace.organism.evaluation.held_out_accuracy`."""
    from qktrace.organism.evaluation import held_out_accuracy as _held_out_accuracy

    return _held_out_accuracy(*args, **kwargs)
