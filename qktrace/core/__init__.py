"""The lowest layer: errors, validators, in-trace tensor ops, intervals, prompts and spans.

Imports torch, numpy and the tokenizer's text only; nothing here knows a model or a store.
"""
