"""What the app holds, typed: :class:`ApiState`, built once by the app factory, and the
backends its lifespan opens. Routes reach it through the :data:`StateDep` dependency."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import redis
from fastapi import Depends, FastAPI, Request
from prometheus_client import CollectorRegistry, Counter, Histogram
from redis.asyncio import Redis as AsyncRedis

from producer.api.files import FileLinks
from producer.api.hub import Hub
from producer.api.keys import KeyRing
from producer.client import Client
from producer.core.errors import Unavailable
from producer.core.metrics import RedisGauges, queue_gauges
from producer.core.redis_url import async_redis_client, redis_client
from producer.core.registry import Registry
from producer.core.settings import Settings
from producer.core.storage import LocalStorage, S3Storage, storage_from_settings
from producer.jobs import scripts as S
from producer.jobs.fleet import queue_report
from producer.jobs.store import JobStore


@dataclass
class Backends:
    """Redis and Celery, opened when the app starts and closed when it stops."""

    #: The producer client: the job store and the Celery app that sends messages.
    client: Client
    #: The broker's Redis (queue depths for admission control and /v1/queues).
    broker: redis.Redis
    #: The asyncio client (event streams, auth): at most :data:`producer.api.hub.CALLS`
    #: calls at once (``hub.gate``), so its pool stays that small.
    aredis: AsyncRedis
    #: The event streams of this process: one reader, fanned out (producer/api/hub.py).
    hub: Hub
    #: The per-key rate limit (:data:`producer.jobs.scripts.RATE_LIMIT`), on ``aredis``.
    rate_limit: Any
    #: Output storage: the OpenAI-compatible routes answer with images' bytes or URLs.
    storage: LocalStorage | S3Storage

    @classmethod
    def open(cls, settings: Settings, registry: Registry) -> Backends:
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialWithJitterBackoff

        client = Client(settings, registry=registry)

        # A client made from a URL retries nothing unless told: after a Redis restart
        # the first call on each pooled connection would fail (a 503, a stream ended).
        def retry() -> Retry:
            return Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.5), 3)

        aredis = async_redis_client(settings.redis_url, health_check_interval=30, retry=retry())

        # The reader's own client: one blocking XREAD at a time, so one connection; a
        # read blocks at most 5 s, so a socket silent for longer is a dead one.
        def reader() -> AsyncRedis:
            return async_redis_client(
                settings.redis_url, health_check_interval=30, socket_timeout=15, retry=retry()
            )

        return cls(
            client=client,
            broker=redis_client(
                settings.effective_broker_url, "ATELIER_BROKER_URL", health_check_interval=30
            ),
            aredis=aredis,
            hub=Hub(
                reader,
                aredis,
                settings.sse_heartbeat_s,
                settings.sse_queue_max,
                expire=client.store.get,
            ),
            rate_limit=aredis.register_script(S.RATE_LIMIT),
            storage=storage_from_settings(settings),
        )

    async def aclose(self) -> None:
        await self.hub.aclose()
        await self.aredis.aclose()
        self.broker.close()
        self.client.close()


class ApiMetrics:
    """The API's own Prometheus registry: requests, latency, and the queue gauges."""

    def __init__(self, state: ApiState) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "atelier_api_requests_total",
            "API requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "atelier_api_request_duration_seconds",
            "API request latency",
            ["method", "route"],
            registry=self.registry,
        )
        self.registry.register(RedisGauges(queue_gauges(state.queue_report)))

    def observe(self, method: str, route: str, status: int, started: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(time.perf_counter() - started)


@dataclass
class ApiState:
    settings: Settings
    registry: Registry
    keyring: KeyRing
    backends: Backends | None = None
    metrics: ApiMetrics = field(init=False)
    #: Signed URLs of ``file://`` outputs (:mod:`producer.api.files`).
    files: FileLinks = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = ApiMetrics(self)
        self.files = FileLinks(self.settings)

    async def open(self) -> None:
        self.backends = Backends.open(self.settings, self.registry)
        await self.backends.hub.start()

    async def aclose(self) -> None:
        if self.backends is not None:
            await self.backends.aclose()
            self.backends = None

    @property
    def up(self) -> Backends:
        if self.backends is None:  # only before the lifespan started, or after it ended
            raise Unavailable("the API is not started")
        return self.backends

    @property
    def store(self) -> JobStore:
        return self.up.client.store

    def queue_report(self) -> list[dict[str, Any]]:
        if self.backends is None:  # scraped before the lifespan started: nothing to say
            return []
        return queue_report(self.store, self.backends.broker, self.registry)


def get_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.api
    return state


def attach(app: FastAPI, state: ApiState) -> None:
    app.state.api = state


StateDep = Annotated[ApiState, Depends(get_state)]
