"""A real HTTP server in a thread that receives webhooks, for tests.

Each path answers by a script: a list of behaviours used in turn (the last repeats):
an int status, ``("status", code, headers)``, ``"hang:<seconds>"`` (answer 200 after
sleeping), ``"redirect:<url>"``, or a callable returning one of those (drawn per
request). A script is looked up by the path without its query string; its turns are
counted per full path, so ``/p?job=1`` and ``/p?job=2`` each run ``/p``'s script.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.helpers import wait_until
from tests.servers import free_port


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)


class Receiver:
    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[Received] = []
        self.scripts: dict[str, list[Any]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with receiver.lock:
                    receiver.received.append(
                        Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                    )
                    script = receiver.scripts.get(self.path.split("?", 1)[0], [204])
                    n = sum(1 for r in receiver.received if r.path == self.path)
                    action = script[min(n, len(script)) - 1]
                if callable(action):
                    action = action()
                headers: dict[str, str] = {}
                if isinstance(action, str) and action.startswith("hang:"):
                    time.sleep(float(action.removeprefix("hang:")))
                    status = 200
                elif isinstance(action, str) and action.startswith("redirect:"):
                    status, headers = 302, {"Location": action.removeprefix("redirect:")}
                elif isinstance(action, tuple):
                    _, status, headers = action
                else:
                    status = int(action)
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:  # the dispatcher gave up on us meanwhile
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def script(self, path: str, *actions: Any) -> str:
        self.scripts[path] = list(actions)
        return self.url(path)

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]

    def wait_for(self, path: str, count: int, timeout: float = 30.0) -> list[Received]:
        def enough() -> list[Received] | None:
            got = self.at(path)
            return got if len(got) >= count else None

        return wait_until(
            enough, timeout, message=lambda: f"{path}: {len(self.at(path))} of {count} requests"
        )

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
