"""Redis URLs, plain or through Sentinel, turned into clients: every Redis connection
atelier makes (job store, API, CLI, Celery broker) goes through here.

Accepted forms (``ATELIER_REDIS_URL``, ``ATELIER_BROKER_URL``)::

    redis://[[user]:password@]host:6379/<db>        redis-py's own forms, as they are
    rediss://…  unix://…
    sentinel://[[user]:password@]host1:26379[,host2:26379…]/<service_name>[/<db>]
               [?sentinel_password=…]

In a ``sentinel://`` URL the hosts are the Sentinels (port 26379 when left out), the
service name is the one their ``sentinel monitor`` names, ``db`` defaults to 0. The
user and password authenticate to the Redis master (as redis-py and kombu use them);
``sentinel_password`` authenticates to the Sentinels themselves, when they have
``requirepass``. Special characters in passwords are %-encoded.

Redis Cluster is not supported: Celery's Redis transport keeps a queue's priority
lists and its unacked index in keys that would land on different slots, and the job
store's transition script writes a record and its event streams in one call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote

if TYPE_CHECKING:
    import redis
    import redis.asyncio

SENTINEL_SCHEME = "sentinel"
DEFAULT_SENTINEL_PORT = 26379
_PLAIN_SCHEMES = ("redis", "rediss", "unix")
_FORM = (
    "sentinel://[[user]:password@]host1:26379[,host2:26379]/<service_name>/<db>"
    "[?sentinel_password=...]"
)


@dataclass(frozen=True)
class SentinelURL:
    """A parsed ``sentinel://`` URL (:func:`parse_sentinel_url`)."""

    sentinels: list[tuple[str, int]]
    service_name: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)

    def master_kwargs(self) -> dict[str, Any]:
        """Connection arguments for the master (and replicas)."""
        out: dict[str, Any] = {"db": self.db}
        if self.username:
            out["username"] = self.username
        if self.password is not None:
            out["password"] = self.password
        return out

    def sentinel_kwargs(self, connection_kwargs: dict[str, Any], retry: Any) -> dict[str, Any]:
        """Connection arguments for the Sentinels: the socket options (what redis-py
        derives by default), their own password (never the master's), and ``retry``: no
        retry, so that a Sentinel that is down costs one refused connection before the
        next one is asked, not redis-py's default backoff (~3.5 s per discovery). The
        master connection's own retries still cover every Sentinel being unreachable
        for a moment."""
        out = {k: v for k, v in connection_kwargs.items() if k.startswith("socket_")}
        out["retry"] = retry
        if self.sentinel_password is not None:
            out["password"] = self.sentinel_password
        return out


def is_sentinel(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEME + "://")


def _bad(setting: str, reason: str) -> ValueError:
    # Never echo the URL: it may hold a password.
    return ValueError(f"{setting}: {reason}; expected {_FORM}")


