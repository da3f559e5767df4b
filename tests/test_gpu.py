"""The GPU tier (`pytest -m gpu`; skipped without CUDA): the organism on a real CUDA device in
float32 and bfloat16. capture reproduces the model's own eager attention there, and a
filter-heads study's store equals the CPU float32 store within `benchmarks/gpu_check.py`'s
TOLERANCE. `python benchmarks/gpu_check.py` runs the same on SmolLM2 and prints the figures
and times (docs/performance.md, "On a GPU")."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
SIZES = {"n_prompts": 24, "n_test": 12, "n_random": 2, "n_random_answers": 1, "batch_size": 12}


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def figures(gpu_check, tmp_path_factory):
    return gpu_check.check("organism", "cuda", SIZES, tmp_path_factory.mktemp("gpu"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_study_on_cuda_gives_the_cpu_store(figures, dtype):
    print(dtype, figures[dtype])
    assert figures[dtype]["failures"] == []
    assert figures[dtype]["rank_differs"] == 0 and figures[dtype]["null_rank_differs"] == 0


def test_results_come_back_to_the_cpu(gpu_check):
    import qktrace

    model = gpu_check.open_model("organism", "cuda", "bfloat16")
    assert next(model.lm._module.parameters()).device.type == "cuda"
    ds = qktrace.capture(model, ["Which box is the cat in? Box"], "1.0", keys="all",
                         progress=False)  # fmt: skip
    assert ds["q"].dtype == "float32" and ds["attention"].notnull().any()
