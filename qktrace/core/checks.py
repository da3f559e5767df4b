"""Argument checks shared by every public verb and CLI option: one message shape for all.

Each check takes the argument's name (as the caller typed it: ``"keys"``, ``"n_prompts"``), the
value, and returns the value in canonical form or raises `BadArgument` (a ValueError) or
`BadArgumentType` (a TypeError). The message names the argument, what was given, and what to
pass; with ``flag=`` it also names the CLI option (``n_prompts=0 (CLI --n-prompts) ...``).
The CLI exits 2 for these errors (a bad argument) and 1 for any other failure (a run that
cannot be done), so raising through this module is what makes an error an argument error.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from qktrace.core.errors import BadArgument, BadArgumentType

__all__ = [
    "BadArgument",
    "BadArgumentType",
    "choice",
    "finite",
    "fits_in_memory",
    "integer",
    "number",
    "one_per_prompt",
    "positions",
    "prompts",
    "shown",
    "unique",
]


def _name(name: str, flag: str | None) -> str:
    return f"{name} (CLI {flag})" if flag else name


def shown(value: Any, limit: int = 60) -> str:
    """`value`'s repr, cut to `limit` characters, for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def integer(
    name: str,
    value: Any,
    *,
    low: int | None = None,
    high: int | None = None,
    flag: str | None = None,
    example: str | None = None,
) -> int:
    """`value` as an int in [low, high]; bools, floats and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BadArgumentType(
            f"{name}={shown(value)} ({type(value).__name__}) is not an integer; pass an int"
            + (f", e.g. {name}={example}" if example else "")
            + "."
        )
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            rule = f"must be >= {low}"
        elif low is None:
            rule = f"must be <= {high}"
        else:
            rule = f"must be between {low} and {high}"
        fix = f"pass e.g. {example}" if example else f"pass {low if low is not None else high}"
        cli = f"(CLI {flag}) " if flag else ""
        raise BadArgument(f"{name}={value} {cli}{rule}; {fix}.")
    return value


def number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    flag: str | None = None,
    meaning: str = "",
    example: str | None = None,
) -> float:
    """`value` as a finite float in [low, high] (or (low, high] with `low_open`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BadArgumentType(
            f"{name}={shown(value)} ({type(value).__name__}) is not a number; pass a float"
            + (f", e.g. {name}={example}" if example else "")
            + "."
        )
    value = float(value)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and value > high
    if not math.isfinite(value) or below or above:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise BadArgument(
            f"{name}={value!r} {'(CLI ' + flag + ') ' if flag else ''}is outside {interval}"
            + (f" ({meaning})" if meaning else "")
            + (f"; pass e.g. {example}." if example else ".")
        )
    return value


def prompts(name: str, value: Any) -> Sequence[Any] | np.ndarray:
    """A non-empty list of prompts: each a string or a list of token ids.

    A bare string is refused: iterating it would make one prompt per character.
    """
    if isinstance(value, (str, bytes)):
        raise BadArgumentType(
            f"{name} is a single {type(value).__name__} ({shown(value)}), not a list of "
            f"prompts: iterating it would run one prompt per character; pass [{shown(value)}] "
            "for one prompt."
        )
    if not isinstance(value, Sequence) and not isinstance(value, np.ndarray):
        raise BadArgumentType(
            f"{name} is a {type(value).__name__}, not a list of prompts; pass a list of strings "
            "(or of token-id lists)."
        )
    if len(value) == 0:
        raise BadArgument("No prompts given: pass a non-empty list of strings (or token-id lists).")
    for i, prompt in enumerate(value):
        if isinstance(prompt, str):
            continue
        if isinstance(prompt, bytes) or not isinstance(prompt, (Sequence, np.ndarray)):
            raise BadArgumentType(
                f"{name}[{i}] is a {type(prompt).__name__} ({shown(prompt)}); each prompt must "
                "be a string or a list of token ids (ints)."
            )
        for token in prompt:
            if isinstance(token, bool) or not isinstance(token, numbers.Integral):
                raise BadArgumentType(
                    f"{name}[{i}] holds {shown(token)} ({type(token).__name__}); a prompt given "
                    "as tokens must be a list of token ids (ints)."
                )
    return value


def positions(name: str, value: Any, n_prompts: int, first: int = 0) -> Any:
    """Token positions per prompt: "last", "all", one int per prompt, or a list of ints each.

    Floats are refused even when whole: a position computed as 1.9 or 0.5 is a bug upstream,
    and truncating it silently would read another token.
    """
    if isinstance(value, str):
        if value in ("last", "all"):
            return value
        raise BadArgument(
            f"{name}={value!r}: positions must be 'last', 'all' or a list per prompt."
        )
    if isinstance(value, (bytes, dict, set)) or not isinstance(value, (Sequence, np.ndarray)):
        raise BadArgumentType(
            f"{name} is a {type(value).__name__} ({shown(value)}); pass 'last', 'all', or one "
            "int (or list of ints) per prompt."
        )
    if len(value) != n_prompts:
        raise BadArgument(
            f"{name}: positions were given for {len(value)} prompts but there are {n_prompts}: "
            "pass one position (or one list of positions) per prompt."
        )
    for i, row in enumerate(value):
        items = (
            [row] if not isinstance(row, (Sequence, np.ndarray)) or isinstance(row, str) else row
        )
        for p in items:
            if isinstance(p, bool) or not isinstance(p, numbers.Integral):
                raise BadArgumentType(
                    f"{name}[{first + i}] holds {shown(p)} ({type(p).__name__}), not a token "
                    "position; "
                    "positions are ints (negative counts from the end), e.g. "
                    f"{name}=[[1, 4], [2]]; round or fix how they were computed."
                )
    return value


def choice(name: str, value: Any, options: Sequence[Any]) -> Any:
    """`value` if it is one of `options`; else an error listing them."""
    if isinstance(value, str | int | bool | None) and value in options:
        return value
    raise BadArgument(f"{name} must be one of {tuple(options)}, not {shown(value)}.")


def one_per_prompt(name: str, value: Any, n_prompts: int, what: str = "token position") -> Any:
    """One entry (e.g. a token position) per prompt: a sequence of length `n_prompts`."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
        raise BadArgument(
            f"{name} must give one {what} per prompt ({n_prompts} prompts), got {shown(value)}."
        )
    if len(value) != n_prompts:
        raise BadArgument(
            f"{name} must give one {what} per prompt ({n_prompts} prompts), got {len(value)}: "
            f"{shown(value)}."
        )
    return value


def finite(name: str, values: Any, fix: str) -> None:
    """Refuse NaN or inf anywhere in `values` (an array or DataArray)."""
    array = np.asarray(getattr(values, "values", values))
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        bad = tuple(int(b) for b in np.argwhere(~np.isfinite(array))[0])
        where = f"index {bad}"
        dims = getattr(values, "dims", None)
        if dims is not None:  # a DataArray: say where by its labels
            labels = []
            for dim, i in zip(dims, bad, strict=True):
                coord = values.indexes[dim][i] if dim in values.indexes else i
                labels.append(f"{dim}={getattr(coord, 'item', lambda c=coord: c)()!r}")
            where = ", ".join(labels)
        n_bad = int((~np.isfinite(array)).sum())
        raise BadArgument(
            f"{name} holds {array[bad].item()!r} at {where} ({n_bad} non-finite "
            f"value{'s' if n_bad > 1 else ''} in all); {fix}."
        )


def unique(name: str, values: Sequence[Any], flag: str | None = None) -> list[Any]:
    """`values` as a list, refusing duplicates."""
    seen: set[Any] = set()
    repeated = [v for v in values if v in seen or seen.add(v)]  # type: ignore[func-returns-value]
    if repeated:
        raise BadArgument(
            f"{_name(name, flag)} lists {repeated[0]!r} more than once ({list(values)}); "
            "give each once."
        )
    return list(values)


def memory_bytes() -> int:
    """This machine's physical memory in bytes (what a run may allocate at most)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return 2**36  # 64 GiB where the system does not say


def fits_in_memory(
    name: str,
    value: int,
    bytes_each: float,
    what: str,
    *,
    flag: str | None = None,
    example: str = "10",
) -> int:
    """Refuse a size whose run would allocate more than this machine's memory, before any work.

    `bytes_each` is what one unit of `value` costs (e.g. one random subspace: d_head^2 floats);
    `what` says what is allocated, for the message.
    """
    need, have = value * bytes_each, memory_bytes()
    if need > have:
        raise BadArgument(
            f"{name}={value} {'(CLI ' + flag + ') ' if flag else ''}is too large: the run "
            f"would allocate about "
            f"{_size(need)} for {what}, more than this machine's {_size(have)} of memory; "
            f"pass e.g. {name}={example}."
        )
    return value


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} EiB"


