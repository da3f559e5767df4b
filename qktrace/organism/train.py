"""Train the organism: ``python -m qktrace.organism.train --out data/organism``.

What it does, in order (all seeded; the defaults made the shipped checkpoint):

1. builds the word-level tokenizer (`qktrace.organism.tokenizer`) over data/ and the words of
   the studies' prompt templates;
2. builds a small `LlamaForCausalLM` (RoPE, grouped-query attention, SwiGLU MLP, RMSNorm);
3. trains it on CPU with AdamW (linear warm-up, cosine decay, gradient clipping), loss on the
   answer token only (cross-entropy against the target distribution of `qktrace.organism.data`),
   alternating batches of the boxes task and the list-filtering task; curriculum: the largest
   number of boxes grows from 3 to `max_pairs` over the first `ramp` share of the steps;
4. saves model (safetensors) and tokenizer with `save_pretrained`, then measures held-out
   accuracy (`qktrace.organism.evaluation`), finds the heads that attend to the answer
   (`qktrace.find_heads`, through `qktrace.load(out)`), and writes ``heads.json``,
   ``train_log.json`` and ``CARD.md`` next to the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qktrace.organism import data
from qktrace.organism.tokenizer import build_tokenizer

DEFAULTS: dict[str, Any] = dict(
    steps=3000,
    batch=64,
    lr=2e-3,
    warmup=200,
    weight_decay=0.01,
    layers=3,
    d_model=128,
    heads=4,
    kv_heads=2,
    ff=384,
    max_pairs=10,
    ramp=0.5,
    plain=0.1,
    boxes_share=0.35,
    boxes_share_early=0.7,
    early_share=0.25,
    seed=0,
    threads=2,
    eval_every=500,
    tie=1,
    local0=8,
    local0_share=0.1,
    lm_weight=0.0,
    aux_weight=1.0,
    aux_share=0.75,
    aux_layer=-1,
    aux_tasks="boxes,filter",
    aux_keys="boxes,filter",
    attn_weight=0.5,
    extra=3,
    min_pairs=2,
)


def make_model(
    tokenizer: Any,
    *,
    layers: int,
    d_model: int,
    heads: int,
    kv_heads: int,
    ff: int,
    tie: bool = True,
) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(  # type: ignore[call-arg]  # rope_theta: a config kwarg the stubs lack
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=ff,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=d_model // heads,
        max_position_embeddings=256,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=bool(tie),
    )
    return LlamaForCausalLM(config)


# ---------------------------------------------------------------------------------------------
# training-only shaping of the circuit
#
# Trained on the answer alone, the model settles in a dead end: a first-layer head copies every
# box letter straight to the last token (1/n accuracy), and no gradient leads out (binding
# stayed at chance for 1000+ steps in every plain setting tried: learning rates, tied or untied
# embeddings, 2-3 layers, a full next-token loss, more answers per sequence). Three training-
# only aids get it out; all are switched off before training ends, and the shipped model is a
# plain Llama with standard causal attention:
#
# 1. local first layer (`local0`, for the first `local0_share` of the steps): layer 0 may only
#    attend to the last `local0` tokens, so it cannot copy far-away letters to the last token;
# 2. deep supervision (`aux_weight`, until `aux_share`): after layer `aux_layer` the residual
#    stream, read through the final norm and the unembedding, should name each box letter's
#    object and the asked object at the query (list items: their category, and the asked
#    category), i.e. what a retrieval head needs to match query and keys; only on the batches
#    of the tasks in `aux_tasks` (comma-separated: boxes, filter), and for tasks not in
#    `aux_keys` at the query only (the box letters / list items get no target);
# 3. attention supervision (`attn_weight`, until `aux_share`): in the last layer, the head that
#    attends most from the query to the answer's keys (the asked box letter; the asked
#    category's items) is pushed to attend there, -log(max over heads of that attention).
#    Without it the model bound the answer through the token after each letter (the comma),
#    which the studies, keyed on the letters, would not see. Which query/key features a head
#    uses to find the answer is left to training: that is what the studies measure.

_STATE: dict[str, Any] = {"window": 0, "stash_layer": -1, "stash": None}


def _train_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> Any:
    """Eager attention with its own causal mask (no padding masks in training: right padding),
    a local window for layer 0 while `_STATE["window"]`, and the attention weights of layer
    `_STATE["stash_layer"]` kept for the attention loss."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    layer = getattr(module, "layer_idx", None)
    t, s = query.shape[2], key.shape[2]
    i = torch.arange(t)[:, None] + (s - t)
    j = torch.arange(s)[None, :]
    allowed = j <= i
    if _STATE["window"] and layer == 0:
        allowed = allowed & (i - j < _STATE["window"])
    mask = torch.zeros(t, s, dtype=query.dtype).masked_fill(~allowed, torch.finfo(query.dtype).min)
    out, weights = eager_attention_forward(
        module, query, key, value, mask[None, None], scaling=scaling, dropout=dropout
    )
    if layer == _STATE["stash_layer"]:
        _STATE["stash"] = weights
    return out, weights


