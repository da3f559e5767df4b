"""After training: held-out accuracy, the heads that attend to the answer, heads.json, CARD.md.

``python -m qktrace.organism.report data/organism`` redoes this for a saved checkpoint (it
reads ``train_log.json`` for the training facts).

Head search
-----------
Through `qktrace.load(out)` (the path every study takes) and `qktrace.find_heads`, every head
of every layer is scored on held-out study prompts (seeds 30_000+), from the last token:

- binding: `qktrace.core.prompts.boxes_prompts(n, 9)`; candidates: the box letters; answer: the
  asked box's letter;
- filter: `qktrace.core.prompts.filter_prompts(n)` (defaults); candidates: the list items;
  answer: the first item of the asked category ("all", "first") or its last ("last"), as
  `studies.filter_heads` does; plus ``category_share``: the share of the attention on the
  items that goes to items of the asked category (from `qktrace.capture`).

The default heads per study are the top 3 by ``answer_attention`` (the rule the studies use
with `find_heads` when no heads are given), written to ``heads.json``.
"""

from __future__ import annotations

import datetime
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qktrace.organism.evaluation import held_out_accuracy

TOP = 3


def _binding_scores(model: Any, n: int, seed: int) -> Any:
    from qktrace import find_heads
    from qktrace.core.prompts import boxes_prompts, locate

    prompts = boxes_prompts(n, 9, seed=seed)
    loc = locate(model.tokenizer, prompts)
    boxes = loc.positions["box"]
    answer = [row[p.meta["answer"]] for row, p in zip(boxes, prompts, strict=True)]
    return find_heads(model, loc.ids, answer, keys=boxes, top=None, batch_size=32, progress=False)


def _filter_scores(model: Any, n: int, seed: int) -> Any:
    from qktrace import capture, find_heads
    from qktrace.core.prompts import filter_prompts, locate

    prompts = filter_prompts(n, seed=seed)
    loc = locate(model.tokenizer, prompts)
    items = loc.positions["item"]
    answer, positive = [], []
    for row, p in zip(items, prompts, strict=True):
        hit = [c == p.meta["asked"] for c in p.meta["item_categories"]]
        pos = [x for x, h in zip(row, hit, strict=True) if h]
        answer.append(pos[-1] if p.meta["question"] == "last" else pos[0])
        positive.append(hit)
    found = find_heads(model, loc.ids, answer, keys=items, top=None, batch_size=32, progress=False)
    ds = capture(model, loc.ids, model.all_heads(), keys=items, batch_size=32, progress=False)
    att = ds["attention"].isel(query=0).transpose("prompt", "head", "key").values  # [p, h, k]
    mask = np.array(positive)[:, None, :]
    share = (np.nansum(att * mask, -1) / np.nansum(att, -1)).mean(0)
    share = dict(zip([str(h) for h in ds["head"].values], share, strict=True))
    return found.assign(category_share=("head", [share[str(h)] for h in found["head"].values]))


