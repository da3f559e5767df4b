"""Passes that read no model output stop the forward at the last layer they read.

Forward hooks on the tiny Llama's last decoder layer and unembedding count the modules that ran:
capture, reduce (one trace, and a session of several), find_heads over chosen layers and
intervene (without verify) read heads of layer 0 of 2 and must run neither; a pass that reads
the model's output (intervene's verify, the answer-level edit) must run both. Equality of the
results with the full forward is what the other test files and the store fingerprints check.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny

import qktrace
from qktrace.model.loading import load

PROMPTS = ["The apple is in Box A, the cat is in Box B.", "Which box is the cat in? Box"]
KEYS = [[1, 2, 3, 4], [1, 2, 3, 4]]
LABELS = [[("a", "positive"), ("a", "negative"), ("b", "positive"), ("b", "negative")]] * 2
QUIET = {"progress": False}


@pytest.fixture
def ran():
    """(model factory, list of the late modules that ran): 'layer' and 'unembed' entries."""
    net, tok = tiny("llama")
    seen: list[str] = []
    hooks = [
        net.model.layers[-1].register_forward_pre_hook(lambda *a: seen.append("layer")),
        net.lm_head.register_forward_pre_hook(lambda *a: seen.append("unembed")),
    ]
    yield (lambda remote, **kw: load(net, tokenizer=tok, remote=remote, **kw)), seen
    for h in hooks:
        h.remove()


def test_reading_passes_stop_after_the_last_layer_read(ran, remote):
    make, seen = ran
    model = make(remote)
    qktrace.capture(model, PROMPTS, "0.1,0.3", keys=KEYS, **QUIET)
    for per_request in (1, 2):
        qktrace.reduce(
            model, PROMPTS, "0.0,0.2", LABELS, keys=KEYS, batch_size=1,
            batches_per_request=per_request, **QUIET,
        )  # fmt: skip
    qktrace.find_heads(model, PROMPTS, [1, 2], keys=KEYS, layers=[0], top=None, **QUIET)
    basis = np.eye(model.d_head)[:, :2]
    qktrace.intervene(model, PROMPTS, "0.1", basis, orig=[1, 1], target=[2, 3], keys=KEYS,
                      n_random=1, **QUIET)  # fmt: skip
    assert seen == []


def test_a_pass_that_reads_the_last_layer_runs_it(ran, remote):
    make, seen = ran
    model = make(remote)
    qktrace.capture(model, PROMPTS, "1.1", keys=KEYS, **QUIET)
    assert seen.count("layer") == 1 and "unembed" not in seen


def test_passes_that_read_the_output_run_in_full(ran):
    make, seen = ran
    model = make(False)
    basis = np.eye(model.d_head)[:, :2]
    qktrace.intervene(model, PROMPTS, "0.1", basis, orig=[1, 1], target=[2, 3], keys=KEYS,
                      n_random=0, verify=True, **QUIET)  # fmt: skip
    assert seen == ["layer", "unembed"]