def flag(name: str, value: Any) -> bool:
    """A bool (numpy's too); 1, "yes" and None are refused."""
    if not isinstance(value, bool | np.bool_):
        raise BadArgumentType(
            f"{name}={shown(value)} ({type(value).__name__}) is not a bool; pass True or False."
        )
    return bool(value)


def path(name: str, value: Any, *, optional: bool = False) -> Any:
    """A non-empty str or os.PathLike (None too when `optional`)."""
    if value is None and optional:
        return None
    if isinstance(value, bytes) or not isinstance(value, str | os.PathLike):
        raise BadArgumentType(
            f"{name}={shown(value)} ({type(value).__name__}) is not a path; pass a str or "
            "pathlib.Path" + (", or None" if optional else "") + "."
        )
    if not os.fspath(value).strip():
        raise BadArgument(f"{name} is an empty path; pass a path, e.g. {name}='out/run.zarr'.")
    return value


def dataset(name: str, value: Any, what: str) -> Any:
    """An xarray Dataset; `what` says which (e.g. "the sums of qktrace.reduce")."""
    import xarray as xr

    if not isinstance(value, xr.Dataset):
        raise BadArgumentType(
            f"{name} is a {type(value).__name__} ({shown(value)}), not an xarray.Dataset; pass "
            f"{what}."
        )
    return value


