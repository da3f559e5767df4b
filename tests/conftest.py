"""Shared fixtures: tiny random-weight models of every family, with offline tokenizers."""

from __future__ import annotations

import warnings

import pytest

import qktrace.testing as testing
from qktrace.models import load

warnings.filterwarnings("ignore", message=".*deprecated.*")

_CACHE: dict[tuple, tuple] = {}
_PADDING_SIDE: dict[tuple, str] = {}


def tiny(family: str = "llama", tokenizer_style: str = "bpe", **overrides):
    """A cached tiny (model, tokenizer) pair of a family."""
    key = (family, tokenizer_style, tuple(sorted(overrides.items())))
    if key not in _CACHE:
        _CACHE[key] = testing.model(family, tokenizer_style=tokenizer_style, **overrides)
        _PADDING_SIDE[key] = _CACHE[key][1].padding_side
    return _CACHE[key]


@pytest.fixture
def llama():
    net, tok = tiny("llama")
    return load(net, tokenizer=tok)


@pytest.fixture(params=[False, "local"], ids=["local", "remote-local"])
def remote(request):
    return request.param


@pytest.fixture(autouse=True)
def _restore_padding_side():
    """Tests may set a cached tokenizer's padding side; give every test the default again."""
    yield
    for key, (_, tok) in _CACHE.items():
        tok.padding_side = _PADDING_SIDE[key]