def _shaping(net: Any, *, window: int, stash_layer: int) -> None:
    """Switch the training-only attention on (window / stash) or, with both off, back to sdpa."""
    from transformers import AttentionInterface

    AttentionInterface.register("organism_train", _train_attention)
    _STATE.update(window=window, stash_layer=stash_layer, stash=None)
    on = bool(window) or stash_layer >= 0
    net.set_attn_implementation("organism_train" if on else "sdpa")


def lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


def max_pairs_at(step: int, steps: int, ramp: float, max_pairs: int) -> int:
    """The curriculum's floor: 3 pairs at first, `max_pairs` after `ramp` of the steps."""
    if ramp <= 0:
        return max_pairs
    return min(max_pairs, 3 + int((max_pairs - 2) * step / (ramp * steps)))


class Curriculum:
    """Largest number of boxes: grows by one when the model masters the current largest
    (train accuracy >= `promote` over its last 10 batches of that size), and never lags the
    fixed ramp `max_pairs_at`."""

    def __init__(self, steps: int, ramp: float, max_pairs: int, promote: float = 0.9) -> None:
        self.steps, self.ramp, self.max_pairs, self.promote = steps, ramp, max_pairs, promote
        self.pairs = 3
        self.recent: list[float] = []

    def at(self, step: int) -> int:
        floor = max_pairs_at(step, self.steps, self.ramp, self.max_pairs)
        if floor > self.pairs:
            self.pairs, self.recent = floor, []
        return self.pairs

    def record(self, n_pairs: int, accuracy: float) -> None:
        if n_pairs != self.pairs or self.pairs >= self.max_pairs:
            return
        self.recent = (self.recent + [accuracy])[-10:]
        if len(self.recent) == 10 and np.mean(self.recent) >= self.promote:
            self.pairs, self.recent = self.pairs + 1, []


def loss_and_accuracy(
    net: Any,
    batch: data.Batch,
    lm_weight: float = 0.0,
    pad_id: int = -1,
    aux_weight: float = 0.0,
    aux_layer: int = 1,
    attn_weight: float = 0.0,
) -> tuple[torch.Tensor, float]:
    """Cross-entropy against the answer distributions, plus `lm_weight` times the ordinary
    next-token loss and `aux_weight` times the deep-supervision loss (the residual stream after
    layer `aux_layer`, read through the final norm and the unembedding, should name each
    position's `data.aux_targets` token); accuracy on the first answers."""
    out = net.model(input_ids=batch.input_ids, output_hidden_states=bool(aux_weight))
    hidden = out.last_hidden_state
    logits = net.lm_head(hidden[batch.rows, batch.cols])
    loss = -(batch.target * torch.log_softmax(logits, -1)).sum(-1).mean()
    if lm_weight:
        every = net.lm_head(hidden[:, :-1])
        labels = batch.input_ids[:, 1:].masked_fill(batch.input_ids[:, 1:] == pad_id, -100)
        lm = torch.nn.functional.cross_entropy(every.flatten(0, 1), labels.flatten())
        loss = loss + lm_weight * lm
    if aux_weight:
        assert batch.aux_ids is not None, "training batches carry deep-supervision targets"
        middle = out.hidden_states[aux_layer + 1][batch.aux_rows, batch.aux_cols]
        aux_logits = net.lm_head(net.model.norm(middle))
        loss = loss + aux_weight * torch.nn.functional.cross_entropy(aux_logits, batch.aux_ids)
    if attn_weight and _STATE["stash"] is not None:
        assert batch.attn_keys is not None, "training batches carry the answer keys"
        weights = _STATE["stash"][batch.rows, :, batch.cols]  # [targets, heads, keys]
        on_answer = (weights * batch.attn_keys[:, None, :]).sum(-1).amax(-1)
        loss = loss - attn_weight * torch.log(on_answer + 1e-6).mean()
    guess = logits.argmax(-1).tolist()
    hits = [g in a for g, a, f in zip(guess, batch.answers, batch.first.tolist(), strict=True) if f]
    return loss, float(np.mean(hits))


