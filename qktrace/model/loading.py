"""Open a model for tracing, and know where each architecture keeps its queries and keys.

Every supported family computes attention the same way in `transformers`: the attention module
builds post-RoPE (and, for Qwen3/Gemma3/OLMo2, post-q_norm/k_norm) query and key states and then
calls one attention function, ``attention_interface(self, query, key, value, mask, scaling=...)``.
The *inputs of that call* are exactly what the softmax sees, in every family: post-RoPE for
Llama/Qwen/Mistral/Gemma, partially rotated for GPT-NeoX, un-rotated for GPT-2. qktrace reads and
edits q and k there, through nnsight's ``.source`` view of the attention forward, so one code path
serves all families (the rotary call's output would miss GPT-2, which has no rotary call, and the
mask and scaling the attention function is given).

An `Adapter` records where a family keeps its decoder layers and attention module, and where its
attention call takes q, k and the mask. Adding a family is one `register_adapter(Adapter(...))`
call. `Model.attention_inputs` is the one place that reads that call: every verb gets q, k and
the mask through it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Any, Literal, NamedTuple

import nnsight
import torch

from qktrace.core import checks, ops
from qktrace.core.errors import BadArgumentType

# the families live below this module (`qktrace.model.checkpoints` needs them too); named here as well
from qktrace.model.families import ADAPTERS as ADAPTERS
from qktrace.model.families import Adapter as Adapter
from qktrace.model.families import adapter_for as adapter_for
from qktrace.model.families import register_adapter as register_adapter

Remote = bool | Literal["local"]


class Head(NamedTuple):
    """One query head: (layer, head). Written "L.H" in specs, labels and CLI flags."""

    layer: int
    head: int

    @property
    def label(self) -> str:
        return f"{self.layer}.{self.head}"


_HEAD_SPEC = re.compile(r"^\s*(\d+)\s*[.:]\s*(\d+)\s*$")


def parse_heads(spec: str | tuple[int, int] | Sequence[Any]) -> list[Head]:
    """Parse heads given as "16.19,20.26", ["16.19"], (16, 19) or [(16, 19)] into `Head`s."""
    if isinstance(spec, Head) or (
        isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(x, int) for x in spec)
    ):
        return parse_heads([spec])  # one (layer, head) pair: a list of one
    how = "write heads as LAYER.HEAD (two integers), comma-separated, e.g. --heads 16.19,20.26"
    if isinstance(spec, str) and not spec.strip():
        raise checks.BadArgument(f"No heads given (got {spec!r}): {how}.")
    if not isinstance(spec, str | Iterable):
        raise checks.BadArgument(
            f"Heads {spec!r} are not a head spec: {how} (or a list of (layer, head))."
        )
    items: list[Any] = spec.split(",") if isinstance(spec, str) else list(spec)
    heads: list[Head] = []
    for item in items:
        if isinstance(item, str):
            match = _HEAD_SPEC.match(item)
            if not match:
                what = "an empty entry" if not item.strip() else f"{item.strip()!r}"
                given = f" in {spec!r}" if isinstance(spec, str) and spec != item else ""
                raise checks.BadArgument(f"Malformed head: {what}{given}; {how}.")
            heads.append(Head(int(match[1]), int(match[2])))
        elif (
            isinstance(item, Sequence)
            and len(item) == 2
            and all(
                isinstance(x, Integral) and not isinstance(x, bool) and int(x) >= 0 for x in item
            )
        ):
            layer, head = item
            heads.append(Head(int(layer), int(head)))
        else:
            raise checks.BadArgument(
                f"Malformed head {item!r}: give a (layer, head) pair of non-negative ints, or a "
                f"string; {how}."
            )
    if not heads:
        raise checks.BadArgument(f"No heads given (got {spec!r}): {how}.")
    return list(dict.fromkeys(heads))


@dataclass
class Model:
    """An nnsight-wrapped language model plus the facts qktrace needs about it.

    Attributes: `lm` (the nnsight model), `name` (hub id or path), `remote` (False, "local" or
    True), and from its config `n_layers`, `n_heads`, `n_kv_heads`, `d_head`.
    """

    lm: Any
    name: str
    adapter: Adapter
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    remote: Remote = False
    revision: str | None = None
    _call_names: dict[int, str] = field(default_factory=dict, repr=False)

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    @property
    def max_positions(self) -> int | None:
        """The model's context length from its config (None when the config has none)."""
        config = self.lm.config
        config = getattr(config, "text_config", None) or config
        value = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        return int(value) if value else None

    @property
    def group_size(self) -> int:
        """Query heads per key head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        """The key head that query head `head` reads: head // (n_heads / n_kv_heads)."""
        return head // self.group_size

    def attention(self, layer: int) -> Any:
        """The nnsight envoy of layer `layer`'s attention module."""
        self.check_layer(layer)
        module = self.lm
        for part in self.adapter.layers.split("."):
            module = getattr(module, part)
        return getattr(module[layer], self.adapter.attention)

    def attention_call_name(self, layer: int) -> str:
        """The name of the `.source` operation where layer `layer` calls its attention function.

        Its ``.inputs`` are ``((module, q, k, v, mask, ...), kwargs)``: q [batch, n_heads, tokens,
        d_head] and k [batch, n_kv_heads, tokens, d_head] exactly as the softmax sees them.
        """
        if layer not in self._call_names:
            source = self.attention(layer).source
            calls = [n for n in source.names if re.fullmatch(r"attention_interface_\d+", n)]
            if not calls:
                raise ValueError(
                    f"Layer {layer}'s attention forward ({type(self.attention(layer)._module).__name__})"
                    " never calls transformers' attention_interface, so qktrace cannot reach its"
                    " q and k. Use a transformers version whose model code does, or register an"
                    " Adapter for a module that does."
                )
            self._call_names[layer] = calls[-1]
        return self._call_names[layer]

    def attention_inputs(self, layer: int) -> ops.AttentionInputs:
        """Layer `layer`'s attention-function inputs, to read inside a trace: (q, k, mask).

        Get it before the trace (it finds the call's name in the module's ``.source`` view), then
        call its ``read()`` once inside the trace, where it opens ``.source`` on the model that runs: q [batch, n_heads, tokens, d_head], k [batch,
        n_kv_heads, tokens, d_head] exactly as the softmax sees them, and the model's mask (None
        where the call has none). q and k are the call's own tensors: write an edit into them in
        place (`qktrace.core.ops.put_positions(..., inplace=True)` on a view such as ``k[:, kv]``) and
        the model computes with it. The reader is a `qktrace.core.ops` object, so the trace body
        holds no qktrace object but those (which travel to NDIF by value).

        >>> inputs = model.attention_inputs(3)  # doctest: +SKIP
        >>> with model.trace(batch):  # doctest: +SKIP
        ...     q, k, mask = inputs.read()
        """
        a = self.adapter
        return ops.AttentionInputs(
            self.attention(layer),
            self.attention_call_name(layer),
            a.query_arg,
            a.key_arg,
            a.mask_arg,
            "attention_mask",
        )

    def scaling(self, layer: int) -> float:
        """The factor the attention logits q·k are multiplied by (1/sqrt(d_head) by default)."""
        module = self.attention(layer)._module
        return float(getattr(module, "scaling", self.d_head**-0.5))

    def softcap(self, layer: int) -> float | None:
        """Gemma 2's attention-logit soft cap, None for other families."""
        module = self.attention(layer)._module
        return getattr(module, "attn_logit_softcapping", None) or getattr(
            getattr(module, "config", None), "attn_logit_softcapping", None
        )

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise checks.BadArgument(
                f"Layer {layer} is out of range: {self.name} has layers 0..{self.n_layers - 1}; "
                f"pick a layer in that range (heads run from 0.0 to {self._last_head})."
            )

    def check_heads(self, heads: Sequence[Head]) -> None:
        """Raise a clear error for any head outside the model."""
        for h in heads:
            self.check_layer(h.layer)
            if not 0 <= h.head < self.n_heads:
                raise checks.BadArgument(
                    f"Head {h.label} is out of range: {self.name} has heads 0..{self.n_heads - 1} "
                    f"in each of its {self.n_layers} layers; pick heads from 0.0 to "
                    f"{self._last_head}."
                )

    @property
    def _last_head(self) -> str:
        return f"{self.n_layers - 1}.{self.n_heads - 1}"

    def all_heads(self) -> list[Head]:
        return [Head(layer, head) for layer in range(self.n_layers) for head in range(self.n_heads)]

    def trace(self, inputs: Any, **kwargs: Any) -> Any:
        """`lm.trace(inputs)` with this model's remote mode; use under `torch.inference_mode()`."""
        return self.lm.trace(inputs, remote=self.remote, **kwargs)

    def session(self, **kwargs: Any) -> Any:
        """An nnsight session (several traces in one remote request) in this model's remote mode."""
        return self.lm.session(remote=self.remote, **kwargs)

    @property
    def remote_label(self) -> str:
        return {False: "local", "local": "remote-local", True: "ndif"}[self.remote]


