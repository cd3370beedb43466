"""Who is calling, and whether they may call now.

- Auth: ``Authorization: Bearer <key>`` (:mod:`producer.api.keys`). 401 without a valid
  key; admin-only routes answer 403 to other keys. A job belongs to the key that created
  it: for any other key it does not exist (404).
- Per-key rate limit (GCRA in Redis, :data:`producer.jobs.scripts.RATE_LIMIT`, so every
  replica shares it): 429 and ``Retry-After``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from producer.api.errors import ApiError
from producer.api.keys import key_id
from producer.api.state import ApiState, StateDep
from producer.core import keys as K


class Caller:
    def __init__(self, digest: str, admin: bool) -> None:
        self.digest = digest
        self.owner = key_id(digest)
        self.admin = admin


_bearer = HTTPBearer(auto_error=False, description="An API key from ATELIER_API_KEYS")


async def caller(
    state: StateDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """Authenticate the bearer key and charge it one request against its rate limit."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise ApiError(401, "unauthorized", "missing bearer API key", headers=challenge)
    digest = state.keyring.authenticate(creds.credentials)
    if digest is None:
        raise ApiError(401, "unauthorized", "unknown API key", headers=challenge)
    await charge(state, digest)
    return Caller(digest, state.keyring.is_admin(digest))


async def charge(state: ApiState, digest: str) -> None:
    """One request against the key's rate limit; 429 when it is spent. On the asyncio
    client: thousands of streams opening at once take no thread and few connections."""
    settings = state.settings
    if settings.rate_limit_per_s <= 0:
        return
    interval = 1000.0 / settings.rate_limit_per_s
    async with state.up.hub.gate:
        wait_ms = await state.up.rate_limit(
            keys=[K.RATE_LIMIT + key_id(digest)], args=[interval, settings.rate_limit_burst]
        )
    if int(wait_ms) > 0:
        retry = max(1, -(-int(wait_ms) // 1000))
        raise ApiError(
            429,
            "rate_limited",
            f"rate limit of {settings.rate_limit_per_s:g}/s exceeded",
            headers={"Retry-After": str(retry)},
        )


def require_admin(who: Caller, doing: str) -> None:
    """403 unless ``who`` holds an admin key (``ATELIER_ADMIN_API_KEYS``)."""
    if not who.admin:
        raise ApiError(403, "forbidden", f"{doing} needs an admin API key (ATELIER_ADMIN_API_KEYS)")


Auth = Annotated[Caller, Depends(caller)]

#: What every route behind a key can answer: no key, the rate limit spent, Redis down
#: (the rate limit lives in Redis).
AUTH_STATUSES = (401, 429, 503)
