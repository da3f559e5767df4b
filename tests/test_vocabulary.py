"""One vocabulary across the language-model study stores: every dim has one meaning, and the
synonyms other modules once used do not come back.

The stores are read from the fingerprints of tests/data (variable -> dims), which
`test_a_built_in_study_writes_the_store_it_wrote_before_the_pipeline` checks against fresh runs;
the toy store (qktrace toy) still has names of its own (`recovered_rank`, ...) and is not
covered yet.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DIMS = {
    "prompt": "a prompt (subspace prompts are summed away; stored prompts are the fresh ones)",
    "key": "a key token of a prompt (the study's key span), padded with NaN",
    "query": "a query token of a prompt",
    "head": "an attention head, 'L.H'",
    "ranked_head": "every head, best first, as find_heads ranked them",
    "feature": "a feature of the contrasts (a category, 'order', 'lexical', ...)",
    "contrast": "positive or negative pairs of a contrast",
    "component": "an SVD component of a feature's ΔC (never a logit part)",
    "part": "a part of an attention logit in attribution (a feature, or 'residual')",
    "dq": "a query dimension of ΔC [dq, dk]",
    "dk": "a key dimension of ΔC",
    "d_head": "a dimension of a captured q or k vector",
    "pc": "a principal component of the keys in the subspace",
    "subspace": "the swapped subspace, then its random draws (attention level)",
    "answer_subspace": "the swapped subspace, then its random draws (answer level)",
    "answer_heads": "the heads edited together for an answer-level swap ('all': every head)",
    "answer_candidate": "a candidate answer of a prompt",
}
# names other modules used for the same things; the stores say rank, null_rank, pc_variance_ratio
SYNONYMS = {"recovered_rank", "n_significant", "target_attention", "pca_explained_variance"}
# the variables over the SVD's component dim
COMPONENT_VARIABLES = {"singular_values", "query_basis", "key_basis", "null_quantile",
                       "null_singular_values", "component"}  # fmt: skip

STORES = sorted((Path(__file__).parent / "data").glob("*.fingerprint.json"))


@pytest.mark.parametrize("fingerprint", STORES, ids=lambda p: p.name.split(".")[0])
def test_every_dim_has_one_meaning(fingerprint):
    variables = json.loads(fingerprint.read_text())
    used = {dim for v in variables.values() for dim in v["dims"]}
    assert used <= set(DIMS), f"dims without a meaning in the vocabulary: {used - set(DIMS)}"
    assert not SYNONYMS & set(variables)
    over_components = {name for name, v in variables.items() if "component" in v["dims"]}
    assert over_components <= COMPONENT_VARIABLES, over_components - COMPONENT_VARIABLES


def test_the_vocabulary_covers_the_three_studies():
    assert {p.name.split(".")[0] for p in STORES} >= {"order_id", "filter_heads", "lexical"}
