"""Start and stop a real NDIF server (ndif 0.1.2) on 127.0.0.1, on CPU, serving SmolLM2.

What runs, each in its own process group, all bound to or talking to 127.0.0.1 only: redis,
moto's S3 server (NDIF's object store for results), a one-node Ray cluster with a fake GPU
(NDIF's controller only manages nodes with a "GPU" resource and sizes models by
``cuda_memory_bytes``), NDIF's controller (a Ray actor), and NDIF's API (gunicorn + its queue
dispatcher). SmolLM2-135M-Instruct is deployed explicitly with its model key and size (ndif
0.1.2's deploy-on-first-request calls an nnsight API that 0.8.1 lacks, and would ask the hub).

Every process started carries a per-run token in its environment; `stop` ends the process
groups it started and then any process that still carries the token (Ray daemonizes some of
its own), by pid, and nothing else.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qktrace.ndif_local import install, model_cache
from qktrace.ndif_local.install import ServerSetupFailed

LOOPBACK = "127.0.0.1"
TOKEN_ENV = "QKTRACE_NDIF_RUN"
SHIM = Path(__file__).with_name("server_side")
MODEL_SIZE_BYTES = 538090408  # SmolLM2-135M-Instruct in float32: the deploy skips the hub's count
FAKE_GPU_MEMORY = 8 * 1024**3
MODEL_KEY = "nnsight.modeling.transformers.TransformersModel:" + json.dumps(
    {"repo_id": model_cache.HUB_ID, "revision": None, "task": "text-generation"}
)
# evict the model's replicas (by model key: `ndif evict --all` finds none, ndif 0.1.2's status
# lists them in another shape; by checkpoint it asks the hub for the key), deploy the spec again
REDEPLOY = """
import sys
from pathlib import Path
from ndif.cli.lib.deploy import deploy
from ndif.cli.lib.evict import evict
from ndif.cli.lib.model_config import load_model_config
specs = load_model_config(Path(sys.argv[1]))
evict(model_keys=[spec["model_key"] for spec in specs], on_message=print)
failed = [d for d in deploy(specs, on_message=print)["deployments"] if d["status"] != "READY"]
sys.exit(f"not ready: {failed}" if failed else 0)
"""
RESULTS_BUCKET = "ndif-results"  # NDIF_OBJECT_STORE_BUCKET's default
PORT_NAMES = (
    "redis", "s3", "api", "ray_gcs", "ray_client", "ray_dashboard", "ray_node_manager",
    "ray_object_manager", "ray_metrics", "ray_agent_grpc", "ray_agent_http", "ray_runtime_env",
)  # fmt: skip


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 right now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class State:
    """What a running server is made of; saved as JSON in its run folder."""

    token: str
    ports: dict[str, int]
    groups: dict[str, int] = field(default_factory=dict)  # service -> process group id
    ray_temp: str = ""

    @property
    def host(self) -> str:
        return f"http://{LOOPBACK}:{self.ports['api']}"


class LocalNDIF:
    """One NDIF server on this machine; `run_dir` holds its logs and state (one server each).

    >>> server = LocalNDIF(Path("/tmp/ndif-run"))  # doctest: +SKIP
    >>> server.start(); print(server.host); server.stop()  # doctest: +SKIP
    """

    def __init__(
        self, run_dir: Path | None = None, root: Path | None = None, inline_limit: int = 0
    ) -> None:
        """`inline_limit` > 0 sends results larger than that many bytes through the object
        store (NDIF hands smaller ones back on the websocket, up to redis's pubsub buffer
        limit, 8 MiB by default): the tests use it to exercise the download path."""
        self.root = root or install.home()
        self.inline_limit = inline_limit
        self.run_dir = Path(run_dir or self.root / "run")
        self.state: State | None = self._load_state()

    # ---- paths and environment ------------------------------------------------------------
    @property
    def venv(self) -> Path:
        return install.venv(self.root)

    @property
    def hf_home(self) -> Path:
        return self.root / "hf"

    @property
    def host(self) -> str:
        if self.state is None:
            raise ServerSetupFailed("The local NDIF server is not running: start it first.")
        return self.state.host

    def _state_file(self) -> Path:
        return self.run_dir / "state.json"

    def _load_state(self) -> State | None:
        try:
            return State(**json.loads(self._state_file().read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _save_state(self) -> None:
        assert self.state is not None
        self._state_file().write_text(json.dumps(asdict(self.state)))

    def env(self) -> dict[str, str]:
        """The environment of every server process."""
        assert self.state is not None
        p = self.state.ports
        env = dict(os.environ)
        for leaked in ("RAY_ADDRESS", "VIRTUAL_ENV", "PYTHONHOME"):
            env.pop(leaked, None)
        env.update(
            PATH=f"{self.venv / 'bin'}:{env.get('PATH', '')}",
            PYTHONPATH=str(SHIM),
            HF_HOME=str(self.hf_home),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            NDIF_HOME=str(self.run_dir / "ndif"),
            NDIF_REDIS_URL=f"redis://{LOOPBACK}:{p['redis']}",
            NDIF_OBJECT_STORE_URL=f"http://{LOOPBACK}:{p['s3']}",
            NDIF_RAY_ADDRESS=f"ray://{LOOPBACK}:{p['ray_client']}",
            NDIF_RAY_TEMP_DIR=self.state.ray_temp,
            NDIF_RAY_DASHBOARD_PORT=str(p["ray_dashboard"]),
            NDIF_API_URL=self.state.host,
            NDIF_API_PORT=str(p["api"]),
            NDIF_DEFAULT_MODEL_ACTOR_CLASS="ndif_cpu_actor.CPUModelActor",
            NDIF_DEFAULT_DTYPE="float32",
            # Ray: use the loopback address for this node everywhere (head, workers, clients)
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            RAY_USAGE_STATS_ENABLED="0",
            GRPC_ENABLE_FORK_SUPPORT="0",
            **{TOKEN_ENV: self.state.token},
        )
        return env

    # ---- start ----------------------------------------------------------------------------
    def start(self, log=print) -> str:
        """Install what is missing, start every service, deploy SmolLM2; return the API URL.

        On any failure everything already started is stopped again.
        """
        if self.state is not None and self.alive():
            return self.state.host
        self.stop()
        install.install(self.root, log=log)
        model_cache.ensure_model(self.hf_home)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))
        # Ray's socket paths must stay short (107 characters): its temp folder lives in /tmp
        ray_temp = tempfile.mkdtemp(prefix="qkndif-ray-")
        self.state = State(token=secrets.token_hex(8), ports=ports, ray_temp=ray_temp)
        self._save_state()
        try:
            started = time.monotonic()
            self._start_stores()
            self._start_ray()
            self._start_api()
            self._deploy()
            log(f"ndif-local: up at {self.state.host} in {time.monotonic() - started:.0f} s")
        except BaseException:
            self.stop()
            raise
        return self.state.host

    def _spawn(self, name: str, command: list[str]) -> None:
        """Start `command` in a new process group, its output in the run folder's logs."""
        assert self.state is not None
        logs = self.run_dir / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / f"{name}.log", "ab") as out:
            process = subprocess.Popen(
                ["nice", "-n", "10", *command], env=self.env(), stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                cwd=self.run_dir,
            )  # fmt: skip
        self.state.groups[name] = process.pid
        self._save_state()

    def _run(self, name: str, command: list[str], extra: dict[str, str] | None = None) -> str:
        """Run a short server command to completion; its output, or a clear error."""
        done = subprocess.run(
            ["nice", "-n", "10", *command], env={**self.env(), **(extra or {})},
            capture_output=True, text=True, timeout=300,
            cwd=self.run_dir,
        )  # fmt: skip
        (self.run_dir / "logs" / f"{name}.log").write_text(done.stdout + done.stderr)
        if done.returncode:
            raise ServerSetupFailed(
                f"The local NDIF server's step {name!r} failed (exit {done.returncode}):\n"
                f"{(done.stdout + done.stderr)[-3000:]}\nLogs: {self.run_dir / 'logs'}."
            )
        return done.stdout

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.5)
        raise ServerSetupFailed(
            f"The local NDIF server's {what} did not come up in {timeout:.0f} s; see the logs "
            f"in {self.run_dir / 'logs'}."
        )

    def _start_stores(self) -> None:
        p = self.state.ports  # type: ignore[union-attr]
        redis = shutil.which("redis-server") or "redis-server"
        limits = []
        if self.inline_limit:  # NDIF inlines results up to min(soft, hard / 2) of this limit
            soft = self.inline_limit
            limits = ["--client-output-buffer-limit", f"pubsub {2 * soft} {soft} 60"]
        self._spawn("redis", [redis, "--port", str(p["redis"]), "--bind", LOOPBACK,
                              "--save", "", "--appendonly", "no", *limits])  # fmt: skip
        self._start_object_store()
        self._wait("redis", lambda: _port_open(p["redis"]), 30)

    def _start_object_store(self) -> None:
        p = self.state.ports  # type: ignore[union-attr]
        self._spawn("s3", [str(self.venv / "bin/moto_server"), "-H", LOOPBACK, "-p", str(p["s3"])])
        self._wait("object store", lambda: _http_ok(f"http://{LOOPBACK}:{p['s3']}/"), 60)
        # moto keeps buckets in memory, and NDIF makes its results bucket once per process: a
        # restarted store gets it back here, as a persistent store (NDIF's rustfs) keeps it
        bucket = f"http://{LOOPBACK}:{p['s3']}/{RESULTS_BUCKET}"
        urllib.request.urlopen(urllib.request.Request(bucket, method="PUT"), timeout=10).close()

    def _start_ray(self) -> None:
        p = self.state.ports  # type: ignore[union-attr]
        # NDIF's own resource list (a "head" resource the controller is pinned to, CPU memory),
        # with a fake GPU's memory: the controller sizes models by it
        resources = json.loads(self._run("resources", [
            str(self.venv / "bin/python"), "-m", "ndif.services.ray.resources", "--head",
        ]).strip().splitlines()[-1])  # fmt: skip
        resources = json.dumps({**resources, "cuda_memory_bytes": FAKE_GPU_MEMORY})
        self._spawn("ray", [
            str(self.venv / "bin/ray"), "start", "--head", "--block",
            f"--node-ip-address={LOOPBACK}", f"--port={p['ray_gcs']}",
            f"--ray-client-server-port={p['ray_client']}",
            "--include-dashboard=true", f"--dashboard-host={LOOPBACK}",
            f"--dashboard-port={p['ray_dashboard']}",
            f"--node-manager-port={p['ray_node_manager']}",
            f"--object-manager-port={p['ray_object_manager']}",
            f"--metrics-export-port={p['ray_metrics']}",
            f"--dashboard-agent-grpc-port={p['ray_agent_grpc']}",
            f"--dashboard-agent-listen-port={p['ray_agent_http']}",
            f"--runtime-env-agent-port={p['ray_runtime_env']}",
            # a fake GPU: NDIF's controller only manages nodes that have one
            "--num-gpus=1", "--num-cpus=4", f"--resources={resources}",
            "--object-store-memory=1000000000", f"--temp-dir={self.state.ray_temp}",  # type: ignore[union-attr]
            "--disable-usage-stats",
        ])  # fmt: skip
        self._wait("Ray head", lambda: _port_open(p["ray_client"]), 120)
        controller = "ndif.services.ray.deployments.controller.controller"
        env_address = {"RAY_ADDRESS": f"{LOOPBACK}:{p['ray_gcs']}"}
        self._run("controller", [str(self.venv / "bin/python"), "-m", controller], env_address)

    def _start_api(self) -> None:
        p = self.state.ports  # type: ignore[union-attr]
        self._spawn("api", [
            str(self.venv / "bin/gunicorn"), "--config", "python:ndif.services.api.gunicorn_conf",
            "--bind", f"{LOOPBACK}:{p['api']}",
            # gunicorn 27 otherwise puts a control socket in ~/.gunicorn, shared by every server
            "--control-socket", str(self.run_dir / "gunicorn.ctl"),
            "ndif.services.api.app:app",
        ])  # fmt: skip
        self._wait("API", lambda: _http_ok(f"{self.state.host}/ping"), 120)  # type: ignore[union-attr]

    def _deploy(self, execution_timeout: float | None = None, replace: bool = False) -> None:
        spec = self.run_dir / "deploy.json"  # JSON is YAML
        spec.write_text(json.dumps({"models": [{
            "checkpoint": model_cache.HUB_ID, "model_key": MODEL_KEY,
            "size_bytes": MODEL_SIZE_BYTES, "dtype": "float32", "pinned": True,
            "execution_timeout_seconds": execution_timeout,
        }]}))  # fmt: skip
        if not replace:
            self._run("deploy", [str(self.venv / "bin/ndif"), "deploy", "-f", str(spec)])
        else:
            self._run("redeploy", [str(self.venv / "bin/python"), "-c", REDEPLOY, str(spec)])

    def redeploy(self, execution_timeout: float | None = None) -> None:
        """Replace SmolLM2's replica by one whose requests stop after `execution_timeout`
        seconds (None: no limit, NDIF's default). NDIF's model actor races each request
        against the limit its deployment was given and answers one that runs past it with an
        ERROR ("Your job exceeded the execution timeout of ...s."). For the fault tests; ~20 s."""
        self._deploy(execution_timeout, replace=True)

    # ---- status and stop ------------------------------------------------------------------
    def alive(self) -> bool:
        """Whether the API answers."""
        return self.state is not None and _http_ok(f"{self.state.host}/ping")

    def pids(self) -> list[int]:
        """Every live process this server started (found by the run token), by pid."""
        if self.state is None:
            return []
        marker = f"{TOKEN_ENV}={self.state.token}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if marker in (entry / "environ").read_bytes().split(b"\0"):
                        found.append(int(entry.name))
                except OSError:
                    continue
        return found

    def kill_service(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill one service's process group (for fault tests)."""
        assert self.state is not None
        os.killpg(self.state.groups.pop(name), sig)
        self._save_state()

    def restart_service(self, name: str) -> None:
        """Start a killed service again: "api" or "s3" (an empty object store)."""
        {"api": self._start_api, "s3": self._start_object_store}[name]()

    def stop(self) -> None:
        """Stop every process this server started, by process group then by pid; forget it."""
        if self.state is None:
            return
        for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            for group in self.state.groups.values():
                try:
                    os.killpg(group, sig)
                except ProcessLookupError:
                    pass
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self.pids():
                break
        if self.state.ray_temp:
            shutil.rmtree(self.state.ray_temp, ignore_errors=True)
        self._state_file().unlink(missing_ok=True)
        self.state = None


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((LOOPBACK, port)) == 0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status < 500
    except (OSError, ValueError):
        return False