def _config_facts(config: Any) -> tuple[int, int, int, int]:
    """(n_layers, n_heads, n_kv_heads, d_head) from a transformers config, any family."""
    config = getattr(config, "text_config", None) or config
    n_layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    n_heads = getattr(config, "num_attention_heads", None) or config.n_head
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    d_head = getattr(config, "head_dim", None) or hidden // n_heads
    return int(n_layers), int(n_heads), int(n_kv), int(d_head)


def _check_load_arguments(
    model: Any, remote: Any, revision: Any, dtype: Any, device_map: Any, gguf_file: Any
) -> None:
    """`load`'s arguments, checked before anything is read or loaded."""
    from qktrace.core import checks

    if not (isinstance(remote, bool) or remote == "local" and isinstance(remote, str)):
        raise checks.BadArgument(f"remote must be False, 'local' or True, not {remote!r}.")
    if not isinstance(model, torch.nn.Module):
        checks.path("model", model)
    for name, value in (("revision", revision), ("device_map", device_map),
                        ("gguf_file", gguf_file)):  # fmt: skip
        if value is not None and not isinstance(value, str):
            raise BadArgumentType(
                f"{name}={value!r} ({type(value).__name__}) is not a str; pass a str or None."
            )
    named = isinstance(dtype, str) and (
        dtype == "auto" or isinstance(getattr(torch, dtype, None), torch.dtype)
    )
    if not (dtype is None or isinstance(dtype, torch.dtype) or named):
        raise checks.BadArgument(
            f"dtype={dtype!r} is not a torch dtype; pass e.g. torch.bfloat16 or 'bfloat16' (or "
            "'auto'), or None for the checkpoint's."
        )