def _table(ds: Any, extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    cols = ("answer_attention", "answer_share", "answer_argmax", *extra)
    return [
        {"head": str(h), **{c: round(float(ds[c].values[i]), 3) for c in cols}}
        for i, h in enumerate(ds["head"].values)
    ]


def find_default_heads(out: str | Path, n: int = 256, seed: int = 30_000) -> dict[str, Any]:
    """Score every head (see module doc); returns {"heads": {...}, "scores": {...}}."""
    import qktrace

    model = qktrace.load(str(out))
    binding = _table(_binding_scores(model, n, seed))
    filt = _table(_filter_scores(model, n, seed + 1), ("category_share",))
    return {
        "heads": {
            "binding": ",".join(r["head"] for r in binding[:TOP]),
            "filter_heads": ",".join(r["head"] for r in filt[:TOP]),
        },
        "rule": f"top {TOP} by answer_attention from the last token (qktrace.find_heads)",
        "n_prompts": n,
        "scores": {"binding": binding, "filter_heads": filt},
    }


def _fmt_table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _files(out: Path) -> str:
    rows = [
        f"| {p.name} | {p.stat().st_size / 1024:.0f} KiB |"
        for p in sorted(out.iterdir())
        if p.is_file()
    ]
    return "\n".join(["| file | size |", "|---|---|", *rows])


def write_card(
    out: Path, run: dict[str, Any], accuracy: dict[str, float], heads: dict[str, Any]
) -> None:
    """CARD.md in `out`: the organism's architecture, data, training aids, training, held-out
    accuracy, default heads and files, section by section (`_Card`)."""
    card = _Card(out, run, accuracy, heads)
    sections = (card.intro, card.architecture, card.data, card.aids, card.training,
                card.accuracy, card.default_heads, card.files)  # fmt: skip
    (out / "CARD.md").write_text("".join(section() for section in sections))


@dataclass
class _Card:
    """The model card's facts, and its sections as text."""

    out: Path
    run: dict[str, Any]
    accuracy_by_group: dict[str, float]
    heads: dict[str, Any]

    @property
    def o(self) -> dict[str, Any]:
        return self.run["options"]

    @property
    def config(self) -> dict[str, Any]:
        return json.loads((self.out / "config.json").read_text())

    @property
    def flags(self) -> str:
        return " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in self.o.items() if k not in ("eval_every",)
        )

    @property
    def acc_rows(self) -> str:
        return "\n".join(f"| {k} | {v:.1%} |" for k, v in self.accuracy_by_group.items())

    def intro(self) -> str:
        """The title and what the organism is."""
        return f"""# qktrace model organism

A small Llama trained here, on CPU, to solve the studies' tasks (boxes binding, list
filtering), so the language-model studies find real structure with no downloads.
Load it like any Hugging Face checkpoint: `qktrace.load("data/organism")` or
`qktrace.load(qktrace.organism.path())`. Written by `python -m qktrace.organism.train` on
{datetime.date.today().isoformat()}.

"""

    def architecture(self) -> str:
        """The model's shape, from its config."""
        config, run = self.config, self.run
        return f"""## Architecture
`LlamaForCausalLM`: {config["num_hidden_layers"]} layers, d_model {config["hidden_size"]},
{config["num_attention_heads"]} query heads and {config["num_key_value_heads"]} key/value heads
(grouped-query) of d_head {config["head_dim"]}, RoPE (theta {config.get("rope_theta", config.get("rope_parameters", {}).get("rope_theta"))}),
SwiGLU MLP {config["intermediate_size"]}, RMSNorm, {"tied" if config.get("tie_word_embeddings") else "untied"} embeddings; {run["n_parameters"]:,}
parameters; vocabulary {config["vocab_size"]} (word level, see `qktrace/organism/tokenizer.py`:
one token per word, item, object, letter and punctuation mark; multi-word items are single
added tokens; chat template `<s><|user|>` message `<|end|><|assistant|>`).

"""

    def data(self) -> str:
        """How the training data is made."""
        o = self.o
        return f"""## Data
Made by the studies' own builders (`qktrace.core.prompts.boxes_prompt`,
`qktrace.core.prompts.filter_prompts`, which `studies.binding` and `studies.filter_heads` use),
chat template applied as `qktrace.core.prompts.locate` does,
{o["plain"]:.0%} without it. Boxes: 2..{o["max_pairs"]} pairs (curriculum: the largest number
starts at 3 and grows when mastered, reaching {o["max_pairs"]} by {o["ramp"]:.0%} of the
steps at the latest), {o["boxes_share_early"]:.0%} of batches in the first {o["early_share"]:.0%}
of the steps, {o["boxes_share"]:.0%} after. Lists: all eleven categories of
data/categories.json, 2..5 categories x 1..5 items (half the lists 3 x 5), questions
"all"/"first"/"last". Each chat prompt is answered and followed by up to {o["extra"]} more
question turns about the same context (the builders' wording), every answer supervised; the
study prompt is the conversation's prefix up to its first answer, token for token. Loss on the
answer tokens only; for "all" questions the target is uniform over the asked category's items
(correct when the argmax is one of them). See `qktrace/organism/data.py`.

"""

    def aids(self) -> str:
        """The training aids, disclosed."""
        o, config = self.o, self.config
        return f"""## Training aids (disclosure: they shape where the mechanism lives)
Three training-only aids (`qktrace/organism/train.py`) were needed; all are off before the end
and the saved model is a plain Llama with standard causal attention, but they decided where
and how the model solves the tasks:

1. **local attention window early**: layer 0 may only attend to the last {o["local0"]} tokens
   for the first {o["local0_share"]:.0%} of the steps;
2. **middle-layer supervision** (weight {o["aux_weight"]}, until {o["aux_share"]:.0%} of the
   steps): after layer {o["aux_layer"] if o["aux_layer"] >= 0 else config["num_hidden_layers"] - 2}, read through the final norm and the unembedding, each box
   letter should name its object, each list item its category, and the query the asked
   object or category;
3. **last-layer attention supervision** (weight {o["attn_weight"]}, until {o["aux_share"]:.0%}
   of the steps): the last layer's head that attends most from the query to the answer's keys
   (the asked box letter; the asked category's items) is pushed to attend there.

Without them binding stayed at chance (the first layer copied all letters to the query and
training never left that state; without 3 the model bound the answer through the comma after
each letter). Consequences for the studies: the retrieval heads sit in the last layer by
construction, and aid 2 writes the bound object's identity (and each item's category) into
the keys' residual stream, which favours a lexical match of query and key over an order-ID
mechanism. Retrained variants (one seed each): without aid 2 on the boxes task
(`--aux-tasks filter`) binding stayed at chance; with aid 2 at the query only (`--aux-keys
filter`) binding reached 100% held-out and the order-ID study still found the queried object's
identity, not an order ID, so aid 2 on the keys is not the only reason for the lexical match.
What the studies find on the organism is about this organism, trained this way,
not about pretrained LLMs in general.

"""

    def training(self) -> str:
        """The optimizer, the run's time and the command that repeats it."""
        o, run = self.o, self.run
        last = self.run["log"][-1] if self.run["log"] else {}
        return f"""## Training
Seed {o["seed"]}; {o["steps"]} steps of batch {o["batch"]}; AdamW lr {o["lr"]} (warm-up
{o["warmup"]} steps, cosine to 0), betas (0.9, 0.98), weight decay {o["weight_decay"]},
gradient clipping 1.0; {o["threads"]} CPU threads (OMP_WAIT_POLICY=PASSIVE).
Training took {run["train_seconds"]:.0f} s wall ({run["train_cpu_seconds"]:.0f} s CPU) on
{run["machine"]}, 2 cores shared with other processes. Final train loss {last.get("loss")}.

Command (the defaults are these values):

    python -m qktrace.organism.train --out data/organism {self.flags}

"""

    def accuracy(self) -> str:
        """The held-out accuracy table."""
        return f"""## Held-out accuracy
Greedy next token on fresh prompts from the studies' `build_prompts` (seeds >= 10000),
located with `qktrace.core.prompts.locate`; {200} prompts per row. Reproduce with
`qktrace organism eval` (or `python -m qktrace.organism eval`).

| group | accuracy |
|---|---|
{self.acc_rows}

"""

    def default_heads(self) -> str:
        """The default heads and their scores."""
        heads = self.heads
        return f"""## Heads (defaults for the studies)
Rule: {heads["rule"]}, on {heads["n_prompts"]} held-out prompts per task (`qktrace.organism.report`).

- binding (order-ID, lexical): **{heads["heads"]["binding"]}**
- filter heads: **{heads["heads"]["filter_heads"]}**

Binding (query: last token "Box"; candidates: box letters; answer: the asked box):

{_fmt_table(heads["scores"]["binding"])}

Filter (query: last token; candidates: list items; answer: first/last item of the asked
category; category_share: share of the item attention on the asked category's items):

{_fmt_table(heads["scores"]["filter_heads"])}

"""

    def files(self) -> str:
        """The checkpoint's files."""
        out = self.out
        return f"""## Files
{_files(out)}
"""


def report(out: str | Path, run: dict[str, Any] | None = None, n: int = 200) -> None:
    """Evaluate, find heads, write heads.json and CARD.md in `out`."""
    out = Path(out)
    run = run or json.loads((out / "train_log.json").read_text())
    accuracy = held_out_accuracy(str(out), n=n)
    heads = find_default_heads(out)
    (out / "heads.json").write_text(json.dumps(heads, indent=1))
    print(json.dumps(heads["heads"]), flush=True)
    write_card(out, run, accuracy, heads)
    write_card(out, run, accuracy, heads)  # again, so the file table lists CARD.md's size


if __name__ == "__main__":
    import torch

    torch.set_num_threads(2)
    report(sys.argv[1] if len(sys.argv) > 1 else "data/organism")
