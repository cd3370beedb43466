"""Object storage for outputs: S3-compatible (boto3) or a local directory.

Keys are deterministic (``{prefix}/{job_id}/{index}.{ext}``), so a second run of a job
overwrites the same objects instead of leaving a second set.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from producer.core.errors import StorageUnavailable
from producer.core.settings import Settings


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def get(self, key: str) -> bytes: ...

    def url(self, key: str) -> str: ...

    def key(self, job_id: str, name: str) -> str: ...


class _Keys:
    prefix: str

    def key(self, job_id: str, name: str) -> str:
        return "/".join(p for p in (self.prefix, job_id, name) if p)


class LocalStorage(_Keys):
    def __init__(self, root: str | os.PathLike[str], prefix: str = "") -> None:
        self.root = Path(root).resolve()
        self.prefix = prefix.strip("/")

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"key {key!r} escapes the storage root")
        return path

    def path_of(self, key: str) -> Path | None:
        """The file ``key`` names, or None for a key that names none under the root
        (empty, absolute, with ``.``/``..`` parts, a NUL byte or a backslash, or a link
        leading out of the root)."""
        if (
            not key
            or "\x00" in key
            or "\\" in key
            or any(part in ("", ".", "..") for part in key.split("/"))
        ):
            return None
        try:
            return self._path(key)
        except (ValueError, OSError):
            return None

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a reader never sees half a file, a re-run replaces it whole.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def url(self, key: str) -> str:
        return self._path(key).as_uri()


class S3Storage(_Keys):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        presign_ttl_s: int = 86400,
        retry_s: float = 60.0,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.presign_ttl_s = presign_ttl_s
        self.retry_s = retry_s
        config = Config(
            s3={"addressing_style": "path"},
            signature_version="s3v4",  # presigned URLs that every current store accepts
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
            # boto3 ≥ 1.36 adds CRC checksums that MinIO, Ceph and older stores refuse.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=config)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        # boto3 retries each call a few times; this loop rides out a longer outage
        # (a restarting store) without regenerating the image.
        deadline = time.monotonic() + self.retry_s
        delay = 0.5
        while True:
            try:
                self.client.put_object(
                    Bucket=self.bucket, Key=key, Body=data, ContentType=content_type
                )
                return
            except (BotoCoreError, ClientError) as exc:
                if isinstance(exc, ClientError):
                    code = exc.response.get("Error", {}).get("Code", "")
                    if code in {"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId"}:
                        raise StorageUnavailable(f"s3 put {key}: {exc}") from exc
                if time.monotonic() + delay > deadline:
                    raise StorageUnavailable(f"s3 put {key}: {exc}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def get(self, key: str) -> bytes:
        obj = self.client.get_object(Bucket=self.bucket, Key=key)
        body: bytes = obj["Body"].read()
        return body

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def url(self, key: str) -> str:
        url: str = self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=self.presign_ttl_s,
        )
        return url


def storage_from_settings(settings: Settings) -> LocalStorage | S3Storage:
    parts = urlsplit(settings.storage_url)
    if parts.scheme == "file":
        # file:///abs/path, or file://./relative for a folder beside the caller.
        path = unquote(parts.netloc + parts.path) if parts.netloc == "." else unquote(parts.path)
        return LocalStorage(path or ".")
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError("ATELIER_STORAGE_URL s3://BUCKET/prefix needs a bucket")
        return S3Storage(
            parts.netloc,
            parts.path,
            endpoint_url=settings.s3_endpoint_url,
            presign_ttl_s=settings.presign_ttl_s,
            retry_s=settings.storage_retry_s,
        )
    raise ValueError(f"unsupported storage URL {settings.storage_url!r}")
