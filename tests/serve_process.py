"""`presence serve` as a real subprocess, for tests that need a process to die or get signals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

from tests.clients import APP, KEY
from tests.conftest import free_port


def _command(tcp_port: int, ws_port: int, http_port: int, args: Sequence[str]) -> list[str]:
    ports = ["--tcp-port", str(tcp_port), "--ws-port", str(ws_port), "--http-port", str(http_port)]
    return [sys.executable, "-m", "presence", "serve", *ports, *args]


def _env(env: dict[str, str] | None) -> dict[str, str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PRESENCE_", "REDIS_URL"))}
    full_env.update(env if env is not None else {"PRESENCE_APPS": f"{APP}:{KEY}"})
    return full_env


def serve_until_exit(args: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`presence serve` on free ports that is expected to exit by itself (a refused start): its exit status,
    stdout and stderr. Raises ``subprocess.TimeoutExpired`` (the process killed) when it still runs after
    ``timeout`` seconds."""
    cmd = _command(free_port(), free_port(), free_port(), args)
    return subprocess.run(cmd, env=_env(None), capture_output=True, text=True, timeout=timeout)


class ServeProcess:
    def __init__(
        self,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.tcp_port, self.ws_port, self.http_port = free_port(), free_port(), free_port()
        cmd = _command(self.tcp_port, self.ws_port, self.http_port, args)
        self.proc = subprocess.Popen(
            cmd, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=preexec_fn
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(20):
            self.kill()
            raise AssertionError("presence serve did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("presence listening"):
                self._ready.set()

    def output(self) -> str:
        return "".join(self.lines)

    def dev_key(self) -> str:
        match = re.search(r"private key (\S+)", self.output())
        assert match, self.output()
        return match.group(1)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def wait_for_line(self, pattern: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if re.search(pattern, line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} in:\n{self.output()}")
