"""Start real servers for the tests: vLLM's OpenAI server and ``ufcal serve``."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data" / "mcqa"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_in(low: int, high: int) -> int:
    """A free port in [low, high), so that the reliability tests' servers stay in a known
    range (else any free port)."""
    import random

    ports = list(range(low, high))
    random.shuffle(ports)
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def missing_tool(msg: str) -> None:
    """A test's external tool is not installed: skip loudly, or fail under
    UFCAL_REQUIRE_DEPLOY_TOOLS=1 (CI, whose `make tools` installs every one)."""
    if os.environ.get("UFCAL_REQUIRE_DEPLOY_TOOLS", "") not in ("", "0"):
        pytest.fail(msg)
    import warnings

    warnings.warn(msg, stacklevel=3)  # shown in the summary even without -rs
    pytest.skip(msg)


def cpu_env() -> dict[str, str]:
    """What vLLM's CPU backend needs here (measured: without the binding it uses one core)."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{max(0, (os.cpu_count() or 1) - 1)}",
    }


class ServerProcess:
    """A subprocess serving HTTP on ``base_url``, its output in ``log_path``."""

    def __init__(
        self, name: str, argv: list[str], env: Mapping[str, str], port: int, log_dir: Path
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = {**os.environ, **env}
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        return self

    def wait_ready(self, path: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited ({self.process.returncode}):\n{self.tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + path, timeout=2.0).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout_s} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 20.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait(10)


def vllm_server(model_dir: Path, log_dir: Path) -> ServerProcess:
    """vLLM's OpenAI-compatible server on CPU with the flags measured to work here."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        EMBEDDED_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enforce-eager",
        "--dtype",
        "float32",
        "--block-size",
        "32",
        "--max-model-len",
        "4096",
    ]
    return ServerProcess("vllm", argv, cpu_env(), port, log_dir)


def ufcal_server(log_dir: Path, name: str, env: Mapping[str, str]) -> ServerProcess:
    """``ufcal serve`` as a user runs it."""
    port = free_port()
    argv = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    return ServerProcess(name, argv, {**cpu_env(), **env}, port, log_dir)


@contextlib.contextmanager
def running(server: ServerProcess, ready_path: str, timeout_s: float) -> Iterator[ServerProcess]:
    server.start()
    try:
        server.wait_ready(ready_path, timeout_s)
        yield server
    finally:
        server.stop()


def fake_server(
    log_dir: Path,
    name: str,
    env: Mapping[str, str],
    *,
    delay: float = 0.0,
    die_after: float | None = None,
    port: int | None = None,
) -> ServerProcess:
    """``ufcal serve`` over the fake engine (``tests/fake_server.py``) as a real process."""
    port = port or free_port_in(8500, 8600)
    argv = [sys.executable, "-m", "tests.fake_server", "--port", str(port), "--delay", str(delay)]
    if die_after is not None:
        argv += ["--die-after", str(die_after)]
    return ServerProcess(name, argv, {"UFCAL_LOG_LEVEL": "warning", **env}, port, log_dir)


class ThreadedApp:
    """An ASGI app (its lifespan included) served by uvicorn in a daemon thread on a free
    port of 127.0.0.1, for tests that drive it with a real HTTP client."""

    def __init__(self, app: object) -> None:
        import threading

        import uvicorn

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,  # type: ignore[arg-type]
            host="127.0.0.1",
            port=self.port,
            log_level=None,
            log_config=None,  # uvicorn's own config would rewire the test process's loggers
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self, ready_path: str = "/readyz", timeout_s: float = 30.0) -> ThreadedApp:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError("the app's server thread exited")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + ready_path, timeout=2.0).status_code == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"the app was not ready at {ready_path} after {timeout_s} s")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(15)

    def __enter__(self) -> ThreadedApp:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