def load(
    model: str | os.PathLike | torch.nn.Module,
    *,
    remote: Remote = False,
    tokenizer: Any = None,
    revision: str | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | None = None,
    gguf_file: str | None = None,
    **hf_kwargs: Any,
) -> Model:
    """Open a model for qktrace: a hub id, a local path, a GGUF file, a named model, or an
    in-memory `transformers` model.

    Parameters
    ----------
    model
        "meta-llama/Llama-3.1-8B-Instruct", a directory saved with `save_pretrained`, a
        ``.gguf`` file (or a directory plus `gguf_file`), a named model (``"smollm2"``:
        SmolLM2-135M-Instruct, see `qktrace.model.checkpoints`), or a `PreTrainedModel` instance
        (then pass `tokenizer`). GGUF files and named models are dequantized once and cached
        as safetensors in ``$QKTRACE_CACHE`` (default ``~/.cache/qktrace``).
    remote
        False runs here; "local" runs nnsight's offline simulation of the NDIF round trip (the
        request is serialized and run with non-installed modules hidden); True runs on NDIF (the
        weights stay on the server; needs NDIF_API_KEY).
    tokenizer
        A tokenizer; by default loaded from `model`. It must be a fast tokenizer (qktrace locates
        tokens by character offsets).
    gguf_file
        The name of the ``.gguf`` file inside the directory `model`.
    revision, dtype, device_map, **hf_kwargs
        Passed to `from_pretrained` (ignored for an in-memory model).

    Examples
    --------
    >>> model = qktrace.load("meta-llama/Llama-3.1-8B-Instruct", remote=True)  # doctest: +SKIP
    >>> model.n_heads, model.n_kv_heads, model.d_head  # doctest: +SKIP
    (32, 8, 128)
    """
    from qktrace.model.remote import preflight

    _check_load_arguments(model, remote, revision, dtype, device_map, gguf_file)
    display_name, model = _converted(model, gguf_file, remote)
    if display_name is not None and revision is None:
        revision = _converted_revision(display_name)
    if remote is True:
        preflight(str(model))
    # In-trace helpers must travel with a remote request: ship qktrace.core.ops by value.
    nnsight.register(ops)
    if isinstance(model, torch.nn.Module):
        name, lm, tokenizer, config = _wrap_in_memory(model, tokenizer)
    else:
        # a converted checkpoint's revision names its source, not a hub revision
        hub_revision = None if display_name is not None else revision
        name, lm, tokenizer, config = _open_checkpoint(
            model, remote, tokenizer, hub_revision, dtype, device_map, hf_kwargs
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    n_layers, n_heads, n_kv, d_head = _config_facts(config)
    return Model(
        lm=lm,
        name=display_name or name,
        adapter=adapter_for(getattr(config, "model_type", type(config).__name__)),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_head=d_head,
        remote=remote,
        revision=revision,
    )


def _wrap_in_memory(model: torch.nn.Module, tokenizer: Any) -> tuple[str, Any, Any, Any]:
    """(name, nnsight model, tokenizer, config) of an in-memory `transformers` model."""
    if tokenizer is None:
        raise ValueError("load(<in-memory model>) needs tokenizer=...: pass the model's tokenizer.")
    config: Any = model.config
    name = getattr(config, "name_or_path", "") or type(model).__name__
    _check_before_loading(name, config, tokenizer)
    lm = nnsight.TransformersModel(model, task="text-generation", tokenizer=tokenizer)
    return name, lm, tokenizer, config


def _open_checkpoint(
    model: str | os.PathLike,
    remote: Remote,
    tokenizer: Any,
    revision: str | None,
    dtype: torch.dtype | str | None,
    device_map: str | None,
    hf_kwargs: dict[str, Any],
) -> tuple[str, Any, Any, Any]:
    """(name, nnsight model, tokenizer, config) of a hub id or a local checkpoint: config and
    tokenizer first, so an unsupported model is refused before any weights are read."""
    from qktrace.model.remote import name_model_offline

    name = str(model)
    local = isinstance(model, os.PathLike) or name.startswith(("/", "./", "../", "~"))
    if local and not Path(name).expanduser().exists():
        raise FileNotFoundError(
            f"No model at {name}: the local path does not exist. Check the path (a directory "
            "written by save_pretrained), or pass a hub id such as "
            "'meta-llama/Llama-3.1-8B-Instruct'."
        )
    config, tokenizer = _config_and_tokenizer(name, tokenizer, revision, hf_kwargs)
    _check_before_loading(name, config, tokenizer)
    kwargs = _from_pretrained_kwargs(hf_kwargs, revision, dtype, device_map)
    # On NDIF the weights stay on the server: only config and tokenizer are read here.
    if remote is True:
        name_model_offline(name)
    if remote is not True and local and "gguf_file" not in kwargs:
        _check_weights_present(Path(name).expanduser())
    try:
        lm = nnsight.TransformersModel(
            name, task="text-generation", tokenizer=tokenizer, dispatch=remote is not True,
            **kwargs,
        )  # fmt: skip
    except Exception as err:  # transformers' and safetensors' own error types vary
        raise OSError(
            f"Cannot load the weights of {name}: {_root_error(err)}. A truncated or damaged "
            "weights file (an interrupted download or copy) gives this: download or save the "
            "model again (model.save_pretrained(path))."
        ) from None
    return name, lm, tokenizer, lm.config


def _config_and_tokenizer(
    name: str, tokenizer: Any, revision: str | None, hf_kwargs: dict[str, Any]
) -> tuple[Any, Any]:
    """The checkpoint's config, and its tokenizer unless one is given (no weights read)."""
    from transformers import AutoConfig, AutoTokenizer

    hub = {k: hf_kwargs[k] for k in ("trust_remote_code", "token") if k in hf_kwargs}
    try:
        config = AutoConfig.from_pretrained(name, revision=revision, **hub)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, **hub)
    except OSError as err:
        raise OSError(
            f"Cannot open the model {name!r}: {err} If it is a local checkpoint, check the "
            "path; if it is a hub id, check its spelling, the network, and your access "
            "(`hf auth login` for gated models)."
        ) from err
    return config, tokenizer


