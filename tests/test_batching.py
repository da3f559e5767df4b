"""The verbs' one batch loop (`batching.run`) and the plan it runs (`batching.plan_run`)."""

import pytest
from nnsight.intervention.backends.remote import RemoteError

import qktrace.model.remote as remote_module
from qktrace.run import batching

PROMPTS = ["The cat sat", "on the mat", "A dog ran far", "to the park", "and back"]


def test_run_yields_every_batch_in_order_and_skips_what_is_done(llama):
    plan = batching.plan_run(llama, PROMPTS, "last", "all", batch_size=2)
    seen = [
        (b.start, value)
        for b, value in batching.run(
            plan, lambda b: len(b.texts), desc="t", resume_hint="", progress=False
        )
    ]
    assert seen == [(0, 2), (2, 2), (4, 1)]
    resumed = [
        b.start for b, _ in batching.run(plan, id, desc="t", resume_hint="", progress=False, done=2)
    ]
    assert resumed == [2, 4]


@pytest.mark.parametrize(
    "per, groups", [(1, [[0], [2], [4]]), (2, [[0, 2], [4]]), (0, [[0, 2, 4]])]
)
def test_run_groups_batches_into_requests(llama, per, groups):
    plan = batching.plan_run(llama, PROMPTS, "last", "all", batch_size=2)
    got = [
        [b.start for b in request]
        for request, n in batching.run(
            plan, len, desc="t", resume_hint="", progress=False, batches_per_request=per
        )
    ]
    assert got == groups


def test_run_retries_then_names_the_prompts_and_the_hint(llama, monkeypatch):
    monkeypatch.setattr(remote_module.time, "sleep", lambda s: None)
    plan = batching.plan_run(llama, PROMPTS, "last", "all", batch_size=2)
    fails = {"left": 1}

    def flaky(batch):
        if batch.start == 2 and fails["left"]:
            fails["left"] -= 1
            raise RemoteError("simulated: job timed out")
        return batch.start

    values = [v for _, v in batching.run(plan, flaky, desc="t", resume_hint="", progress=False)]
    assert values == [0, 2, 4] and fails["left"] == 0  # retried once, then went on

    def down(batch):
        if batch.start >= 2:
            raise RemoteError("simulated: server down")
        return batch.start

    done = []
    with pytest.raises(RuntimeError, match=r"prompts 2\.\.3 failed 4 times.*resume from 2"):
        for b, _ in batching.run(
            plan, down, desc="t", resume_hint=lambda s: f"resume from {s}", progress=False
        ):
            done.append(b.start)
    assert done == [0]  # the batch before the failure was handed over


def test_prepare_tokenizes_each_prompt_once(llama, monkeypatch):
    tokenizer_type = type(llama.tokenizer)
    real, calls = tokenizer_type.__call__, []
    monkeypatch.setattr(
        tokenizer_type, "__call__", lambda self, *a, **k: calls.append(a[0]) or real(self, *a, **k)
    )
    plan = batching.plan_run(llama, PROMPTS, "last", "all", batch_size=2)
    batches = list(plan)
    assert sorted(calls) == sorted(PROMPTS)  # once each, in plan_run; batches pad the kept ids
    assert plan.lengths == [len(b) for batch in batches for b in batch.encoded.tokens]
    assert [plan.ids(i) for i in range(len(PROMPTS))] == [
        llama.tokenizer(p)["input_ids"] for p in PROMPTS
    ]


def test_prepare_is_the_old_name_of_plan_run(llama):
    """`batching.prepare` (before 0.2) still plans the same run, for one release."""
    with pytest.warns(DeprecationWarning, match="is now qktrace.run.batching.plan_run"):
        old = batching.prepare(llama, PROMPTS, "last", "all", batch_size=2)
    new = batching.plan_run(llama, PROMPTS, "last", "all", batch_size=2)
    with pytest.warns(DeprecationWarning):
        assert batching.prepare is batching.plan_run
    assert old.sha256 == new.sha256 and old.lengths == new.lengths


def test_batch_size_changes_no_value_only_the_traces(llama):
    """One default batch size (`batching.BATCH_SIZE`) for every verb: a batch of any size
    captures and sums the same values (to float rounding)."""
    import numpy as np

    from qktrace.verbs.capture import capture
    from qktrace.verbs.reduce import reduce

    assert batching.BATCH_SIZE == 16
    one = capture(llama, PROMPTS, "0.1", batch_size=1, progress=False)
    every = capture(llama, PROMPTS, "0.1", progress=False)
    for name in ("q", "k", "attention"):
        np.testing.assert_allclose(one[name].values, every[name].values, rtol=1e-5, atol=1e-6)
    labels = [[("f", "positive" if j % 2 else "negative") for j in range(2)] for _ in PROMPTS]
    sums = [
        reduce(llama, PROMPTS, "0.1", labels, keys=[[0, 1]] * len(PROMPTS), batch_size=b,
               progress=False)
        for b in (1, batching.BATCH_SIZE)
    ]  # fmt: skip
    np.testing.assert_allclose(sums[0].qk_sum.values, sums[1].qk_sum.values, rtol=1e-5, atol=1e-6)
