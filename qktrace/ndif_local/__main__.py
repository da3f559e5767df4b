"""`python -m qktrace.ndif_local install|start|stop|status`: your own NDIF on 127.0.0.1.

`start` installs what is missing (a Python 3.11 venv with ndif 0.1.2, the SmolLM2 cache entry),
starts the server and prints the line to export; `stop` ends every process it started.
"""

from __future__ import annotations

import sys

from qktrace.ndif_local import install
from qktrace.ndif_local.server import LocalNDIF

USAGE = "usage: python -m qktrace.ndif_local install|start|stop|status"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("install", "start", "stop", "status"):
        print(USAGE, file=sys.stderr)
        return 2
    server = LocalNDIF()
    command = argv[0]
    if command == "install":
        install.install()
        from qktrace.ndif_local.model_cache import ensure_model

        ensure_model(server.hf_home)
    elif command == "start":
        host = server.start()
        cache = server.hf_home / "hub"
        print(f"export NDIF_HOST={host} HF_HUB_CACHE={cache} HF_HUB_OFFLINE=1")
    elif command == "stop":
        server.stop()
        print("ndif-local: stopped")
    else:
        up = server.alive()
        print(f"ndif-local: {'up at ' + server.host if up else 'not running'}")
        return 0 if up else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
