"""What the paper's studies choose the same way: their heads and sizes per model.

The shared method (output, null, PCA, swaps, answer-level effects, figures) is the library's:
`qktrace.study.tools` and `qktrace.study.pipeline`.
"""

from __future__ import annotations

import os

from qktrace.model.loading import Model
from qktrace.study.tools import ModelLike, is_organism

# Heads the paper reports for Llama-3.1-8B-Instruct, used when no heads are given for it.
PAPER_MODEL = "llama-3.1-8b-instruct"
PAPER_HEADS = {
    "filter_heads": "16.19,20.26,20.14",
    "binding": "16.1,17.24,20.1,16.8,16.19,20.13,20.14,22.14,24.27",
}


# The default model: the organism shipped in data/organism (`qktrace.organism`), which runs
# offline on a CPU. Its default sizes keep each study under a minute on 2 idle CPU cores (the
# paper's 2000 / 1000 prompts are for 8B models on GPUs); the heads come from its heads.json.
ORGANISM = "organism"
ORGANISM_SIZES = {  # study -> (n_prompts, n_test)
    "filter_heads": (900, 300),
    "order_id": (900, 270),
    "lexical": (900, 270),
}
PAPER_SIZES = {"filter_heads": (2000, 1000), "order_id": (2000, 500), "lexical": (2000, 500)}
# Named models that run on a CPU (`qktrace.model.checkpoints.NAMED`, e.g. smollm2, 135M parameters):
# sizes that finish in a few minutes per study on 2 idle cores.
CPU_MODEL_SIZES = {"filter_heads": (300, 100), "order_id": (300, 100), "lexical": (300, 100)}


def sizes(
    model: ModelLike, study: str, n_prompts: int | None, n_test: int | None
) -> tuple[int, int]:
    """(n_prompts, n_test): those given, else the organism's defaults or the paper's."""
    from qktrace.model.checkpoints import NAMED

    name = model.name if isinstance(model, Model) else os.fspath(model)
    if is_organism(model):
        table = ORGANISM_SIZES
    elif name in NAMED:
        table = CPU_MODEL_SIZES
    else:
        table = PAPER_SIZES
    default_prompts, default_test = table[study]
    return (
        default_prompts if n_prompts is None else n_prompts,
        default_test if n_test is None else n_test,
    )


def paper_heads(model: Model, study: str) -> tuple[str, str] | None:
    """(heads, where from) for a declared study's ``heads`` hook: the organism's heads on the
    organism, the paper's for its model, else None (the pipeline then runs `find_heads`)."""
    if is_organism(model):
        from qktrace import organism

        return organism.heads(study), ORGANISM
    if PAPER_MODEL in model.name.lower():
        return PAPER_HEADS[study], "paper"
    return None