def _from_pretrained_kwargs(
    hf_kwargs: dict[str, Any],
    revision: str | None,
    dtype: torch.dtype | str | None,
    device_map: str | None,
) -> dict[str, Any]:
    """`from_pretrained`'s keywords: the caller's, plus revision, dtype and device map."""
    kwargs: dict[str, Any] = dict(hf_kwargs)
    if revision is not None:
        kwargs["revision"] = revision
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    return kwargs


_WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt")


def _check_weights_present(path: Path) -> None:
    """Refuse a local model folder without weight files before transformers tries them."""
    if path.is_dir() and not any(any(path.glob(p)) for p in _WEIGHTS):
        raise FileNotFoundError(
            f"No weights in {path}: it has {sorted(f.name for f in path.iterdir())[:8]} but no "
            "model.safetensors (or pytorch_model.bin, or shards with an index). Save the model "
            "there with model.save_pretrained(path), or pass the folder that holds its weights."
        )


def _root_error(err: BaseException) -> str:
    """The innermost error of a transformers/safetensors load failure, as one line."""
    import re

    text = str(err)
    inner = re.findall(r"^\s*(\w+(?:Error|Exception): .+)$", text, flags=re.MULTILINE)
    line = inner[-1] if inner else text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(err).__name__}: {line.strip()}" if not inner else line.strip()


