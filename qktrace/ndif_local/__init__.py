"""Your own NDIF on 127.0.0.1: the real NDIF server (ndif 0.1.2) on CPU, serving SmolLM2.

`python -m qktrace.ndif_local install|start|stop|status`; `LocalNDIF` does the same from Python
(the `ndif_server` test tier's fixture). `install` builds the server's own Python 3.11 venv
(`install.py`) and SmolLM2's offline hub-cache entry (`model_cache.py`); `server.py` starts and
stops the services; `server_side/` holds the one file the server imports (a CPU model actor).
"""
