"""Every bad input a researcher might give gets an error that says what is wrong and names the fix.

One test per row of the table in docs/errors.md, "Bad input and the errors it gets" (the test
id is the row's name). API rows check the exception type and message; CLI rows check that the command
exits non-zero with one ``Error: ...`` line on stderr and no traceback.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

import qktrace
import qktrace.model.testing as testing
import qktrace.verbs.reduce as sums_module
from qktrace.cli import app
from qktrace.core.prompts import Prompt, locate
from qktrace.model.loading import load, parse_heads
from qktrace.store.files import MANIFEST
from tests.conftest import tiny

PROMPTS = ["The apple is in Box A, the cat is in Box B", "Which box is the cat in? Box"]
KEYS = [[1, 2], [2, 3]]
LABELS = [[("fruit", "positive"), ("fruit", "negative")]] * 2
# a tiny order-id run on the CLI: 4 prompts in 2 batches of 2
STUDY = ["--n-prompts", "4", "--n-test", "2", "--n-pairs", "2", "--n-random", "1"]
STUDY += ["--batch-size", "2", "--no-figures", "--quiet"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> SimpleNamespace:
    """A tiny Llama (in memory and as a checkpoint) and stores to resume or open."""
    tmp = tmp_path_factory.mktemp("bad")
    net, tok = tiny("llama")
    llama = load(net, tokenizer=tok)
    capture_store = tmp / "capture.zarr"
    qktrace.capture(llama, PROMPTS, "1.0", keys=KEYS, out=capture_store, progress=False)
    sums_store = tmp / "sums.zarr"
    qktrace.reduce(llama, PROMPTS, "1.0", LABELS, keys=KEYS, out=sums_store, progress=False)
    damaged = tmp / "damaged.zarr"
    damaged.mkdir()
    (damaged / "zarr.json").write_text("{not json")
    empty = qktrace.save(xr.Dataset(), tmp / "empty.zarr")
    return SimpleNamespace(
        tmp=tmp,
        llama=llama,
        tok=tok,
        checkpoint=testing.save_checkpoint(tmp / "tiny-llama", "llama"),
        capture_store=capture_store,
        sums_store=sums_store,
        damaged=damaged,
        empty=empty,
    )


@dataclass
class Row:
    """A bad input: `run(env, tmp_path, monkeypatch)` raises `error` matching `match` (API), or
    returns CLI arguments whose run exits with `code` and an ``Error:`` line matching `match`."""

    id: str
    run: Callable[..., Any]
    match: str
    error: type[BaseException] | None = None  # None: a CLI row
    code: int = 1


def interrupt_reduce_at_batch(monkeypatch, k: int) -> None:
    """Send this process a real SIGINT (Ctrl-C) in the k-th in-trace reduce batch (1-based)."""
    real = sums_module._reduce_batch
    calls = {"n": 0}

    def dies(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == k:
            signal.raise_signal(signal.SIGINT)  # Python's handler raises KeyboardInterrupt
            raise AssertionError("SIGINT did not interrupt the run")
        return real(*args, **kwargs)

    monkeypatch.setattr(sums_module, "_reduce_batch", dies)


def study_interrupted(env, tmp_path, monkeypatch) -> list:
    interrupt_reduce_at_batch(monkeypatch, 2)
    return ["study", "order-id", "-m", env.checkpoint, "--heads", "1.0", "-o", tmp_path, *STUDY]


def study_resumed_with_other_seed(env, tmp_path, monkeypatch) -> list:
    with monkeypatch.context() as m:
        first = CliRunner().invoke(app, [str(a) for a in study_interrupted(env, tmp_path, m)])
    assert first.exit_code == 130, first.output
    assert (tmp_path / "order_id.sums.zarr").exists()  # the first batch's sums are kept
    args = ["study", "order-id", "-m", env.checkpoint, "--heads", "1.0", "-o", tmp_path]
    return [*args, *STUDY, "--seed", "1"]


def no_ndif_key(env, tmp_path, monkeypatch) -> list:
    import nnsight

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    return ["study", "order-id", "-m", env.checkpoint, "--heads", "1.0", "--remote", "-o", tmp_path]


def ndif_key_rejected(env, tmp_path, monkeypatch) -> list:
    import nnsight
    from nnsight import ndif

    monkeypatch.setenv("NDIF_API_KEY", "not-a-real-key")
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    monkeypatch.delenv("QKTRACE_SKIP_NDIF_CHECK", raising=False)
    monkeypatch.setattr(ndif, "whoami", lambda *a, **k: {"email": None, "tags": []})
    return ["study", "order-id", "-m", env.checkpoint, "--heads", "1.0", "--remote", "-o", tmp_path]


def requests_keep_failing(env, tmp_path, monkeypatch) -> list:
    """--remote-local, with the simulated NDIF answering the first request and failing all others."""
    from nnsight.intervention.backends.local import LocalSimulationBackend
    from nnsight.intervention.backends.remote import RemoteError

    import qktrace.model.remote as remote_module

    real, calls = LocalSimulationBackend.__call__, []

    def call(self, tracer):
        calls.append(1)
        if len(calls) > 1:
            raise RemoteError("simulated: job timed out on the server")
        return real(self, tracer)

    monkeypatch.setattr(LocalSimulationBackend, "__call__", call)
    monkeypatch.setattr(remote_module.time, "sleep", lambda s: None)
    monkeypatch.setattr(
        "qktrace.verbs.reduce.REMOTE_BATCHES_PER_REQUEST", 1
    )  # one batch a request,
    monkeypatch.setattr(
        "qktrace.verbs.reduce.STUDY_REMOTE_BATCHES_PER_REQUEST", 1
    )  # in studies too
    return order_id_cli("--heads", "1.0", "--remote-local", *STUDY)(env, tmp_path, monkeypatch)


def unknown_architecture(env, tmp_path, monkeypatch) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "opt", vocab_size=len(env.tok), hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, ffn_dim=32, word_embed_proj_dim=32, max_position_embeddings=64,
    )  # fmt: skip
    load(AutoModelForCausalLM.from_config(config), tokenizer=env.tok)


def slow_tokenizer(env, tmp_path, monkeypatch) -> None:
    from transformers import ByT5Tokenizer  # a pure-Python tokenizer: no offsets

    net, _ = tiny("llama")
    load(net, tokenizer=ByT5Tokenizer())


def no_positive_keys(env, tmp_path, monkeypatch) -> None:
    negatives = [[("fruit", "negative"), ("fruit", "negative")]] * 2
    qktrace.decompose(
        qktrace.reduce(env.llama, PROMPTS, "1.0", negatives, keys=KEYS, progress=False)
    )


def qwen3():
    net, tok = tiny("qwen3")
    return load(net, tokenizer=tok)


def open_a_file(env, tmp_path, monkeypatch) -> None:
    (tmp_path / "x.zarr").write_text("")
    qktrace.open(tmp_path / "x.zarr")


def capture_into_per_batch_layout(env, tmp_path, monkeypatch) -> None:
    """capture(out=) of a store in the layout qktrace wrote before: one zarr store per batch."""
    old = tmp_path / "old.zarr"
    qktrace.save(qktrace.open(env.capture_store), old / "batch-000000.zarr")
    manifest = {"format": "qktrace-batches", "version": 1, "dim": "prompt", "params": {},
                "attrs": {}, "finalized": False}  # fmt: skip
    (old / MANIFEST).write_text(json.dumps(manifest))
    qktrace.capture(env.llama, PROMPTS, "1.0", keys=KEYS, out=old, progress=False)


def damaged_store(env, tmp_path, monkeypatch) -> list:
    """`qktrace show` of a store with a variable folder deleted (zarr would read it as zeros)."""
    import shutil

    copy = tmp_path / "sums.zarr"
    shutil.copytree(env.sums_store, copy)
    shutil.rmtree(copy / "pair_count")
    return ["show", copy]


def model_folder(env, tmp_path, how: str) -> Path:
    """A copy of the tiny checkpoint without its weights, or with them cut in half."""
    import shutil

    folder = tmp_path / f"model-{how}"
    shutil.copytree(env.checkpoint, folder)
    weights = folder / "model.safetensors"
    if how == "no-weights":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


_HELD: list = []  # locks held for the rest of the session (each on its own tmp_path)


def output_busy(env, tmp_path, monkeypatch) -> list:
    """A second run on an output another live run is writing: this process holds its lock."""
    from qktrace.store.locks import writing

    lock = writing(tmp_path / "order_id.zarr")
    lock.__enter__()
    _HELD.append(lock)
    return order_id_cli("--heads", "1.0", *STUDY)(env, tmp_path, monkeypatch)


def sums_with(value: float):
    def run(env, *_):
        sums = qktrace.reduce(env.llama, PROMPTS, "1.0", LABELS, keys=KEYS, progress=False)
        sums["qk_sum"][0, 0, 1, 2, 3] = value
        qktrace.decompose(sums)

    return run


def cli(*args: Any) -> Callable[..., list]:
    return lambda env, tmp_path, monkeypatch: [
        getattr(env, a[1:]) if isinstance(a, str) and a.startswith("@") else a for a in args
    ]


def order_id_cli(*flags: Any) -> Callable[..., list]:
    return lambda env, tmp_path, monkeypatch: [
        "study", "order-id", "-m", env.checkpoint, "-o", tmp_path, *flags,
    ]  # fmt: skip


ROWS = [
    # heads
    Row("heads-malformed", order_id_cli("--heads", "16-19"),
        r"--heads: Malformed head: '16-19'; write heads as LAYER\.HEAD .* e\.g\. --heads 16\.19", code=2),
    Row("heads-not-numbers", order_id_cli("--heads", "a.b"),
        r"Malformed head: 'a\.b'; write heads as LAYER\.HEAD \(two integers\)", code=2),
    Row("heads-empty", order_id_cli("--heads", ""),
        r"No heads given \(got ''\): write heads as LAYER\.HEAD", code=2),
    Row("heads-trailing-comma", lambda *_: parse_heads("16.19,"),
        r"an empty entry in '16\.19,'; write heads as LAYER\.HEAD", ValueError),
    Row("heads-bad-pair", lambda *_: parse_heads([(16,)]),
        r"Malformed head \(16,\): give a \(layer, head\) pair of non-negative ints", ValueError),
    Row("layer-out-of-range", lambda env, *_: qktrace.capture(env.llama, PROMPTS, "7.0"),
        r"Layer 7 is out of range: .* has layers 0\.\.1; pick a layer .* 0\.0 to 1\.3", ValueError),
    Row("head-out-of-range", order_id_cli("--heads", "1.9", *STUDY),
        r"Head 1\.9 is out of range: .* heads 0\.\.3 .*; pick heads from 0\.0 to 1\.3", code=2),
    # command line
    Row("unknown-study", cli("study", "orderid", "-m", "x", "-o", "out"),
        r"unknown study 'orderid' \(did you mean 'order-id'\?\); choose one of filter-heads, "
        r"order-id, lexical", code=2),
    Row("remote-and-remote-local", order_id_cli("--remote", "--remote-local"),
        r"--remote .* and --remote-local .* exclude each other; give one of them", code=2),
    Row("remote-bad-value", lambda env, *_: load(env.checkpoint, remote="ndif"),
        r"remote must be False, 'local' or True, not 'ndif'", ValueError),
    Row("ndif-key-missing", no_ndif_key,
        r"NDIF_API_KEY is not set\. Get a key at https://login\.ndif\.us.*--remote-local"),
    Row("ndif-key-rejected", ndif_key_rejected,
        r"NDIF did not accept the API key in NDIF_API_KEY \(for .*tiny-llama\)\. Check the key at "
        r"https://login\.ndif\.us"),
    Row("ndif-request-keeps-failing", requests_keep_failing,
        r"The request for prompts 2\.\.3 failed 4 times; last error: simulated: job timed out on "
        r"the server\. The sums of prompts 0\.\.1 are saved in .*order_id\.sums\.zarr: rerun the "
        r"same call \(CLI: the same command\) to resume\."),
    Row("model-path-missing", cli("study", "order-id", "-m", "./no-such-model", "--heads", "1.0",
                                  "-o", "out"),
        r"No model at \./no-such-model: the local path does not exist\. Check the path"),
    Row("unknown-architecture", unknown_architecture,
        r"Unsupported architecture model_type='opt'\. Supported: .*llama.*register_adapter",
        ValueError),
    Row("slow-tokenizer", slow_tokenizer,
        r"is a ByT5Tokenizer, a slow \(pure-Python\) tokenizer; .* "
        r"Pass tokenizer=AutoTokenizer\.from_pretrained", ValueError),
    Row("slow-tokenizer-locate",
        lambda *_: locate(__import__("transformers").ByT5Tokenizer(), [Prompt("a", {})]),
        r"needs a fast tokenizer .* got a ByT5Tokenizer.*AutoTokenizer\.from_pretrained",
        ValueError),
    # stores
    Row("show-missing-store", lambda env, tmp_path, _: ["show", tmp_path / "nope.zarr"],
        r"no qktrace store at .*nope\.zarr: check the path", code=2),
    Row("show-damaged-store", cli("show", "@damaged"),
        r"cannot read the zarr store at .*damaged\.zarr \(JSONDecodeError.*Rerun the command "
        "that wrote it", code=2),
    Row("show-empty-store", cli("show", "@empty"),
        r"empty\.zarr is a zarr store without data variables.*pass a store written by a "
        "qktrace study", code=2),
    Row("open-file-not-store",
        open_a_file,
        r"x\.zarr is a file, not a qktrace store .* pass the path of the \.zarr store itself",
        ValueError),
    Row("capture-out-other-heads",
        lambda env, *_: qktrace.capture(env.llama, PROMPTS, "1.1", keys=KEYS, out=env.capture_store),
        r"capture\.zarr holds batches of a run with different parameters \(heads\):\n  heads: "
        r"stored \['1\.0'\], now \['1\.1'\]\nResume only with the same parameters\. To start over, "
        r"pass a new --out \(Python: a new out= path\) or --overwrite", ValueError),
    Row("capture-out-other-prompts",
        lambda env, *_: qktrace.capture(env.llama, PROMPTS[::-1], "1.0", keys=KEYS,
                                        out=env.capture_store),
        r"different parameters \(prompts_sha256\):\n  prompts_sha256: stored '\w+', now '\w+'",
        ValueError),
    Row("capture-out-other-model",
        lambda env, *_: qktrace.capture(qwen3(), PROMPTS, "1.0", keys=KEYS,
                                        out=env.capture_store),
        r"\n  model: stored 'LlamaForCausalLM', now 'Qwen3ForCausalLM'", ValueError),
    Row("capture-out-per-batch-layout", capture_into_per_batch_layout,
        r"old\.zarr was written by an older qktrace, one zarr store per batch .*It still opens "
        r"with qktrace\.open, but a run cannot resume into it: write this run to a new path",
        ValueError),
    Row("reduce-out-other-keys",
        lambda env, *_: qktrace.reduce(env.llama, PROMPTS, "1.0", LABELS, keys=[[0, 1], [2, 3]],
                                       out=env.sums_store),
        r"sums\.zarr holds the sums of a run with different parameters \(prompts_sha256\):\n  "
        r"prompts_sha256: stored '\w+', now '\w+'\nResume only with the same parameters",
        ValueError),
    Row("reduce-out-other-model",
        lambda env, *_: qktrace.reduce(qwen3(), PROMPTS, "1.0", LABELS, keys=KEYS,
                                       out=env.sums_store),
        r"different parameters \(model.*\):\n  model: stored 'LlamaForCausalLM', now "
        r"'Qwen3ForCausalLM'(.|\n)*a new out= path", ValueError),
    Row("reduce-out-not-sums",
        lambda env, *_: qktrace.reduce(env.llama, PROMPTS, "1.0", LABELS, keys=KEYS,
                                       out=env.capture_store),
        r"capture\.zarr is not a checkpoint of qktrace\.reduce \(it holds batches of a capture, "
        r"written by something else\); pass another out= path", ValueError),
    Row("study-out-other-seed", study_resumed_with_other_seed,
        r"order_id\.sums\.zarr holds the sums of a run with different parameters "
        r"\(prompts_sha256\):"),
    Row("study-interrupted", study_interrupted,
        r"interrupted\. Completed batches are kept next to .*order_id\.zarr; rerun the same "
        "command to resume", code=130),
    # prompts
    Row("no-prompts", lambda env, *_: qktrace.reduce(env.llama, [], "1.0", [], keys=[]),
        r"No prompts given: pass a non-empty list", ValueError),
    Row("prompt-without-tokens",
        lambda env, *_: qktrace.capture(env.llama, [""], "1.0", add_special_tokens=False),
        r"Prompt 0 \(''\) has no tokens: remove it or give it text", ValueError),
    Row("empty-dataset", lambda *_: qktrace.decompose(xr.Dataset()),
        r"the sums have no pair count \(variables: \[\]\); expected 'pair_count'", KeyError),
    Row("key-position-outside-prompt",
        lambda env, *_: qktrace.capture(env.llama, PROMPTS, "1.0", keys=[[0], [99]]),
        r"Key position 99 is outside prompt 1, which has \d+ tokens \(valid: 0\.\.\d+ or "
        r"-\d+\.\.-1\)\. Check how the position was computed", ValueError),
    Row("prompt-longer-than-context",
        lambda env, *_: qktrace.capture(env.llama, ["ok", "apple " * 300], "1.0"),
        r"Prompt 1 has \d+ tokens, more than .* context of 256: shorten it", ValueError),
    Row("span-not-found",
        lambda env, *_: locate(env.tok, [Prompt("The cat", {"object": [(4, 20)]})], chat=False),
        r"Prompt 0 \('The cat'\): span 'object' \(4, 20\) is not a non-empty range inside the "
        "text .*build prompts with PromptBuilder", ValueError),
    # the contrast and the method's parameters
    Row("no-positive-keys", no_positive_keys,
        r"No positive pairs for head='1\.0', feature='fruit': .* Add positive pairs", ValueError),
    Row("too-few-prompts-for-categories",
        lambda env, tmp_path, _: ["study", "filter-heads", "-m", env.checkpoint, "--heads", "1.0",
                                  "--n-prompts", "3", "-o", tmp_path],
        r"n_prompts=3 \(CLI --n-prompts\) is too few: .* 5 categories, .* without positive keys"
        r".*; pass n_prompts >= 5", code=2),
    Row("one-box-pair", order_id_cli("--heads", "1.0", "--n-pairs", "1"),
        r"n_pairs=1 \(CLI --n-pairs\) must be between 2 and 26: the other boxes' keys are the "
        "negatives", code=2),
    Row("threshold-zero", order_id_cli("--heads", "1.0", "--threshold", "0"),
        r"threshold=0\.0 \(CLI --threshold\) is outside \(0, 1\] .*; pass e\.g\. 0\.99", code=2),
    Row("threshold-above-one", lambda *_: qktrace.verbs.decompose.rank_for_threshold([1.0], 1.5),
        r"threshold=1\.5 is outside \(0, 1\]: it is the fraction of sum\(S\^2\) the kept "
        r"components hold; pass e\.g\. threshold=0\.99", ValueError),
    Row("batch-size-zero", order_id_cli("--heads", "1.0", "--batch-size", "0"),
        r"batch_size=0 \(CLI --batch-size\) is below 1; pass e\.g\. 16", code=2),
    Row("basis-wrong-shape",
        lambda env, *_: qktrace.intervene(env.llama, PROMPTS, "1.0", np.ones((2, 16, 3)),
                                          orig=[1, 1], target=[2, 2]),
        r"has shape \(2, 16, 3\); expected \[d_head, r\] = \[16, r\] .* not their transposes",
        ValueError),
    # argument checks (qktrace.core.checks): wrong types and values at every public verb
    Row("prompts-a-string", lambda env, *_: qktrace.capture(env.llama, "The cat sat", "1.0"),
        r"prompts is a single str \('The cat sat'\), not a list of prompts: iterating it would "
        r"run one prompt per character; pass \['The cat sat'\] for one prompt", TypeError),
    Row("reduce-prompts-a-string",
        lambda env, *_: qktrace.reduce(env.llama, "The cat sat", "1.0", LABELS, keys=KEYS),
        r"prompts is a single str", TypeError),
    Row("key-position-not-integer",
        lambda env, *_: qktrace.capture(env.llama, PROMPTS, "1.0", keys=[[1.9], [1]]),
        r"keys\[0\] holds 1\.9 \(float\), not a token position; positions are ints", TypeError),
    Row("key-position-half",
        lambda env, *_: qktrace.capture(env.llama, PROMPTS, "1.0", keys=[[0.5], [1]]),
        r"keys\[0\] holds 0\.5 \(float\), not a token position", TypeError),
    Row("query-position-float",
        lambda env, *_: qktrace.capture(env.llama, PROMPTS, "1.0", query=[1.5, 2], keys=KEYS),
        r"query\[0\] holds 1\.5 \(float\), not a token position", TypeError),
    Row("sums-with-inf", sums_with(np.inf),
        r"sums\['qk_sum'\] holds inf at head='1\.0', feature='fruit', contrast='negative', dq=2, "
        r"dk=3 \(1 non-finite value in all\); an SVD of it would be meaningless", ValueError),
    Row("sums-with-nan", sums_with(np.nan),
        r"sums\['qk_sum'\] holds nan at head='1\.0'.*recompute the sums", ValueError),
    Row("seed-negative", order_id_cli("--heads", "1.0", "--seed", "-1"),
        r"seed=-1 \(CLI --seed\) is negative \(numpy seeds are >= 0\); pass e\.g\. 0", code=2),
    Row("toy-seed-negative", cli("toy", "-o", "out", "--seed", "-1"),
        r"seed=-1 \(CLI --seed\) must be >= 0; pass e\.g\. 0", code=2),
    Row("categories-duplicate",
        lambda env, tmp_path, _: ["study", "filter-heads", "-m", env.checkpoint, "--heads", "1.0",
                                  "--categories", "fruit,animal,fruit", "-o", tmp_path],
        r"categories \(CLI --categories\) lists 'fruit' more than once \(\['fruit', 'animal', "
        r"'fruit'\]\); give each once", code=2),
    # --out
    Row("out-empty", lambda env, tmp_path, _: ["study", "order-id", "-m", env.checkpoint, "-o", ""],
        r"--out is empty; pass a directory for the results", code=2),
    Row("out-a-file",
        lambda env, tmp_path, _: (tmp_path / "afile").write_text("x") and
        ["study", "order-id", "-m", env.checkpoint, "-o", tmp_path / "afile"],
        r"--out .*afile is a file; pass a directory \(created if missing\)", code=2),
    Row("out-a-store", lambda env, tmp_path, _: ["study", "order-id", "-m", env.checkpoint,
                                                 "-o", env.sums_store],
        r"--out .*sums\.zarr is itself a qktrace store; pass the folder that holds it", code=2),
    Row("out-busy", output_busy,
        r"another run is writing .*order_id\.zarr \(process \d+ holds \.order_id\.zarr\.lock\); "
        r"wait for it to finish, or pass another output folder"),
    # models and stores that are damaged
    Row("model-without-weights",
        lambda env, tmp_path, _: ["study", "order-id", "-m", model_folder(env, tmp_path, "no-weights"),
                                  "--heads", "1.0", "-o", tmp_path / "out"],
        r"No weights in .*model-no-weights: it has \[.*\] but no model\.safetensors"),
    Row("model-weights-truncated",
        lambda env, tmp_path, _: ["study", "order-id", "-m", model_folder(env, tmp_path, "cut"),
                                  "--heads", "1.0", "-o", tmp_path / "out"],
        r"Cannot load the weights of .*model-cut: SafetensorError: .*A truncated or damaged "
        r"weights file"),
    Row("show-store-variable-deleted", damaged_store,
        r"sums\.zarr is damaged: variable 'pair_count': its folder is missing\. Read as is, the "
        r"missing pieces would come back as fill values .*Rewrite it with: "),
]  # fmt: skip


def errors_table() -> str:
    return (Path(__file__).parents[1] / "docs" / "errors.md").read_text()


def quoted_message(row_id: str) -> str:
    """The message docs/errors.md quotes for a row: the first code span of its second cell."""
    for line in errors_table().splitlines():
        if f"`test_bad_input[{row_id}]`" in line:
            cell = line.split(" | ")[1]
            quoted = re.search(r"``(.+?)``|`([^`]+)`", cell)
            assert quoted, f"the docs/errors.md row {row_id} quotes no message"
            return quoted[1] or quoted[2]
    raise AssertionError(f"no docs/errors.md row for test_bad_input[{row_id}]")


def _plain(text: str) -> str:
    """Paths cut to their last part, OUT/ dropped, whitespace collapsed: how the table quotes."""
    text = re.sub(r"(?:/[^\s/:'\"]+)+/([^\s/:'\"]+)", r"\1", text).replace("OUT/", "")
    return " ".join(text.split())


def assert_quoted_in_docs(row_id: str, message: str) -> None:
    """Every piece of the page's (abridged) quote is in the message the code gives now.

    The quote is split where it abridges ("...", "…") or names a placeholder ("<model>").
    """
    actual = _plain(message)
    for piece in re.split(r"\.\.\.|…|<[^>]+>", quoted_message(row_id)):
        piece = _plain(piece).strip(" .;:,")
        if len(piece) >= 4:
            assert piece in actual, f"docs/errors.md quotes {piece!r}; the code says {actual!r}"


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths (CLI "out", "./no-such-model") land here
    if row.error is not None:
        with pytest.raises(row.error) as err:
            row.run(env, tmp_path, monkeypatch)
        message = err.value.args[0] if err.value.args else str(err.value)
        assert re.search(row.match, str(message)), message
        assert_quoted_in_docs(row.id, str(message))
        return
    args = [str(a) for a in row.run(env, tmp_path, monkeypatch)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == row.code, result.output + repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    assert re.search(row.match, errors[0]), errors[0]
    assert_quoted_in_docs(row.id, result.stderr.split("Error: ", 1)[1])


def test_every_row_is_in_the_errors_table():
    ids = re.findall(r"`test_bad_input\[([\w-]+)\]`", errors_table())
    assert sorted(ids) == sorted(r.id for r in ROWS)
