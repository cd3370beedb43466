"""``/v1/files/{key}``: the outputs of ``file://`` storage, at signed, expiring URLs
(:mod:`producer.api.files`); no API key, the signature is the permission."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from producer.api.files import MEDIA_TYPES, OCTET_STREAM, SIGNATURE_PATTERN
from producer.api.schemas import refusals
from producer.api.state import StateDep

router = APIRouter(tags=["files"])

_BINARY = {"schema": {"type": "string", "format": "binary"}}


@router.get(
    "/v1/files/{key:path}",
    operation_id="get_file",
    summary="An output (file:// storage)",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The file.",
            "content": {t: _BINARY for t in {*MEDIA_TYPES.values(), OCTET_STREAM}},
        },
        **refusals(403, 404, 422),
    },
)
def get_file(
    key: str,
    state: StateDep,
    expires: Annotated[
        int, Query(ge=0, le=10**12, description="When the URL expires (unix seconds).")
    ],
    signature: Annotated[str, Query(pattern=SIGNATURE_PATTERN, description="The URL's signature.")],
) -> FileResponse:
    """The URLs come in the outputs of the records and events the API serves (for
    ``file://`` storage only: S3 outputs have presigned URLs). 403: the signature does not
    match or the URL has expired (read the job again for a fresh one); 404: no such
    file, or storage is not ``file://``."""
    path, media_type = state.files.open(key, expires, signature)
    max_age = max(0, min(3600, expires - int(time.time())))
    return FileResponse(
        path,
        media_type=media_type,
        headers={
            "Cache-Control": f"private, max-age={max_age}",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox",
        },
    )
