"""The fault suite's load generator: jobs submitted through the HTTP API the way a careful
client submits them, while the suite breaks things underneath."""

from __future__ import annotations

import threading
import time
from typing import Any


class Submitter(threading.Thread):
    """Submits ``count`` jobs through the HTTP API as a careful client would: each with
    its own ``Idempotency-Key``, retried (on the next replica, after a pause) on a
    connection error, a 5xx, or a 409 ``idempotency_in_progress``, until a 202.

    ``accepted`` maps each key to the job id of its first 202; ``answers`` keeps every
    202 (key, job id), replays included, so a test can check one key = one job.
    """

    def __init__(
        self,
        urls: list[str],
        count: int,
        body: dict[str, Any],
        key: str = "fault-key",
        pace_s: float = 0.0,
        deadline_s: float = 90,
        prefix: str = "fault-",
    ) -> None:
        super().__init__(name="submitter", daemon=True)
        self.urls, self.count, self.body = urls, count, body
        self.headers = {"Authorization": f"Bearer {key}"}
        self.pace_s, self.deadline_s, self.prefix = pace_s, deadline_s, prefix
        self.accepted: dict[str, str] = {}
        self.answers: list[tuple[str, str]] = []
        self.failures: list[str] = []
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def run(self) -> None:
        import httpx

        # A retry budget shared by all the requests of a load generator, not a wait.
        deadline = time.monotonic() + self.deadline_s
        turn = 0
        try:
            with httpx.Client(timeout=10) as http:
                for i in range(self.count):
                    idem = f"{self.prefix}{i}"
                    while True:
                        url = self.urls[turn % len(self.urls)]
                        turn += 1
                        try:
                            resp = http.post(
                                f"{url}/v1/jobs",
                                json={**self.body, "seed": i},
                                headers={**self.headers, "Idempotency-Key": idem},
                            )
                        except httpx.HTTPError as exc:
                            self.failures.append(f"{idem}: {type(exc).__name__}")
                        else:
                            if resp.status_code == 202:
                                with self._lock:
                                    self.answers.append((idem, resp.json()["id"]))
                                    self.accepted.setdefault(idem, resp.json()["id"])
                                break
                            retryable = resp.status_code >= 500 or (
                                resp.status_code == 409
                                and "in_progress" in resp.json()["error"]["code"]
                            )
                            self.failures.append(f"{idem}: {resp.status_code} {resp.text}")
                            if not retryable:
                                raise AssertionError(f"{idem}: {resp.status_code} {resp.text}")
                        if time.monotonic() > deadline:
                            raise AssertionError(
                                f"{idem}: no 202 in {self.deadline_s} s; "
                                f"last failures {self.failures[-3:]}"
                            )
                        time.sleep(0.2)
                    if self.pace_s:
                        time.sleep(self.pace_s)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def accepted_count(self) -> int:
        with self._lock:
            return len(self.accepted)

    def finish(self, timeout: float) -> dict[str, str]:
        self.join(timeout)
        assert not self.is_alive(), "the submitter did not finish"
        if self.error is not None:
            raise self.error
        return dict(self.accepted)