def mapping(name: str, value: Any, what: str) -> Any:
    """A non-empty mapping, e.g. head -> basis."""
    from collections.abc import Mapping

    if not isinstance(value, Mapping):
        raise BadArgumentType(
            f"{name} is a {type(value).__name__} ({shown(value)}), not a mapping; pass {what}."
        )
    if not value:
        raise BadArgument(f"{name} is empty; pass {what}.")
    return value


def token_ids(name: str, prompts: Any, vocab_size: int | None) -> None:
    """Prompts given as token ids: every id in [0, vocab_size) (the model's embedding rows)."""
    if not vocab_size:
        return
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            continue
        for token in prompt:
            if not 0 <= int(token) < vocab_size:
                raise BadArgument(
                    f"{name}[{i}] holds token id {int(token)}, outside the model's vocabulary "
                    f"(ids 0..{vocab_size - 1}); pass ids from its tokenizer "
                    "(model.tokenizer(text)['input_ids'])."
                )


def one_int_per_prompt(
    name: str, value: Any, n_prompts: int, what: str, *, low: int | None = None
) -> list[int]:
    """One int per prompt (e.g. the index of each prompt's answer), each >= `low` if given."""
    one_per_prompt(name, value, n_prompts, what)
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise BadArgumentType(
                f"{name}[{i}] is {shown(item)} ({type(item).__name__}), not an int; pass one "
                f"{what} (an int) per prompt."
            )
        if low is not None and item < low:
            raise BadArgument(
                f"{name}[{i}]={int(item)} must be >= {low}; pass one {what} per prompt."
            )
    return [int(v) for v in value]
