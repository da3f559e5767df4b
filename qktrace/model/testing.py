"""Tiny random-weight models and offline tokenizers, for tests, benchmarks and demos.

No hub access is needed: tokenizers are trained here in milliseconds on a small built-in corpus,
and models are built from configs. Two tokenizer styles cover the two families of real
tokenizers: byte-level BPE (GPT-2, Llama 3, Qwen) and Metaspace "▁word" pieces
(SentencePiece-style: Llama 2, Mistral, Gemma). Both carry a chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = [
    "The apple is in Box A, the cat is in Box B, and the ship is in Box C.",
    "Which box is the apple in? Box A. Which box is the cat in? Box B.",
    "- apple\n- horse\n- water\n- truck\n- France\nWhat are the fruits in the list?",
    "banana cherry mango tiger eagle salmon milk juice bus train plane Spain Japan tennis",
    "Paris London Texas Ohio bread cheese rice soccer golf robin sparrow trout shark",
    "user assistant system What is the first animal in the list? the last vehicle",
    "0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz .,;:!?'\"-()",
]

SPECIAL_TOKENS = [
    "<s>",
    "</s>",
    "<pad>",
    "<unk>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<|end|>",
]


def tokenizer(style: str = "bpe", *, corpus: list[str] | None = None, vocab_size: int = 400) -> Any:
    """An offline fast tokenizer with a chat template: style "bpe" (byte-level) or "metaspace"."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = (corpus or _CORPUS) * 4
    if style == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    elif style == "metaspace":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted(set("".join(texts)) | {"▁", "\n"})
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet
        )
    else:
        raise ValueError(f"Unknown tokenizer style {style!r}: use 'bpe' or 'metaspace'.")
    tok.train_from_iterator(texts, trainer)
    from tokenizers.processors import TemplateProcessing

    bos = tok.token_to_id("<s>")
    tok.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "gpt2", "gpt_neox")


def config(
    family: str = "llama", *, vocab_size: int = 400, layers: int = 2, **overrides: Any
) -> Any:
    """A tiny config of a family: d_model 64, 4 heads of 16 (2 key heads where the family has GQA)."""
    from transformers import AutoConfig

    base: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    if family == "gpt2":
        base = dict(
            vocab_size=vocab_size,
            n_embd=64,
            n_layer=layers,
            n_head=4,
            n_positions=256,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
        )
    elif family == "gpt_neox":
        base.update(num_key_value_heads=4, rotary_pct=0.25)
    elif family in ("gemma2", "gemma3_text"):
        base.update(sliding_window=8, query_pre_attn_scalar=16)
    elif family == "mistral":
        base.update(sliding_window=8)
    base.update(overrides)
    return AutoConfig.for_model(family, **base)


def model(
    family: str = "llama", *, seed: int = 0, tokenizer_style: str = "bpe", **overrides: Any
) -> tuple[Any, Any]:
    """A tiny random-weight (model, tokenizer) pair with eager attention, in eval mode."""
    from transformers import AutoModelForCausalLM

    tok = tokenizer(tokenizer_style)
    torch.manual_seed(seed)
    cfg = config(family, vocab_size=len(tok), **overrides)
    net = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    return net, tok


def save_checkpoint(path: str | Path, family: str = "llama", **kwargs: Any) -> Path:
    """Write a tiny model and its tokenizer with `save_pretrained`, as a hub checkpoint would be."""
    path = Path(path)
    net, tok = model(family, **kwargs)
    net.save_pretrained(path)
    tok.save_pretrained(path)
    return path
