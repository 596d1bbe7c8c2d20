"""Start user functions and proxies as real processes, and wait until they serve.

Used by `make run`, the end-to-end tests and the benchmarks, so that all three
start the system the same way a user does: `python -m examples.<name>` and
`cloudstate-proxy serve`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ManagedProcess:
    """A child process with its output in a log file."""

    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.args,
            cwd=ROOT,
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL and reap: the crash case."""
        if self.popen is not None and self.alive():
            self.popen.kill()
        if self.popen is not None:
            self.popen.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait for a clean exit, SIGKILL after ``timeout``."""
        if self.popen is None:
            return None
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def start_user_function(
    module: str, port: int, log_dir: Path, env: Mapping[str, str] | None = None
) -> ManagedProcess:
    """`python -m <module>` with HOST/PORT set, e.g. module="examples.shoppingcart"."""
    return ManagedProcess(
        name=module,
        args=[sys.executable, "-m", module],
        log_path=log_dir / f"{module.rsplit('.', 1)[-1]}-{port}.log",
        env={"HOST": "127.0.0.1", "PORT": str(port), **(env or {})},
    ).start()


def start_proxy(
    user_function_port: int,
    port: int,
    journal_url: str,
    log_dir: Path,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> ManagedProcess:
    """`cloudstate-proxy serve` in front of the user function on ``user_function_port``."""
    args = [
        sys.executable,
        "-m",
        "cloudstate_proxy",
        "serve",
        "--user-function-host",
        "127.0.0.1",
        "--user-function-port",
        str(user_function_port),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--journal-url",
        journal_url,
        *extra_args,
    ]
    return ManagedProcess(
        name=f"proxy-{port}", args=args, log_path=log_dir / f"proxy-{port}.log", env=dict(env or {})
    ).start()


def wait_serving(
    address: str, timeout: float = 60.0, process: ManagedProcess | None = None
) -> None:
    """Poll grpc.health.v1 at ``address`` until it answers SERVING.

    Raises RuntimeError with the process's log tail when the deadline passes or
    the process exits first.
    """
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and not process.alive():
                raise RuntimeError(f"{process.name} exited early:\n{process.log_tail()}")
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)  # polling interval, not synchronisation
    tail = process.log_tail() if process is not None else ""
    raise RuntimeError(f"{address} not SERVING within {timeout} s\n{tail}")


def wait_port(port: int, timeout: float = 30.0, process: ManagedProcess | None = None) -> None:
    """Poll until something accepts TCP connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise RuntimeError(f"{process.name} exited early:\n{process.log_tail()}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)  # polling interval, not synchronisation
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")
