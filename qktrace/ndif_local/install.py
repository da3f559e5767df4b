"""Install the local NDIF server's own Python 3.11 venv, once, from the pinned requirements.

NDIF 0.1.2 declares Python >= 3.12 but runs on 3.11 (the only CPU torch wheel at hand here), so
`ndif` itself goes in with ``--no-deps --ignore-requires-python`` and its dependencies normally
from ``server-requirements.txt`` (installing everything with --ignore-requires-python would pull
sdists that need Python 3.12). redis comes from the system (Debian: ``apt-get install
redis-server``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from qktrace.core.errors import QktraceError

NDIF_VERSION = "0.1.2"
TORCH_VERSION = "2.13.0"
REQUIREMENTS = Path(__file__).with_name("server-requirements.txt")
PYTHON_ENV = "QKTRACE_NDIF_PYTHON"


class ServerSetupFailed(QktraceError, RuntimeError):
    """The local NDIF server could not be installed or started; the message names the fix."""


def home() -> Path:
    """Where the server venv and its model cache live: $QKTRACE_NDIF_HOME, else
    ``~/.cache/qktrace/ndif-local``."""
    configured = os.environ.get("QKTRACE_NDIF_HOME")
    return (
        Path(configured).expanduser() if configured else Path.home() / ".cache/qktrace/ndif-local"
    )


def venv(root: Path | None = None) -> Path:
    return (root or home()) / "venv"


def installed(root: Path | None = None) -> bool:
    """Whether the venv is complete (written last, after every package went in)."""
    return (venv(root) / "qktrace-ndif-installed").exists()


def find_python311() -> str:
    """A Python 3.11 interpreter to build the venv with ($QKTRACE_NDIF_PYTHON, else on PATH)."""
    for candidate in (os.environ.get(PYTHON_ENV), "python3.11"):
        if candidate and shutil.which(candidate):
            return candidate
    if sys.version_info[:2] == (3, 11):
        return sys.executable
    raise ServerSetupFailed(
        "The local NDIF server needs Python 3.11 for its venv, and none was found: install "
        f"python3.11, or point {PYTHON_ENV} at one."
    )


def install(root: Path | None = None, log=print) -> Path:
    """Create the server venv unless it is complete; return its path."""
    target = venv(root)
    if installed(root):
        return target
    if not shutil.which("redis-server"):
        raise ServerSetupFailed(
            "The local NDIF server needs redis-server: `apt-get install -y redis-server` "
            "(Debian/Ubuntu) or `brew install redis`, then start again."
        )
    pip = [str(target / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    steps = [
        [find_python311(), "-m", "venv", str(target)],
        # plain pip: a CPU wheel where pip is set up for one (CI), PyPI's build elsewhere
        pip + [f"torch=={TORCH_VERSION}"],
        pip + ["--no-deps", "--ignore-requires-python", f"ndif=={NDIF_VERSION}"],
        pip + ["-r", str(REQUIREMENTS)],
    ]
    for step in steps:
        log("ndif-local: " + " ".join(step[:6]) + (" ..." if len(step) > 6 else ""))
        done = subprocess.run(["nice", "-n", "10", *step], capture_output=True, text=True)
        if done.returncode:
            raise ServerSetupFailed(
                f"Installing the local NDIF server failed at `{' '.join(step)}`:\n"
                f"{done.stderr[-2000:]}\nFix the cause (network, disk) and run "
                "`python -m qktrace.ndif_local install` again; delete "
                f"{target} to start from scratch."
            )
    (target / "qktrace-ndif-installed").write_text(f"ndif=={NDIF_VERSION}\n")
    return target
