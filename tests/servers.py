"""Real servers for tests: redis-server, moto's S3 server, atelier workers.

Each runs as a subprocess on a free port and is stopped by its own pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0, proc: subprocess.Popen[Any] | None = None) -> None:
    """Until something listens on ``port``; fails at once if ``proc`` exits first."""
    # Imported here: tests/helpers.py imports this module.
    from tests.helpers import wait_until

    def listening() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_until(listening, timeout, message=f"something listens on port {port}")


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, grace: float = 15.0) -> None:
    """Stop ``proc`` by its pid: ``sig`` first, SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


class RedisServer:
    def __init__(self, workdir: Path, appendonly: bool = False) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(self.workdir),
            "--maxmemory-policy",
            "noeviction",
        ]
        args += (
            ["--appendonly", "yes", "--appendfsync", "everysec"]
            if self.appendonly
            else ["--appendonly", "no"]
        )
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            stop(self.proc, sig)


class S3Server:
    """moto's S3 server over HTTP, in its own process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, timeout=30, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class Process:
    """A subprocess of ours logging to a file: started, waited for (a port, or a line
    in its log), stopped by its pid."""

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        ready: bytes | None = None,
        port: int | None = None,
        grace: float = 15.0,
        new_session: bool = False,
    ) -> None:
        self.argv, self.env, self.log_path = argv, env, log_path
        self.ready, self.port, self.grace = ready, port, grace
        #: Lead its own process group (pgid = pid), so :meth:`kill_group` reaches every
        #: process it started and nothing of the test's.
        self.new_session = new_session
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self, wait: bool = True, timeout: float = 30.0) -> Process:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=self.new_session,
            )
        if wait:
            self.wait_ready(timeout)
        return self

    def log(self) -> str:
        return self.log_path.read_bytes()[self._log_offset :].decode(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.proc is not None
        if self.port is not None:
            wait_port(self.port, timeout, self.proc)
        if self.ready is None:
            return
        from tests.helpers import wait_until  # here: tests/helpers.py imports this module

        proc, ready = self.proc, self.ready

        def logged_ready() -> bool:
            if ready in self.log_path.read_bytes()[self._log_offset :]:
                return True
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{self.argv[2:]} exited with {proc.returncode}:\n{self.log()[-4000:]}"
                )
            return False

        wait_until(
            logged_ready, timeout, message=lambda: f"{self.argv[2:]} ready:\n{self.log()[-4000:]}"
        )

    def kill(self) -> None:
        """SIGKILL: the process dies without a word, as under an OOM kill."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def kill_group(self) -> None:
        """SIGKILL the process group this process leads (started with ``new_session``):
        the process and everything it started die at once, as when a container or a
        node is killed."""
        assert self.new_session, "kill_group needs a process started with new_session"
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to this process (SIGTERM, SIGSTOP, SIGCONT...)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGCONT)  # a stopped one could not exit
            stop(self.proc, grace=self.grace)


class Worker(Process):
    """``python -m worker`` as a subprocess, logging to a file."""

    READY = b"atelier worker ready"

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        models: list[str],
        concurrency: int | None = None,
        new_session: bool = False,
        extra_args: list[str] | None = None,
    ) -> None:
        argv = [sys.executable, "-m", "worker", *(extra_args or [])]
        for m in models:
            argv += ["--model", m]
        if concurrency:
            argv += ["--concurrency", str(concurrency)]
        super().__init__(argv, env, log_path, ready=self.READY, grace=30, new_session=new_session)
        self.models, self.concurrency = models, concurrency

    def start(self, wait: bool = True, timeout: float = 120.0) -> Worker:
        super().start(wait, timeout)
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        super().wait_ready(timeout)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "producer.cli", *args]


def api_process(env: dict[str, str], log_path: Path) -> Process:
    port = free_port()
    return Process(
        _cli("api", "--host", "127.0.0.1", "--port", str(port)), env, log_path, port=port
    )


def dispatcher_process(env: dict[str, str], log_path: Path) -> Process:
    return Process(_cli("dispatcher"), env, log_path, ready=b"ready")
