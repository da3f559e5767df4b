"""Held-out accuracy of the organism, on prompts made and located exactly as the studies do.

Held-out prompts come from the studies' own builders (`qktrace.core.prompts`) (seeds >= 10_000, which the
training run never uses) and are tokenized by `qktrace.core.prompts.locate`, chat template applied:
the very path a study takes. A prediction is the greedy next token at the last position.

Groups reported:
- ``boxes n=K``: `qktrace.core.prompts.boxes_prompts(n, K)` (= `studies.binding.build_prompts`),
  K = 2..10 pairs, every position asked;
- ``order-id n=9``: the order-ID design (same queried object "stone" in every prompt);
- ``filter <question>``: `qktrace.core.prompts.filter_prompts` (= `studies.filter_heads.build_prompts`)
  with its defaults (the five paper
  categories, 3 categories x 5 items) per question ("all": argmax is any item of the asked
  category; "first"/"last": that item);
- ``filter11 c=C``: all eleven categories, C categories per list (5 items each), all questions;
- ``plain boxes n=9`` / ``plain filter``: without the chat template (``chat=False``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from qktrace.core.deprecation import renamed_attributes
from qktrace.core.prompts import Prompt, boxes_prompts, filter_prompts, load_categories, locate
from qktrace.organism.data import targets

__all__ = ["held_out_accuracy", "accuracy", "heldout_sets", "main"]


# `held_out_accuracy`'s name before 0.2 (`qktrace eval` is the verb `evaluate`), kept for one release
__getattr__ = renamed_attributes(__name__, {"evaluate": "held_out_accuracy"})


def heldout_sets(n: int = 200, seed: int = 10_000) -> dict[str, tuple[list[Prompt], bool]]:
    """Group name -> (prompts, chat) for the held-out evaluation."""
    sets: dict[str, tuple[list[Prompt], bool]] = {}
    for k in range(2, 11):
        sets[f"boxes n={k}"] = (boxes_prompts(n, k, seed=seed + k), True)
    sets["order-id n=9"] = (
        boxes_prompts(n, 9, query_object="stone", seed=seed + 20),
        True,
    )
    for q in ("all", "first", "last"):
        sets[f"filter {q}"] = (
            filter_prompts(n, questions=[q], seed=seed + 30 + len(q)),
            True,
        )
    every = list(load_categories())
    for c in (2, 3, 4, 5):
        sets[f"filter11 c={c}"] = (
            filter_prompts(n, categories=every, categories_per_list=c, seed=seed + 40 + c),
            True,
        )
    sets["plain boxes n=9"] = (boxes_prompts(n, 9, seed=seed + 50), False)
    sets["plain filter"] = (filter_prompts(n, seed=seed + 51), False)
    return sets


@torch.inference_mode()
def accuracy(
    net: Any, tokenizer: Any, prompts: Sequence[Prompt], *, chat: bool = True, batch_size: int = 64
) -> float:
    """Fraction of prompts whose greedy next token is a correct answer (see `data.targets`)."""
    loc = locate(tokenizer, prompts, chat=chat)
    correct = 0
    for start in range(0, len(prompts), batch_size):
        rows = loc.ids[start : start + batch_size]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        last = torch.tensor([len(r) - 1 for r in rows])
        hidden = net.model(input_ids=ids).last_hidden_state[torch.arange(len(rows)), last]
        guess = net.lm_head(hidden).argmax(-1).tolist()
        for g, p in zip(guess, prompts[start : start + len(rows)], strict=True):
            correct += g in tokenizer.convert_tokens_to_ids(targets(p))
    return correct / len(prompts)


def held_out_accuracy(
    model: str | os.PathLike | Any | None = None,
    tokenizer: Any = None,
    *,
    n: int = 200,
    seed: int = 10_000,
    groups: Sequence[str] | None = None,
    verbose: bool = True,
) -> dict[str, float]:
    """Held-out accuracy per group (task and size), printed as a table when `verbose`.

    `model`: a checkpoint directory (default: the shipped organism), or an in-memory
    `LlamaForCausalLM` with its `tokenizer`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model is None:
        from qktrace.model.organism import path

        model = path()
    if isinstance(model, (str, os.PathLike)):
        from qktrace.model.checkpoints import is_convertible, local_checkpoint

        if is_convertible(model):  # a named model (smollm2) or a .gguf file
            model = local_checkpoint(model)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
        model = AutoModelForCausalLM.from_pretrained(model)
    net = model.eval()
    results = {}
    for name, (prompts, chat) in heldout_sets(n, seed).items():
        if groups is not None and not any(name.startswith(g) for g in groups):
            continue
        results[name] = accuracy(net, tokenizer, prompts, chat=chat)
        if verbose:
            print(f"{name:<18} {results[name]:6.1%}  ({len(prompts)} prompts)", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Held-out accuracy of the qktrace organism.")
    parser.add_argument("--model", default=None, help="checkpoint dir (default: data/organism)")
    parser.add_argument("--n", type=int, default=200, help="prompts per group")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    held_out_accuracy(args.model, n=args.n)


if __name__ == "__main__":
    main(sys.argv[1:])