def _query_aux_only(batch: data.Batch) -> data.Batch:
    """The batch with deep-supervision targets at the query (first answer) positions only."""
    assert batch.aux_rows is not None and batch.aux_cols is not None and batch.aux_ids is not None
    firsts = zip(batch.rows.tolist(), batch.cols.tolist(), batch.first.tolist(), strict=True)
    query = {(r, c) for r, c, f in firsts if f}
    pairs = zip(batch.aux_rows.tolist(), batch.aux_cols.tolist(), strict=True)
    keep = torch.tensor([pair in query for pair in pairs])
    return dataclasses.replace(
        batch,
        aux_rows=batch.aux_rows[keep],
        aux_cols=batch.aux_cols[keep],
        aux_ids=batch.aux_ids[keep],
    )


def train(out: str | Path, **options: Any) -> dict[str, Any]:
    """Train, save to `out`, evaluate, find heads; returns the run's log."""
    opts = {**DEFAULTS, **options}
    rng = _seeded(opts)
    tokenizer = build_tokenizer(data.tokenizer_corpus(opts["seed"]))
    net = make_model(
        tokenizer,
        layers=opts["layers"],
        d_model=opts["d_model"],
        heads=opts["heads"],
        kv_heads=opts["kv_heads"],
        ff=opts["ff"],
        tie=bool(opts["tie"]),
    )
    n_params = sum(p.numel() for p in net.parameters())
    print(
        f"organism: {n_params:,} parameters, vocab {len(tokenizer)}, {opts['steps']} steps x "
        f"{opts['batch']}, {opts['threads']} threads",
        flush=True,
    )
    start, cpu_start = time.time(), time.process_time()
    log = _train_steps(net, tokenizer, _optimizer(net, opts), rng, opts, start)
    train_seconds = time.time() - start
    train_cpu = time.process_time() - cpu_start
    net.eval()
    out = Path(out)
    _save(net, tokenizer, out)
    run = {
        "options": opts,
        "n_parameters": n_params,
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu, 1),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "log": log,
    }
    (out / "train_log.json").write_text(json.dumps(run, indent=1))
    print(
        f"trained in {train_seconds:.0f} s wall ({train_cpu:.0f} s CPU); saved to {out}", flush=True
    )
    return run


