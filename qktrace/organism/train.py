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
import json
import math
import platform
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import data
from .tokenizer import build_tokenizer

DEFAULTS: dict[str, Any] = dict(
    steps=4000,
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
    ramp=0.4,
    plain=0.1,
    boxes_share=0.6,
    seed=0,
    threads=2,
    eval_every=500,
)


def make_model(
    tokenizer: Any, *, layers: int, d_model: int, heads: int, kv_heads: int, ff: int
) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
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
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


def max_pairs_at(step: int, steps: int, ramp: float, max_pairs: int) -> int:
    if ramp <= 0:
        return max_pairs
    return min(max_pairs, 3 + int((max_pairs - 2) * step / (ramp * steps)))


def loss_and_accuracy(net: Any, batch: data.Batch) -> tuple[torch.Tensor, float]:
    hidden = net.model(input_ids=batch.input_ids).last_hidden_state
    logits = net.lm_head(hidden[torch.arange(len(batch.last)), batch.last])
    loss = -(batch.target * torch.log_softmax(logits, -1)).sum(-1).mean()
    guess = logits.argmax(-1).tolist()
    acc = float(np.mean([g in a for g, a in zip(guess, batch.answers, strict=True)]))
    return loss, acc


def train(out: str | Path, **options: Any) -> dict[str, Any]:
    """Train, save to `out`, evaluate, find heads; returns the run's log."""
    opts = {**DEFAULTS, **options}
    torch.set_num_threads(opts["threads"])
    seed = opts["seed"]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    tokenizer = build_tokenizer(data.tokenizer_corpus(seed))
    net = make_model(
        tokenizer,
        layers=opts["layers"],
        d_model=opts["d_model"],
        heads=opts["heads"],
        kv_heads=opts["kv_heads"],
        ff=opts["ff"],
    )
    n_params = sum(p.numel() for p in net.parameters())
    decay = [p for n, p in net.named_parameters() if p.ndim >= 2]
    other = [p for n, p in net.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": opts["weight_decay"]},
            {"params": other, "weight_decay": 0.0},
        ],
        lr=opts["lr"],
        betas=(0.9, 0.98),
    )
    steps = opts["steps"]
    print(
        f"organism: {n_params:,} parameters, vocab {len(tokenizer)}, {steps} steps x "
        f"{opts['batch']}, {opts['threads']} threads",
        flush=True,
    )
    log: list[dict[str, Any]] = []
    window: dict[str, list[float]] = {"boxes": [], "filter": []}
    start = time.time()
    cpu_start = time.process_time()
    net.train()
    for step in range(steps):
        task = "boxes" if rng.random() < opts["boxes_share"] else "filter"
        pairs = max_pairs_at(step, steps, opts["ramp"], opts["max_pairs"])
        batch = data.training_batch(
            tokenizer, rng, task, opts["batch"], max_pairs=pairs, plain=opts["plain"]
        )
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, opts["warmup"], opts["lr"])
        loss, acc = loss_and_accuracy(net, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        window[task].append(acc)
        if (step + 1) % 100 == 0 or step + 1 == steps:
            entry = {
                "step": step + 1,
                "seconds": round(time.time() - start, 1),
                "max_pairs": pairs,
                "lr": round(lr_at(step, steps, opts["warmup"], opts["lr"]), 6),
                "loss": round(float(loss), 4),
                "train_acc_boxes": round(float(np.mean(window["boxes"] or [np.nan])), 3),
                "train_acc_filter": round(float(np.mean(window["filter"] or [np.nan])), 3),
            }
            window = {"boxes": [], "filter": []}
            if opts["eval_every"] and ((step + 1) % opts["eval_every"] == 0 or step + 1 == steps):
                net.eval()
                from .evaluation import evaluate

                quick = evaluate(
                    net,
                    tokenizer,
                    n=64,
                    groups=["boxes n=3", "boxes n=6", "boxes n=9", "filter"],
                    verbose=False,
                )
                net.train()
                entry["heldout"] = {k: round(v, 3) for k, v in quick.items()}
            log.append(entry)
            print(json.dumps(entry), flush=True)
    train_seconds = time.time() - start
    train_cpu = time.process_time() - cpu_start
    net.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
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


def main(argv: Sequence[str] | None = None) -> None:
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
        from .report import report

        report(out, run)


if __name__ == "__main__":
    main(sys.argv[1:])
