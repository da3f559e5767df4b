"""One "same run?" check: every place that resumes or reuses a stored result refuses (or skips)
one made with other parameters with the same message: the store, each differing parameter with
its stored and current value, and the fix."""

from __future__ import annotations

import re
import warnings

import pytest
import xarray as xr

import qktrace
from qktrace.store import DifferentRunError
from qktrace.studies import binding
from qktrace.studies import toy as toy_study

PROMPTS = ["The apple is in Box A, the cat is in Box B.", "Which box is the cat in? Box"]
KEYS = [[1, 2, 3], [1, 2, 3]]
LABELS = [[("a", "positive"), ("a", "negative"), None]] * 2
FORM = re.compile(
    r"(?P<path>\S+) holds (?P<what>.+) of a run with different parameters \((?P<keys>[^)]+)\):\n"
    r"(?P<lines>(  \w+: stored .+, now .+\n)+)(?P<fix>.+)"
)


def check_form(message: str, path, keys: list[str]) -> re.Match:
    match = FORM.fullmatch(message)
    assert match, message
    assert match["path"] == str(path) and match["keys"].split(", ") == keys
    assert [line.split(":")[0].strip() for line in match["lines"].splitlines()] == keys
    return match


def test_capture_batches_resumed_with_other_heads(llama, tmp_path):
    out = tmp_path / "capture.zarr"
    qktrace.capture(llama, PROMPTS, "1.0", keys=KEYS, out=out, progress=False)
    with pytest.raises(DifferentRunError) as err:
        qktrace.capture(llama, PROMPTS, "1.1", keys=KEYS, out=out, progress=False)
    fix = check_form(str(err.value), out, ["heads"])["fix"]
    assert "a new --out" in fix and "--overwrite" in fix


def test_reduce_checkpoint_resumed_with_another_batch_size(llama, tmp_path):
    out = tmp_path / "sums.zarr"
    qktrace.reduce(llama, PROMPTS, "1.0", LABELS, keys=KEYS, out=out, progress=False)
    with pytest.raises(DifferentRunError) as err:
        qktrace.reduce(llama, PROMPTS, "1.0", LABELS, keys=KEYS, batch_size=1, out=out,
                       progress=False)  # fmt: skip
    fix = check_form(str(err.value), out, ["batch_size"])["fix"]
    assert "a new --out" in fix and "--overwrite" in fix


def test_lexical_skips_an_order_subspace_of_other_pairs(tmp_path):
    path = tmp_path / "order_id.zarr"
    stored = xr.Dataset(
        coords={"head": ["1.0", "1.2"]},
        attrs={"model": "m", "params": {"n_pairs": 4, "threshold": 0.99, "chat": None}},
    )
    same = {"n_pairs": 4, "threshold": 0.99, "chat": None}
    assert binding.reusable_order_subspace(path, stored, "m", ["1.2"], same)
    with pytest.warns(UserWarning) as caught:
        reused = binding.reusable_order_subspace(path, stored, "m", ["1.2", "1.3"],
                                                 {**same, "n_pairs": 9})  # fmt: skip
    assert not reused
    match = check_form(str(caught[0].message), path, ["heads", "n_pairs"])
    assert "n_pairs: stored 4, now 9" in match["lines"] and "--overwrite" in match["fix"]


def test_toy_finished_models_of_other_parameters(tmp_path):
    folder = tmp_path / "toy.cells"
    toy_study.Cells(folder, toy_study.settings(max_steps=5))
    with pytest.raises(DifferentRunError) as err, warnings.catch_warnings():
        toy_study.Cells(folder, toy_study.settings(max_steps=6, n_random=2))
    fix = check_form(str(err.value), folder, ["max_steps", "n_random"])["fix"]
    assert "a new --out" in fix and "--overwrite" in fix
