"""API keys: kept only as sha256 digests, a presented key compared with every one in
constant time. Configured as ``ATELIER_API_KEYS`` (and ``ATELIER_ADMIN_API_KEYS``), each
a key or ``sha256:<hex>`` of one."""

from __future__ import annotations

import hashlib
import hmac
import re


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(digest: str) -> str:
    """The public name of a key (stored as a job's ``owner``): never the key itself."""
    return "key_" + digest[:16]


def _digests(value: str) -> list[str]:
    out = []
    for item in (x.strip() for x in value.split(",")):
        if not item:
            continue
        if item.startswith("sha256:"):
            hexd = item.removeprefix("sha256:").lower()
            if not re.fullmatch(r"[0-9a-f]{64}", hexd):
                raise ValueError("an API key given as sha256:<hex> needs 64 hex digits")
            out.append(hexd)
        else:
            out.append(key_digest(item))
    return out


class KeyRing:
    def __init__(self, api_keys: str, admin_keys: str) -> None:
        self.digests = _digests(api_keys)
        self.admin = _digests(admin_keys)

    @staticmethod
    def _match(digest: str, known: list[str]) -> bool:
        found = False
        for d in known:  # no early exit: the time does not depend on which key matched
            found |= hmac.compare_digest(d, digest)
        return found

    def authenticate(self, key: str) -> str | None:
        digest = key_digest(key)
        return digest if self._match(digest, self.digests) else None

    def is_admin(self, digest: str) -> bool:
        return self._match(digest, self.admin)
