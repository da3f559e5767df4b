"""A result's identity: what made it (its provenance attrs), and whether a stored result was
made by the same run.

`provenance` builds the attrs every result carries (versions, verb, parameters, model, mode,
seed, date); `jsonable` turns parameters into what zarr stores. `check_same_run` is the one
"same run?" check: a resumed or reused store whose parameters differ raises
`DifferentRunError`, naming each difference.
"""

from __future__ import annotations

import datetime as _dt
import enum
import os
from collections.abc import Mapping
from importlib import metadata
from typing import Any

import numpy as np

from qktrace.core.errors import StoreError
from qktrace.core.version import __version__

__all__ = ["provenance", "PROVENANCE_KEYS", "check_same_run", "DifferentRunError"]

_REMOTE_MODES = {False: "local", "local": "remote-local", True: "ndif"}
# attrs that identify a run: a resumed run must agree on them (when both runs give them)
IDENTITY_ATTRS = ("verb", "study", "model", "revision", "dtype", "seed")
# the keys of `provenance`, present (maybe None) in the attrs of every result
PROVENANCE_KEYS = (
    "qktrace_version", "nnsight_version", "torch_version", "transformers_version", "verb",
    "study", "params", "model", "revision", "dtype", "remote", "d_head", "seed", "date",
)  # fmt: skip


