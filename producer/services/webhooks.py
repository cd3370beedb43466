"""Webhook signing (Standard Webhooks) and one delivery attempt.

A delivery is a POST of the event as JSON with three headers:

- ``webhook-id``: the event id, the same on every retry (receivers deduplicate on it);
- ``webhook-timestamp``: seconds since the epoch when this attempt was signed;
- ``webhook-signature``: ``v1,`` + base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}``
  keyed by the bytes the ``whsec_`` secret encodes.

:func:`attempt` sends one and classifies the result; the dispatcher decides on retries.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

from producer.core.contract import Event, EventType, shared_data
from producer.core.netguard import EgressRefused, post
from producer.core.settings import Settings

#: The ``webhook_events`` filter name of each event type; types absent are not sent.
FILTER_NAME: dict[EventType, str] = {
    EventType.STARTED: "started",
    EventType.PROGRESS: "progress",
    EventType.OUTPUT: "output",
    EventType.SUCCEEDED: "completed",
    EventType.FAILED: "completed",
    EventType.CANCELLED: "completed",
    EventType.EXPIRED: "completed",
}


def secret_bytes(secret: str) -> bytes:
    if not secret.startswith("whsec_"):
        raise ValueError("a webhook secret starts with 'whsec_'")
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def event_body(event: Event) -> bytes:
    # Events come from the global stream, which has no previews; a retry reads the
    # job's own log, which may: a webhook never carries one.
    sent: Event = {**event, "data": shared_data(event["data"])}
    return json.dumps(sent, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class Result:
    #: ``delivered``; ``retry`` (try again later); ``failed`` (never again: a 410,
    #: or an address the guard refuses).
    outcome: str
    status: int | None = None
    error: str | None = None
    #: Seconds the receiver asked us to wait (``Retry-After``), if it did.
    retry_after_s: float | None = None
    duration_ms: int = 0
    #: Which attempt at this event this was, counting from 1.
    attempt: int = 1


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


def attempt(url: str, event: Event, settings: Settings) -> Result:
    """Send ``event`` to ``url`` once, signed; never raises."""
    if not settings.webhook_secret:
        return Result("failed", error="ATELIER_WEBHOOK_SECRET is not set")
    body = event_body(event)
    ts = int(time.time())
    headers = {
        "webhook-id": event["id"],
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(settings.webhook_secret, event["id"], ts, body),
    }
    t0 = time.perf_counter()
    try:
        status, resp_headers = post(
            url,
            body,
            headers,
            connect_timeout=settings.webhook_connect_timeout_s,
            read_timeout=settings.webhook_read_timeout_s,
            allowlist=settings.egress_allowlist,
            allow_http=settings.allow_http,
        )
    except EgressRefused as exc:
        return Result("failed", error=f"refused: {exc}", duration_ms=_since(t0))
    except (OSError, ValueError) as exc:  # connect/read timeouts, resets, bad responses
        return Result("retry", error=f"{type(exc).__name__}: {exc}", duration_ms=_since(t0))
    took = _since(t0)
    if 200 <= status < 300:
        return Result("delivered", status=status, duration_ms=took)
    if status == 410:  # Gone: the receiver wants no more
        return Result("failed", status=status, error="410 Gone: no more attempts", duration_ms=took)
    error = f"HTTP {status}"
    if 300 <= status < 400:
        error += " (redirects are not followed)"
    return Result(
        "retry",
        status=status,
        error=error,
        duration_ms=took,
        retry_after_s=parse_retry_after(resp_headers.get("retry-after")),
    )


def _since(t0: float) -> int:
    return round((time.perf_counter() - t0) * 1000)
