"""Architecture families: where each keeps its attention, relative to the nnsight model.

Its own module, below `qktrace.model.loading` and `qktrace.model.checkpoints`, because both need the list
(the models to trace; the GGUF architectures worth dequantizing). `qktrace.model.loading` re-exports
every name here.
"""

from __future__ import annotations

from dataclasses import dataclass

from qktrace.core.errors import BadArgument

__all__ = ["ADAPTERS", "Adapter", "adapter_for", "register_adapter"]


@dataclass(frozen=True)
class Adapter:
    """Where one architecture family keeps its attention, relative to the nnsight model, and
    where its attention call takes q, k and the mask (positional indices; the mask may also
    come as the keyword ``attention_mask``)."""

    family: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    attention: str = "self_attn"
    # positions of q, k and the mask in the attention call (the mask may come as a keyword)
    query_arg: int = 1
    key_arg: int = 2
    mask_arg: int = 4


ADAPTERS: list[Adapter] = [
    Adapter("llama", ("llama",)),
    Adapter("qwen2", ("qwen2", "qwen2_moe")),
    Adapter("qwen3", ("qwen3", "qwen3_moe")),
    Adapter("mistral", ("mistral", "mixtral", "ministral")),
    Adapter("gemma", ("gemma", "gemma2", "gemma3_text")),
    Adapter("olmo", ("olmo", "olmo2")),
    Adapter("phi3", ("phi3",)),
    Adapter("gpt2", ("gpt2",), layers="transformer.h", attention="attn"),
    Adapter("gpt_neox", ("gpt_neox",), layers="gpt_neox.layers", attention="attention"),
]


def register_adapter(adapter: Adapter) -> None:
    """Teach qktrace a new architecture family (its `model_type`s and module paths)."""
    ADAPTERS.insert(0, adapter)


def adapter_for(model_type: str) -> Adapter:
    """The adapter for a `config.model_type`; a clear error listing what is supported."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = ", ".join(sorted(t for a in ADAPTERS for t in a.model_types))
    raise BadArgument(
        f"Unsupported architecture model_type={model_type!r}. Supported: {supported}. "
        "To add one, point qktrace at its decoder layers and attention module, e.g. "
        "qktrace.model.loading.register_adapter(qktrace.model.loading.Adapter('myfam', ('my_model_type',), "
        "layers='model.layers', attention='self_attn')); its attention forward must call "
        "transformers' attention_interface(self, query, key, value, mask, ...)."
    )
