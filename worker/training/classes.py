"""Prior preservation's first phase, ``class_images``: ``num_class_images`` pictures of
``class_prompt`` made by the loaded base (before any LoRA is added), stored under
``{prefix}/{job_id}/class_images/{i}.png`` so that a resumed run reads them back
instead of making them again."""

from __future__ import annotations

import io
from typing import Any

from worker.diffusion import encode as encoding
from worker.run import Run


def class_images(run: Run, model: Any, storage: Any, level: int) -> tuple[list[Any], int]:
    """The class images (PIL), and how many were made now (the rest were read back)."""
    import torch
    from PIL import Image

    req = run.request
    n, res = req["num_class_images"], req["resolution"]
    pipe, spec = model.pipe, model.spec
    made = {
        "prompt": req["class_prompt"],
        "negative_prompt": "",
        "model": req["model"],
        "steps": spec.steps,
        "scheduler": spec.scheduler,
        "guidance_scale": spec.guidance_scale,
        "width": res,
        "height": res,
        "output_format": "png",
        "quality": 90,
    }
    out: list[Any] = []
    fresh = 0
    for i in range(n):
        run.check()
        key = storage.key(run.job_id, f"class_images/{i}.png")
        raw = _existing(storage, key)
        if raw is None:
            pipe.scheduler = model.scheduler(spec.scheduler)
            gen = torch.Generator("cpu").manual_seed(_class_seed(req["seed"], i))
            with torch.inference_mode():
                image = pipe(
                    prompt=req["class_prompt"],
                    num_inference_steps=spec.steps,
                    guidance_scale=spec.guidance_scale,
                    width=res,
                    height=res,
                    generator=[gen],
                    output_type="pil",
                ).images[0]
            run.check_fence()
            storage.put(
                key, encoding.encode(image, made, _class_seed(req["seed"], i), level), "image/png"
            )
            fresh += 1
        else:
            image = Image.open(io.BytesIO(raw), formats=["PNG"]).convert("RGB")
        out.append(image)
        run.report(i + 1, n, phase="class_images", loss=None, lr=None)
    return out, fresh


def _class_seed(seed: int, i: int) -> int:
    return (seed + 1_000_003 * (i + 1)) % 2**32


def _existing(storage: Any, key: str) -> bytes | None:
    try:
        raw: bytes = storage.get(key)
        return raw
    except FileNotFoundError:
        return None
    except Exception as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        if code in {"NoSuchKey", "404", "NotFound"}:
            return None
        raise
