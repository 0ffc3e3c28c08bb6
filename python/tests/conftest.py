"""Fixtures: a real aegis-broker on a private directory, and Rust instances (aegisctl serve).

The binaries come from AEGIS_BIN_DIR (default: the workspace's target/debug).
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("AEGIS_BIN_DIR", ROOT / "target" / "debug"))
DEADLINE = 30.0


def _ready(proc: subprocess.Popen, prefix: str) -> str:
    """Waits for the process's line starting with `prefix` (a deadline, not a sleep)."""
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{proc.args} exited before saying {prefix!r}")
        if line.startswith(prefix):
            return line
    raise RuntimeError(f"{proc.args} did not say {prefix!r} in time")


class TestBus:
    __test__ = False  # a fixture helper, not a test class

    def __init__(self, args: list[str]) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="aegis-py-")
        self.dir = self.tmp.name
        self.procs: list[subprocess.Popen] = []
        self.broker = self._start([str(BIN / "aegis-broker"), "--dir", self.dir, "--log", "warn", *args], "aegis-broker ready")

    def _start(self, argv: list[str], prefix: str) -> subprocess.Popen:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        _ready(p, prefix)
        self.procs.append(p)
        return p

    def serve(self, service: str, instance: str, *extra: str) -> subprocess.Popen:
        """A Rust echo instance (aegisctl serve)."""
        argv = [str(BIN / "aegisctl"), "--dir", self.dir, "serve", service, "--instance", instance, "--echo", *extra]
        return self._start(argv, "ready ")

    def aegisctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "aegisctl"), "--dir", self.dir, *args], capture_output=True, text=True, timeout=DEADLINE)

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(DEADLINE)
                except subprocess.TimeoutExpired:
                    p.kill()
        self.tmp.cleanup()


@pytest.fixture
def testbus(request):
    args = getattr(request, "param", [])
    b = TestBus(args)
    yield b
    b.close()