def _host_port(item: str, setting: str) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6]:port
        host, sep, rest = item[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise _bad(setting, f"sentinel address {item!r} is not [ipv6]:port")
        port_text = rest[1:]
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise _bad(setting, f"sentinel address {item!r} has no host")
    if not port_text:
        return host, DEFAULT_SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad(setting, f"sentinel address {item!r} has no valid port")
    return host, int(port_text)


def parse_sentinel_url(url: str, setting: str = "ATELIER_REDIS_URL") -> SentinelURL:
    """Parse a ``sentinel://`` URL; a ``ValueError`` names ``setting`` and what is wrong."""
    if not is_sentinel(url):
        raise _bad(setting, "not a sentinel:// URL")
    # Split by hand: urllib's checks of a netloc do not expect a list of hosts.
    rest, _, query_text = url[len(SENTINEL_SCHEME) + 3 :].partition("?")
    netloc, slash, path_text = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
        if not colon:  # "secret@host": a password without its colon, most likely
            raise _bad(setting, "credentials must be [user]:password@")
    if not hosts:
        raise _bad(setting, "no sentinel address")
    sentinels = [_host_port(item.strip(), setting) for item in hosts.split(",")]
    # "svc" or "svc/3"; a trailing slash is tolerated.
    segments = path_text.split("/") if slash else []
    if segments and segments[-1] == "":
        segments = segments[:-1]
    if not segments or not segments[0]:
        raise _bad(setting, "no service name (the name Sentinel monitors) after the hosts")
    if len(segments) > 2:
        raise _bad(setting, "too many path segments")
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit():
            raise _bad(setting, f"database {segments[1]!r} is not a number")
        db = int(segments[1])
    query = parse_qs(query_text, keep_blank_values=True)
    unknown = sorted(set(query) - {"sentinel_password"})
    if unknown:
        raise _bad(setting, f"unknown option(s) {', '.join(unknown)}")
    sentinel_password = query["sentinel_password"][-1] if "sentinel_password" in query else None
    return SentinelURL(sentinels, unquote(segments[0]), db, username, password, sentinel_password)


def check_redis_url(url: str, setting: str) -> None:
    """Refuse what no client here can use, naming ``setting`` (Settings calls this)."""
    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme == SENTINEL_SCHEME:
        parse_sentinel_url(url, setting)
    elif scheme not in _PLAIN_SCHEMES:
        raise ValueError(f"{setting} must start with redis://, rediss://, unix:// or sentinel://")


def redis_client(url: str, setting: str = "ATELIER_REDIS_URL", **kwargs: Any) -> redis.Redis:
    """A redis-py client; through Sentinel, one that follows the current master (after a
    failover its next command reconnects to the new one)."""
    import redis
    import redis.sentinel
    from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
    from redis.retry import Retry

    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kwargs)
    s = parse_sentinel_url(url, setting)
    # master_for's connections get no retry unless told (a plain client gets redis-py's
    # default): give them the same, so both kinds ride out a short outage alike.
    kwargs.setdefault("retry", Retry(ExponentialWithJitterBackoff(base=0.01, cap=1), 10))
    sentinel = redis.sentinel.Sentinel(
        s.sentinels,
        sentinel_kwargs=s.sentinel_kwargs(kwargs, Retry(NoBackoff(), 0)),
        **kwargs,
        **s.master_kwargs(),
    )
    master: redis.Redis = sentinel.master_for(s.service_name)
    return master


def async_redis_client(
    url: str, setting: str = "ATELIER_REDIS_URL", **kwargs: Any
) -> redis.asyncio.Redis:
    """:func:`redis_client` for asyncio (the API's event streams)."""
    import redis.asyncio
    import redis.asyncio.sentinel
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialWithJitterBackoff, NoBackoff

    if not is_sentinel(url):
        return redis.asyncio.Redis.from_url(url, **kwargs)
    s = parse_sentinel_url(url, setting)
    kwargs.setdefault("retry", Retry(ExponentialWithJitterBackoff(base=0.01, cap=1), 10))
    sentinel = redis.asyncio.sentinel.Sentinel(
        s.sentinels,
        sentinel_kwargs=s.sentinel_kwargs(kwargs, Retry(NoBackoff(), 0)),
        **kwargs,
        **s.master_kwargs(),
    )
    master: redis.asyncio.Redis = sentinel.master_for(s.service_name)
    return master


def kombu_broker(url: str, setting: str = "ATELIER_BROKER_URL") -> tuple[str, dict[str, Any]]:
    """The broker URL and extra transport options Celery (kombu) needs for ``url``.

    kombu's Sentinel transport wants one ``sentinel://[:pw@]host:port/db`` per Sentinel,
    joined by ``;``, and the service name as the ``master_name`` transport option; the
    first URL's credentials and db are used for the master, ``sentinel_kwargs`` for the
    Sentinels. A plain URL is returned as it is, with no options.
    """
    if not is_sentinel(url):
        return url, {}
    s = parse_sentinel_url(url, setting)
    auth = ""
    if s.password is not None or s.username:
        auth = f"{quote(s.username or '', safe='')}:{quote(s.password or '', safe='')}@"
    urls = []
    for host, port in s.sentinels:
        netloc = f"[{host}]" if ":" in host else host
        urls.append(f"sentinel://{auth}{netloc}:{port}/{s.db}")
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # kombu hands sentinel_kwargs to redis-py's Sentinel as they are (in-process: these
    # options are never serialized).
    options: dict[str, Any] = {
        "master_name": s.service_name,
        "sentinel_kwargs": s.sentinel_kwargs({}, Retry(NoBackoff(), 0)),
    }
    return ";".join(urls), options
