"""The ``atelier`` command: a thin layer over the client, the store and the processes.

``main`` parses the command line (:mod:`producer.cli.main`); ``jobs``, ``train``,
``demo`` and ``studio`` are its larger commands, ``embedded`` the private stack (a
redis-server, a worker, the API) the demo and the studio run on, and ``common`` what
the commands share (exit codes, request options, the progress bar). The top layer of
``producer``: nothing else in it imports ``cli``.
"""

from producer.cli.main import main

__all__ = ["main"]
