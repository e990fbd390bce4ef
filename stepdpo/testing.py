"""Real servers for the integration tests and the benchmarks (from a checkout: it runs launch/serve_reward.sh),
started by the caller and stopped by PID. Benchmarks import it from here rather than from tests/."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_available() -> bool:
    return VLLM_PYTHON.exists()


class VLLMServer:
    """launch/serve_reward.sh in its own process group; `url` once healthy."""

    def __init__(self, model: Path, method: str, log: Path, port: int | None = None, extra: list[str] | None = None):
        self.model, self.method, self.log, self.extra = model, method, log, list(extra or [])
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._log = None  # this start's log file

    def start(self) -> "VLLMServer":
        # 300 s is several times a start on a quiet 2-core machine; a loaded one may take longer (a loop's
        # evaluation died so beside two other jobs): HEALTH_TIMEOUT in the environment overrides it
        env = dict(os.environ, VLLM_PYTHON=str(VLLM_PYTHON))
        env.setdefault("HEALTH_TIMEOUT", "300")
        env.pop("HF_HUB_OFFLINE", None)  # vLLM checks the hub for local dirs too; it is offline anyway
        env["HF_HUB_OFFLINE"] = "1"
        self._close()
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            ["bash", str(REPO / "launch" / "serve_reward.sh"), str(self.model), "--cpu", "--method", self.method,
             "--port", str(self.port), *self.extra],
            stdout=subprocess.PIPE, stderr=self._log, env=env, start_new_session=True,
        )
        return self

    def wait(self, timeout: float | None = None) -> "VLLMServer":
        timeout = timeout if timeout is not None else int(os.environ.get("HEALTH_TIMEOUT", "300")) + 30
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline().decode().strip()  # the script prints the URL once healthy
        if line != self.url:
            self.stop()
            raise RuntimeError(f"vLLM ({self.method}) did not come up: {line!r}; see {self.log}")
        if time.monotonic() > deadline:
            raise RuntimeError("vLLM start took too long")
        return self

    def kill(self) -> None:
        """Hard kill, as a crash would (the whole process group)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._close()

    def _close(self) -> None:
        # The URL pipe and the log file of this start: a server killed and started again opens new ones.
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()
        if self._log:
            self._log.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._close()
        _wait_port_free(self.port)


def _wait_port_free(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.5)