def _converted(
    model: str | os.PathLike | torch.nn.Module, gguf_file: str | None, remote: Remote
) -> tuple[str | None, Any]:
    """(display name, checkpoint dir) for a named model or a GGUF file, else (None, model).

    Those are dequantized once into the cache (`qktrace.model.checkpoints`) and opened from there.
    """
    from qktrace.model import checkpoints

    if isinstance(model, torch.nn.Module):
        return None, model
    name = os.fspath(model)
    if not checkpoints.is_convertible(name, gguf_file):
        return None, model
    if remote is True:
        raise ValueError(
            f"{name!r} is a local checkpoint (converted from GGUF), which NDIF does not host: "
            "load it with remote=False, or remote='local' to simulate the NDIF request offline."
        )
    converted = str(checkpoints.local_checkpoint(name, gguf_file))
    if name in checkpoints.NAMED:
        return name, converted
    return str(Path(name) / gguf_file if gguf_file else Path(name)), converted


def _converted_revision(name: str) -> str:
    """Provenance of a converted checkpoint: the pinned package, or the GGUF file."""
    from qktrace.model import checkpoints

    spec = checkpoints.NAMED.get(name)
    if spec is None:
        return f"gguf:{Path(name).name}"
    return f"{spec.package}=={spec.version} ({spec.member}), dequantized to float32"


def _check_before_loading(name: str, config: Any, tokenizer: Any) -> None:
    """Refuse what qktrace cannot use, before any weights are loaded."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"The tokenizer of {name} is a {type(tokenizer).__name__}, a slow (pure-Python) "
            "tokenizer; qktrace locates tokens by character offsets, which only fast tokenizers "
            "(transformers.PreTrainedTokenizerFast, backed by the `tokenizers` library) give. "
            "Pass tokenizer=AutoTokenizer.from_pretrained(<model>) (fast by default), or a "
            "PreTrainedTokenizerFast built from the slow one."
        )
    adapter_for(getattr(config, "model_type", type(config).__name__))


def iter_batches(items: Sequence[Any], batch_size: int) -> Iterator[tuple[int, Sequence[Any]]]:
    """(start index, slice) pairs over `items` in batches of `batch_size`."""
    if batch_size < 1:
        raise checks.BadArgument(f"batch_size must be >= 1, got {batch_size}.")
    for start in range(0, len(items), batch_size):
        yield start, items[start : start + batch_size]


def check_model(name: str, value: Any) -> Model:
    """A model loaded with `qktrace.load` (a `qktrace.model.loading.Model`)."""
    if not isinstance(value, Model):
        raise BadArgumentType(
            f"{name} is a {type(value).__name__} ({checks.shown(value)}), not a model loaded with "
            f"qktrace.load; pass {name}=qktrace.load('<hub id or path>')."
        )
    return value
