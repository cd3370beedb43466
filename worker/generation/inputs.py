"""Step 1 of a generation: its input images, fetched before the GPU is taken and decoded
once it is (the init image of img2img, the mask of inpainting, control images and
reference images)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from producer.core.errors import ImageFetchFailed, ImageInvalid
from producer.core.normalized import GenerateRequest
from producer.core.settings import Settings
from producer.jobs.store import JobStore


@dataclass
class Fetched:
    """The raw bytes of a job's input images."""

    image: bytes | None
    mask: bytes | None = None
    control: list[bytes] = field(default_factory=list)
    references: list[bytes] = field(default_factory=list)


@dataclass
class Inputs:
    """The decoded inputs at the output size, and what the manifest records of them."""

    image: Any = None  # PIL image, or None for text-to-image
    mask: Any = None  # greyscale PIL image, or None unless inpainting
    image_sha256: str | None = None
    mask_sha256: str | None = None
    #: Control images at the output size (edge maps already derived), in request order.
    control: list[Any] = field(default_factory=list)
    #: Reference images as given (the IP-Adapter's image processor sizes them).
    references: list[Any] = field(default_factory=list)
    control_sha256: list[str] = field(default_factory=list)
    references_sha256: list[str] = field(default_factory=list)


def fetch(request: GenerateRequest, settings: Settings, store: JobStore) -> Fetched | None:
    """The input images' bytes; None when the job has none (text-to-image)."""
    control, refs = request.get("control", []), request.get("references", [])
    if not (request.get("image") or control or refs):
        return None
    src = request.get("image")
    image = fetch_image(src, settings, store) if src else None
    mask = fetch_image(request["mask"], settings, store, "mask") if request.get("mask") else None
    return Fetched(
        image,
        mask,
        [
            fetch_image(c["image"], settings, store, f"control.{i}.image")
            for i, c in enumerate(control)
        ],
        [
            fetch_image(r["image"], settings, store, f"references.{i}.image")
            for i, r in enumerate(refs)
        ],
    )


def fetch_image(src: str, settings: Settings, store: JobStore, field_name: str = "image") -> bytes:
    from producer.core.netguard import EgressRefused
    from producer.core.netguard import fetch as guarded_fetch

    if src.startswith("sha256:"):  # given inline; the client stored the bytes
        stored = store.get_input(src.removeprefix("sha256:"))
        if stored is None:
            raise ImageInvalid(f"{field_name}: the inline image is no longer stored")
        return stored
    try:
        return guarded_fetch(
            src,
            max_bytes=settings.max_image_bytes,
            total_timeout=settings.image_fetch_timeout_s,
            allowlist=settings.egress_allowlist,
            allow_http=settings.allow_http,
        )
    except (EgressRefused, OSError, ValueError) as exc:
        raise ImageFetchFailed(f"{field_name}: {exc}") from None


def decode(request: GenerateRequest, fetched: Fetched | None) -> Inputs:
    """The init image (and mask) at the output size; refused when unreadable, or when
    the mask's size is not the image's as given (then they do not belong together)."""
    if fetched is None:
        return Inputs()
    from PIL import Image

    from producer.core.images import open_image

    size = (request["width"], request["height"])
    inputs = Inputs()
    _decode_conditioning(request, fetched, inputs, size)
    if fetched.image is None:
        return inputs
    inputs.image_sha256 = hashlib.sha256(fetched.image).hexdigest()
    img = _open(open_image, fetched.image, "image")
    source_size = img.size  # the mask is checked against the image as given
    inputs.image = img if img.size == size else img.resize(size, Image.Resampling.LANCZOS)
    if fetched.mask is None:
        return inputs
    inputs.mask_sha256 = hashlib.sha256(fetched.mask).hexdigest()
    mask = _open(open_image, fetched.mask, "mask")
    if mask.size != source_size:
        raise ImageInvalid(
            f"mask: is {mask.width}×{mask.height} but image is "
            f"{source_size[0]}×{source_size[1]}; they must be the same size"
        )
    mask = mask.convert("L")
    inputs.mask = mask if mask.size == size else mask.resize(size, Image.Resampling.LANCZOS)
    return inputs


def _decode_conditioning(
    request: GenerateRequest, fetched: Fetched, inputs: Inputs, size: tuple[int, int]
) -> None:
    """Control images at the output size (``preprocess: canny`` derives the edge map
    there), and reference images as given."""
    from PIL import Image

    from producer.core.images import open_image
    from worker.generation.conditioning import canny

    for i, (entry, raw) in enumerate(zip(request.get("control", []), fetched.control, strict=True)):
        img = _open(open_image, raw, f"control.{i}.image")
        if img.size != size:
            img = img.resize(size, Image.Resampling.LANCZOS)
        inputs.control.append(canny(img) if entry.get("preprocess") == "canny" else img)
        inputs.control_sha256.append(hashlib.sha256(raw).hexdigest())
    for i, raw in enumerate(fetched.references):
        inputs.references.append(_open(open_image, raw, f"references.{i}.image"))
        inputs.references_sha256.append(hashlib.sha256(raw).hexdigest())


def _open(open_image: Any, raw: bytes, what: str) -> Any:
    try:
        return open_image(raw)
    except ValueError as exc:
        raise ImageInvalid(f"{what} {exc}") from None
