"""The payload-retrieval toy model (the paper's §2; docs/results/toy.md): a one-head model whose
feature subspaces are known by construction, so the contrastive-covariance method can be checked
against them.

- `data`: the task (latents z1, z2, payloads, fixed random encoders) and its contrast sets;
- `model`: the single attention head with a linear read-out;
- `train`: AdamW with early stopping on a fixed validation set;
- `analysis`: recovered subspaces and ranks, PCA, swap interventions (`swap_interventions`),
  interaction matrix G.

The study that runs all of it over the grid of ranks is `studies.toy` (``qktrace toy``).
"""

from qktrace.core.deprecation import renamed_attributes
from qktrace.toy.analysis import (
    analyze,
    interaction_matrix,
    pca_on_subspace,
    recover_subspaces,
    swap_interventions,
)
from qktrace.toy.data import PayloadTask
from qktrace.toy.model import PayloadRetrievalHead
from qktrace.toy.train import TrainedModel, train

__all__ = [
    "PayloadRetrievalHead",
    "PayloadTask",
    "TrainedModel",
    "analyze",
    "interaction_matrix",
    "swap_interventions",
    "pca_on_subspace",
    "recover_subspaces",
    "train",
]

# the toy's names before 0.2, kept for one release
__getattr__ = renamed_attributes(__name__, {"intervene": "swap_interventions"})
