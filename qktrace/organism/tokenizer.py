"""The organism's word-level tokenizer: one token per word, item, object, letter and mark.

Design
------
- **Model**: `tokenizers` WordLevel over a closed vocabulary built from the same sources the
  studies draw from (``data/categories.json``, ``data/objects.json``, ``data/box_letters.json``)
  plus every word of the prompt templates (taken from prompts the study builders make, so a
  template change is picked up when the tokenizer is rebuilt). Unknown words map to ``<unk>``.
- **Pre-tokenizer**: split on whitespace, then isolate every punctuation character, so
  "Box K," gives "Box", "K", "," and character offsets point at the words themselves (what
  `qktrace.core.prompts.locate` reads).
- **Multi-word items** ("polar bear", "South Korea", "US state", ...) are kept whole: they are
  added tokens (``single_word=True``), matched before pre-tokenization, so every item of
  ``data/categories.json`` is exactly one token and its span's last token is the item itself.
  ("US states", the plural used in questions, is one added token too.)
- **Special tokens**: ``<s>`` (bos), ``</s>`` (eos), ``<pad>``, ``<unk>``, and the chat markers
  ``<|user|>``, ``<|assistant|>``, ``<|system|>``, ``<|end|>``. The chat template is the one of
  `qktrace.model.testing` (role marker, message, ``<|end|>``; generation prompt ``<|assistant|>``).
  Without the template, the post-processor prepends ``<s>``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from qktrace.model.testing import CHAT_TEMPLATE, SPECIAL_TOKENS

__all__ = ["build_tokenizer", "vocabulary_words", "multiword_items", "CHAT_TEMPLATE"]


def _data() -> tuple[dict[str, Any], list[str], list[str]]:
    from qktrace.core.prompts import load_box_letters, load_categories, load_objects

    return load_categories(), load_objects(), load_box_letters()


def multiword_items() -> list[str]:
    """Every item, object or category name of data/ with a space in it (each becomes one token)."""
    categories, objects, letters = _data()
    names = list(objects) + list(letters)
    for cat, entry in categories.items():
        names += [cat, entry["plural"], *entry["items"]]
    return sorted({n for n in names if " " in n}, key=lambda s: (-len(s), s))


def _pre_tokenizer() -> Any:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )


def vocabulary_words(texts: Iterable[str]) -> list[str]:
    """The single-word tokens of `texts`, data/ words included, in a stable order."""
    categories, objects, letters = _data()
    multi = multiword_items()  # longest first: "US states" before "US state"
    words: list[str] = []
    for cat, entry in categories.items():
        words += [cat, entry["plural"], *entry["items"]]
    words += list(objects) + list(letters)
    words = [w for w in words if w not in multi]
    pre = _pre_tokenizer()
    for text in texts:
        for name in multi:  # remove them as the added tokens would match them
            text = text.replace(name, " ")
        words += [w for w, _ in pre.pre_tokenize_str(text)]
    return list(dict.fromkeys(words))


def build_tokenizer(texts: Iterable[str]) -> Any:
    """A `PreTrainedTokenizerFast` over data/ words plus every word of `texts` (template words).

    Token ids: the special tokens first (``<s>`` = 0, ``</s>`` = 1, ``<pad>`` = 2, ``<unk>`` = 3,
    then the chat markers), then the words in order of first appearance, then the multi-word
    items.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in vocabulary_words(texts):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens(
        [AddedToken(name, single_word=True, normalized=False) for name in multiword_items()]
    )
    tok.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        model_max_length=256,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