def provenance(
    verb: str,
    params: Mapping[str, Any],
    *,
    model: Any = None,
    study: str | None = None,
    revision: str | None = None,
    remote: bool | str | None = None,
    seed: int | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> dict:
    """The provenance attrs every qktrace result carries: how it was made, read back from disk.

    Every verb (`capture`, `reduce`, `decompose`, `find_heads`, `intervene`, ...), the study
    pipeline and the toy attach these same keys (`PROVENANCE_KEYS`), so any result a researcher
    loads says which model, mode, versions, parameters and seed made it.

    Parameters
    ----------
    verb : str
        What made the result: a verb (``"capture"``), ``"study"`` or ``"toy"``.
    params : dict
        Its parameters. Converted to JSON-compatible values (nested dicts, lists and tuples,
        `Path`, numpy scalars and arrays), so zarr can store them.
    model : qktrace Model or str, optional
        The `qktrace.load`-ed model (gives id, revision, dtype, remote mode and d_head), or a
        model id.
    study : str, optional
        The study's name, when a study made it (``"filter_heads"``, ``"toy"``).
    revision, remote
        Override the model's revision and remote mode: ``False`` -> ``"local"``, ``"local"``
        (nnsight's simulation of the NDIF path) -> ``"remote-local"``, ``True`` -> ``"ndif"``.
    seed : int, optional
        Random seed of the run, where it has one.
    inputs : dict, optional
        The attrs of the result this one is computed from (e.g. `decompose`'s sums): the model
        facts come from it when `model` is not given, and ``params["input"]`` records its verb
        and parameters.

    Returns
    -------
    dict
        Keys `PROVENANCE_KEYS`: ``qktrace_version``, ``nnsight_version``, ``torch_version``,
        ``transformers_version``, ``verb``, ``study``, ``params``, ``model``, ``revision``,
        ``dtype``, ``remote``, ``d_head``, ``seed``, ``date`` (UTC, ISO 8601). What is unknown
        (a package not installed, no model) is ``None``.

    Examples
    --------
    >>> from pathlib import Path
    >>> from qktrace.store import provenance
    >>> p = provenance("toy", {"layers": (0, 1), "out": Path("a.zarr")}, remote="local", seed=0)
    >>> p["verb"], p["params"], p["remote"], p["seed"]
    ('toy', {'layers': [0, 1], 'out': 'a.zarr'}, 'remote-local', 0)
    """
    facts: dict[str, Any] = dict.fromkeys(("model", "revision", "dtype", "remote", "d_head"))
    params = dict(params)
    if inputs is not None:
        facts.update({k: inputs.get(k) for k in facts})
        if seed is None:
            seed = inputs.get("seed")
        if inputs.get("verb") is not None:
            params["input"] = {"verb": inputs.get("verb"), "params": inputs.get("params")}
    if isinstance(model, str):
        facts["model"] = model
    elif model is not None:
        facts.update(
            model=model.name,
            revision=model.revision,
            dtype=_model_dtype(model),
            remote=_remote_mode(model.remote),
            d_head=int(model.d_head),
        )
    if revision is not None:
        facts["revision"] = revision
    if remote is not None or facts["remote"] is None:
        facts["remote"] = _remote_mode(bool(remote) if remote is None else remote)
    return {
        "qktrace_version": __version__,
        "nnsight_version": _version("nnsight"),
        "torch_version": _version("torch"),
        "transformers_version": _version("transformers"),
        "verb": verb,
        "study": study,
        "params": jsonable(params),
        **facts,
        "seed": None if seed is None else int(seed),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _remote_mode(remote: Any) -> str:
    """The stored label of an nnsight ``remote`` argument."""
    mode = _REMOTE_MODES.get(remote) if isinstance(remote, (bool, str)) else None
    if mode is None:
        raise ValueError(
            f"remote={remote!r} is not a remote mode; pass False (local), 'local' "
            "(nnsight's simulation of NDIF) or True (NDIF)."
        )
    return mode


def _model_dtype(model: Any) -> str | None:
    """The dtype of the model's weights, e.g. ``"bfloat16"`` (None when it has none to read)."""
    try:
        return str(next(model.lm.parameters()).dtype).removeprefix("torch.")
    except (AttributeError, StopIteration, TypeError):
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def jsonable(value: Any) -> Any:
    """`value` as JSON-compatible data: dicts with str keys, lists, str, int, float, bool, None.

    Numpy scalars and arrays become Python numbers and lists, paths and enums their string or
    value, dates ISO strings, sets sorted lists; anything else its ``str()``.
    """
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((jsonable(v) for v in value), key=repr)
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, (_dt.date, _dt.time)):
        return value.isoformat()
    return str(value)


# --------------------------------------------------------------------------------------------
# same run?


class DifferentRunError(StoreError):
    """A stored result was made with other parameters than the run that wants to reuse it."""

    def __init__(self, message: str, differences: list[str]) -> None:
        super().__init__(message)
        self.differences = differences


def check_same_run(
    path: str | os.PathLike,
    stored: Mapping[str, Any],
    now: Mapping[str, Any],
    *,
    what: str = "results",
    fix: str | None = None,
) -> None:
    """Raise `DifferentRunError` unless `stored` and `now` (a run's parameters) are equal.

    The one "same run?" check of qktrace: a resumed `BatchWriter` store (capture's ``out=``),
    a resumed `qktrace.reduce` checkpoint, a reused order-ID subspace (lexical) and the toy's
    finished models all refuse or skip a stored result this way, with one message: the store,
    each differing parameter with its stored and current value, and the fix.

    Examples
    --------
    >>> check_same_run("run.zarr", {"seed": 0, "n": 4}, {"seed": 1, "n": 4}, what="sums")
    Traceback (most recent call last):
    ...
    qktrace.store.DifferentRunError: run.zarr holds sums of a run with different parameters (seed):
      seed: stored 0, now 1
    Resume only with the same parameters. To start over, pass a new --out (Python: a new out= path) or --overwrite (Python: delete run.zarr).
    """
    stored, now = jsonable(dict(stored)), jsonable(dict(now))
    if stored == now:
        return
    keys = [k for k in dict.fromkeys([*stored, *now]) if stored.get(k, ...) != now.get(k, ...)]
    if fix is None:
        fix = (
            "Resume only with the same parameters. To start over, pass a new --out (Python: a "
            f"new out= path) or --overwrite (Python: delete {path})."
        )
    raise DifferentRunError(
        f"{path} holds {what} of a run with different parameters ({', '.join(keys)}):\n"
        + diff_lines(stored, now, "", "stored", "now")
        + f"\n{fix}",
        keys,
    )


def diff_lines(
    old: Mapping[str, Any], new: Mapping[str, Any], noun: str, old_name: str, new_name: str
) -> str:
    """One line per key whose value differs between `old` and `new`, for "same run?" errors."""
    missing = "<missing>"
    lines = []
    for key in list(old) + [k for k in new if k not in old]:
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            label = f"{noun} {key!r}" if noun else key
            lines.append(f"  {label}: {old_name} {a!r}, {new_name} {b!r}")
    return "\n".join(lines)
