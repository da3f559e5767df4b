"""One vocabulary across every store qktrace writes: each dim has one meaning, a name means the
same thing (over the same dims) wherever it appears, and the synonyms other modules once used do
not come back.

The stores checked: the three studies' stores with everything the pipeline adds (answer-level
swaps, the permutation null, the key PCA; read from the fingerprints of tests/data, which
`test_a_built_in_study_writes_the_store_it_wrote_before_the_pipeline` checks against fresh runs),
the pipeline's head ranking, the toy store (one cell of it), and the output of every verb:
capture, reduce, decompose, find_heads, intervene, intervene_captured, intervene_answers,
attribute, evaluate (eval.zarr). The verb outputs come from the `every_verb` fixture
(tests/conftest.py).
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
    "component": "a column of a subspace basis: an SVD component of ΔC (never a logit part)",
    "part": "a part of an attention logit in attribution (a feature, or 'residual')",
    "dq": "a query dimension of ΔC [dq, dk]",
    "dk": "a key dimension of ΔC",
    "d_head": "a dimension of a q or k vector (in the toy store: the head width of each model)",
    "pc": "a principal component of the keys in the subspace",
    "subspace": "the swapped subspace, then its random draws (attention level)",
    "answer_subspace": "the swapped subspace, then its random draws (answer level)",
    "answer_heads": "the heads edited together for an answer-level swap ('all': every head)",
    "answer_candidate": "a candidate answer of a prompt (in a study store)",
    "candidate": "a candidate answer of a prompt (intervene_answers)",
    "task": "a task group of the evaluation (eval.zarr): 'boxes n=3', 'filter all', ...",
    # the toy store: a grid of trained one-head models
    "variant": "toy: discrete or continuous latents",
    "N": "toy: the rank of latent z1",
    "M": "toy: the rank of latent z2",
    "seed": "toy: the seed of a trained model",
    "latent": "toy: the latent whose subspace is recovered (z1, z2), the toy's feature",
    "random_subspace": "toy: a random baseline of a recovered subspace (random_z1, ...)",
    "draw": "toy: one random draw of a random baseline",
    "role": "toy: query or key vectors in the PCA",
    "point": "toy: an episode in the PCA",
    "query_latent": "toy: a latent coordinate on the query side of G",
    "key_latent": "toy: a latent coordinate on the key side of G",
}
# names other modules once used for the same things -> the name every store uses
SYNONYMS = {
    "recovered_rank": "rank",
    "n_significant": "null_rank",
    "target_attention": "mean_attention_target_after",
    "pca_explained_variance": "pc_variance_ratio",
    "explained_variance": "pc_variance_ratio",
}
# the variables over a basis' component dim, and over attribution's part dim
COMPONENT_VARIABLES = {"singular_values", "query_basis", "key_basis", "null_quantile",
                       "null_singular_values", "component", "basis"}  # fmt: skip
PART_VARIABLES = {"logit_part", "part_rank", "part"}
# dims along which a store stacks results that another store holds one of
STACKED = {"head", "answer_heads"}
TOY_GRID = {"variant", "d_head", "N", "M", "seed"}  # one trained model per cell
# the same dim under a store's own name: the toy's latents are its features; a study store holds
# attention- and answer-level swaps, so intervene_answers' dims are renamed there
SAME_DIM = {"latent": "feature", "answer_subspace": "subspace", "answer_candidate": "candidate"}

FINGERPRINTS = {
    p.name.split(".")[0]: p
    for p in sorted((Path(__file__).parent / "data").glob("*.fingerprint.json"))
}
VERB_STORES = ["capture", "reduce", "decompose", "find_heads", "intervene", "intervene_captured",
               "intervene_answers", "attribute", "evaluate", "toy", "ranking"]  # fmt: skip
STORES = [*FINGERPRINTS, *VERB_STORES]


@pytest.fixture(scope="module")
def every_store(every_verb) -> dict[str, dict[str, tuple[str, ...]]]:
    """{store: {variable or coordinate: its dims}}."""
    stores = {
        name: {v: tuple(entry["dims"]) for v, entry in json.loads(path.read_text()).items()}
        for name, path in FINGERPRINTS.items()
    }
    for name in VERB_STORES:
        ds = every_verb[name]
        stores[name] = {str(v): tuple(map(str, ds[v].dims)) for v in ds.variables}
    return stores


def problems(variables: dict[str, tuple[str, ...]]) -> list[str]:
    """What breaks the vocabulary in one store."""
    found = []
    for name, dims in variables.items():
        if unknown := set(dims) - set(DIMS):
            found.append(f"{name}: dims without a meaning {sorted(unknown)}")
        if name in SYNONYMS:
            found.append(f"{name}: say {SYNONYMS[name]!r}")
        if "component" in dims and name not in COMPONENT_VARIABLES:
            found.append(f"{name}: over 'component' (a basis column), but not a basis variable")
        if "part" in dims and name not in PART_VARIABLES:
            found.append(f"{name}: over 'part' (a logit part), but not an attribution variable")
    return found


@pytest.mark.parametrize("name", STORES)
def test_every_name_of_every_store_has_one_meaning(every_store, name):
    assert not problems(every_store[name]), problems(every_store[name])


def core(dims: tuple[str, ...], store: str = "") -> set[str]:
    return {SAME_DIM.get(d, d) for d in dims} - STACKED - (TOY_GRID if store == "toy" else set())


def test_a_name_has_the_same_dims_in_every_store(every_store):
    """Up to stacking (per head, per toy model) and a dim a store holds one of: `rank` over
    (head, feature) here and over (head, component) there would be two meanings of `rank`."""
    seen: dict[str, tuple[str, set[str]]] = {}
    clashes = []
    for store_name, variables in every_store.items():
        for name, dims in variables.items():
            if name in seen:
                first, other = seen[name]
                mine = core(dims, store_name)
                if not (mine <= other or other <= mine):
                    clashes.append(
                        f"{name}: {sorted(other)} in {first}, {sorted(mine)} in {store_name}"
                    )
            else:
                seen[name] = (store_name, core(dims, store_name))
    assert not clashes, "\n".join(clashes)


def test_n_pairs_counts_object_box_pairs_only(every_verb):
    """In the binding studies and eval.zarr `n_pairs` is object-box pairs per prompt; the toy's
    contrast pairs have a name of their own."""
    assert "n_pairs" not in every_verb["toy"].attrs["params"]
    assert "n_contrast_pairs" in every_verb["toy"].attrs["params"]
    assert set(every_verb["evaluate"]["n_pairs"].dims) == {"task"}


def test_the_check_catches_a_synonym_and_a_second_meaning():
    """The checks above can fail: the toy's old names, attribution's old `component` dim."""
    assert problems({"recovered_rank": ("variant", "latent", "seed")})
    assert problems({"logit_part": ("prompt", "head", "query", "key", "component")})
    assert problems({"rank": ("head", "part")})
    assert not core(("head", "feature")) <= core(("head", "component"))
    assert problems({"x": ("sample",)})


def test_the_vocabulary_covers_the_studies_the_toy_and_every_verb():
    assert set(FINGERPRINTS) >= {"order_id", "filter_heads", "lexical"}
    assert set(VERB_STORES) >= {"capture", "reduce", "decompose", "find_heads", "intervene",
                                "intervene_answers", "attribute", "evaluate", "toy"}  # fmt: skip
