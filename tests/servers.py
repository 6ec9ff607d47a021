"""Servers the tests start: on 127.0.0.1, free ports, bounded waits, and always stopped (also when a test fails)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def processes(marker: bytes) -> set[int]:
    """PIDs of this machine's processes whose command line contains `marker` (a Ray replica's title, Triton's stub)."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(int(pid))
        except OSError:  # gone meanwhile
            pass
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5.0, headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_until(check, timeout: float, what: str, interval: float = 0.25):
    """Poll `check()` until it returns something true; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


class Server:
    """A server process started in its own process group; `log` is where its output goes."""

    def __init__(self, command: list[str], log: Path, env: dict | None = None):
        self.log = log
        self.output = open(log, "wb")
        self.process = subprocess.Popen(command, stdout=self.output, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})}, start_new_session=True)

    def tail(self, lines: int = 30) -> str:
        self.output.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, url: str, timeout: float) -> None:
        def ready():
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.tail()}")
            try:
                return get(url, timeout=2)[0] == 200
            except OSError:
                return False

        try:
            wait_until(ready, timeout, f"{url} answering 200")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.tail()}") from None

    def stop(self, timeout: float = 20.0, group: bool = True) -> int:
        """SIGTERM to the group (or to the server alone, which then stops its children itself), then SIGKILL to
        the group after `timeout`; the exit code."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if group:
                    os.killpg(self.process.pid, signal.SIGTERM)
                else:
                    self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):  # whatever of the group is left
            os.killpg(self.process.pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(10)
        self.output.close()
        return self.process.returncode


@contextlib.contextmanager
def running(command: list[str], ready_url: str, log: Path, timeout: float = 120.0, env: dict | None = None):
    server = Server(command, log, env)
    try:
        server.wait_ready(ready_url, timeout)
        yield server
    finally:
        server.stop()