def _seeded(opts: dict[str, Any]) -> np.random.Generator:
    """Seed python, numpy and torch with ``opts["seed"]`` (threads as asked); the data's rng."""
    torch.set_num_threads(opts["threads"])
    seed = opts["seed"]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def _optimizer(net: torch.nn.Module, opts: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW, with weight decay on the matrices only."""
    decay = [p for n, p in net.named_parameters() if p.ndim >= 2]
    other = [p for n, p in net.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": opts["weight_decay"]},
            {"params": other, "weight_decay": 0.0},
        ],
        lr=opts["lr"],
        betas=(0.9, 0.98),
    )


def _train_steps(
    net: Any,
    tokenizer: Any,
    opt: torch.optim.Optimizer,
    rng: np.random.Generator,
    opts: dict[str, Any],
    start: float,
) -> list[dict[str, Any]]:
    """The training loop: per step a task, a batch at the curriculum's size, one update; a log
    entry every 100 steps (and at the last)."""
    steps = opts["steps"]
    log: list[dict[str, Any]] = []
    window: dict[str, list[float]] = {"boxes": [], "filter": []}
    curriculum = Curriculum(steps, opts["ramp"], opts["max_pairs"])
    local_steps = int(opts["local0_share"] * steps) if opts["local0"] else 0
    stash = opts["layers"] - 1 if opts["attn_weight"] and opts["aux_share"] > 0 else -1
    _shaping(net, window=opts["local0"] if local_steps else 0, stash_layer=stash)
    net.train()
    for step in range(steps):
        _shaping_at(net, step, opts, local_steps, stash)
        share = (
            opts["boxes_share_early"] if step < opts["early_share"] * steps else opts["boxes_share"]
        )
        task = "boxes" if rng.random() < share else "filter"
        pairs = curriculum.at(step)
        batch = data.training_batch(tokenizer, rng, task, opts["batch"], max_pairs=pairs,
                                    plain=opts["plain"], extra=opts["extra"],
                                    min_pairs=opts["min_pairs"])  # fmt: skip
        loss, acc = _update(net, tokenizer, opt, batch, task, step, opts)
        window[task].append(acc)
        if task == "boxes":
            curriculum.record(batch.n_pairs, acc)
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log.append(_log_entry(net, tokenizer, step, pairs, loss, window, opts, start))
            window = {"boxes": [], "filter": []}
    return log


def _shaping_at(net: Any, step: int, opts: dict[str, Any], local_steps: int, stash: int) -> None:
    """Lift layer 0's window at `local_steps`; turn deep and attention supervision off at the
    end of the shaping share of the steps."""
    steps = opts["steps"]
    if step == local_steps and local_steps:
        _shaping(net, window=0, stash_layer=stash if step < opts["aux_share"] * steps else -1)
        print(f"step {step}: layer 0 window lifted", flush=True)
    if step == int(opts["aux_share"] * steps):
        _shaping(net, window=0, stash_layer=-1)
        print(f"step {step}: deep and attention supervision off", flush=True)


def _update(
    net: Any,
    tokenizer: Any,
    opt: torch.optim.Optimizer,
    batch: data.Batch,
    task: str,
    step: int,
    opts: dict[str, Any],
) -> tuple[torch.Tensor, float]:
    """One optimizer step on `batch` at this step's learning rate and supervision; (loss,
    accuracy)."""
    steps = opts["steps"]
    for group in opt.param_groups:
        group["lr"] = lr_at(step, steps, opts["warmup"], opts["lr"])
    shaping = step < opts["aux_share"] * steps
    if shaping and task not in opts["aux_keys"].split(","):
        batch = _query_aux_only(batch)
    aux_layer = opts["aux_layer"] if opts["aux_layer"] >= 0 else opts["layers"] - 2
    loss, acc = loss_and_accuracy(
        net,
        batch,
        opts["lm_weight"],
        tokenizer.pad_token_id,
        opts["aux_weight"] if shaping and task in opts["aux_tasks"].split(",") else 0.0,
        aux_layer,
        opts["attn_weight"] if shaping else 0.0,
    )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    return loss, acc


def _log_entry(
    net: Any,
    tokenizer: Any,
    step: int,
    pairs: int,
    loss: torch.Tensor,
    window: dict[str, list[float]],
    opts: dict[str, Any],
    start: float,
) -> dict[str, Any]:
    """The log line of `step` (printed): loss, training accuracies over the window, and a
    quick held-out evaluation every ``eval_every`` steps."""
    steps = opts["steps"]
    entry: dict[str, Any] = {
        "step": step + 1,
        "seconds": round(time.time() - start, 1),
        "max_pairs": pairs,
        "lr": round(lr_at(step, steps, opts["warmup"], opts["lr"]), 6),
        "loss": round(float(loss.detach()), 4),
        "train_acc_boxes": round(float(np.mean(window["boxes"] or [np.nan])), 3),
        "train_acc_filter": round(float(np.mean(window["filter"] or [np.nan])), 3),
    }
    if opts["eval_every"] and ((step + 1) % opts["eval_every"] == 0 or step + 1 == steps):
        net.eval()
        from qktrace.organism.evaluation import held_out_accuracy

        quick = held_out_accuracy(
            net,
            tokenizer,
            n=64,
            groups=["boxes n=3", "boxes n=6", "boxes n=9", "filter"],
            verbose=False,
        )
        net.train()
        entry["heldout"] = {k: round(v, 3) for k, v in quick.items()}
    print(json.dumps(entry), flush=True)
    return entry


def _save(net: Any, tokenizer: Any, out: Path) -> None:
    """The checkpoint in `out`: weights (safetensors) and tokenizer, readable by all."""
    out.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for file in out.iterdir():
        file.chmod(0o644)


def _passive_openmp(argv: Sequence[str]) -> None:
    """Re-run this command with ``OMP_WAIT_POLICY=PASSIVE`` unless it is set.

    With OpenMP's default (active) waiting, 2 threads on 2 cores shared with other processes
    ran 4x slower than 1 thread (measured here: 1.57 s vs 0.38 s per step); passive waiting
    gave 0.28-0.43 s. OpenMP reads the variable when torch loads, before this module runs
    (``import qktrace`` loads torch), hence the re-exec.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "qktrace.organism.train", *argv])


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    _passive_openmp(argv)
    parser = argparse.ArgumentParser(description="Train the qktrace model organism on CPU.")
    parser.add_argument("--out", required=True, help="checkpoint directory, e.g. data/organism")
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--no-report", action="store_true", help="skip evaluation, heads, card")
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    no_report = args.pop("no_report")
    run = train(out, **args)
    if not no_report:
        from qktrace.organism.report import report

        report(out, run)


if __name__ == "__main__":
    main(sys.argv[1:])
