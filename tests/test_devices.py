"""Every in-trace step of every verb on a model whose weights and activations live on (virtual)
CUDA devices: one GPU, and a model sharded across two (layers 0-1 on cuda:0, 2-3 on cuda:1,
moved between them by forward pre-hooks as accelerate's `device_map` does).

The devices are virtual (`tests/virtual_devices.py`): every tensor computes on the CPU and
carries the device it would be on, and an op mixing devices CUDA would not mix raises. So the
real verbs run end to end and return numbers, which must equal the CPU run's; a client-built
tensor (position index, mask, label, basis, random draw) left on the CPU in any in-trace step
raises here, as it would on a GPU or on NDIF's nodes (`test_a_cpu_index_left_behind_fails`).

Autocast: NDIF runs each request of a half-precision model inside `torch.autocast("cuda",
bfloat16)`; the exact steps (`qktrace.core.ops.exact`) must give the same numbers inside CPU
autocast as without it.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from conftest import tiny
from torch.utils._pytree import tree_map_only
from virtual_devices import MixedDevices, VirtualDevices

import qktrace
from qktrace.core import ops
from qktrace.model.loading import Head, load
from qktrace.study.paired import paired_sums
from qktrace.study.projected import projected_pass
from qktrace.study.prompts import Prepared
from qktrace.verbs.evaluate import evaluate
from qktrace.verbs.intervene import Edit, intervene_captured

PROMPTS = [
    "The apple is in Box A, the cat is in Box B.",
    "Which box is the cat in? Box",
    "The ship is in Box C, the apple is in Box A.",
    "Which box is the apple in? Box",
]
KEYS = [[1, 2, 3, 4]] * 4
LABELS = [[("a", "positive"), ("a", "negative"), ("b", "positive"), ("b", "negative")]] * 4
HEADS = "0.1,1.0,3.3"  # on the sharded model: layers on cuda:0 and on cuda:1
QUIET = {"progress": False}


def _move_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
    """accelerate's AlignDevicesHook in short: a module's tensor inputs go to its device."""
    device = next(module.parameters()).device
    return tree_map_only(torch.Tensor, lambda x: x.to(device), (args, kwargs))


@contextlib.contextmanager
def on_devices(net: torch.nn.Module, sharded: bool):
    """`net`'s weights on cuda:0, or (sharded) its second half on cuda:1, inside the
    virtual devices; the hooks are removed afterwards (the tiny models are cached)."""
    hooks = []
    with VirtualDevices() as devices:
        devices.place(net, "cuda:0")
        if sharded:
            layers = net.model.layers
            second = [*layers[len(layers) // 2 :], net.model.norm, net.lm_head]
            for module in second:
                devices.place(module, "cuda:1")
            for module in [*layers, net.model.norm, net.lm_head]:
                hooks.append(module.register_forward_pre_hook(_move_inputs, with_kwargs=True))
        try:
            yield devices
        finally:
            for hook in hooks:
                hook.remove()


@pytest.fixture(params=["one-gpu", "sharded"])
def placement(request):
    return request.param


def _model(dtype: torch.dtype = torch.float32):
    net, tok = tiny("llama", layers=4)
    return net.to(dtype), load(net, tokenizer=tok)


def _equal(a, b):
    """Two results of a verb: the same variables and values (exactly: both computed on CPU)."""
    assert set(a.data_vars) == set(b.data_vars)
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


def _every_verb(model):
    """{verb: result} of every verb whose steps run in a trace (and intervene_captured)."""
    captured = qktrace.capture(model, PROMPTS, HEADS, keys=KEYS, **QUIET)
    sums = qktrace.reduce(model, PROMPTS, HEADS, LABELS, keys=KEYS, **QUIET)
    basis = qktrace.decompose(sums)["key_basis"].sel(head="1.0", feature="a")
    swap = {"orig": [1] * 4, "target": [2] * 4, "n_random": 2}
    return {
        "capture": captured,
        "reduce": sums,
        "reduce_session": qktrace.reduce(
            model,
            PROMPTS,
            HEADS,
            LABELS,
            keys=KEYS,
            batch_size=2,
            batches_per_request=2,
            **QUIET,
        ),
        "reduce_delta": qktrace.reduce(
            model,
            PROMPTS,
            HEADS,
            LABELS,
            keys=KEYS,
            batch_size=2,
            batches_per_request=0,
            delta=True,
            delta_dtype="float16",
            **QUIET,
        ),
        "find_heads": qktrace.find_heads(
            model, PROMPTS, [1, 2, 1, 2], keys=KEYS, top=None, **QUIET
        ),
        "intervene": qktrace.intervene(
            model, PROMPTS, "3.3", basis, keys=KEYS, verify=True, **swap, **QUIET
        ),
        "intervene_query": qktrace.intervene(
            model,
            PROMPTS,
            "1.0",
            basis,
            keys=KEYS,
            edit=Edit("ablate", side="query"),
            orig=[1] * 4,
            target=[2] * 4,
            n_random=2,
            **QUIET,
        ),
        "intervene_patch": qktrace.intervene(
            model,
            PROMPTS,
            "1.0",
            basis,
            keys=KEYS,
            edit=Edit("patch", source=captured["k"].sel(head="1.0").isel(key=2)),
            orig=[1] * 4,
            target=[2] * 4,
            n_random=2,
            **QUIET,
        ),
        "intervene_captured": intervene_captured(captured, "1.0", basis, **swap),
        "evaluate": evaluate(model, n=2, pairs=(2,), groups=["boxes"], batch_size=2, **QUIET),
        "intervene_answers": qktrace.intervene_answers(
            model,
            PROMPTS,
            {"1.0": basis, "3.3": basis},
            candidates=[[10, 11]] * 4,
            answer=[0, 1, 0, 1],
            target_answer=[1, 0, 1, 0],
            **swap,
            **QUIET,
        ),
    }


def _passes(model):
    """The fresh-prompt pass (`projected_pass`) and the counterfactual pairs (`paired_sums`)
    of a remote study, with their permutation nulls."""
    heads = [Head(1, 0), Head(3, 3)]
    rng = np.random.default_rng(0)
    projection = {h.label: np.linalg.qr(rng.normal(size=(model.d_head, 3)))[0] for h in heads}
    pairs = {"a": [[True, False, True, None]] * 2 + [[False, True, None, True]] * 2}
    captured, null = projected_pass(
        model,
        PROMPTS,
        heads,
        projection,
        query="last",
        keys=KEYS,
        pairs=pairs,
        n_permutations=20,
        batch_size=2,
        **QUIET,
    )
    ids = [model.tokenizer(p)["input_ids"] for p in PROMPTS]
    train = Prepared(
        prompts=[],
        ids=ids,
        keys=[[1, 2]] * 4,
        query="last",
        labels=[[("x",), ("y",)]] * 4,  # type: ignore[list-item]  # paired_sums reads the feature only
        answer=[0, 1, 0, 1],
        swap=[],
        coords={},
        first_keys=[],
        orig_choices=[],
        counterfactual_ids=ids[::-1],
        counterfactual_keys=[[2, 3]] * 4,
    )
    sums, pair_null = paired_sums(model, train, heads, n_permutations=20, batch_size=2, **QUIET)
    return {"projected": captured, "projected_null": null, "paired": sums, "paired_null": pair_null}


def test_every_verb_on_gpus_gives_the_cpu_numbers(placement):
    net, model = _model()
    cpu = {**_every_verb(model), **_passes(model)}
    with on_devices(net, placement == "sharded"):
        assert net.model.layers[-1].self_attn.q_proj.weight.device.type == "cuda"
        gpu = {**_every_verb(model), **_passes(model)}
    for verb in cpu:
        _equal(gpu[verb], cpu[verb])


@pytest.mark.parametrize("remote", [False, "local"], ids=["local", "remote-local"])
def test_capture_and_reduce_on_a_sharded_model(remote):
    """The serialized request (remote="local") meets the devices as NDIF's nodes would: its
    client tensors arrive as plain CPU tensors."""
    net, tok = tiny("llama", layers=4)
    model = load(net, tokenizer=tok, remote=remote)
    cpu = qktrace.reduce(model, PROMPTS, HEADS, LABELS, keys=KEYS, **QUIET)
    with on_devices(net, sharded=True):
        captured = qktrace.capture(model, PROMPTS, HEADS, keys=KEYS, **QUIET)
        sums = qktrace.reduce(model, PROMPTS, HEADS, LABELS, keys=KEYS, **QUIET)
    _equal(sums, cpu)
    assert np.isfinite(captured["attention"].values).any()


def test_a_cpu_index_left_behind_fails(monkeypatch):
    """With the move to the activation's device taken out of `ops`, the tier raises; and
    moving everything to the first GPU only fails the sharded model (its later layers)."""
    net, model = _model()
    monkeypatch.setattr(ops, "near", lambda t, x: t)
    with on_devices(net, sharded=False), pytest.raises(MixedDevices, match="cuda:0"):
        qktrace.capture(model, PROMPTS, HEADS, keys=KEYS, **QUIET)
    monkeypatch.setattr(ops, "near", lambda t, x: t.to("cuda:0"))
    with on_devices(net, sharded=False):
        qktrace.reduce(model, PROMPTS, HEADS, LABELS, keys=KEYS, **QUIET)
    with on_devices(net, sharded=True), pytest.raises(MixedDevices, match="cuda:1"):
        qktrace.reduce(model, PROMPTS, HEADS, LABELS, keys=KEYS, **QUIET)


def test_virtual_devices_raise_as_cuda_does():
    x = torch.zeros(2, 4, 3)
    index = torch.zeros(2, 1, 3, dtype=torch.long)
    with VirtualDevices() as devices:
        devices.place(x, "cuda:0")
        assert x.device == torch.device("cuda:0") and x.is_cuda
        with pytest.raises(MixedDevices, match="same device"):
            x.gather(1, index)
        with pytest.raises(MixedDevices):
            x + torch.ones(3)
        with pytest.raises(MixedDevices, match="cuda:1"):
            x + x.to("cuda:1")
        assert x.gather(1, index.to(x.device)).device == x.device
        assert x[torch.tensor([1])].shape == (1, 4, 3)  # a CPU index into a CUDA tensor is fine
        assert (x * torch.tensor(2.0)).device == x.device  # so is a CPU scalar
        assert x.cpu().device.type == "cpu" and x.device.type == "cuda"


def _organism() -> str | None:
    from qktrace import organism

    try:
        return str(organism.path())
    except FileNotFoundError:
        return None


STUDY_RUN = {"n_prompts": 8, "n_test": 4, "n_random": 1, "n_random_answers": 0,
             "batch_size": 4, "figures": False, "progress": False, "overwrite": True}  # fmt: skip
STUDY_ONLY = {"filter_heads": {"categories": ["fruit", "animal"]}, "lexical": {}}


@pytest.mark.e2e
@pytest.mark.skipif(_organism() is None, reason="no organism checkpoint in data/organism")
@pytest.mark.parametrize("name", ["filter_heads", "lexical"])
def test_a_remote_study_on_a_sharded_model_writes_the_cpu_store(name, tmp_path):
    """A whole study through the simulated NDIF request (ΔC in sessions, the fresh prompts'
    projected pass or the counterfactual pairs with their nulls in the trace) on the organism
    split across cuda:0 (layer 0) and cuda:1 (layers 1-2): the store the CPU run writes."""
    import importlib

    from qktrace.store import io as store

    study = importlib.import_module(f"qktrace.studies.{name}")
    model = qktrace.load(_organism(), remote="local")
    settings = {**STUDY_RUN, **STUDY_ONLY[name]}
    cpu = store.open(study.run(model, out=tmp_path / "cpu", **settings)).load()
    with on_devices(model.lm._module, sharded=True):
        gpu = store.open(study.run(model, out=tmp_path / "gpu", **settings)).load()
    _equal(gpu, cpu)


# Autocast: the steps that must stay exact give the same numbers inside autocast.


def test_every_verb_under_autocast_gives_the_numbers_without_it():
    """A bfloat16 model under CPU autocast (as NDIF runs one under CUDA autocast): every verb
    returns what it does without autocast (the model's own bfloat16 forward is unchanged by it;
    the float32 and float64 steps of qktrace would not be, but for `ops.exact`)."""
    net, tok = tiny("llama", layers=4)
    model = load(net.to(torch.bfloat16), tokenizer=tok)
    try:
        plain = {**_every_verb(model), **_passes(model)}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = {**_every_verb(model), **_passes(model)}
    finally:
        net.float()
    for verb in plain:
        _equal(autocast[verb], plain[verb])


def test_ops_are_exact_under_autocast_and_would_not_be_without_exact(monkeypatch):
    torch.manual_seed(0)
    q = torch.randn(3, 2, 5, 16)
    k = torch.randn(3, 2, 5, 16)
    pos = torch.tensor([[4], [3], [2]])
    w = torch.randn(3, 5, 4)
    basis = torch.linalg.qr(torch.randn(16, 3))[0]

    def steps():
        q_sel = ops.gather_heads(q, [0, 1], pos)
        return [
            *ops.attention_rows(q_sel, k, [0, 1], None, pos, 0.25, None),
            ops.qk_sums(q_sel[:, :, 0], k, w),
            *ops.vector_sums(q_sel[:, :, 0], k, w),
            ops.head_coordinates(k, torch.stack([basis, basis])),
            ops.edit_in_subspace(k[:, 0, :2], basis, "swap"),
            ops.project_out(k, basis),
            *ops.null_cutoffs(
                ops.qk_sums(q_sel[:, :, 0], k, w)[0, 0],
                ops.qk_sums(q_sel[:, :, 0], k, w)[0, 1:],
                0.9,
            ),
        ]

    plain = steps()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = steps()
    for a, b in zip(plain, inside, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    monkeypatch.setattr(ops, "exact", lambda x: contextlib.nullcontext())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        careless = steps()
    assert not torch.equal(careless[0], plain[0])  # float32 logits would turn bfloat16


# bfloat16 end to end: the paper's models run in bfloat16 on NDIF.

BF16_RUN = {"categories": ["fruit", "animal"], "n_prompts": 24, "n_test": 12,
            "n_random": 1, "n_random_answers": 0, "batch_size": 12, "figures": False,
            "progress": False}  # fmt: skip


def bf16_vs_fp32(out) -> dict[str, float]:
    """filter-heads on the organism loaded in float32 and in bfloat16 (same prompts, heads,
    seeds): the largest differences of what the study reports. `docs/performance.md` prints it."""
    from qktrace.store import io as store
    from qktrace.studies import filter_heads

    runs = {}
    for dtype in ("float32", "bfloat16"):
        model = qktrace.load(_organism(), dtype=dtype)
        runs[dtype] = store.open(filter_heads.run(model, out=out / dtype, **BF16_RUN)).load()
    a, b = runs["float32"], runs["bfloat16"]

    def rel(name: str) -> float:
        x, y = a[name].values, b[name].values
        return float(np.nanmax(np.abs(x - y)) / np.nanmax(np.abs(x)))

    def most(name: str) -> float:
        return float(np.nanmax(np.abs(a[name].values - b[name].values)))

    return {
        "rank_differs": float((a["rank"].values != b["rank"].values).sum()),
        "null_rank_differs": float((a["null_rank"].values != b["null_rank"].values).sum()),
        "delta_c_rel": rel("delta_c"),
        "singular_values_rel": rel("singular_values"),
        "flip_rate_abs": most("flip_rate"),
        "mean_delta_p_target_abs": most("mean_delta_p_target"),
        "attention_before_abs": most("attention_before"),
        "attention_after_abs": most("attention_after"),
    }


@pytest.mark.e2e
@pytest.mark.skipif(_organism() is None, reason="no organism checkpoint in data/organism")
def test_a_bfloat16_study_gives_the_float32_ranks_and_effects(tmp_path):
    diff = bf16_vs_fp32(tmp_path)
    print(diff)
    assert diff["rank_differs"] == 0 and diff["null_rank_differs"] == 0
    assert diff["delta_c_rel"] < 2e-2 and diff["singular_values_rel"] < 1e-2
    assert diff["flip_rate_abs"] <= 1 / BF16_RUN["n_test"] + 1e-9  # at most one prompt
    assert diff["mean_delta_p_target_abs"] < 2e-2
