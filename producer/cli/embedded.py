"""The embedded stack of ``atelier demo`` and ``atelier studio``: a private redis-server,
a worker and (for the studio) the API, each a child process in one temporary folder,
all stopped whatever happens (Ctrl-C, SIGTERM, SIGHUP, or the parent dying)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from producer.core.settings import Settings, child_env, get_settings

#: How long the worker may take to build (tiny models) or download and warm up (real ones).
WORKER_START_S = 600
#: How long the API may take to listen.
API_START_S = 60


class EmbeddedStack:
    """Start with :meth:`start_worker` / :meth:`start_api` inside ``with``; leaving the
    block stops every child by its pid and removes the folder."""

    def __init__(self, model: str, device: str | None, prefix: str, **env: str) -> None:
        redis_bin = shutil.which("redis-server")
        if not redis_bin:
            raise SystemExit("atelier needs redis-server on PATH (apt-get install redis-server)")
        self.model = model
        self.redis_bin = redis_bin
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.redis_port = free_port()
        url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.env: dict[str, str] = child_env(
            ATELIER_REDIS_URL=url,
            ATELIER_BROKER_URL=url,
            ATELIER_STORAGE_URL=f"file://{self.tmp / 'store'}",
            ATELIER_DEFAULT_MODEL=model,
            ATELIER_DEVICE=device or get_settings().device,
            **env,
        )

    def __enter__(self) -> EmbeddedStack:
        # SIGTERM and SIGHUP unwind through __exit__, as Ctrl-C does.
        signal.signal(signal.SIGTERM, _raise_exit)
        signal.signal(signal.SIGHUP, _raise_exit)
        try:
            self._spawn(
                [
                    self.redis_bin,
                    "--port",
                    str(self.redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.tmp),
                ],
                None,
            )
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def settings(self) -> Settings:
        """The settings that reach this stack (for a client in this process)."""
        values: dict[str, Any] = {
            k.removeprefix("ATELIER_").lower(): v
            for k, v in self.env.items()
            if k.startswith("ATELIER_")
        }
        return Settings(**values)

    def start_worker(self) -> None:
        """Start a worker on the model; return once it has warmed up."""
        log_path = self.tmp / "worker.log"
        worker = self._spawn([sys.executable, "-m", "worker", "--model", self.model], log_path)
        deadline = time.monotonic() + WORKER_START_S
        while b"atelier worker ready" not in log_path.read_bytes():
            if worker.poll() is not None or time.monotonic() > deadline:
                print(log_path.read_text()[-3000:], file=sys.stderr)
                raise SystemExit("atelier: the worker did not start")
            time.sleep(0.2)

    def start_api(self, host: str, port: int, keys: str) -> None:
        """Start ``atelier api`` on ``host:port`` with ``keys``; return once it listens."""
        self.env["ATELIER_API_KEYS"] = keys
        log_path = self.tmp / "api.log"
        api = self._spawn(
            [sys.executable, "-m", "producer.cli", "api", "--host", host, "--port", str(port)],
            log_path,
        )
        deadline = time.monotonic() + API_START_S
        while not _listening(host, port):
            if api.poll() is not None or time.monotonic() > deadline:
                print(log_path.read_text()[-3000:], file=sys.stderr)
                raise SystemExit("atelier: the API did not start")
            time.sleep(0.1)

    def alive(self) -> bool:
        """Whether every child still runs."""
        return all(proc.poll() is None for proc in self.procs)

    def close(self) -> None:
        for proc in reversed(self.procs):
            _stop(proc)
        self.procs.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _spawn(self, argv: list[str], log_path: Path | None) -> subprocess.Popen[bytes]:
        """A child, listed at once (so :meth:`close` stops it), logging to ``log_path``."""
        if log_path is None:
            proc = subprocess.Popen(
                argv,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        else:
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    argv,
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent,
                )
        self.procs.append(proc)
        return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection(
            (host if host != "0.0.0.0" else "127.0.0.1", port), timeout=0.5
        ):
            return True
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the parent dies, however it dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: close() still cleans up
        pass


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
