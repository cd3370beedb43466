"""Steps 3, 5 and 6 of a generation: the safety checker's verdicts, then every image
encoded and stored with a ``job.output`` event each, then the manifest."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, cast

from producer.core.contract import (
    CONTENT_TYPES,
    EXTENSIONS,
    EventType,
    Output,
    OutputFlags,
    sweep_cells,
)
from producer.core.normalized import GenerateRequest
from producer.core.storage import LocalStorage, S3Storage
from worker.diffusion import encode as encoding
from worker.diffusion.safety import SafetyChecker, blur, placeholder
from worker.run import Run


@dataclass
class Verdicts:
    """The safety checker's flags (one per image) and what is done to flagged ones."""

    flags: list[bool]
    action: str  # "blur" or "withhold"


@dataclass
class Item:
    """One output to store: the picture (None: withheld), its seed and the request
    its PNG text records, and the fields its output entry adds."""

    image: Any
    size: tuple[int, int]
    seed: int | None
    request: dict[str, Any]
    extra: OutputFlags


@dataclass
class Stored:
    key: str
    url: str
    content_type: str
    data: bytes


def check_safety(checker: SafetyChecker | None, action: str, images: list[Any]) -> Verdicts | None:
    if checker is None or action == "off":
        return None
    return Verdicts(checker.check(images), action)


def items(req: GenerateRequest, images: list[Any], verdicts: Verdicts | None) -> list[Item]:
    """What to store, in index order: each image (blurred or withheld when flagged), and
    after a sweep's cells its contact sheet."""
    cells = sweep_cells(req)
    flags = verdicts.flags if verdicts is not None else [False] * len(images)
    shown = [
        image if not flag else blur(image) if verdicts and verdicts.action == "blur" else None
        for image, flag in zip(images, flags, strict=True)
    ]
    out = []
    for i, image in enumerate(shown):
        if cells:
            cell = cells[i]
            item = Item(
                image,
                images[i].size,
                cell["seed"],
                {**req, "steps": cell["steps"], "guidance_scale": cell["guidance_scale"]},
                {"sweep": cell["label"]},
            )
        else:
            item = Item(image, images[i].size, req["seed"] + i, dict(req), {})
        if verdicts is not None:
            item.extra["nsfw"] = flags[i]
            if flags[i] and image is not None:
                item.extra["blurred"] = True
            elif flags[i]:
                item.extra["withheld"] = True
        out.append(item)
    if cells:  # the contact sheet: one more output, after the cells
        from worker.diffusion.grid import contact_sheet

        tiles = [
            im if im is not None else placeholder(images[i].size) for i, im in enumerate(shown)
        ]
        sheet = contact_sheet(tiles, cells)
        out.append(Item(sheet, sheet.size, None, dict(req), {"contact_sheet": True}))
    return out


def output_entry(index: int, item: Item, stored: Stored | None) -> Output:
    """An output of the record (and of its ``job.output`` event); a withheld image has
    no object."""
    entry: Output = {
        "index": index,
        "key": stored.key if stored else None,
        "url": stored.url if stored else None,
        "seed": item.seed,
        "width": item.size[0],
        "height": item.size[1],
        "content_type": stored.content_type if stored else None,
        "bytes": len(stored.data) if stored else 0,
        "sha256": hashlib.sha256(stored.data).hexdigest() if stored else None,
        **item.extra,
    }
    return entry


def store_images(
    run: Run, storage: LocalStorage | S3Storage, to_store: list[Item], png_compress_level: int
) -> tuple[list[Output], float, float]:
    """Encode and store each item, with a ``job.output`` event each but the last's;
    returns the outputs and the seconds spent encoding and uploading. The last output's
    event goes with the terminal write (:func:`last_event`): one compare-and-set fewer
    per job, beside the next job's denoising, and the same events in the same order."""
    fmt = run.request["output_format"]
    content_type = CONTENT_TYPES[fmt]
    encode_s = upload_s = 0.0
    outputs: list[Output] = []
    for i, item in enumerate(to_store):
        stored = None
        if item.image is not None:
            t0 = time.perf_counter()
            data = encoding.encode(item.image, item.request, item.seed, png_compress_level)
            t1 = time.perf_counter()
            key = storage.key(run.job_id, f"{i}.{EXTENSIONS[fmt]}")
            run.check_fence()
            storage.put(key, data, content_type)
            upload_s += time.perf_counter() - t1
            encode_s += t1 - t0
            stored = Stored(key, storage.url(key), content_type, data)
        outputs.append(output_entry(i, item, stored))
        if i < len(to_store) - 1:
            run.emit(EventType.OUTPUT, {"output": outputs[-1]}, outputs=list(outputs))
    return outputs, encode_s, upload_s


def last_event(outputs: list[Output]) -> list[tuple[EventType, dict[str, Any]]]:
    """The ``job.output`` event :func:`store_images` left to the terminal write."""
    return [(EventType.OUTPUT, {"output": outputs[-1]})] if outputs else []


def manifest(
    run: Run,
    *,
    model_source: dict[str, Any],
    versions: dict[str, str],
    worker: str | None,
    checker: str | None,
    inputs: Any,
    verdicts: Verdicts | None,
    outputs: list[Output],
    timings: dict[str, int],
) -> bytes:
    """``manifest.json``: what made the outputs, enough to make them again."""
    req = cast(GenerateRequest, run.request)
    body = {
        "job_id": run.job_id,
        "request": {k: v for k, v in req.items() if k not in ("image", "mask")},
        "init_image_sha256": inputs.image_sha256,
        "safety": None
        if verdicts is None
        else {
            "checker": checker,
            "action": verdicts.action,
            "flagged": [i for i, f in enumerate(verdicts.flags) if f],
        },
        "mask_sha256": inputs.mask_sha256,
        **({"control_sha256": inputs.control_sha256} if inputs.control_sha256 else {}),
        **({"references_sha256": inputs.references_sha256} if inputs.references_sha256 else {}),
        "seeds": (
            [c["seed"] for c in sweep_cells(req)]
            or [req["seed"] + i for i in range(req["num_images"])]
        ),
        "model": model_source,
        "versions": versions,
        "worker": worker,
        "attempt": run.record["attempts"],
        "timings": timings,
        "outputs": [{k: v for k, v in o.items() if k != "url"} for o in outputs],
    }
    return json.dumps(body, indent=2, sort_keys=True).encode()
