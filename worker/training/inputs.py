"""A training's instance images: fetched before the device is taken (inline ones from
the job store, https through the address guard, ``storage:`` keys from the bucket, one
zip read in memory under its caps), then decoded under the image guards and cropped and
resized to ``resolution`` as diffusers' DreamBooth scripts do (shortest side resized,
centre crop; the crop's corner goes into SDXL's time ids)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from producer.core.errors import ImageFetchFailed, ImageInvalid
from producer.core.images import open_image
from producer.core.normalized import TrainingRequest
from producer.core.settings import Settings
from producer.core.train_contract import is_zip_source, read_zip
from producer.jobs.store import JobStore
from worker.generation.inputs import fetch_image


@dataclass
class Instance:
    """One training image, decoded: the crop at ``resolution``, what SDXL's time ids
    need, its caption and the sha256 of the bytes it came from."""

    image: Any  # PIL RGB image, resolution × resolution
    original_size: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]  # (top, left) of the crop, after resizing
    caption: str
    sha256: str


def fetch(
    request: TrainingRequest, settings: Settings, store: JobStore, storage: Any
) -> list[tuple[str, bytes]]:
    """Every image's bytes, named by where it came from (zip entries by their name)."""
    out: list[tuple[str, bytes]] = []
    for i, src in enumerate(request["images"]):
        field = f"images.{i}"
        limit = settings.train_zip_max_bytes if is_zip_source(src) else settings.max_image_bytes
        raw = _read(
            src.removesuffix(".zip") if src.startswith("sha256:") else src,
            settings,
            store,
            storage,
            field,
            limit,
        )
        if is_zip_source(src):
            try:
                out += read_zip(
                    raw,
                    settings.train_zip_max_entries,
                    settings.max_image_bytes,
                    settings.train_zip_max_bytes,
                )
            except ValueError as exc:
                raise ImageInvalid(f"{field}: {exc}") from None
        else:
            out.append((field, raw))
    return out


def _read(
    src: str, settings: Settings, store: JobStore, storage: Any, field: str, limit: int
) -> bytes:
    if src.startswith("storage:"):
        key = src.removeprefix("storage:")
        try:
            raw: bytes = storage.get(key)
        except FileNotFoundError:
            raise ImageFetchFailed(f"{field}: no object at storage key {key!r}") from None
        except Exception as exc:  # noqa: BLE001 - boto's errors: the object cannot be read
            raise ImageFetchFailed(f"{field}: reading {key!r}: {exc}") from None
        if len(raw) > limit:
            raise ImageInvalid(f"{field}: {key!r} is larger than {limit} bytes")
        return raw
    if src.startswith("sha256:") or limit == settings.max_image_bytes:
        return fetch_image(src, settings, store, field)
    from producer.core.netguard import EgressRefused
    from producer.core.netguard import fetch as guarded_fetch

    try:
        return guarded_fetch(
            src,
            max_bytes=limit,
            total_timeout=settings.image_fetch_timeout_s,
            allowlist=settings.egress_allowlist,
            allow_http=settings.allow_http,
        )
    except (EgressRefused, OSError, ValueError) as exc:
        raise ImageFetchFailed(f"{field}: {exc}") from None


def decode(request: TrainingRequest, fetched: list[tuple[str, bytes]]) -> list[Instance]:
    """Decode, resize and crop every image; captions replace the instance prompt."""
    from PIL import Image

    res = request["resolution"]
    captions = request.get("captions")
    if captions is not None and len(captions) != len(fetched):
        raise ImageInvalid(f"captions: {len(captions)} captions for {len(fetched)} images")
    out = []
    for i, (name, raw) in enumerate(fetched):
        try:
            img = open_image(raw)
        except ValueError as exc:
            raise ImageInvalid(f"{name}: {exc}") from None
        w, h = img.size
        scale = res / min(w, h)
        nw, nh = max(res, round(w * scale)), max(res, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        top, left = (nh - res) // 2, (nw - res) // 2
        img = img.crop((left, top, left + res, top + res))
        out.append(
            Instance(
                img,
                (h, w),
                (top, left),
                captions[i] if captions else request["instance_prompt"],
                hashlib.sha256(raw).hexdigest(),
            )
        )
    return out
