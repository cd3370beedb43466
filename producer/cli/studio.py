"""``atelier studio`` (``make studio``): the embedded stack (:mod:`producer.cli.embedded`)
with the API, so the studio page (``GET /``) runs on one machine with nothing else
installed; it prints the page's address with a fresh key and runs until Ctrl-C."""

from __future__ import annotations

import argparse
import secrets
import signal
import sys
import time

from producer.cli.common import need_worker_extra
from producer.cli.embedded import EmbeddedStack, free_port

#: Previews every fifth of a second: a tiny model's job lasts a second or two.
PREVIEW_INTERVAL_S = "0.2"


def run_studio(args: argparse.Namespace) -> int:
    """Start everything, print the address, wait for Ctrl-C (or a child dying)."""
    need_worker_extra()
    # Ctrl-C is KeyboardInterrupt even where the shell started us ignoring SIGINT (`&`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    key = "studio-" + secrets.token_urlsafe(18)
    port = args.port or free_port()
    with EmbeddedStack(
        args.model,
        args.device,
        "atelier-studio-",
        ATELIER_PROGRESS_INTERVAL_S="0.1",
        ATELIER_PREVIEW_INTERVAL_S=PREVIEW_INTERVAL_S,
    ) as stack:
        print(
            f"atelier studio: starting a worker with {args.model} (built on first use)",
            file=sys.stderr,
            flush=True,
        )
        stack.start_worker()
        stack.start_api(args.host, port, key)
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        # The key rides in the fragment: the browser never sends it to the server; the
        # page moves it to session storage and drops it from the address bar.
        print(
            f"atelier studio: open http://{host}:{port}/#key={key}\n"
            f"  API key: {key}\n  Ctrl-C stops it all.",
            flush=True,
        )
        try:
            while stack.alive():
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("atelier studio: stopping", file=sys.stderr)
            return 0
        print("atelier studio: a process of the stack exited; stopping the rest", file=sys.stderr)
        return 1
