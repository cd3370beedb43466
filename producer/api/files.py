"""Outputs a browser can load from ``file://`` storage: the API serves them at signed,
expiring URLs of its own (S3 outputs keep their presigned URLs).

A URL is ``{base}/v1/files/{key}?expires={unix s}&signature={sig}``, ``sig`` the
base64url HMAC-SHA256 of ``{key}\\n{expires}`` under ``FILE_URL_SECRET``. It names no
API key: whoever holds it may fetch that one file until it expires, as with a presigned
S3 URL. The API gives it only to the job's owner (in the records and events it
serves), the signature binds the key, and the key must name a file under the storage
root (:meth:`producer.core.storage.LocalStorage.path_of`), so no other file can be reached.

``base`` is ``PUBLIC_URL``, or else the address the request came to
(:func:`bind_base`, called for every request by the app's middleware).
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
import hmac
import logging
import secrets
import time
from pathlib import Path
from urllib.parse import quote

from producer.api.errors import ApiError
from producer.core.contract import Output
from producer.core.settings import Settings
from producer.core.storage import LocalStorage, storage_from_settings

log = logging.getLogger("atelier.api")

#: The signature as it appears in a URL.
SIGNATURE_PATTERN = r"^[A-Za-z0-9_-]{43}$"
#: Expiry times are rounded up to this, so a record read twice gives the same URL.
ROUND_S = 300
#: What each stored extension is served as.
MEDIA_TYPES = {
    "png": "image/png",
    "webp": "image/webp",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "json": "application/json",
}
OCTET_STREAM = "application/octet-stream"

_base: contextvars.ContextVar[str] = contextvars.ContextVar("atelier_api_base", default="")


def bind_base(url: str) -> None:
    """The address this request came to (``scheme://host[:port]``), for its links."""
    _base.set(url.rstrip("/"))


class FileLinks:
    """Signs the URLs of ``file://`` outputs and checks them when they come back."""

    def __init__(self, settings: Settings) -> None:
        local = settings.storage_url.startswith("file://")
        storage = storage_from_settings(settings) if local else None
        self.storage: LocalStorage | None = storage if isinstance(storage, LocalStorage) else None
        if settings.file_url_secret is None and self.storage is not None:
            log.warning(
                "ATELIER_FILE_URL_SECRET is not set: output URLs are signed with a "
                "key of this process, and stop working when it restarts"
            )
        self.secret = (settings.file_url_secret or secrets.token_urlsafe(32)).encode()
        self.ttl_s = settings.presign_ttl_s
        self.public_url = settings.public_url

    def _sign(self, key: str, expires: int) -> str:
        mac = hmac.new(self.secret, f"{key}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def url(self, key: str, now: float | None = None) -> str:
        """A URL of ``key`` that lives at least ``PRESIGN_TTL_S``."""
        at = time.time() if now is None else now
        expires = (int(at + self.ttl_s) // ROUND_S + 1) * ROUND_S
        base = self.public_url or _base.get()
        return (
            f"{base}/v1/files/{quote(key, safe='/')}"
            f"?expires={expires}&signature={self._sign(key, expires)}"
        )

    def outputs(self, outputs: list[Output]) -> list[Output]:
        """``outputs`` with a signed URL in place of each ``file://`` one; as they
        are for S3 storage (presigned) or withheld images (no URL)."""
        if self.storage is None:
            return outputs
        return [
            {**o, "url": self.url(key)}
            if (key := o.get("key")) and str(o.get("url") or "").startswith("file:")
            else o
            for o in outputs
        ]

    def open(self, key: str, expires: int, signature: str) -> tuple[Path, str]:
        """The file a URL names and its media type; 403 for a bad signature or an
        expired URL, 404 when there is no such file here."""
        if self.storage is None:
            raise ApiError(404, "not_found", "this API serves no files: storage is not file://")
        if not hmac.compare_digest(self._sign(key, expires), signature):
            raise ApiError(
                403,
                "invalid_signature",
                "the URL's signature does not match it (changed, or signed by another server key)",
            )
        if expires <= time.time():
            raise ApiError(
                403, "url_expired", "this URL has expired: read the job again for a fresh one"
            )
        path = self.storage.path_of(key)
        if path is None or not path.is_file():
            raise ApiError(404, "not_found", "no such file (it may have been deleted)")
        return path, MEDIA_TYPES.get(path.suffix.lstrip(".").lower(), OCTET_STREAM)
