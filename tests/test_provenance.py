"""Every result says how it was made: the same provenance keys on the output of every verb.

`qktrace.provenance` is the one helper; a verb that built its attrs by hand (or forgot
them) is missing keys here. The study stores and the toy store are checked where they are
written (tests/test_pipeline.py, tests/test_toy.py).
"""

from __future__ import annotations

import pytest

import qktrace
from qktrace.store.identity import PROVENANCE_KEYS

VERBS = {
    "capture": "capture",
    "reduce": "reduce",
    "decompose": "decompose",
    "find_heads": "find_heads",
    "intervene": "intervene",
    "intervene_captured": "intervene_captured",
    "intervene_answers": "intervene_answers",
    "attribute": "attribute",
    "evaluate": "evaluate",
    "toy": "toy",
}
# the model facts a result of a model run carries (the toy trains its own model)
MODEL_FACTS = ("model", "dtype", "remote", "d_head")


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_attaches_the_same_provenance(every_verb, verb):
    attrs = every_verb[verb].attrs  # saved and read back
    missing = [key for key in PROVENANCE_KEYS if key not in attrs]
    assert not missing, f"{verb} lacks provenance {missing}: build its attrs with provenance()"
    assert attrs["verb"] == VERBS[verb]
    assert attrs["qktrace_version"] == qktrace.__version__ and attrs["torch_version"]
    assert isinstance(attrs["params"], dict) and attrs["params"], verb
    assert attrs["date"].endswith("+00:00")
    if verb != "toy":
        facts = {key: attrs[key] for key in MODEL_FACTS}
        assert facts == {"model": "LlamaForCausalLM", "dtype": "float32", "remote": "local",
                         "d_head": 16}, verb  # fmt: skip


def test_results_computed_from_a_result_keep_its_model_and_name_it(every_verb):
    for verb, made_from in (("decompose", "reduce"), ("intervene_captured", "capture"),
                            ("attribute", "capture")):  # fmt: skip
        params = every_verb[verb].attrs["params"]
        assert params["input"]["verb"] == made_from, verb
        assert params["input"]["params"] == every_verb[made_from].attrs["params"], verb


def test_seed_is_recorded_where_there_is_one(every_verb):
    assert every_verb["intervene"].attrs["seed"] == 0
    assert every_verb["intervene_answers"].attrs["seed"] == 0
    assert every_verb["evaluate"].attrs["seed"] == 10_000
    assert every_verb["capture"].attrs["seed"] is None  # capture draws nothing at random
