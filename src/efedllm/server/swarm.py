"""A local swarm on 127.0.0.1: a bootstrap DHT node in this process and server subprocesses.

Used by ``efedllm demo``, ``efedllm swarm up``, the swarm tests and the benchmarks. Every process
it starts is terminated (SIGTERM, then SIGKILL after a grace period) by ``shutdown()``. Each server
is started with ``--ready-file``: it writes its peer id, span and addresses there once it is online,
and :func:`peer_id_of` reads that file (not the server's log).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from efedllm.common.spans import Span
from efedllm.dht.identity import Identity, start_dht
from efedllm.dht.records import ServerInfo, ServerState
from efedllm.dht.servers import fetch_servers
from efedllm.models.weights import model_blocks


@dataclass
class ServerProcess:
    blocks: str
    process: subprocess.Popen
    log_path: str
    ready_path: str
    extra: list[str] = field(default_factory=list)

    def ready(self) -> dict | None:
        """What the server wrote to its ready file once online (peer id, blocks, addresses), or None yet."""
        try:
            with open(self.ready_path) as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None

    def log(self) -> str:
        try:
            with open(self.log_path) as handle:
                return handle.read()
        except OSError:
            return ""


def even_spans(num_blocks: int, servers: int) -> list[Span]:
    bounds = [round(index * num_blocks / servers) for index in range(servers + 1)]
    return [Span(bounds[index], bounds[index + 1]) for index in range(servers)]


def threads_per_server(servers: int, cores: int) -> int:
    """Torch threads for each of ``servers`` servers sharing ``cores`` cores: their share, at least one.
    Measured (benchmarks/throughput.py, 3 servers on 2 cores, one run): 8 concurrent sessions 13 tokens/s
    at 2 threads each against 30 at 1, and a single stream 10.5 against 12: two OpenMP teams on one core
    wait at every barrier for a partner that is not running."""
    if servers < 1 or cores < 1:
        raise ValueError(f"need servers >= 1 and cores >= 1, got {servers} and {cores}")
    return max(1, cores // servers)


def machine_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0))


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def peer_id_of(server: ServerProcess, timeout: float = 10.0) -> str | None:
    """The peer id in a server's ready file; waits up to ``timeout`` s for it, since a server
    announces itself online in the DHT just before it writes the file."""
    deadline = time.monotonic() + timeout
    while True:
        ready = server.ready()
        if ready is not None:
            return ready["peer_id"]
        if time.monotonic() > deadline or server.process.poll() is not None:
            return None
        time.sleep(0.1)


def server_environment(environment) -> dict:
    """The environment of a server started beside others on this machine (unless the caller's sets it):
    idle OpenMP workers spin briefly (``GOMP_SPINCOUNT=10000``, tens of microseconds), then sleep. The gaps
    between a step's operations are shorter, so workers stay awake through a step; between steps they sleep
    and leave the cores to the server computing next. Measured on a 30-block decode step in one process:
    29 ms with this or libgomp's default spinning, 52 ms with ``OMP_WAIT_POLICY=PASSIVE`` (every operation
    then wakes its workers)."""
    return {"GOMP_SPINCOUNT": "10000", **environment, "HF_HUB_OFFLINE": "1"}


class LocalSwarm:
    def __init__(self, model: str = "smollm2-135m", log_dir: str | None = None) -> None:
        self.model = model
        self.log_dir = log_dir  # None: a fresh folder per swarm, made when the first server starts
        self.servers: list[ServerProcess] = []
        self.dht = None

    def start_bootstrap(self) -> list[str]:
        self.dht = start_dht(Identity.generate(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        return self.initial_peers

    @property
    def initial_peers(self) -> list[str]:
        return [str(maddr) for maddr in self.dht.get_visible_maddrs()]

    def start_server(self, blocks: str | None = None, num_blocks: int | None = None, extra: list[str] = ()) -> ServerProcess:
        if self.log_dir is None:
            self.log_dir = tempfile.mkdtemp(prefix=f"efedllm-swarm-{os.getpid()}-")
        os.makedirs(self.log_dir, exist_ok=True)
        log_path = os.path.join(self.log_dir, f"server-{len(self.servers)}.log")
        ready_path = os.path.join(self.log_dir, f"server-{len(self.servers)}.ready.json")
        if os.path.exists(ready_path):
            os.remove(ready_path)  # a folder reused from an earlier swarm: wait for this server's own file
        command = [sys.executable, "-m", "efedllm.cli", "serve", "--model", self.model, "--host", "127.0.0.1",
                   *[argument for peer in self.initial_peers for argument in ("--initial-peers", peer)],
                   "--ready-file", ready_path, *extra]
        command += ["--blocks", blocks] if blocks else ["--num-blocks", str(num_blocks)]
        with open(log_path, "w") as log:
            # own process group: stopping a server also stops its p2p daemon, as if the machine died
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                       env=server_environment(os.environ))
        server = ServerProcess(blocks or f"auto:{num_blocks}", process, log_path, ready_path, list(extra))
        self.servers.append(server)
        return server

    def server_records(self) -> tuple[dict[str, ServerInfo], int]:
        total = model_blocks(self.model)
        return fetch_servers(self.dht, self.model, total), total

    def wait_until_online(self, count: int, timeout: float = 180.0) -> dict:
        """Wait until ``count`` servers announce themselves online; raise with their logs if not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for server in self.servers:
                if server.process.poll() is not None:
                    raise RuntimeError(f"server {server.blocks} exited with {server.process.returncode}:\n{server.log()[-3000:]}")
            records, _ = self.server_records()
            online = {peer: info for peer, info in records.items() if info.state is ServerState.ONLINE}
            if len(online) >= count:
                return online
            time.sleep(0.5)
        raise TimeoutError(f"only some of {count} servers came online in {timeout} s")

    def send_signal(self, server: ServerProcess, sig: int) -> None:
        """SIGKILL: the server's whole process group (it and its p2p daemon, as if the machine died);
        any other signal: the server alone, which then leaves cleanly through its own DHT child."""
        if sig == signal.SIGKILL:
            _signal_group(server.process, sig)
        else:
            server.process.send_signal(sig)

    def kill(self, server: ServerProcess, sig: int = signal.SIGKILL) -> None:
        """:meth:`send_signal`, then wait for the server to exit."""
        self.send_signal(server, sig)
        server.process.wait(timeout=30)

    def shutdown(self, grace: float = 10.0) -> None:
        for server in self.servers:
            if server.process.poll() is None:
                server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for server in self.servers:
            try:
                server.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(server.process, signal.SIGKILL)
                server.process.wait()
            _signal_group(server.process, signal.SIGKILL)  # whatever the server left behind in its group
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
