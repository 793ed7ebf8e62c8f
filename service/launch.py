"""Start a real server as a subprocess on free local ports, for the end-to-end tests and the load tests.

    with launch(model="models/locca-tiny-shapes", backend="torch") as server:
        LoccaClient(server.url).caption(image)

Settings go in as LOCCA_* environment variables, exactly as a deployment sets them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    grpc_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def get(self, path: str, timeout: float = 5.0) -> httpx.Response:
        return httpx.get(self.url + path, timeout=timeout)

    def wait(self, path: str = "/readyz", timeout: float = 120.0) -> None:
        """Until `path` answers 200 (e.g. /healthz: listening; /readyz: warmed up)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if self.get(path, timeout=1.0).status_code == 200:
                    return
            time.sleep(0.02)
        raise TimeoutError(f"{path} not 200 after {timeout}s:\n{self.log()}")

    def worker_pids(self) -> list[int]:
        """The model worker processes (multiprocessing spawn children, not its resource tracker)."""
        pids = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd = (p / "cmdline").read_bytes().decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == self.proc.pid and "spawn_main" in cmd and "resource_tracker" not in cmd:
                pids.append(int(p.name))
        return pids

    def metric(self, name: str, labels: str = "") -> float:
        """The value of one sample of /metrics (0 when absent), e.g. metric("locca_requests_aborted_total",
        'reason="cancelled"')."""
        key = f"{name}{{{labels}}}" if labels else name
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(key + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""


def start(log_path: str | Path, env: dict | None = None, **settings) -> ServerProcess:
    """Start `locca serve` with LOCCA_<KEY>=value for every keyword, and `env` besides (e.g. OTEL_* variables);
    ports are picked unless given."""
    port = settings.pop("port", None) or free_port()
    grpc_port = settings.pop("grpc_port", None) or free_port()
    env = {**os.environ, **(env or {}), "LOCCA_HOST": "127.0.0.1", "LOCCA_PORT": str(port),
           "LOCCA_GRPC_PORT": str(grpc_port), **{f"LOCCA_{k.upper()}": str(v) for k, v in settings.items()}}
    log_path = Path(log_path)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    return ServerProcess(proc, port, grpc_port, log_path)


@contextlib.contextmanager
def launch(log_path: str | Path = "/tmp/locca-serve.log", ready: bool = True, env: dict | None = None, **settings):
    server = start(log_path, env, **settings)
    try:
        server.wait("/readyz" if ready else "/healthz")
        yield server
    finally:
        server.stop()
