"""Lexical binding: the query-key subspace that carries *which object* a box holds (paper §3.3, Figs 9-10).

Method
------
1. **Prompts** (`studies.binding`): boxes prompts with ``n_pairs`` pairs; the queried object
   and its position vary. **Counterfactual:** the same prompt with the queried object replaced,
   in the context and in the question, by one the prompt does not use; all else stays.
2. **Contrast.** Query: the last token ("Box"). Positive: q · k of the answer's box key;
   negative: the same query with the counterfactual's answer box key, which differs only in the
   object bound to that box. So ΔC isolates the lexical match (feature "lexical"; with
   ``negative_query="counterfactual"`` the negative uses the counterfactual's own query). The
   pairs cross two prompts: captured (resumable) and summed in float64 by the pipeline, which
   also runs the permutation null on them, the PCA of fresh box keys (by object and order), the
   swap of the answer's box key with another against random subspaces (attention and answer).
3. **Order subspace** (`attribution`): from ``OUT/order_id.zarr`` when it was made for the same
   model, heads, pairs, threshold and chat setting, else computed with the order-ID design; it
   joins the store as feature "order" (``null_rank`` -1: tested in order_id.zarr).
4. **Attribution (Fig 10).** Each box key's attention logit split into the parts carried by the
   order and lexical query subspaces plus a residual (`qktrace.attribute`), and the explained
   fraction 1 - ||resid||^2 / ||total||^2; figures ``lexical_attribution*.png``.

Store ``OUT/lexical.zarr`` (features "lexical" and "order"), figures beside it.

Example
-------
    qktrace study lexical --model meta-llama/Llama-3.1-8B-Instruct --remote --n-prompts 2000 \\
        --out out/binding
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import xarray as xr

from qktrace.core.prompts import Prompt
from qktrace.model.loading import parse_heads
from qktrace.studies import binding, order_id
from qktrace.studies._common import paper_heads, sizes
from qktrace.study.pipeline import Run, Study, StudyOption
from qktrace.study.tools import ModelLike
from qktrace.verbs.attribute import attribute

STUDY = "lexical"
NEGATIVE_QUERY_HELP = (
    "The query of the negative pairs: the original prompt's (only the key differs) or the "
    "counterfactual's own."
)
NegativeQuery = Literal["original", "counterfactual"]
SUBSPACE = ["delta_c", "singular_values", "query_basis", "key_basis", "rank", "pair_count",
            "qk_sum", "q_sum", "k_sum"]  # fmt: skip


def lexical(n_pairs: int = 9, negative_query: NegativeQuery = "original") -> Study:
    """The lexical study: `n_pairs` boxes per prompt; the negative pairs' query (step 2)."""
    binding.check_pairs(n_pairs)
    if negative_query not in ("original", "counterfactual"):
        raise ValueError(f"negative_query={negative_query!r}: use 'original' or 'counterfactual'.")

    def labels(prompt: Prompt) -> list[tuple[str, str]]:
        answer = prompt.meta["answer"]
        return [("lexical", "positive" if j == answer else "negative")
                for j in range(len(prompt.meta["letters"]))]  # fmt: skip

    def coords(prompt: Prompt) -> dict[str, Any]:
        meta = prompt.meta
        return {"order": list(range(len(meta["letters"]))), "object": meta["objects"],
                "box": meta["letters"], "answer": meta["answer"],
                "query_object": meta["query_object"]}  # fmt: skip

    return Study(
        name=STUDY,
        prompts=lambda n, seed: binding.build_prompts(n, n_pairs, seed=seed),
        keys="box",
        labels=labels,
        counterfactual=binding.counterfactual,
        negative_query=negative_query,
        coords=coords,
        answers="keys",  # the box letters as the prompt writes them
        hues=("object", "order"),
        heads=lambda model: paper_heads(model, "binding"),
        sizes=lambda model: sizes(model, STUDY, None, None),
        analysis=attribution,
        figures=binding.attribution_figures,
        options={
            "n_pairs": StudyOption(n_pairs, binding.PAIRS_HELP),
            "negative_query": StudyOption(
                negative_query, NEGATIVE_QUERY_HELP, choices=("original", "counterfactual")
            ),
        },  # fmt: skip
        make=lexical,
    )


def attribution(ds: xr.Dataset, run: Run) -> xr.Dataset:
    """Steps 3 and 6: the order subspace joins the store (its null tested in order_id.zarr:
    ``null_rank`` -1), and each box key's logit is split into order, lexical and the rest."""
    order, run.params["order_subspace"] = order_subspace(ds, run)
    lexical = ds[SUBSPACE]
    # a remote run's order sums are ΔC only (`qktrace.verbs.reduce.study_options`): no C+ and C- sums
    order = order.assign(
        {
            name: xr.full_like(lexical[name].isel(feature=[0]), np.nan).assign_coords(
                feature=order["feature"].values
            )
            for name in SUBSPACE
            if name not in order
        }
    )
    subspaces = xr.concat(
        [lexical, order.drop_vars([v for v in order.coords if v not in lexical.coords])],
        dim="feature", data_vars="all", coords="minimal", compat="override",
        combine_attrs="drop",
    )  # fmt: skip
    null = ds[["null_rank", "null_quantile", "null_singular_values"]]
    null = null.reindex(feature=subspaces["feature"].values, fill_value={"null_rank": -1})
    bases = {f: subspaces["query_basis"].sel(feature=f) for f in ("order", "lexical")}
    parts = attribute(ds, bases, side="query")[["logit_part", "explained", "part_rank"]]
    return xr.merge([subspaces, null, parts], compat="override", combine_attrs="drop")


def order_subspace(ds: xr.Dataset, run: Run) -> tuple[xr.Dataset, str]:
    """The order-ID subspace: reused from OUT/order_id.zarr if it matches, else computed."""
    from qktrace.store import io as store

    stored = run.path.parent / f"{order_id.STUDY}.zarr"
    labels = [str(h) for h in ds["head"].values]
    p, lm = run.params, run.model
    if stored.exists():
        old = store.open(stored, checksums=True)
        if binding.reusable_order_subspace(stored, old, lm.name, labels, p):
            kept = [name for name in SUBSPACE if name in old]  # no qk_sum: a remote run's
            return old[kept].sel(head=labels).load(), str(stored)
    computed = binding.order_subspaces(
        lm, parse_heads(labels),
        n_prompts=p["n_prompts"], n_pairs=p["n_pairs"],
        query_object=order_id.default_query_object(run.seed), threshold=p["threshold"],
        batch_size=run.batch_size, seed=run.seed, chat=run.chat, sums_out=run.checkpoint,
        progress=run.progress,
    )  # fmt: skip
    return computed, "computed"


def run(
    model: ModelLike | None = None,
    *,
    out: str | Path,
    n_pairs: int = 9,
    negative_query: NegativeQuery = "original",
    **settings: Any,
) -> Path:
    """Find the lexical subspace of binding heads; PCA, swaps, and the order/lexical attribution.

    `n_pairs` as in `studies.order_id.run` (the paper's attribution figure used 4);
    `negative_query`: "original" (default), the negative pairs use the original prompt's query
    with the counterfactual's key; "counterfactual", the counterfactual's own query. The other
    settings are `qktrace.study.pipeline.run_study`'s. Returns the path of ``OUT/lexical.zarr``.
    """
    return lexical(n_pairs, negative_query).run(model, out=out, **settings)


study = lexical()  # the default design, for load_study("qktrace.studies.lexical")
